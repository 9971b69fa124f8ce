"""Inductor plan start-up: does a plan's compile artefact make the compile warm where scoring loads it?

    python bench/inductor_warm_start.py [--precision fp16] [--token-budget 4096] [--buckets 64]

Builds an inductor plan of the committed emr_risk model in this process (as
``engines ensure`` does), then loads it, each time with an empty Inductor cache
directory so only the plan's artefacts can help, in:

- ``fresh_process``: a new Python process (as a CLI run would);
- ``ray_task``: a Ray task (a Ray worker process, ``OMP_NUM_THREADS=1``);
- ``ray_actor``: a Ray actor loading it in ``__init__``, as the EMR scoring
  feed's engine actors do (``num_gpus`` where the machine has a GPU).

For each it reports the activate seconds, the FX-graph cache hits and misses,
how its first FX-graph cache key differs from the build's (Inductor's hash lines
that only one side has, and the pickled bytes of differing example inputs), and a fingerprint of how that process pickles a cache-key input
(``torch._inductor.codecache`` hashes pickled tensor metadata): the sha256 of
the pickled metadata of a fake tensor, and the ``copyreg`` reducers registered
for torch types. Where a loader misses and the build hits, these show what
differs. Runs on a CPU machine too (Inductor's C++ kernels). Prints one JSON
object last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reporting import emit, reported  # noqa: E402  (bench/, beside this script)


def pickling_fingerprint() -> dict[str, Any]:
    """How this process pickles a cache-key tensor input (see the module docstring)."""
    import copyreg
    import hashlib
    import pickle

    import torch
    from torch._inductor.codecache import extract_tensor_metadata_for_cache_key
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with FakeTensorMode():
        fake = torch.empty(1024, 256, dtype=torch.float16, device=device)
    meta = extract_tensor_metadata_for_cache_key(fake)
    blob = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
    torch_reducers = sorted(f"{getattr(k, '__module__', '?')}.{getattr(k, '__qualname__', k)}"
                            for k in copyreg.dispatch_table if "torch" in str(getattr(k, "__module__", "")))
    return {"metadata_sha256": hashlib.sha256(blob).hexdigest()[:16], "metadata_bytes": len(blob),
            "copyreg_torch_reducers": torch_reducers, "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def record_cache_keys() -> list[dict[str, Any]]:
    """From now on, record each AOTAutograd and FX-graph cache key this process computes: the kind, the
    key, the cache's own per-component hash lines, and the bytes the cache's pickler makes of the first
    example inputs (what the per-input hashes are taken over). A lookup that hits the AOTAutograd cache
    computes no FX-graph key; one that misses computes both."""
    import torch._functorch._aot_autograd.autograd_cache as autograd_cache
    import torch._inductor.codecache as codecache

    seen: list[dict[str, Any]] = []

    def wrap(module: Any, name: str, pickler_cls: Any) -> None:
        original = getattr(module, name)

        def recorded(gm, example_inputs, *args, **kwargs):
            key, lines = original(gm, example_inputs, *args, **kwargs)
            graph = gm.gm if hasattr(gm, "gm") else gm
            raw = []
            for x in list(example_inputs)[:2]:
                try:
                    raw.append(pickler_cls(graph).dumps(x).hex())
                except Exception as exc:  # noqa: BLE001 — a probe reports what it could not pickle
                    raw.append(repr(exc))
            seen.append({"kind": name, "key": key, "lines": list(lines), "raw_inputs": raw})
            return key, lines

        setattr(module, name, recorded)

    wrap(codecache, "compiled_fx_graph_hash", codecache.FxGraphCachePickler)
    wrap(autograd_cache, "autograd_cache_key", autograd_cache.AOTAutogradCachePickler)
    return seen


def load_plan(plan: str) -> dict[str, Any]:
    """Activate the plan's runner with an empty Inductor cache directory; what it did."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="medscreen-inductor-")
    sys.path.insert(0, str(REPO))
    from engines import cache

    keys = record_cache_keys()
    path = Path(plan)
    runner = cache.runner_for(path, cache.read_metadata(path))
    t0 = time.perf_counter()
    with runner:
        described = runner.describe()
    return {"activate_s": round(time.perf_counter() - t0, 2), "compile_cache": described["compile_cache"],
            "cuda_graphs": described.get("cuda_graphs"), "pickling": pickling_fingerprint(), "keys": keys}


def key_difference(build: list[dict[str, Any]], loaded: list[dict[str, Any]]) -> dict[str, Any]:
    """How a loader's first cache key differs from the build's: the hash lines only one side has, and
    where an example input's line differs, the pickled bytes of both sides from the first byte that differs."""
    counts = {"build_keys": [k["kind"] for k in build], "loaded_keys": [k["kind"] for k in loaded]}
    if not build or not loaded:
        return counts
    b, l = build[0], loaded[0]
    only_build = [x for x in b["lines"] if x not in l["lines"]]
    only_loaded = [x for x in l["lines"] if x not in b["lines"]]
    raw = []
    for rb, rl in zip(b["raw_inputs"], l["raw_inputs"]):
        first = next((i for i, (x, y) in enumerate(zip(rb, rl)) if x != y), min(len(rb), len(rl)))
        if rb != rl:
            start = max(0, first - 80) & ~1
            raw.append({"first_differing_hex_char": first, "build": rb[start:start + 400],
                        "loaded": rl[start:start + 400], "build_len": len(rb), "loaded_len": len(rl)})
    return {**counts, "kind": [b["kind"], l["kind"]], "same_key": b["key"] == l["key"], "only_build": [x[:400] for x in only_build[:6]],
            "only_loaded": [x[:400] for x in only_loaded[:6]], "raw_inputs_differ": raw}


class _LoadInActor:
    """A Ray actor that loads the plan once, as an engine actor does in ``__init__``."""

    def __init__(self, plan: str):
        self.result = load_plan(plan)

    def loaded(self) -> dict:
        return self.result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", default="fp16", choices=["fp32", "fp16"])
    p.add_argument("--token-budget", type=int, default=4096)
    p.add_argument("--buckets", default="64", help="comma-separated scoring.length_buckets")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import subprocess

    import ray

    from conf.settings import load_settings
    from engines import cache

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="medscreen-bench-"))
    result: dict[str, Any] = {"bench": "inductor_warm_start", "precision": args.precision}
    with reported(result, workdir, keep_workdir=args.workdir is not None):
        settings = load_settings({"engines.cache_dir": str(workdir / "engines"),
                                  "scoring.token_budget": args.token_budget,
                                  "scoring.length_buckets": [int(b) for b in args.buckets.split(",")]})
        # An empty Inductor cache for the build as well: it computes its keys instead of hitting an old entry.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="medscreen-inductor-")
        built_keys = record_cache_keys()
        t0 = time.perf_counter()
        plan = cache.build(settings, backend="inductor", precision=args.precision)
        meta = cache.read_metadata(plan)
        result["build"] = {"seconds": round(time.perf_counter() - t0, 1), "fingerprint": meta["fingerprint"],
                           "shapes": meta["shapes"], "compile_threads": meta.get("compile_threads"),
                           "pickling": pickling_fingerprint()}

        code = ("import json, sys; sys.path.insert(0, sys.argv[2]); "
                "from inductor_warm_start import load_plan; print(json.dumps(load_plan(sys.argv[1])))")
        done = subprocess.run([sys.executable, "-c", code, str(plan), str(REPO / "bench")], capture_output=True,
                              text=True, timeout=900, cwd=REPO)
        result["fresh_process"] = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                                   else {"error": done.stderr[-1500:]})

        ray.init(include_dashboard=False, configure_logging=False)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        resources = {"num_gpus": 0.5} if gpus else {"num_cpus": 0.5}
        result["ray_task"] = ray.get(ray.remote(**resources)(load_plan).remote(str(plan)))
        actor = ray.remote(**resources)(_LoadInActor).remote(str(plan))
        result["ray_actor"] = ray.get(actor.loaded.remote())
        for where in ("fresh_process", "ray_task", "ray_actor"):
            loaded = result[where].pop("keys", None)
            if loaded is not None:
                result[where]["key_vs_build"] = key_difference(built_keys, loaded)
        result["build"]["keys"] = [k["kind"] for k in built_keys]
    return emit(result)


if __name__ == "__main__":
    raise SystemExit(main())
