"""The inference core shared by EMR and CT scoring: one Ray start, one engine-actor lifecycle, one pool size.

- :func:`ray_session` connects to ``ray.address`` or starts a local Ray, and
  shuts down only what it started;
- :class:`EngineActor` loads its engine from an :class:`engines.source.EngineSource`
  once in ``__init__``, holds it activated (:func:`engines.runner.activated`)
  for the actor's life and releases it once;
- :func:`engine_actor_pool` sizes the actor pool and its per-actor resources.

The stage actors (:class:`inference.emr_actors.ScoreActor`,
:class:`inference.ct_stages.SegmentSeries`) subclass :class:`EngineActor` and
add only the method their pipeline calls (``score``, ``__call__``).
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from conf.settings import Settings
from engines.runner import Runner, activated
from engines.source import EngineSource


@contextlib.contextmanager
def ray_session(settings: Settings) -> Iterator[bool]:
    """Connect to ``settings.ray.address`` (else ``RAY_ADDRESS``) or start a local Ray; shut it down on exit
    only if started here.

    Yields True when this call started Ray. A Ray already initialised in this
    process (a test fixture, a benchmark) is used as it is.
    """
    import ray

    started = False
    if not ray.is_initialized():
        # Local Ray on a laptop/CI has no auth; a cluster address brings its own.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Unset means a Ray of our own: never attach to whatever cluster another program runs here.
        address = settings.ray.address or os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        started = True
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


def engine_actor_pool(settings: Settings, gpus: int, default_per_gpu: int) -> tuple[int, dict[str, Any]]:
    """Size and per-actor resources of an engine actor pool (EMR and CT scoring).

    With GPUs, ``ray.actors_per_gpu`` actors share each one (unset: the
    pipeline's ``default_per_gpu``, what was measured best for it); without,
    actors take fractional CPUs so a pool cannot starve the read tasks.
    ``ray.num_actors`` overrides the size. ``ray.actor_resources`` (custom
    resources) pins the actors to the nodes that offer them.
    """
    extra = {"resources": dict(settings.ray.actor_resources)} if settings.ray.actor_resources else {}
    if gpus:
        per_gpu = settings.ray.actors_per_gpu or default_per_gpu
        return (settings.ray.num_actors or gpus * per_gpu,
                {"num_gpus": 1 / per_gpu, "num_cpus": settings.ray.actor_num_cpus, **extra})
    return settings.ray.num_actors or 1, {"num_cpus": settings.ray.actor_num_cpus, **extra}


class EngineActor:
    """One engine per actor for the actor's whole life: loaded and activated once, released once.

    ``runner`` (active), ``metadata`` and ``fingerprint`` are what subclasses
    use; ``actor_id`` and ``incarnation`` (fresh when Ray restarts the actor)
    tag their records. ``device_lock`` serialises engine calls where an actor
    runs several calls at once (``ray.actor_threads``): one call holds the
    device while the others do their host work.
    """

    def __init__(self, source: EngineSource, precision: str):
        t0 = time.perf_counter()
        # Start-up before the engine load: actor scheduling, imports, unpickling the arguments.
        self.init_started_at = time.time()
        self.device_lock = threading.Lock()
        runner, self.metadata = source.load(precision)
        source_load_s = time.perf_counter() - t0
        self._held = contextlib.ExitStack()
        self.runner: Runner = self._held.enter_context(activated(runner))
        self.fingerprint = str(self.metadata.get("fingerprint"))
        # A restarted actor runs __init__ again: a fresh incarnation id under the same actor id.
        self.incarnation = uuid.uuid4().hex[:12]
        self.actor_id = _actor_id()
        # Start-up as the run's metrics report it: engine load + activation, and when the actor was ready.
        self.engine_load_s = round(time.perf_counter() - t0, 3)
        self.ready_at = time.time()
        # What the engine did at load where it says (the inductor plan: compile-cache hits and misses).
        described = getattr(self.runner, "describe", None)
        self.engine_load = {k: v for k, v in (described() if described else {}).items()
                            if k in ("compile_cache", "cuda_graphs", "compile_mode", "compile_seconds",
                                     "cache_load_s", "load_seconds")}
        # Finding, verifying and opening the plan (source.load) before its activation.
        self.engine_load["source_load_s"] = round(source_load_s, 3)

    def close(self) -> None:
        """Deactivate the engine (idempotent)."""
        self._held.close()

    def __del__(self) -> None:
        held: Any = getattr(self, "_held", None)
        if held is not None:
            try:
                held.close()
            except Exception:  # noqa: BLE001 — best effort at interpreter teardown
                pass


def _actor_id() -> str:
    try:
        import ray

        # Outside a Ray worker (benchmarks, unit use) asking for the runtime context would connect
        # to whatever cluster runs on this machine.
        if ray.is_initialized():
            return ray.get_runtime_context().get_actor_id() or f"pid-{os.getpid()}"
    except Exception:  # noqa: BLE001 — no Ray here
        pass
    return f"pid-{os.getpid()}"
