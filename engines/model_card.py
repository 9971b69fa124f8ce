"""Model cards (conf/models/<model>.yaml): what an exported model is, its I/O, profiles and metrics."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from conf.settings import CONF_DIR, Settings, load_yaml
from lake.files import file_sha256

# Card paths (onnx.path) are repository-relative so the checkout can live anywhere.
REPO_ROOT = CONF_DIR.parent


class ModelCardError(ValueError):
    """A model card is missing, malformed, or does not match its artifact."""


def card_path(settings: Settings, model: str) -> Path:
    if model not in settings.models:
        raise ModelCardError(f"model {model!r} has no card; known models: {sorted(settings.models)} "
                             "(settings.models maps names to card files)")
    return Path(settings.models[model])


def load_card(settings: Settings, model: str = "emr_risk", verify: bool = True) -> dict[str, Any]:
    """Load ``model``'s card; ``card["onnx"]["file"]`` is the resolved ONNX path.

    With ``verify`` (default) the ONNX file's sha256 must equal the card's, so an
    engine is never built from an artifact the card does not describe.
    """
    path = card_path(settings, model)
    if not path.is_file():
        raise ModelCardError(f"model card {path} for {model!r} does not exist; export the model "
                             f"first (python -m models.{model}.train)")
    card = load_yaml(path.read_text()) or {}
    for key in ("name", "version", "onnx", "inputs", "outputs"):
        if key not in card:
            raise ModelCardError(f"model card {path} lacks {key!r}; re-export the model")
    onnx_file = Path(card["onnx"]["path"])
    if not onnx_file.is_absolute():
        onnx_file = REPO_ROOT / onnx_file
    card["onnx"]["file"] = str(onnx_file)
    card["card_file"] = str(path)
    for precision, entry in ((card.get("fused_onnx") or {}).get("graphs") or {}).items():
        fused = Path(entry["path"])
        entry["file"] = str(fused if fused.is_absolute() else REPO_ROOT / fused)
        if verify and (not Path(entry["file"]).is_file() or file_sha256(Path(entry["file"])) != entry["sha256"]):
            raise ModelCardError(f"fused {precision} graph {entry['file']} named by card {path} is missing or "
                                 "does not match its sha256; re-export it (python -m models.emr_risk.export_fused)")
    if verify:
        if not onnx_file.is_file():
            raise ModelCardError(f"ONNX file {onnx_file} named by card {path} does not exist")
        actual = file_sha256(onnx_file)
        if actual != card["onnx"]["sha256"]:
            raise ModelCardError(f"ONNX file {onnx_file} has sha256 {actual[:12]}… but card {path} "
                                 f"records {card['onnx']['sha256'][:12]}…; re-export the model so "
                                 "the card and artifact agree")
    return card


def check_vocabulary(card: dict[str, Any], size: int, version: str, sha256: str) -> None:
    """Refuse to score with a vocabulary other than the one the model was trained on."""
    vocab = card.get("vocab") or {}
    problems = [f"{k}: card {vocab.get(k)!r} vs data {v!r}"
                for k, v in (("size", size), ("version", version), ("sha256", sha256))
                if vocab.get(k) != v]
    if problems:
        raise ModelCardError(f"vocabulary mismatch for model {card.get('name')!r} "
                             f"({'; '.join(problems)}); rebuild features with the model's "
                             "vocabulary or retrain the model")


def profiles(card: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Optimisation profiles {"batch": {min,opt,max}, "seq": {min,opt,max}} from the card."""
    prof = card.get("profiles") or {}
    out = {}
    for dim, default in (("batch", {"min": 1, "opt": 256, "max": 2048}),
                         ("seq", {"min": 1, "opt": 64, "max": 256})):
        p = {**default, **(prof.get(dim) or {})}
        if not p["min"] <= p["opt"] <= p["max"]:
            raise ModelCardError(f"profile {dim} of {card.get('name')!r} needs min ≤ opt ≤ max; got {p}")
        out[dim] = {k: int(p[k]) for k in ("min", "opt", "max")}
    return out
