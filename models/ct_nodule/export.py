"""ONNX export of the CT nodule U-Net: one self-contained file, dynamic batch, sigmoid in-graph."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from models.ct_nodule.model import UNet3D
from models.emr_risk.export import strip_build_metadata

OPSET = 18


def export_onnx(model: UNet3D, path: Path, patch_zyx: tuple[int, int, int]) -> Path:
    """Export ``model`` (eval mode) to ``path`` and check ONNX Runtime agrees with torch.

    Input ``image`` float32 [batch, 1, z, y, x], output ``prob`` float32 of the
    same shape; only the batch axis is dynamic (engines build profiles over it).
    """
    model = model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, 1, *patch_zyx)
    batch = torch.export.Dim("batch", min=1, max=64)
    # external_data=False: a single file, so the engine cache hashes exactly what runs.
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["image"],
                                output_names=["prob"], opset_version=OPSET,
                                dynamic_shapes={"x": {0: batch}}, external_data=False)
    proto = strip_build_metadata(program.model_proto)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    onnx.checker.check_model(onnx.load(str(path)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = torch.rand(n, 1, *patch_zyx)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(["prob"], {"image": x.numpy()})[0]
        if got.shape != ref.shape or not np.allclose(got, ref, atol=1e-4):
            raise RuntimeError(f"exported ONNX {path} disagrees with torch at batch {n}: "
                               f"max |Δ| {np.abs(got - ref).max():.2e}")
    return path
