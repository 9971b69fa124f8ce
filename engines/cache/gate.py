"""Engine cache, the gate role: take the held-out data, hand it with both runners to the comparator
(:mod:`engines.gate`) and record the verdict in the plan's sidecar.

The comparator never reads the lake; this role fetches its data — labelled
timelines (:func:`engines.samples.holdout_sample`) for the EMR model, planted
spheres (:func:`engines.samples.planted_spheres`) for segmentation models.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from conf.settings import Settings
from engines.cache.key import EngineCacheError, metadata_path, plan_lock, read_metadata, write_metadata_file
from engines.cache.load import reference_runner, runner_for, verify
from engines.model_card import load_card
from engines.runner import activated


def gate_plan(settings: Settings, plan_path: Path, as_of: str | None = None,
              rows: int | None = None) -> dict[str, Any]:
    """Run the accuracy gate for a cached plan and record the verdict in its metadata.

    ``rows``: held-out sample size (default :data:`engines.gate.DEFAULT_GATE_ROWS`).
    """
    from engines import gate as gate_mod, samples

    rows = rows or gate_mod.DEFAULT_GATE_ROWS
    plan_path = Path(plan_path)
    problems = verify(plan_path, settings)
    if problems:
        raise EngineCacheError(f"refusing to gate {plan_path}: " + "; ".join(problems))
    meta = read_metadata(plan_path)
    is_reference = meta["backend"] == "onnxruntime" and meta["precision"] == "fp32" \
        and meta.get("graph", "reference") == "reference" \
        and (meta.get("providers") or ["CPUExecutionProvider"])[0] == "CPUExecutionProvider"
    card = load_card(settings, meta["model"])
    segmentation = card.get("task") == "segmentation"
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    with activated(reference_runner(settings, meta["model"])) as reference:
        if is_reference and segmentation:
            verdict: dict[str, Any] = {"passed": True, "reference": True, "failures": [], "thresholds": {},
                                       "metrics": {}, "checked_at": now}
        elif is_reference:
            # The fp32 ONNX on ORT's CPU EP *is* the reference; record its own metrics where a
            # labelled sample exists, and pass by definition.
            verdict = {"passed": True, "reference": True, "failures": [], "thresholds": {},
                       "checked_at": now, "metrics": {}}
            try:
                data = _labelled_data(settings, as_of, rows, meta["model"])
            except samples.SampleError as exc:
                verdict["note"] = f"no labelled sample for metrics: {exc}"
            else:
                probs = gate_mod.run_batches(reference, data.batches, data.rows)
                verdict["metrics"] = {"rows": data.rows, "heads": gate_mod.head_metrics(probs, data.labels)}
                verdict["as_of"] = data.as_of
        else:
            with activated(runner_for(plan_path, meta)) as candidate:
                if segmentation:
                    spec = card["inputs"][0]
                    images, truth = samples.planted_spheres(tuple(int(d) for d in spec["shape"][2:]),
                                                            gate_mod.SEGMENTATION_SAMPLE_VOLUMES)
                    verdict = gate_mod.segmentation_gate(card, reference, candidate, meta["precision"],
                                                         images, truth)
                else:
                    verdict = gate_mod.gate(reference, candidate, meta["precision"],
                                            _labelled_data(settings, as_of, rows, meta["model"]),
                                            gate_mod.thresholds_for(settings, meta["precision"]))
    with plan_lock(plan_path):
        meta = read_metadata(plan_path)
        meta["gate"] = verdict
        write_metadata_file(metadata_path(plan_path), meta)
    return verdict


def _labelled_data(settings: Settings, as_of: str | None, rows: int, model: str):
    """The EMR gate's data: the held-out labelled sample from the lake, as scoring batches it."""
    from engines import gate as gate_mod, samples

    used_as_of, table = samples.holdout_sample(settings, as_of, rows, model=model)
    return gate_mod.GateData(batches=samples.feed_batches(table, settings.features.max_tokens),
                             labels=samples.labels(table), rows=table.num_rows, as_of=used_as_of)
