"""Train the reference 3-D U-Net on synthetic chest phantoms, export ONNX, write the model card.

    python -m models.ct_nodule.train [--minutes 5] [--seed 7]

Data: chest phantoms (``medscreen.ct_phantom``) sampled on scanner-like grids
(in-plane 0.6–0.9 mm, slices 1–2.5 mm) and resampled to the pipeline's 1 mm
isotropic grid with linear interpolation, so training sees the same partial
volume blur as scoring does; windowed to [0, 1]. Crops are nodule-enriched
(most centred near a nodule, the rest anywhere in the body). Loss: soft Dice +
BCE. CPU only, a few minutes.

Crops are smaller than the scoring patch (the network is fully convolutional
and its receptive field is ~30 voxels) because a full 64×128×128 patch costs
~3 s per step on a 2-core CPU; the held-out Dice is measured the way scoring
works: full-size patches over whole phantoms, stitched with the pipeline's own
blending.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from medscreen.ct_phantom import ChestAnatomy, default_origin_lps_mm, make_phantom, random_nodules
from models.ct_nodule.export import export_onnx
from models.ct_nodule.model import UNet3D
from preprocessing.patches import PatchExtractor
from preprocessing.resample import resample_to_spacing, window_to_unit
from preprocessing.stitching import stitch
from preprocessing.volume import Volume

REPO = Path(__file__).resolve().parents[2]
ONNX_PATH = Path("models/ct_nodule/ct_nodule.onnx")      # repo-relative, as the card records it
CARD_PATH = Path("conf/models/ct_nodule.yaml")
WEIGHTS_PATH = Path("models/ct_nodule/ct_nodule.pt")     # torch weights, to fine-tune (--resume)
VERSION = "1.0.0"
WINDOW_HU = (-1000.0, 400.0)
SPACING_MM = 1.0
PATCH_ZYX = (64, 128, 128)
STRIDE_ZYX = (32, 64, 64)
CROP_ZYX = (32, 64, 64)


def phantom_volume(rng: np.random.Generator, z_extent_mm: float = 96.0,
                   n_nodules: int = 6) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """One phantom on a random scanner grid, resampled to 1 mm: (image [0,1], mask, nodules)."""
    sx = float(rng.uniform(0.6, 0.9))
    sz = float(rng.choice([1.0, 1.25, 2.0, 2.5]))
    fov = float(rng.uniform(300.0, 400.0))
    nxy = int(round(fov / sx))
    nz = int(round(z_extent_mm / sz))
    shape, spacing = (nz, nxy, nxy), (sz, sx, sx)
    origin = default_origin_lps_mm(shape, spacing)
    anatomy = ChestAnatomy.for_grid(shape, spacing, origin)
    nodules = random_nodules(rng, n_nodules, anatomy, diameter_range_mm=(4.0, 28.0))
    hu, mask = make_phantom(shape, spacing, nodules, rng, origin)
    # The pipeline's own resampling and windowing, so training sees what scoring sees.
    vol = resample_to_spacing(Volume(hu, spacing, origin), SPACING_MM)
    img = window_to_unit(vol.hu, WINDOW_HU)
    m = resample_to_spacing(Volume(mask.astype(np.float32), spacing, origin), SPACING_MM).hu >= 0.5
    return img, m.astype(np.uint8), nodules


def sample_crop(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray,
                centres: np.ndarray, enrich: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    size = np.array(CROP_ZYX)
    shape = np.array(img.shape)
    if len(centres) and rng.uniform() < enrich:
        c = centres[rng.integers(len(centres))] + rng.integers(-12, 13, size=3)
        start = np.clip(c - size // 2, 0, shape - size)
    else:
        start = np.array([rng.integers(0, s - k + 1) for s, k in zip(shape, size)])
    sl = tuple(slice(int(a), int(a) + int(k)) for a, k in zip(start, size))
    x, y = img[sl], mask[sl]
    if rng.uniform() < 0.5:  # left/right mirror: lungs are near-symmetric
        x, y = x[..., ::-1], y[..., ::-1]
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum()
    dice = 1.0 - (2.0 * inter + 1.0) / (prob.sum() + target.sum() + 1.0)
    return dice + torch.nn.functional.binary_cross_entropy_with_logits(logits, target)


def predict_volume(model: UNet3D, img: np.ndarray, batch: int = 2) -> np.ndarray:
    """Sliding-window prediction with the pipeline's own patching and blending."""
    grid, patches = PatchExtractor(PATCH_ZYX, STRIDE_ZYX)(img)
    preds = np.empty_like(patches)
    with torch.no_grad():
        for i in range(0, len(patches), batch):
            preds[i:i + batch] = model(torch.from_numpy(patches[i:i + batch])).numpy()
    return stitch(preds, grid)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred.astype(bool), truth.astype(bool)
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * (p & t).sum() / denom)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_card(path: Path, onnx_rel: Path, sha: str, metrics: dict[str, Any]) -> None:
    card = {
        "name": "ct_nodule",
        "version": VERSION,
        "task": "segmentation",
        "description": "Reference 3-D U-Net (2 levels, 8 base channels) segmenting lung nodules in "
                       "windowed 1 mm isotropic CT patches; trained on synthetic chest phantoms only.",
        "onnx": {"path": str(onnx_rel), "sha256": sha, "opset": 18, "bytes": (REPO / onnx_rel).stat().st_size},
        "inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 1, *PATCH_ZYX]}],
        "outputs": [{"name": "prob", "dtype": "float32", "shape": ["batch", 1, *PATCH_ZYX]}],
        # TensorRT optimisation profile: patches arrive in large batches (see inference.ct).
        # Only the batch axis is dynamic; the patch shape is fixed by the export.
        "profiles": {"batch": {"min": 1, "opt": 8, "max": 16}},
        "preprocessing": {"spacing_mm": SPACING_MM, "window_hu": list(WINDOW_HU),
                          "patch_size": list(PATCH_ZYX), "patch_stride": list(STRIDE_ZYX),
                          "pad_value": 0.0, "blend": "gaussian"},
        "postprocessing": {"probability_threshold": 0.5},
        "gate": {"metric": "dice", "max_abs_delta_dice": {"fp16": 0.01, "int8": 0.03}},
        "metrics": metrics,
        "training": {"data": "medscreen.ct_phantom synthetic chests, resampled to 1 mm",
                     "crop_size": list(CROP_ZYX), "loss": "soft Dice + BCE",
                     "command": "python -m models.ct_nodule.train"},
    }
    path.write_text("# Model card for the CT nodule segmenter; written by models/ct_nodule/train.py.\n"
                    + yaml.safe_dump(card, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="training time budget")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--volumes", type=int, default=8, help="training phantoms")
    ap.add_argument("--holdout", type=int, default=2, help="held-out phantoms for Dice")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true",
                    help="start from the committed weights (models/ct_nodule/ct_nodule.pt)")
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    t0 = time.time()
    train = [phantom_volume(rng) for _ in range(args.volumes)]
    centres = [np.argwhere(m > 0)[:: 97] for _, m, _ in train]  # voxels inside nodules, thinned
    print(f"generated {len(train)} training phantoms in {time.time() - t0:.0f}s", flush=True)

    model = UNet3D(8)
    if args.resume:
        model.load_state_dict(torch.load(REPO / WEIGHTS_PATH, weights_only=True))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    deadline = time.time() + args.minutes * 60
    step, losses = 0, []
    model.train()
    while time.time() < deadline:
        xs, ys = [], []
        for _ in range(args.batch):
            k = int(rng.integers(len(train)))
            x, y = sample_crop(rng, train[k][0], train[k][1], centres[k])
            xs.append(x)
            ys.append(y)
        xb = torch.from_numpy(np.stack(xs)[:, None])
        yb = torch.from_numpy(np.stack(ys)[:, None].astype(np.float32))
        loss = dice_bce_loss(model.logits(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 25 == 0:
            print(f"step {step} loss {np.mean(losses[-25:]):.4f} ({time.time() - t0:.0f}s)", flush=True)
    del train

    model.eval()
    hold_rng = np.random.default_rng(args.seed + 1000)
    inter = total = 0
    per_volume = []
    for _ in range(args.holdout):
        img, mask, _ = phantom_volume(hold_rng)
        pred = predict_volume(model, img) >= 0.5
        per_volume.append(round(dice(pred, mask), 4))
        inter += int((pred & (mask > 0)).sum())
        total += int(pred.sum() + mask.sum())
    heldout = 2.0 * inter / max(total, 1)
    print(f"held-out Dice {heldout:.4f} per volume {per_volume}", flush=True)

    torch.save(model.state_dict(), REPO / WEIGHTS_PATH)
    onnx_abs = REPO / ONNX_PATH
    export_onnx(model, onnx_abs, PATCH_ZYX)
    sha = sha256_file(onnx_abs)
    metrics = {"heldout_dice": round(heldout, 4), "heldout_dice_per_volume": per_volume,
               "heldout_volumes": args.holdout, "train_steps": step, "train_seconds": round(time.time() - t0),
               "final_train_loss": round(float(np.mean(losses[-25:])), 4) if losses else None,
               "seed": args.seed}
    if args.resume:
        metrics["resumed"] = True
    write_card(REPO / CARD_PATH, ONNX_PATH, sha, metrics)
    print(json.dumps({"onnx": str(ONNX_PATH), "bytes": onnx_abs.stat().st_size, "sha256": sha, **metrics}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
