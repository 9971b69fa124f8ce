"""Train the EMR risk model on synthetic data THROUGH THE LAKE, export ONNX, write the model card.

    python -m models.emr_risk.train [--workdir DIR] [--patients N] [--as-of D]

Steps: synthetic FHIR export (medscreen.synth_emr) → ingest (jobs.emr_ingest)
→ labelled timelines (jobs.emr_features --with-labels) for quarterly training
as-of dates and one later held-out date → train on CPU → held-out metrics per
head → ONNX (dynamo exporter, dynamic batch/seq, one file) → conf/models/emr_risk.yaml.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.emr_risk.export import export_onnx, write_card
from models.emr_risk.model import HEADS, EmrRiskModel, ModelConfig

log = logging.getLogger("models.emr_risk.train")

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_AS_OF = ("2022-06-30", "2022-09-30", "2022-12-31", "2023-03-31", "2023-06-30")
HOLDOUT_AS_OF = "2024-06-30"
MODEL_VERSION = "1.0.0"


def build_lake(settings, workdir: Path, patients: int, seed: int, as_ofs: list[str]) -> dict[str, Any]:
    """Synthetic export → ingest → labelled timelines for each as-of date; returns the stage summaries."""
    from jobs import emr_features, emr_ingest
    from medscreen.synth_emr import generate

    raw = workdir / "emr_export"
    t = time.perf_counter()
    synth = generate(raw, patients=patients, seed=seed, bad_share=0.02, fmt="fhir")
    log.info("synthetic export: %d patients in %.0fs", patients, time.perf_counter() - t)
    t = time.perf_counter()
    ingest = emr_ingest.run(settings, raw, "fhir")
    log.info("ingest in %.0fs", time.perf_counter() - t)
    feats = {}
    for d in as_ofs:
        t = time.perf_counter()
        feats[d] = emr_features.run(settings, d, with_labels=True)
        log.info("features %s: %d rows in %.0fs", d, feats[d]["rows"], time.perf_counter() - t)
    return {"synth": synth.get("signal"), "ingest": {k: ingest.get(k) for k in ("run_id",)},
            "features": feats}


def load_rows(lake_root: Path, as_of: str, max_tokens: int) -> dict[str, np.ndarray]:
    """One labelled partition as padded arrays (through engines.samples, as scoring will see it)."""
    from engines import samples

    table = samples.read_timelines(lake_root, as_of, labels=True)
    feed = samples.to_feed(table, max_tokens)
    feed["labels"] = samples.labels(table)
    # A stable per-patient group, so a validation split never shares a patient with training.
    feed["group"] = np.array([int(k[:8], 16) for k in table.column("patient_key").to_pylist()],
                             dtype=np.int64)
    feed["length"] = np.minimum(np.asarray(table.column("length").to_pylist()), max_tokens)
    return feed


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    seq = max(p["tokens"].shape[1] for p in parts)
    out: dict[str, list] = {k: [] for k in parts[0]}
    for p in parts:
        for k, v in p.items():
            if v.ndim == 2 and k in ("tokens", "days_before"):
                v = np.pad(v, ((0, 0), (0, seq - v.shape[1])))
            out[k].append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def batches(data: dict[str, np.ndarray], batch_rows: int, rng: np.random.Generator | None,
            device: str = "cpu"):
    """Length-bucketed batches (shuffled within and across buckets when rng is given)."""
    order = np.argsort(data["length"] + (rng.random(len(data["length"])) * 4 if rng is not None else 0),
                       kind="stable")
    chunks = [order[i:i + batch_rows] for i in range(0, len(order), batch_rows)]
    if rng is not None:
        rng.shuffle(chunks)
    for idx in chunks:
        seq = max(1, int(data["length"][idx].max()))
        # Timelines are left-aligned: keep the first `seq` positions (padding beyond).
        yield tuple(torch.from_numpy(a).to(device) for a in (
            data["tokens"][idx, :seq], data["days_before"][idx, :seq], data["age_years"][idx],
            data["sex"][idx], data["labels"][idx].astype(np.float32)))


def predict(model: EmrRiskModel, data: dict[str, np.ndarray], batch_rows: int = 512) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros((len(data["length"]), len(HEADS)), np.float32)
    order = np.argsort(data["length"], kind="stable")
    with torch.no_grad():
        for i in range(0, len(order), batch_rows):
            idx = order[i:i + batch_rows]
            seq = max(1, int(data["length"][idx].max()))
            out[idx] = model(*(torch.from_numpy(a).to(device) for a in (
                data["tokens"][idx, :seq], data["days_before"][idx, :seq], data["age_years"][idx],
                data["sex"][idx]))).cpu().numpy()
    return out


def split_by_patient(data: dict[str, np.ndarray], val_share: float
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(train, validation) with every row of a patient on one side."""
    val = (data["group"] % 1000) < int(round(val_share * 1000))
    return ({k: v[~val] for k, v in data.items()}, {k: v[val] for k, v in data.items()})


def train(model: EmrRiskModel, data: dict[str, np.ndarray], epochs: int, lr: float, seed: int,
          batch_rows: int = 128, time_budget_s: float = 600.0,
          val: dict[str, np.ndarray] | None = None) -> tuple[list[float], list[float]]:
    """AdamW on masked BCE (labels of -1 = unknown are ignored).

    With ``val`` the weights of the epoch with the best mean validation AUC are
    kept (early stopping; the held-out as-of date is never looked at).
    Returns (loss per epoch, mean validation AUC per epoch).
    """
    from engines.metrics import head_metrics

    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    # Positive weights bring rare heads (hf) up to the gradient share of common ones.
    y = data["labels"]
    pos = np.clip([(y[:, j] == 1).mean() for j in range(y.shape[1])], 1e-3, None)
    loss_fn = nn.BCEWithLogitsLoss(reduction="none",
                                   pos_weight=torch.tensor(np.sqrt((1 - pos) / pos), dtype=torch.float32,
                                                           device=device))
    steps = epochs * math.ceil(len(y) / batch_rows)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    history, val_auc, started = [], [], time.perf_counter()
    best_state, best_auc = None, -1.0
    for epoch in range(epochs):
        model.train()
        total, n = 0.0, 0
        for tokens, days, age, sex, labels in batches(data, batch_rows, rng, str(device)):
            logits = model.logits(tokens, days, age, sex)
            mask = (labels >= 0).float()
            loss = (loss_fn(logits, labels.clamp(min=0)) * mask).sum() / mask.sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(labels)
            n += len(labels)
        history.append(total / max(n, 1))
        if val is not None:
            m = head_metrics(predict(model, val), val["labels"])
            val_auc.append(float(np.nanmean([m[h]["auc"] for h in HEADS])))
            if val_auc[-1] > best_auc:
                best_auc = val_auc[-1]
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        log.info("epoch %d: loss %.4f, validation mean AUC %s (%.0fs)", epoch + 1, history[-1],
                 f"{val_auc[-1]:.4f}" if val_auc else "-", time.perf_counter() - started)
        if time.perf_counter() - started > time_budget_s:
            log.warning("time budget %.0fs spent after %d epochs", time_budget_s, epoch + 1)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history, val_auc


ARRAY_KEYS = ("length", "age_years", "sex", "labels", "group")


def save_arrays(path: Path, train_data: dict[str, np.ndarray], hold: dict[str, np.ndarray],
                meta: dict[str, Any]) -> Path:
    """Ragged (unpadded) arrays + metadata, so training can run where there is no lake or Spark."""
    out: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
    for split, d in (("train", train_data), ("hold", hold)):
        keep = np.arange(d["tokens"].shape[1])[None, :] < d["length"][:, None]
        out[f"{split}_tokens"] = d["tokens"][keep].astype(np.int32)
        out[f"{split}_days_before"] = d["days_before"][keep].astype(np.float32)
        for k in ARRAY_KEYS:
            out[f"{split}_{k}"] = d[k]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **out)
    return path


def load_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    z = np.load(path)
    splits = []
    for split in ("train", "hold"):
        d = {k: z[f"{split}_{k}"] for k in ARRAY_KEYS}
        n, seq = len(d["length"]), max(1, int(d["length"].max()))
        keep = np.arange(seq)[None, :] < d["length"][:, None]
        d["tokens"] = np.zeros((n, seq), np.int64)
        d["days_before"] = np.zeros((n, seq), np.float32)
        d["tokens"][keep] = z[f"{split}_tokens"]
        d["days_before"][keep] = z[f"{split}_days_before"]
        splits.append(d)
    return splits[0], splits[1], json.loads(str(z["meta"]))


def main(argv: list[str] | None = None) -> int:
    from engines.metrics import head_metrics

    p = argparse.ArgumentParser(prog="python -m models.emr_risk.train", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("work/train_emr_risk"),
                   help="synthetic export + lake live here (default work/train_emr_risk)")
    p.add_argument("--lake", help="use this lake (already ingested) instead of <workdir>/lake")
    p.add_argument("--skip-data", action="store_true", help="the lake already holds the timelines")
    p.add_argument("--patients", type=int, default=8000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--as-of", dest="as_of", default=HOLDOUT_AS_OF, help="held-out as-of date")
    p.add_argument("--train-as-of", nargs="+", default=list(TRAIN_AS_OF))
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--time-budget-s", type=float, default=900.0)
    p.add_argument("--onnx", type=Path, default=REPO_ROOT / "models" / "emr_risk" / "emr_risk.onnx")
    p.add_argument("--card", type=Path, default=REPO_ROOT / "conf" / "models" / "emr_risk.yaml")
    p.add_argument("--save-arrays", type=Path, dest="save_arrays",
                   help="write the training/held-out arrays here and stop (train with --from-arrays)")
    p.add_argument("--from-arrays", type=Path, dest="from_arrays",
                   help="train from --save-arrays output: no lake, Spark or settings needed")
    p.add_argument("--device", default="cpu", help="torch device for training (cpu, cuda)")
    p.add_argument("--val-share", type=float, default=0.15, dest="val_share",
                   help="share of training patients held back for early stopping (0 disables)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Synthetic patients only: a fixed training key keeps reruns' patient keys identical.
    # A real deployment's key (env or key file) wins when set.
    os.environ.setdefault("MEDSCREEN_PSEUDONYM_KEY", "emr-risk-training-on-synthetic-data-only")
    if args.from_arrays:
        train_data, hold, meta = load_arrays(args.from_arrays)
    else:
        from conf.settings import load_settings

        lake = Path(args.lake) if args.lake else args.workdir / "lake"
        settings = load_settings({"lake.root": str(lake)})
        dates = list(args.train_as_of) + [args.as_of]
        if not args.skip_data:
            build_lake(settings, args.workdir, args.patients, args.seed, dates)
        max_tokens = settings.features.max_tokens
        train_data = concat([load_rows(lake, d, max_tokens) for d in args.train_as_of])
        hold = load_rows(lake, args.as_of, max_tokens)
        meta = {"vocab": _vocabulary(lake, dates), "max_tokens": max_tokens,
                "train_as_of": list(args.train_as_of), "holdout_as_of": args.as_of,
                "patients": args.patients, "seed": args.seed}
        if args.save_arrays:
            save_arrays(args.save_arrays, train_data, hold, meta)
            print(args.save_arrays)
            return 0
    vocab, max_tokens = meta["vocab"], meta["max_tokens"]
    log.info("training rows %d, held-out rows %d, vocabulary %d tokens", len(train_data["length"]),
             len(hold["length"]), vocab["size"])

    torch.manual_seed(args.seed)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    config = ModelConfig(vocab_size=vocab["size"], d_model=args.d_model, n_layers=args.layers,
                         n_heads=4, d_ff=2 * args.d_model)
    model = EmrRiskModel(config).to(args.device)
    t = time.perf_counter()
    fit, val = split_by_patient(train_data, args.val_share) if args.val_share > 0 else (train_data, None)
    history, val_auc = train(model, fit, args.epochs, args.lr, args.seed,
                             time_budget_s=args.time_budget_s, val=val)
    train_s = time.perf_counter() - t
    metrics = head_metrics(predict(model, hold), hold["labels"])
    metrics = {h: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}
               for h, m in metrics.items()}
    log.info("held-out %s: %s", meta["holdout_as_of"], json.dumps(metrics))

    model = model.cpu()
    export_onnx(model, args.onnx)
    state_path = args.onnx.with_suffix(".pt")
    torch.save(model.state_dict(), state_path)
    all_lengths = np.concatenate([train_data["length"], hold["length"]])
    profiles = {"batch": {"min": 1, "opt": 256, "max": 2048},
                "seq": {"min": 1, "opt": int(max(1, min(max_tokens, np.percentile(all_lengths, 95)))),
                        "max": max_tokens}}
    write_card(args.card, args.onnx, REPO_ROOT, version=MODEL_VERSION, config=config, vocab=vocab,
               profiles=profiles,
               metrics={"holdout_as_of": meta["holdout_as_of"], "heads": metrics},
               training={"trained": True, "data": "synthetic (medscreen.synth_emr) through the lake",
                         "patients": meta["patients"], "seed": meta["seed"],
                         "train_as_of": meta["train_as_of"], "device": args.device,
                         "rows": int(len(train_data["length"])), "epochs_run": len(history),
                         "validation": {"patients_share": args.val_share,
                                        "rows": int(len(val["length"])) if val is not None else 0,
                                        "mean_auc_per_epoch": [round(x, 4) for x in val_auc],
                                        "kept_epoch": (int(np.argmax(val_auc)) + 1) if val_auc else None},
                         "loss_per_epoch": [round(x, 4) for x in history], "train_seconds": round(train_s),
                         "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
               torch_state=state_path)
    # The fused contrib-op graphs GPU engines are built from, from these same weights.
    from models.emr_risk.export_fused import export_and_record

    export_and_record(args.card, REPO_ROOT)
    print(json.dumps({"onnx": str(args.onnx), "card": str(args.card), "holdout": metrics}, indent=2))
    return 0


def _vocabulary(lake: Path, dates: list[str]) -> dict[str, Any]:
    """The vocabulary every partition was built with (they must agree)."""
    from lake.commit import read_manifest
    from lake.paths import LakePaths

    seen = {json.dumps(read_manifest(LakePaths(lake).timelines(d))["vocabulary"], sort_keys=True)
            for d in dates}
    if len(seen) != 1:
        raise ValueError(f"timelines partitions {dates} were built with different vocabularies; "
                         "rebuild them with one medscreen version")
    v = json.loads(seen.pop())
    return {"size": int(v["size"]), "version": v["version"], "sha256": v["sha256"]}


if __name__ == "__main__":
    raise SystemExit(main())
