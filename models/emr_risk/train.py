"""Train the EMR risk model on synthetic data THROUGH THE LAKE, export ONNX, write the model card.

    python -m models.emr_risk.train [--workdir DIR] [--patients N] [--as-of D]
    python -m models.emr_risk.train --calibrate-only [--skip-data] ...

Steps: synthetic FHIR export (synth.emr) → ingest (jobs.emr_ingest)
→ labelled timelines (jobs.emr_features --with-labels) for quarterly training
as-of dates and one later held-out date → train on CPU → held-out metrics per
head → ONNX (dynamo exporter, dynamic batch/seq, one file) → calibration and
operating points (below) → conf/models/emr_risk.yaml.

Calibration and operating points are fitted on the exported ONNX's outputs
(what every engine computes) for the validation split — the training
patients held back for early stopping — never on the held-out date:
each head gets a calibration (Platt by default, isotonic optional) and a
threshold chosen by a stated rule (default: at most 100 flagged per 1 000
patients eligible for the head's list, eligibility as in ``scoring.eligibility``);
the card records both with reliability curves and the threshold's held-out
sensitivity/PPV. ``--calibrate-only`` does just this for the card's existing
ONNX, leaving the model untouched.
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

from conf.settings import HEADS
from models.emr_risk.export import export_onnx, update_card, write_card
from models.emr_risk.model import EmrRiskModel, ModelConfig

log = logging.getLogger("models.emr_risk.train")

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_AS_OF = ("2022-06-30", "2022-09-30", "2022-12-31", "2023-03-31", "2023-06-30")
HOLDOUT_AS_OF = "2024-06-30"
MODEL_VERSION = "1.1.0"  # 1.1: vocabulary rules 2 (dx:<group> tokens), the merged pipeline's population and labels


def build_lake(settings, workdir: Path, patients: int, seed: int, as_ofs: list[str]) -> dict[str, Any]:
    """Synthetic export → ingest → labelled timelines for each as-of date; returns the stage summaries."""
    from jobs import emr_features, emr_ingest
    from synth.emr import generate

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
    feed["prevalent"] = _prevalent(lake_root, as_of, table)
    return feed


def _prevalent(lake_root: Path, as_of: str, table) -> np.ndarray:
    """prevalent_<head> per row of ``table`` (bool [n, heads]): who screening would leave out."""
    import pyarrow.compute as pc

    from lake.commit import read_partition
    from lake.paths import LakePaths
    from lake.schemas import PREVALENT_COLUMNS

    flags = read_partition(LakePaths(lake_root).timelines(as_of), columns=["patient_key", *PREVALENT_COLUMNS])
    index = pc.index_in(table.column("patient_key"), value_set=flags.column("patient_key"))
    return np.stack([flags.column(c).take(index).fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
                     for c in PREVALENT_COLUMNS], axis=1)


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


ARRAY_KEYS = ("length", "age_years", "sex", "labels", "group", "prevalent")


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
        missing = [k for k in ARRAY_KEYS if f"{split}_{k}" not in z]
        if missing:
            raise ValueError(f"{path} lacks {missing} (written by an older version); "
                             "rebuild it with --save-arrays")
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
                   help="share of training patients held back for early stopping, calibration and "
                        "operating points (0 disables all three)")
    p.add_argument("--calibration", choices=CALIBRATION_METHODS, default="platt",
                   help="calibration method fitted on the validation split (default platt: monotone, so "
                        "rankings and AUC are unchanged, and stable with a few hundred positives per head)")
    p.add_argument("--operating-rule", choices=OPERATING_RULES, default="list_size_per_1000",
                   dest="operating_rule", help="how each head's threshold is chosen on validation")
    p.add_argument("--operating-target", type=float, default=100.0, dest="operating_target",
                   help="the rule's target: flagged per 1 000 eligible (default 100), or a PPV in (0, 1)")
    p.add_argument("--calibrate-only", action="store_true", dest="calibrate_only",
                   help="no training: calibrate the card's existing ONNX on the validation split, choose "
                        "operating points, and update only those sections of the card")
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
    if args.calibrate_only:
        import yaml

        card = yaml.safe_load(args.card.read_text())
        share = float(((card.get("training") or {}).get("validation") or {}).get("patients_share") or args.val_share)
        _, val = split_by_patient(train_data, share)
        onnx_path = REPO_ROOT / card["onnx"]["path"] if not Path(card["onnx"]["path"]).is_absolute() \
            else Path(card["onnx"]["path"])
        sections = calibrate_sections(onnx_path, val, hold, meta, share, args)
        expected_rows = ((card.get("training") or {}).get("validation") or {}).get("rows")
        if expected_rows is not None and expected_rows != len(val["length"]):
            # The split follows the patient keys, i.e. the pseudonym key the arrays were built with.
            note = (f"the model's own validation split ({expected_rows} rows) was not reproduced "
                    f"({len(val['length'])} rows: the data were keyed with another pseudonym key), so most "
                    "of these rows' patients were among the model's training rows; the held-out date "
                    "(never used for fitting) shows how the calibration carries over")
            log.warning("calibration: %s", note)
            sections["calibration"]["fitted_on"]["note"] = note
        update_card(args.card, **sections)
        print(json.dumps({"card": str(args.card), "calibration": sections["calibration"]["id"],
                          "operating_points": {h: p["threshold"] for h, p in
                                               sections["operating_points"]["heads"].items()}}, indent=2))
        return 0

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
    sections = calibrate_sections(args.onnx, val, hold, meta, args.val_share, args) if val is not None else {}
    write_card(args.card, args.onnx, REPO_ROOT, version=MODEL_VERSION, config=config, vocab=vocab,
               profiles=profiles,
               metrics={"holdout_as_of": meta["holdout_as_of"], "heads": metrics},
               training={"trained": True, "data": "synthetic (synth.emr) through the lake",
                         "patients": meta["patients"], "seed": meta["seed"],
                         "train_as_of": meta["train_as_of"], "device": args.device,
                         "rows": int(len(train_data["length"])), "epochs_run": len(history),
                         "validation": {"patients_share": args.val_share,
                                        "rows": int(len(val["length"])) if val is not None else 0,
                                        "mean_auc_per_epoch": [round(x, 4) for x in val_auc],
                                        "kept_epoch": (int(np.argmax(val_auc)) + 1) if val_auc else None},
                         "loss_per_epoch": [round(x, 4) for x in history], "train_seconds": round(train_s),
                         "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
               torch_state=state_path, **sections)
    # The fused contrib-op graphs GPU engines are built from, from these same weights.
    from models.emr_risk.export_fused import export_and_record

    export_and_record(args.card, REPO_ROOT)
    print(json.dumps({"onnx": str(args.onnx), "card": str(args.card), "holdout": metrics}, indent=2))
    return 0


CALIBRATION_METHODS = ("platt", "isotonic")
OPERATING_RULES = ("list_size_per_1000", "target_ppv")


def predict_onnx(onnx_path: Path, data: dict[str, np.ndarray], batch_rows: int = 512) -> np.ndarray:
    """The exported model's raw outputs on ONNX Runtime (CPU): what every engine reproduces."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = np.zeros((len(data["length"]), len(HEADS)), np.float32)
    order = np.argsort(data["length"], kind="stable")
    for i in range(0, len(order), batch_rows):
        idx = order[i:i + batch_rows]
        seq = max(1, int(data["length"][idx].max()))
        out[idx] = session.run(["probs"], {
            "tokens": data["tokens"][idx, :seq].astype(np.int64),
            "days_before": data["days_before"][idx, :seq].astype(np.float32),
            "age_years": data["age_years"][idx].astype(np.float32),
            "sex": data["sex"][idx].astype(np.int64)})[0]
    return out


def eligible_rows(data: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, Any]]:
    """Per head (columns), rows eligible for the head's screening list under the configured
    ``scoring.eligibility`` (preprocessing.eligibility, as screening applies it); and those rules."""
    from conf.settings import load_settings
    from preprocessing import eligibility as elig

    rules = load_settings({}).scoring.eligibility
    encounters = elig.encounter_counts(data["tokens"])
    cols = []
    for j, head in enumerate(HEADS):
        r = rules[head]
        codes = elig.reasons(elig.HeadRule(r.min_age_years, r.max_age_years, r.min_encounters),
                             data["age_years"], encounters, data["prevalent"][:, j])
        cols.append(codes == elig.ELIGIBLE)
    return np.stack(cols, axis=1), {h: rules[h].model_dump() for h in HEADS}


def calibrate_sections(onnx_path: Path, val: dict[str, np.ndarray], hold: dict[str, np.ndarray],
                       meta: dict[str, Any], val_share: float, args: argparse.Namespace) -> dict[str, Any]:
    """The card's ``calibration`` and ``operating_points`` for ``onnx_path``, fitted on ``val``
    (validation patients) and measured on ``hold`` (the held-out date)."""
    from engines import calibration as cal
    from engines import operating_points as op
    from engines.metrics import brier, roc_auc
    from lake.files import file_sha256

    raw_val, raw_hold = predict_onnx(onnx_path, val), predict_onnx(onnx_path, hold)
    yv, yh = val["labels"], hold["labels"]
    fitted = cal.fit(args.calibration, raw_val, yv, HEADS, file_sha256(onnx_path), fitted_on={
        "split": "validation", "patients_share": val_share, "as_of": meta["train_as_of"],
        "rows": int(len(yv)), "labelled": {h: int((yv[:, j] >= 0).sum()) for j, h in enumerate(HEADS)}})
    cv, ch = fitted.apply(raw_val, HEADS), fitted.apply(raw_hold, HEADS)
    curves = {name: {h: cal.reliability(p[:, j], y[:, j]) for j, h in enumerate(HEADS)}
              for name, p, y in (("validation_raw", raw_val, yv), ("validation", cv, yv), ("holdout", ch, yh))}
    holdout = {}
    for j, h in enumerate(HEADS):
        ok = yh[:, j] >= 0
        holdout[h] = {"auc": round(roc_auc(yh[ok, j], ch[ok, j]), 4),
                      "brier_raw": round(brier(yh[ok, j], raw_hold[ok, j]), 4),
                      "brier_calibrated": round(brier(yh[ok, j], ch[ok, j]), 4),
                      "ece_raw": cal.reliability(raw_hold[:, j], yh[:, j])["ece"],
                      "ece_calibrated": curves["holdout"][h]["ece"]}
    calibration = fitted.to_card(reliability=curves, holdout_as_of=meta["holdout_as_of"], holdout=holdout)
    ev, rules = eligible_rows(val)
    eh, _ = eligible_rows(hold)
    descriptions = {
        "list_size_per_1000": f"the lowest threshold at which at most {args.operating_target:g} of every 1 000 "
                              "validation patients eligible for the head's list are flagged (outreach capacity)",
        "target_ppv": f"the lowest threshold at which validation PPV among labelled flagged eligible patients "
                      f"is at least {args.operating_target:g} (at least {op.MIN_FLAGGED} of them)"}
    heads = {}
    for j, h in enumerate(HEADS):
        t = op.choose(cv[:, j], yv[:, j], ev[:, j], args.operating_rule, args.operating_target)
        # Exact (a float32 score value): rounding could lift it above the score it was chosen at.
        heads[h] = {"threshold": None if t is None else float(t),
                    "validation": op.measure(cv[:, j], yv[:, j], ev[:, j], t),
                    "holdout": op.measure(ch[:, j], yh[:, j], eh[:, j], t)}
        log.info("operating point %s: threshold %s, held-out %s", h, heads[h]["threshold"],
                 json.dumps(heads[h]["holdout"]))
    operating_points = {
        "calibration_id": fitted.id,
        "rule": {"name": args.operating_rule, "target": args.operating_target,
                 "description": descriptions[args.operating_rule]},
        "chosen_on": "validation split (calibrated scores, patients eligible for each head's list)",
        "holdout_as_of": meta["holdout_as_of"],
        "eligibility": rules,
        "heads": heads,
    }
    return {"calibration": calibration, "operating_points": operating_points}


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
