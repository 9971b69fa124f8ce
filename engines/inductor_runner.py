"""Inductor runner: a ``torch.export`` program compiled by Inductor for the scoring pipeline's fixed shapes.

``activate`` loads the plan's Mega-Cache artefacts (``torch.compiler.load_cache_artifacts``),
the exported program (``torch.export.load(plan).module()``), wraps it in
``torch.compile(mode="reduce-overhead", dynamic=False)`` — generated kernels,
plus CUDA graphs on a GPU — and runs every compiled shape once so the first
batches do not stall (``compile_seconds`` records the time per shape).

``infer`` hits a compiled shape on every call: a batch's sequence is padded to
the smallest compiled length that holds it and its rows are run in chunks of
that shape's batch size, the last chunk padded with empty timelines (token 0)
whose outputs are discarded; no call recompiles. A sequence longer than every
compiled length runs uncompiled on the exported module (logged once).

CUDA graphs are recorded per thread (torch's CUDA-graph trees keep their state
in thread-local storage), and Ray Data calls an actor from another thread than
the one that ran ``__init__`` (Ray 2.60: ``__init__`` on ``MainThread``,
``__call__`` on a ``ThreadPoolExecutor`` thread, measured): the first ``infer``
on a new thread runs every shape there once more, which records that thread's
graphs from the already compiled kernels (no recompilation), instead of
recording them lazily in the middle of scoring. Calls are serialised (one lock).

Imports torch only, never the model definition.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from engines.ort_runner import coerce_feed
from engines.runner import TensorSpec

log = logging.getLogger(__name__)

INPUTS = [TensorSpec("tokens", "int64", ("batch", "seq")), TensorSpec("days_before", "float32", ("batch", "seq")),
          TensorSpec("age_years", "float32", ("batch",)), TensorSpec("sex", "int64", ("batch",))]
OUTPUTS = [TensorSpec("probs", "float32", ("batch", 3))]
# reduce-overhead: the first call of a shape warms up, the second records its CUDA graph, the third replays.
_WARM_CALLS = 3


def scoring_shapes(token_budget: int, length_buckets: list[int]) -> list[tuple[int, int]]:
    """The (batch rows, sequence length) shapes the scoring pipeline forms: ``token_budget // L`` rows per bucket."""
    return [(max(1, token_budget // int(L)), int(L)) for L in sorted(set(int(b) for b in length_buckets))]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_identity() -> tuple[str, str]:
    """(module, version) of the torch installed here: the inductor backend's identity."""
    import torch

    return "torch", torch.__version__


def torch_platform() -> dict[str, Any]:
    """The device torch runs on here: ``"<gpu> sm<cc>"`` of CUDA device 0, or ``"cpu"``."""
    import torch

    if not torch.cuda.is_available():
        return {"kind": "cpu", "id": "cpu"}
    major, minor = torch.cuda.get_device_capability(0)
    name = torch.cuda.get_device_name(0)
    return {"kind": "gpu", "gpu": name, "compute_capability": f"{major}.{minor}", "cuda": torch.version.cuda,
            "id": f"{name} sm{major}{minor}"}


def cuda_available() -> bool:
    """True when a GPU answers and torch, installed here, can use it (torch is not imported on
    machines without a GPU)."""
    import importlib.util

    from engines.hardware import gpu_info

    if gpu_info() is None or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


class InductorRunner:
    """Runs a ``torch.export`` plan compiled per shape. ``activate`` loads and compiles, ``infer`` runs."""

    def __init__(self, plan: Path, compile_cache: Path | None, shapes: list[tuple[int, int]] | list[list[int]],
                 name: str | None = None, device: str | None = None, compile_threads: int | None = None):
        self.plan = Path(plan)
        self.compile_cache = Path(compile_cache) if compile_cache else None
        self.shapes = sorted((int(b), int(s)) for b, s in shapes)
        self.name = name or f"inductor:{self.plan.name}"
        self.device = device
        self.compile_threads = int(compile_threads) if compile_threads else None
        self.compile_seconds: dict[str, float] = {}
        self.cache_load_s: float | None = None
        self.compile_cache_counts: dict[str, int] = {}
        self.eager_calls = 0
        self._module = None
        self._compiled = None
        self._warm_threads: set[int] = set()
        self._warned_eager = False
        # One call at a time: a thread's first call records its CUDA graphs, and replays share buffers.
        self._lock = threading.Lock()

    @property
    def is_active(self) -> bool:
        return self._compiled is not None

    @property
    def input_specs(self) -> list[TensorSpec]:
        return list(INPUTS)

    @property
    def output_specs(self) -> list[TensorSpec]:
        return list(OUTPUTS)

    def activate(self) -> None:
        import torch
        import torch._dynamo.config as dynamo_config

        if self._compiled is not None:
            return
        if not self.plan.is_file():
            raise FileNotFoundError(f"inductor plan {self.plan} does not exist; build it with "
                                    "`medscreen engines ensure --backend inductor`")
        self.device = self.device or default_device()
        if self.compile_cache is not None:
            t0 = time.perf_counter()
            torch.compiler.load_cache_artifacts(self.compile_cache.read_bytes())
            self.cache_load_s = round(time.perf_counter() - t0, 3)
        self._module = torch.export.load(str(self.plan)).module().to(self.device)
        # One compiled entry per shape; dynamo's default limit (8) would send later shapes to eager.
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, len(self.shapes) + 2)
        self._compiled = torch.compile(self._module, mode="reduce-overhead", dynamic=False)
        threads = torch.get_num_threads()
        if self.compile_threads and self.compile_threads != threads:
            # Inductor's FX-graph cache key holds torch's intra-op thread count: compile under the
            # build's count, or the artefacts miss (a Ray actor runs with OMP_NUM_THREADS=1).
            torch.set_num_threads(self.compile_threads)
        try:
            for batch, seq in self.shapes:
                t0 = time.perf_counter()
                self._warm_shape(batch, seq)
                self.compile_seconds[f"{batch}x{seq}"] = round(time.perf_counter() - t0, 3)
        finally:
            torch.set_num_threads(threads)
        self._warm_threads = {threading.get_ident()}
        self.compile_cache_counts = _compile_cache_counts()
        log.info("inductor plan %s on %s: compiled %s (seconds per shape), cache load %ss, compile cache %s",
                 self.plan.name, self.device, self.compile_seconds, self.cache_load_s, self.compile_cache_counts)

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._compiled is None:
            raise RuntimeError(f"runner {self.name} is not active; call activate() first")
        arrays = coerce_feed(feed, INPUTS)
        rows, seq = arrays["tokens"].shape
        if rows == 0:
            return {"probs": np.zeros((0, 3), np.float32)}
        with self._lock:
            if self.device == "cuda" and threading.get_ident() not in self._warm_threads:
                self._warm_thread()
            shape = self.shape_for(rows, seq)
            if shape is None:
                return {"probs": self._eager(arrays, seq)}
            batch, length = shape
            out = np.empty((rows, 3), np.float32)
            for start in range(0, rows, batch):
                chunk = {k: v[start:start + batch] for k, v in arrays.items()}
                out[start:start + batch] = self._run(_pad(chunk, batch, length))[:len(chunk["tokens"])]
            return {"probs": out}

    def shape_for(self, rows: int, seq: int) -> tuple[int, int] | None:
        """The compiled (batch, length) a batch of ``rows`` × ``seq`` runs as; None: longer than all of them.

        The smallest compiled length that holds ``seq``; of its batch sizes the smallest that holds
        ``rows``, else the largest (the rows then run in chunks of it).
        """
        lengths = [s for _, s in self.shapes if s >= seq]
        if not lengths:
            return None
        length = min(lengths)
        batches = sorted(b for b, s in self.shapes if s == length)
        return next((b for b in batches if b >= rows), batches[-1]), length

    def deactivate(self) -> None:
        self._compiled = None
        self._module = None

    def __enter__(self) -> "InductorRunner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # -- internals

    def _run(self, arrays: dict[str, np.ndarray], compiled: bool = True) -> np.ndarray:
        import torch

        args = [torch.from_numpy(arrays[s.name]).to(self.device, non_blocking=True) for s in INPUTS]
        with torch.inference_mode():
            if compiled and self.device == "cuda":
                # The output lives in the CUDA graph's pool: copied out below, before the next replay.
                torch.compiler.cudagraph_mark_step_begin()
            out = (self._compiled if compiled else self._module)(*args)
            return out.float().cpu().numpy()

    def _eager(self, arrays: dict[str, np.ndarray], seq: int) -> np.ndarray:
        if not self._warned_eager:
            log.warning("inductor plan %s: sequence length %d is longer than every compiled shape %s; such "
                        "batches run uncompiled (eager) on the exported program", self.plan.name, seq, self.shapes)
            self._warned_eager = True
        self.eager_calls += 1
        return self._run(arrays, compiled=False)

    def _warm_shape(self, batch: int, seq: int) -> None:
        feed = {s.name: np.zeros((batch, seq) if len(s.shape) == 2 else (batch,), s.dtype) for s in INPUTS}
        feed["tokens"][:, 0] = 1  # one real event per row, as real batches have
        for _ in range(_WARM_CALLS):
            self._run(feed)

    def _warm_thread(self) -> None:
        t0 = time.perf_counter()
        for batch, seq in self.shapes:
            self._warm_shape(batch, seq)
        self._warm_threads.add(threading.get_ident())
        log.info("inductor plan %s: CUDA graphs recorded for thread %s in %.2fs", self.plan.name,
                 threading.current_thread().name, time.perf_counter() - t0)

    def describe(self) -> dict[str, Any]:
        """What this runner did at load: device, shapes, compile seconds per shape, cache load seconds."""
        return {"device": self.device, "shapes": [list(s) for s in self.shapes],
                "compile_seconds": dict(self.compile_seconds), "cache_load_s": self.cache_load_s,
                "compile_cache": dict(self.compile_cache_counts),
                "eager_calls": self.eager_calls}


def _compile_cache_counts() -> dict[str, int]:
    """Inductor's FX-graph cache hits, misses and bypasses so far in this process: a load that
    compiled from the plan's artefacts shows hits only."""
    from torch._dynamo.utils import counters

    return {k.removeprefix("fxgraph_cache_"): int(v) for k, v in counters["inductor"].items()
            if k.startswith("fxgraph_cache_")}


def _pad(arrays: dict[str, np.ndarray], rows: int, seq: int) -> dict[str, np.ndarray]:
    """Pad to ``rows`` rows (empty timelines) and ``seq`` positions (token 0 = padding)."""
    out = {}
    for s in INPUTS:
        a = arrays[s.name]
        if a.shape[0] == rows and (a.ndim == 1 or a.shape[1] == seq):
            out[s.name] = a
            continue
        shape = (rows,) if a.ndim == 1 else (rows, seq)
        padded = np.zeros(shape, a.dtype)
        padded[tuple(slice(0, n) for n in a.shape)] = a
        out[s.name] = padded
    return out
