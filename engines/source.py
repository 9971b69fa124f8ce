"""Where scoring actors get their engine (EMR and CT alike): the engine cache or the reference ONNX.

An :class:`EngineSource` is a small picklable value handed to every actor;
``load`` returns a runner that is not yet activated (the actor activates it
once, :mod:`inference.actors`) and the metadata whose fingerprint score and
finding rows carry.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from conf.settings import Settings
from engines.runner import Runner


class EngineSource(Protocol):
    """``load(precision)`` → (runner, not yet activated; its metadata)."""

    def load(self, precision: str) -> tuple[Runner, dict[str, Any]]: ...


@dataclass(frozen=True)
class CachedEngine:
    """The engine cache (:mod:`engines.cache`): verified, gated engines only, unless forced."""

    settings: Settings
    model: str = "emr_risk"
    backend: str | None = None
    force_ungated: bool = False

    def load(self, precision: str) -> tuple[Runner, dict[str, Any]]:
        from engines import cache

        return cache.load_runner(self.settings, model=self.model, backend=self.backend,
                                 precision=precision, force_ungated=self.force_ungated)


@dataclass(frozen=True)
class ReferenceEngine:
    """The card's fp32 ONNX itself on ONNX Runtime: the reference every candidate is gated against.

    Needs no gate (it is what gates compare to) and no build; the fingerprint
    names the exact artifact and runtime. ``intra_op_threads`` 0 = ORT's default.
    """

    settings: Settings
    model: str = "ct_nodule"
    intra_op_threads: int = 0

    def load(self, precision: str) -> tuple[Runner, dict[str, Any]]:
        import onnxruntime as ort

        from engines.model_card import load_card
        from engines.ort_runner import OrtRunner, default_providers

        if precision != "fp32":
            raise ValueError(f"the reference engine is fp32; precision {precision!r} needs a built engine "
                             f"(`medscreen engines ensure --model {self.model}`)")
        card = load_card(self.settings, self.model)
        providers = default_providers()
        runner = OrtRunner(Path(card["onnx"]["file"]), providers=providers, name=f"onnxruntime:{self.model}",
                           intra_op_threads=self.intra_op_threads)
        fingerprint = (f"onnxruntime-{ort.__version__}-{providers[0].replace('ExecutionProvider', '').lower()}"
                       f"-fp32-{card['onnx']['sha256'][:16]}")
        return runner, {"fingerprint": fingerprint, "precision": "fp32", "backend": "onnxruntime"}
