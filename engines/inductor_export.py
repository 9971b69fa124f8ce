"""Build side of the ``inductor`` backend: the emr_risk model exported once, then compiled per scoring shape.

The plan is a ``torch.export`` program of the model wrapped to the fixed I/O
contract (``tokens`` int64 [b, s], ``days_before`` f32 [b, s], ``age_years``
f32 [b], ``sex`` int64 [b] → ``probs`` f32 [b, 3]); the fp16 variant holds
half weights and casts inside (days/age to half in, probabilities to float
out), so every precision has one contract. Beside it go the Inductor compile
artefacts (``torch.compiler`` Mega-Cache) for the fixed shapes the scoring
pipeline produces, so a runtime compiles from cache instead of from scratch.

Only this module imports the model definition (:mod:`models.emr_risk.model`);
the runtime (:mod:`engines.inductor_runner`) needs torch alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from engines.model_card import REPO_ROOT, file_sha256


class InductorBuildError(ValueError):
    """The inductor plan cannot be built for this model card (what is missing, and what to do)."""


def weights_file(card: dict[str, Any]) -> tuple[Path, str]:
    """(path, sha256) of the torch state dict the card names, checked against the card's sha256."""
    entry = card.get("torch") or {}
    if not entry.get("state_dict"):
        raise InductorBuildError(f"model card {card.get('card_file')} of {card.get('name')!r} names no torch "
                                 "weights (torch.state_dict); the inductor backend exports the torch model, so "
                                 "use backend onnxruntime for this model")
    path = Path(entry["state_dict"])
    path = path if path.is_absolute() else REPO_ROOT / path
    if not path.is_file():
        raise InductorBuildError(f"torch weights {path} named by card {card.get('card_file')} do not exist")
    sha = file_sha256(path)
    if entry.get("sha256") and entry["sha256"] != sha:
        raise InductorBuildError(f"torch weights {path} have sha256 {sha[:12]}… but card {card.get('card_file')} "
                                 f"records {entry['sha256'][:12]}…; re-export the model so they agree")
    return path, sha


def export_program(card: dict[str, Any], precision: str, device: str, out: Path) -> Path:
    """Export the card's torch model at ``precision`` on ``device`` to ``out`` (``torch.export.save``)."""
    import torch

    if card.get("name") != "emr_risk" or "architecture" not in card:
        raise InductorBuildError(f"the inductor backend knows the emr_risk model only; card "
                                 f"{card.get('card_file')} describes {card.get('name')!r}")
    if precision not in ("fp32", "fp16"):
        raise InductorBuildError(f"the inductor backend builds fp32 and fp16, not {precision}")
    from models.emr_risk.model import EmrRiskModel, ModelConfig

    path, _ = weights_file(card)
    model = EmrRiskModel(ModelConfig(**card["architecture"]))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    wrapped = _contract(model.eval(), half=precision == "fp16").to(device).eval()
    auto = torch.export.Dim.AUTO
    # Dim.AUTO, not a ranged Dim: a declared seq range fails a guard of the encoder; the runtime
    # compiles static shapes from this one program anyway.
    dims = ({0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto}, {0: auto})
    with torch.no_grad():
        program = torch.export.export(wrapped, example_inputs(8, 16, int(card["vocab"]["size"]), device),
                                      dynamic_shapes=dims)
    torch.export.save(program, str(out))
    return out


def compile_artifacts(plan: Path, shapes: list[tuple[int, int]],
                      device: str, compile_mode: str = "per_shape") -> tuple[bytes, dict[str, float], int]:
    """Compile ``plan`` for every shape as the runtime does; the Mega-Cache bytes, seconds per shape and
    torch's intra-op thread count during the compile.

    The runtime's own compile path (:class:`engines.inductor_runner.InductorRunner`) is what runs here,
    so the cache entries it records are the ones a runtime looks up. Their keys hold the thread
    count, so a runtime compiles under the same count (``compile_threads`` in the sidecar).
    """
    import torch

    from engines.inductor_runner import InductorRunner

    threads = torch.get_num_threads()
    runner = InductorRunner(plan, None, shapes, name="inductor-build", device=device, compile_mode=compile_mode)
    runner.activate()
    try:
        seconds = dict(runner.compile_seconds)
    finally:
        runner.deactivate()
    saved = torch.compiler.save_cache_artifacts()
    if not saved:
        raise InductorBuildError("torch.compiler.save_cache_artifacts() returned nothing after compiling "
                                 f"{len(shapes)} shapes; the compile cache is disabled in this environment")
    return saved[0], seconds, threads


def example_inputs(batch: int, seq: int, vocab_size: int, device: str) -> tuple:
    import torch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, vocab_size, (batch, seq), generator=g)
    tokens[:, seq // 2:] = 0
    return (tokens.to(device), (torch.rand(batch, seq, generator=g) * 3000).to(device),
            (torch.rand(batch, generator=g) * 80 + 10).to(device), torch.randint(0, 3, (batch,), generator=g).to(device))


def _contract_module():
    import torch

    class Contract(torch.nn.Module):
        """The model behind the fixed I/O contract; ``half``: fp16 weights, casts inside."""

        def __init__(self, inner: torch.nn.Module, half: bool):
            super().__init__()
            self.inner = inner.half() if half else inner
            self.fp16 = half  # not `half`: that would shadow Module.half()

        def forward(self, tokens, days_before, age_years, sex):
            if self.fp16:
                return self.inner(tokens, days_before.half(), age_years.half(), sex).float()
            return self.inner(tokens, days_before, age_years, sex)

    return Contract


def _contract(inner, half: bool):
    # The Module class is made on first use: this module is imported where torch is not installed.
    return _contract_module()(inner, half)
