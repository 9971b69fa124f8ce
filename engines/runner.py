"""The one runner interface every backend implements (Polygraphy's shape)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

# The precisions a plan (and so a runner) can have; engines.precision produces them.
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                      # numpy dtype name: "float32", "int64", ...
    shape: tuple[int | str, ...]    # symbolic dims as strings ("batch", "seq")


@runtime_checkable
class Runner(Protocol):
    """Load once (``activate``), ``infer`` many times, release (``deactivate``)."""

    name: str

    @property
    def input_specs(self) -> list[TensorSpec]: ...

    @property
    def output_specs(self) -> list[TensorSpec]: ...

    def activate(self) -> None: ...

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def deactivate(self) -> None: ...


@contextlib.contextmanager
def activated(runner: Runner) -> Iterator[Runner]:
    """``with activated(runner) as r: r.infer(...)`` — activate on entry, deactivate on exit (Polygraphy's
    ``with runner:``), for any backend behind the :class:`Runner` interface."""
    runner.activate()
    try:
        yield runner
    finally:
        runner.deactivate()
