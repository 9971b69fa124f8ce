"""Inductor runner: a ``torch.export`` program compiled by Inductor for the scoring pipeline's fixed shapes.

``activate`` loads the plan's Mega-Cache artefacts (``torch.compiler.load_cache_artifacts``),
the exported program (``torch.export.load(plan).module()``), wraps it in
``torch.compile(dynamic=False)`` and prepares every compiled shape once
(``compile_seconds`` records the time per shape), under the thread count the
plan was built with (Inductor's cache key holds it).

On a GPU each shape is then captured in one CUDA graph of its own, with static
device inputs and output and page-locked host buffers beside them: a call
copies the batch into the host buffers (padding in place), issues one
asynchronous copy per input, replays the graph, copies the probabilities back
and synchronises once. No guard evaluation, no allocation and no pageable
copy per call: at small batches these cost more than the model itself. The
graphs share one memory pool (calls are serialised and every output is copied
out before the next replay) and, unlike ``mode="reduce-overhead"``'s
thread-local CUDA-graph trees, replay from any thread (Ray Data calls an actor
from another thread than the one that ran ``__init__``).

``infer`` hits a compiled shape on every call: a batch's sequence is padded to
the smallest compiled length that holds it and its rows are run in chunks of
that shape's batch size, the last chunk padded with empty timelines (token 0)
whose outputs are discarded; no call recompiles. A sequence longer than every
compiled length runs uncompiled on the exported module (logged once).

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
# Calls per shape before capture: the first compiles (or loads from the cache), the second runs warm.
_WARM_CALLS = 2
# How the plan is compiled and run, per engines.inductor_compile: part of the plan's cache key (the compile
# artefacts hold this recipe).
COMPILE_RECIPES = {
    "per_shape": "torch.compile(dynamic=False), one CUDA graph per shape, memory formats pickled by name",
    "dynamic": "torch.compile(dynamic=True), one CUDA graph per shape, memory formats pickled by name",
}


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


def memory_format_named(name: str) -> Any:
    """``torch.<name>`` (a ``torch.memory_format``): the unpickling side of :func:`pin_cache_key_pickling`."""
    import torch

    return getattr(torch, name)


def _reduce_memory_format(fmt: Any) -> tuple[Any, tuple[str]]:
    return memory_format_named, (str(fmt).removeprefix("torch."),)


def pin_cache_key_pickling() -> None:
    """Make the bytes of Inductor's cache keys independent of the process's import history.

    Inductor and AOTAutograd hash pickled tensor metadata. A ``torch.memory_format``
    (``contiguous_format``) has no ``__module__``, so pickle names it after the first
    module in ``sys.modules`` that holds it: ``torch`` in a fresh process, another
    module in a Ray GPU worker. Every input's hash then differed, and the plan's
    artefacts missed in the scoring actors (measured on an H200:
    ``bench/inductor_warm_start.py``). A ``copyreg`` reducer names it by this
    function instead, the same in every process; build and load both call this
    before compiling, so their keys agree. Idempotent.
    """
    import copyreg

    import torch

    kind = type(torch.contiguous_format)
    if copyreg.dispatch_table.get(kind) is not _reduce_memory_format:
        copyreg.pickle(kind, _reduce_memory_format)


class InductorRunner:
    """Runs a ``torch.export`` plan compiled per shape. ``activate`` loads and compiles, ``infer`` runs."""

    def __init__(self, plan: Path, compile_cache: Path | None, shapes: list[tuple[int, int]] | list[list[int]],
                 name: str | None = None, device: str | None = None, compile_threads: int | None = None,
                 compile_mode: str = "per_shape"):
        self.plan = Path(plan)
        self.compile_cache = Path(compile_cache) if compile_cache else None
        self.shapes = sorted((int(b), int(s)) for b, s in shapes)
        self.name = name or f"inductor:{self.plan.name}"
        self.device = device
        self.compile_threads = int(compile_threads) if compile_threads else None
        if compile_mode not in COMPILE_RECIPES:
            raise ValueError(f"compile_mode {compile_mode!r}: one of {sorted(COMPILE_RECIPES)}")
        self.compile_mode = compile_mode
        self.compile_seconds: dict[str, float] = {}
        self.cache_load_s: float | None = None
        self.compile_cache_counts: dict[str, int] = {}
        # Seconds of activate before the shapes: importing torch._dynamo, loading the program, moving it to
        # the device.
        self.load_seconds: dict[str, float] = {}
        self.eager_calls = 0
        self._module = None
        self._compiled = None
        self._slots: dict[tuple[int, int], _Slot] = {}
        self._warned_eager = False
        # One call at a time: the static buffers and the graphs' memory pool are shared.
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
        t_start = time.perf_counter()
        import torch
        import torch._dynamo.config as dynamo_config

        if self._compiled is not None:
            return
        # torch itself is usually imported already (the plan's platform check); torch._dynamo is not.
        self.load_seconds = {"import_dynamo": round(time.perf_counter() - t_start, 3)}
        if not self.plan.is_file():
            raise FileNotFoundError(f"inductor plan {self.plan} does not exist; build it with "
                                    "`medscreen engines ensure --backend inductor`")
        self.device = self.device or default_device()
        pin_cache_key_pickling()  # before anything computes a cache key (build and load alike)
        if self.compile_cache is not None:
            t0 = time.perf_counter()
            torch.compiler.load_cache_artifacts(self.compile_cache.read_bytes())
            self.cache_load_s = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        program = torch.export.load(str(self.plan))
        self.load_seconds["export_load"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        self._module = program.module().to(self.device)
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.load_seconds["module_to_device"] = round(time.perf_counter() - t0, 3)
        # per_shape: one compiled entry per shape; dynamo's default limit (8) would send later shapes to
        # eager. dynamic: one entry with symbolic batch and length serves them all.
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, len(self.shapes) + 2)
        self._compiled = torch.compile(self._module, dynamic=self.compile_mode == "dynamic")
        threads = torch.get_num_threads()
        if self.compile_threads and self.compile_threads != threads:
            # Inductor's FX-graph cache key holds torch's intra-op thread count: compile under the
            # build's count, or the artefacts miss (a Ray actor runs with OMP_NUM_THREADS=1).
            torch.set_num_threads(self.compile_threads)
        counts_before = _compile_cache_counts()
        pool = torch.cuda.graph_pool_handle() if self.device == "cuda" else None
        try:
            for batch, seq in self.shapes:
                t0 = time.perf_counter()
                self._slots[(batch, seq)] = self._prepare(batch, seq, pool)
                self.compile_seconds[f"{batch}x{seq}"] = round(time.perf_counter() - t0, 3)
        finally:
            torch.set_num_threads(threads)
        # This runner's own lookups: the process's counters may hold earlier compiles (a build, a gate).
        self.compile_cache_counts = {k: v - counts_before.get(k, 0) for k, v in _compile_cache_counts().items()
                                     if v - counts_before.get(k, 0)}
        log.info("inductor plan %s on %s: compiled %s (seconds per shape), cache load %ss, compile cache %s, "
                 "CUDA graphs %d", self.plan.name, self.device, self.compile_seconds, self.cache_load_s,
                 self.compile_cache_counts, sum(slot.graph is not None for slot in self._slots.values()))

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._compiled is None:
            raise RuntimeError(f"runner {self.name} is not active; call activate() first")
        arrays = coerce_feed(feed, INPUTS)
        rows, seq = arrays["tokens"].shape
        if rows == 0:
            return {"probs": np.zeros((0, 3), np.float32)}
        with self._lock:
            shape = self.shape_for(rows, seq)
            if shape is None:
                return {"probs": self._eager(arrays, seq)}
            slot = self._slots[shape]
            out = np.empty((rows, 3), np.float32)
            for start in range(0, rows, slot.batch):
                chunk = {k: v[start:start + slot.batch] for k, v in arrays.items()}
                n = len(chunk["tokens"])
                out[start:start + n] = slot.run(chunk, self._compiled)[:n]  # copied out before the next run
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
        self._slots = {}

    def __enter__(self) -> "InductorRunner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # -- internals

    def _prepare(self, batch: int, seq: int, pool: Any) -> "_Slot":
        """Compile (or load from the cache) and warm one shape; on a GPU capture its CUDA graph."""
        import torch

        slot = _Slot(batch, seq, self.device)
        with torch.inference_mode():
            if self.device != "cuda":
                for _ in range(_WARM_CALLS):
                    slot.out = self._compiled(*slot.inputs)
                return slot
            # Warm on a side stream before capturing, as torch.cuda.graphs documents.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(_WARM_CALLS):
                    slot.out = self._compiled(*slot.inputs)
            torch.cuda.current_stream().wait_stream(side)
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    slot.out = self._compiled(*slot.inputs).float()
            except Exception as exc:  # noqa: BLE001 — the shape still runs compiled, without a graph
                log.warning("inductor plan %s: CUDA graph capture of shape %dx%d failed (%s: %s); that shape "
                            "runs compiled without a graph", self.plan.name, batch, seq, type(exc).__name__, exc)
                return slot
        slot.graph = graph
        return slot

    def _eager(self, arrays: dict[str, np.ndarray], seq: int) -> np.ndarray:
        import torch

        if not self._warned_eager:
            log.warning("inductor plan %s: sequence length %d is longer than every compiled shape %s; such "
                        "batches run uncompiled (eager) on the exported program", self.plan.name, seq, self.shapes)
            self._warned_eager = True
        self.eager_calls += 1
        args = [torch.from_numpy(arrays[s.name]).to(self.device) for s in INPUTS]
        with torch.inference_mode():
            return self._module(*args).float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        """What this runner did at load: device, shapes, compile seconds per shape, cache load seconds."""
        return {"device": self.device, "shapes": [list(s) for s in self.shapes], "compile_mode": self.compile_mode,
                "compile_seconds": dict(self.compile_seconds), "cache_load_s": self.cache_load_s,
                "load_seconds": dict(self.load_seconds),
                "compile_cache": dict(self.compile_cache_counts),
                "cuda_graphs": sum(slot.graph is not None for slot in self._slots.values()),
                "eager_calls": self.eager_calls}


def _compile_cache_counts() -> dict[str, int]:
    """Inductor's FX-graph cache hits, misses and bypasses so far in this process (cumulative;
    ``activate`` keeps its own share)."""
    from torch._dynamo.utils import counters

    return {k.removeprefix("fxgraph_cache_"): int(v) for k, v in counters["inductor"].items()
            if k.startswith("fxgraph_cache_")}


class _Slot:
    """One compiled shape: static device inputs, on a GPU page-locked host buffers and a CUDA graph."""

    def __init__(self, batch: int, seq: int, device: str):
        import torch

        self.batch, self.seq, self.device = batch, seq, device
        self.graph: Any = None
        self.out: Any = None
        pinned = device == "cuda"
        self.host = {s.name: torch.zeros((batch, seq) if len(s.shape) == 2 else (batch,), dtype=getattr(torch, s.dtype),
                                         pin_memory=pinned) for s in INPUTS}
        self.host["tokens"][:, 0] = 1  # one real event per row while warming, as real batches have
        self.host_np = {k: v.numpy() for k, v in self.host.items()}
        self.inputs = [self.host[s.name].to(device) for s in INPUTS]
        self.host_out = torch.empty((batch, 3), dtype=torch.float32, pin_memory=pinned)

    def run(self, chunk: dict[str, np.ndarray], compiled: Any) -> np.ndarray:
        """Scores for ``chunk`` (at most ``batch`` rows, at most ``seq`` positions), padded here.

        On a GPU the array is a view of the page-locked output buffer, valid until the next run."""
        import torch

        for s in INPUTS:
            a, host = chunk[s.name], self.host_np[s.name]
            if a.shape == host.shape:
                np.copyto(host, a)
            else:  # pad: empty timelines past the rows, token 0 past the positions
                host.fill(0)
                host[tuple(slice(0, n) for n in a.shape)] = a
        if self.device != "cuda":
            with torch.inference_mode():
                return compiled(*[self.host[s.name] for s in INPUTS]).float().numpy()
        for s, static in zip(INPUTS, self.inputs):
            static.copy_(self.host[s.name], non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
            out = self.out
        else:
            with torch.inference_mode():
                out = compiled(*self.inputs).float()
        self.host_out.copy_(out, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return self.host_out.numpy()
