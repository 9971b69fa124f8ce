"""Train the reference 3-D U-Net on synthetic chest phantoms, export ONNX, write the model card.

    python -m models.ct_nodule.train                       # train, export, card (GPU: ~5 min)
    python -m models.ct_nodule.train --out DIR             # train only: weights + metrics in DIR
    python -m models.ct_nodule.train --export-only DIR     # export + card from DIR (pinned torch)

Data: chest phantoms (``synth.ct_phantom``) sampled on scanner-like grids
(in-plane 0.6–0.9 mm, slices 1–2.5 mm) and resampled to the pipeline's 1 mm
isotropic grid with the pipeline's own resampling and windowing
(``preprocessing.resample``), so training sees the partial-volume blur that
scoring sees. Crops of the scoring patch size (64×128×128) are
nodule-enriched (60 % centred near a nodule, the rest anywhere). Loss: soft
Dice + BCE, one-cycle learning rate.

The committed artifact was trained on a GPU with the defaults (4000 steps of
batch 4, 32 phantoms; about 5 minutes) and exported here with the pinned torch
(``--out`` there, ``--export-only`` here). A full-size step costs ~3 s on a
2-core CPU; on a CPU use ``--crop 32 64 64 --minutes N`` (the network is fully
convolutional, receptive field ~30 voxels). The held-out Dice is measured the
way scoring works: full-size patches over whole held-out phantoms, blended with
the pipeline's own stitching.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from lake.files import file_sha256
from synth.ct_phantom import ChestAnatomy, default_origin_lps_mm, make_phantom, random_nodules
from models.ct_nodule.export import export_onnx
from models.ct_nodule.model import UNet3D
from preprocessing.ct_chain import Compose, ResampleToSpacing, WindowToUnit
from preprocessing.sliding_window import sliding_window_inference
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
CROP_ZYX = (64, 128, 128)
# A phantom's HU volume → the model's input: the steps scoring runs after reading the DICOM files.
MODEL_INPUT = Compose(ResampleToSpacing(SPACING_MM), WindowToUnit(WINDOW_HU))


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
    # The pipeline's own chain (resample, then window), so training sees what scoring sees.
    img = MODEL_INPUT(Volume(hu, spacing, origin)).image
    m = ResampleToSpacing(SPACING_MM)(Volume(mask.astype(np.float32), spacing, origin)).hu >= 0.5
    return img, m.astype(np.uint8), nodules


def sample_crop(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray,
                centres: np.ndarray, enrich: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    size = np.array(CROP_ZYX)  # module-level, so --crop reaches the sampler
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


def predict_volume(model: UNet3D, img: np.ndarray, batch: int = 2, device: str = "cpu") -> np.ndarray:
    """Sliding-window prediction with the pipeline's own patching and blending (the torch model as predictor)."""
    def predict(patches: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(patches)).to(device)).cpu().numpy()

    return sliding_window_inference(img, predict, PATCH_ZYX, STRIDE_ZYX, batch)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred.astype(bool), truth.astype(bool)
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * (p & t).sum() / denom)


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
                          "pad": "edge", "blend": "gaussian"},
        "postprocessing": {"probability_threshold": 0.5},
        "gate": {"metric": "dice", "max_abs_delta_dice": {"fp16": 0.01, "int8": 0.03}},
        "metrics": metrics,
        "training": {"data": "synth.ct_phantom synthetic chests, resampled to 1 mm",
                     "crop_size": list(metrics.get("train_crop") or []), "loss": "soft Dice + BCE",
                     "command": "python -m models.ct_nodule.train --workers 14 --out DIR (GPU), then "
                                "python -m models.ct_nodule.train --export-only DIR"},
    }
    path.write_text("# Model card for the CT nodule segmenter; written by models/ct_nodule/train.py.\n"
                    + yaml.safe_dump(card, sort_keys=False))


def _phantom_job(seed: int) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    return phantom_volume(np.random.default_rng(seed))


def make_phantoms(seeds: list[int], workers: int) -> list[tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]]:
    """Phantoms for ``seeds`` (one generator each, so the set does not depend on ``workers``)."""
    if workers <= 1:
        return [_phantom_job(s) for s in seeds]
    from multiprocessing import get_context

    with get_context("spawn").Pool(workers) as pool:
        return pool.map(_phantom_job, seeds)


def evaluate(model: UNet3D, seed: int, n: int, workers: int, device: str) -> tuple[float, list[float]]:
    """Dice over ``n`` held-out phantoms, scored the way the pipeline scores (patches + blending)."""
    model.eval()
    inter = total = 0
    per_volume = []
    for img, mask, _ in make_phantoms([seed + 10_000 + i for i in range(n)], workers):
        pred = predict_volume(model, img, device=device) >= 0.5
        per_volume.append(round(dice(pred, mask), 4))
        inter += int((pred & (mask > 0)).sum())
        total += int(pred.sum() + mask.sum())
    return 2.0 * inter / max(total, 1), per_volume


def export_and_card(model: UNet3D, metrics: dict[str, Any]) -> dict[str, Any]:
    """Export the ONNX next to this file and write the model card; return what was written."""
    onnx_abs = REPO / ONNX_PATH
    export_onnx(model.cpu().eval(), onnx_abs, PATCH_ZYX)
    sha = file_sha256(onnx_abs)
    write_card(REPO / CARD_PATH, ONNX_PATH, sha, metrics)
    return {"onnx": str(ONNX_PATH), "bytes": onnx_abs.stat().st_size, "sha256": sha, **metrics}


def main(argv: list[str] | None = None) -> int:
    global CROP_ZYX
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="training time budget (when --steps is 0)")
    ap.add_argument("--steps", type=int, default=4000, help="training steps (0: run for --minutes)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--volumes", type=int, default=32, help="training phantoms")
    ap.add_argument("--holdout", type=int, default=4, help="held-out phantoms for Dice")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, nargs=3, default=list(CROP_ZYX), help="training crop z y x")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="processes generating phantoms")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    ap.add_argument("--resume", action="store_true",
                    help="start from the committed weights (models/ct_nodule/ct_nodule.pt)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", type=Path, default=None,
                    help="write weights + metrics here and skip the export (train on one machine, "
                         "export with the pinned torch on another via --export-only)")
    ap.add_argument("--export-only", type=Path, default=None, metavar="DIR",
                    help="export ONNX + card from DIR/ct_nodule.pt and DIR/metrics.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.export_only is not None:
        model = UNet3D(8)
        model.load_state_dict(torch.load(args.export_only / "ct_nodule.pt", weights_only=True, map_location="cpu"))
        metrics = json.loads((args.export_only / "metrics.json").read_text())
        torch.save(model.state_dict(), REPO / WEIGHTS_PATH)
        print(json.dumps(export_and_card(model, metrics)))
        return 0

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    CROP_ZYX = tuple(args.crop)  # type: ignore[assignment]

    t0 = time.time()
    train = make_phantoms([args.seed * 1000 + i for i in range(args.volumes)], args.workers)
    centres = [np.argwhere(m > 0)[:: 97] for _, m, _ in train]  # voxels inside nodules, thinned
    print(f"generated {len(train)} training phantoms in {time.time() - t0:.0f}s", flush=True)

    model = UNet3D(8).to(device)
    if args.resume:
        model.load_state_dict(torch.load(REPO / WEIGHTS_PATH, weights_only=True, map_location=device))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    total_steps = args.steps or None
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total_steps) \
        if total_steps else None
    deadline = time.time() + args.minutes * 60
    step, losses = 0, []
    model.train()
    while (step < total_steps) if total_steps else (time.time() < deadline):
        xs, ys = [], []
        for _ in range(args.batch):
            k = int(rng.integers(len(train)))
            x, y = sample_crop(rng, train[k][0], train[k][1], centres[k])
            xs.append(x)
            ys.append(y)
        xb = torch.from_numpy(np.stack(xs)[:, None]).to(device)
        yb = torch.from_numpy(np.stack(ys)[:, None].astype(np.float32)).to(device)
        loss = dice_bce_loss(model.logits(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 100 == 0:
            print(f"step {step} loss {np.mean(losses[-100:]):.4f} ({time.time() - t0:.0f}s)", flush=True)
    del train

    heldout, per_volume = evaluate(model, args.seed, args.holdout, args.workers, device)
    print(f"held-out Dice {heldout:.4f} per volume {per_volume}", flush=True)
    metrics = {"heldout_dice": round(heldout, 4), "heldout_dice_per_volume": per_volume,
               "heldout_volumes": args.holdout, "train_steps": step, "train_volumes": args.volumes,
               "train_crop": list(CROP_ZYX), "train_batch": args.batch, "train_device": device,
               "train_seconds": round(time.time() - t0),
               "final_train_loss": round(float(np.mean(losses[-100:])), 4) if losses else None,
               "seed": args.seed, "torch": torch.__version__}
    if args.resume:
        metrics["resumed"] = True
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(model.cpu().state_dict(), args.out / "ct_nodule.pt")
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps(metrics))
        return 0
    torch.save(model.cpu().state_dict(), REPO / WEIGHTS_PATH)
    print(json.dumps(export_and_card(model, metrics)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
