"""Export the EMR risk model to ONNX (dynamo exporter, dynamic batch and seq, one self-contained file)."""
from __future__ import annotations

from pathlib import Path

import onnx
import torch

from conf.settings import HEADS
from lake.files import file_sha256
from models.emr_risk.model import INPUT_NAMES, OUTPUT_NAMES, EmrRiskModel, ModelConfig

OPSET = 18


def example_inputs(batch: int = 2, seq: int = 8, vocab_size: int = 32,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs that satisfy the I/O contract (some padding, all three sex codes)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab_size, (batch, seq), generator=g)
    tokens[0, seq // 2:] = 0
    days = torch.rand(batch, seq, generator=g) * 1000.0
    age = torch.rand(batch, generator=g) * 60.0 + 20.0
    sex = torch.arange(batch) % 3
    return tokens, days, age, sex


def export_onnx(model: EmrRiskModel, path: Path) -> Path:
    """Write ``model`` to ``path`` as ONNX with dynamic ``batch``/``seq`` and weights folded into the file.

    The dynamo exporter is used because the legacy one bakes the traced sequence
    length into nn.TransformerEncoder's reshapes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    args = example_inputs(batch=3, seq=11, vocab_size=model.config.vocab_size)
    batch, seq = torch.export.Dim("batch", min=1, max=65536), torch.export.Dim("seq", min=1, max=8192)
    dynamic_shapes = {"tokens": {0: batch, 1: seq}, "days_before": {0: batch, 1: seq},
                      "age_years": {0: batch}, "sex": {0: batch}}
    with torch.no_grad():
        program = torch.onnx.export(model, args, input_names=list(INPUT_NAMES),
                                    output_names=list(OUTPUT_NAMES), dynamic_shapes=dynamic_shapes,
                                    dynamo=True, opset_version=OPSET, optimize=True,
                                    external_data=False)
    proto = program.model_proto
    # The exporter names dims s0/s1...; the contract's names make the graph self-describing.
    for vi in list(proto.graph.input) + list(proto.graph.output):
        dims = vi.type.tensor_type.shape.dim
        for i, dim in enumerate(dims):
            if dim.dim_param or not dim.HasField("dim_value"):
                dim.dim_param = "batch" if i == 0 else "seq"
    strip_build_metadata(proto)
    onnx.checker.check_model(proto, full_check=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(proto, tmp, save_as_external_data=False)
    tmp.replace(path)
    return path


def strip_build_metadata(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop what the exporter records about the machine that built the model.

    The dynamo exporter attaches stack traces (source file paths of the build
    machine) and module names to every node; a committed artifact carries none.
    """
    def clean(nodes) -> None:
        for node in nodes:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                if attr.HasField("g"):
                    clean(attr.g.node)
                for g in attr.graphs:
                    clean(g.node)

    clean(proto.graph.node)
    for function in proto.functions:
        clean(function.node)
        del function.metadata_props[:]
    del proto.graph.metadata_props[:]
    proto.graph.doc_string = ""
    proto.doc_string = ""
    return proto


def write_card(card_path: Path, onnx_path: Path, repo_root: Path, *, version: str,
               config: ModelConfig, vocab: dict, profiles: dict, metrics: dict,
               training: dict, torch_state: Path | None = None,
               calibration: dict | None = None, operating_points: dict | None = None) -> Path:
    """Write the model card (YAML) describing ``onnx_path``; the ONNX path is stored repo-relative."""
    onnx_path, repo_root = Path(onnx_path).resolve(), Path(repo_root).resolve()
    card = {
        "name": "emr_risk",
        "version": version,
        "description": "Risk of incident type 2 diabetes, chronic kidney disease and heart failure "
                       "within the horizon after the as-of date, from a point-in-time EMR timeline.",
        # Repo-relative when inside the checkout, so the card does not name this machine's paths.
        "onnx": {"path": (str(onnx_path.relative_to(repo_root)) if onnx_path.is_relative_to(repo_root)
                          else str(onnx_path)), "sha256": file_sha256(onnx_path),
                 "opset": OPSET, "bytes": onnx_path.stat().st_size},
        "inputs": [
            {"name": "tokens", "dtype": "int64", "shape": ["batch", "seq"], "note": "0 = padding"},
            {"name": "days_before", "dtype": "float32", "shape": ["batch", "seq"]},
            {"name": "age_years", "dtype": "float32", "shape": ["batch"]},
            {"name": "sex", "dtype": "int64", "shape": ["batch"], "note": "0 unknown, 1 F, 2 M"},
        ],
        "outputs": [{"name": "probs", "dtype": "float32", "shape": ["batch", 3],
                     "heads": list(HEADS), "note": "sigmoid applied in-graph"}],
        "heads": list(HEADS),
        "vocab": vocab,
        "profiles": profiles,
        "architecture": config.to_dict(),
        "metrics": metrics,
        "training": training,
    }
    if torch_state is not None:
        # The eager baseline of bench/engines.py loads these weights (the ONNX folds them away).
        ts = Path(torch_state).resolve()
        card["torch"] = {"state_dict": (str(ts.relative_to(repo_root)) if ts.is_relative_to(repo_root)
                                        else str(ts)), "sha256": file_sha256(ts)}
    if calibration is not None:
        card["calibration"] = calibration
    if operating_points is not None:
        card["operating_points"] = operating_points
    return _write_yaml(Path(card_path), card)


def update_card(card_path: Path, **sections: dict) -> Path:
    """Replace whole top-level sections of an existing card (``--calibrate-only``), keeping the rest."""
    import yaml

    card = yaml.safe_load(Path(card_path).read_text())
    card.update(sections)
    return _write_yaml(Path(card_path), card)


def _write_yaml(card_path: Path, card: dict) -> Path:
    import yaml

    card_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = card_path.with_name(card_path.name + ".tmp")
    tmp.write_text("# Written by python -m models.emr_risk.train; do not edit by hand.\n"
                   + yaml.safe_dump(card, sort_keys=False))
    tmp.replace(card_path)
    return card_path
