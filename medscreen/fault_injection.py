"""Test-only fault hooks for the CLI's scoring commands: off unless a test sets the variable.

The fault tests need a real process death at a known point of a real run (an
Airflow task's scoring subprocess killed after some fragments are staged), so
that its retry has something to resume. Signals from outside cannot aim that
well; this hook kills the process from inside, with SIGKILL, so no Python
clean-up, ``finally`` block or atexit handler runs — as when the kernel's OOM
killer or an operator's ``kill -9`` ends it.

``MEDSCREEN_TEST_FAULT_SIGKILL_AFTER_FRAGMENTS=N:MARKER`` arms it: after the
N-th fragment this process stages, it creates MARKER and kills itself. When
MARKER already exists the hook stays off, so the fault fires once and the
retry runs clean. Unset (the default, and always in production), the CLI
passes no hook at all.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Callable

FAULT_ENV = "MEDSCREEN_TEST_FAULT_SIGKILL_AFTER_FRAGMENTS"


def sigkill_after_fragments() -> Callable[[int, int], None] | None:
    """The ``on_fragment_done`` hook :data:`FAULT_ENV` asks for, or None when it is unset or spent."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    count, sep, marker = spec.partition(":")
    if not sep or not marker or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{FAULT_ENV} must be N:MARKER_FILE (N ≥ 1), got {spec!r}")
    if os.path.exists(marker):
        return None
    after = int(count)

    def hook(fragment: int, done: int) -> None:
        if done >= after:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook
