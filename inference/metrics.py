"""Run metrics for EMR scoring: throughput, per-batch latency (host vs device), padding, restarts.

Per-batch records come back from the actors with the scores; this module
turns them into the metrics.json summary and, when
``scoring.prometheus_port`` is set, exposes them to Prometheus.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lake.schemas import HEADS

HIST_BINS = 20


def percentiles_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/max of durations given in seconds, reported in milliseconds."""
    if not len(values_s):
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    a = np.asarray(values_s, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50_ms": round(float(p50), 3), "p95_ms": round(float(p95), 3),
            "p99_ms": round(float(p99), 3), "max_ms": round(float(a.max()), 3)}


def throughput_series(batches: Sequence[dict[str, Any]], started_at: float, bins: int = 30
                      ) -> list[dict[str, float]]:
    """Scored rows per second over the run, in up to ``bins`` equal time windows."""
    done = [(b["done_at"] - started_at, b["n_rows"]) for b in batches if b.get("done_at")]
    if not done:
        return []
    t = np.array([d[0] for d in done])
    n = np.array([d[1] for d in done], dtype=np.float64)
    end = max(float(t.max()), 1e-3)
    edges = np.linspace(0.0, end, bins + 1)
    counts, _ = np.histogram(np.clip(t, 0, end), bins=edges, weights=n)
    width = edges[1] - edges[0]
    return [{"t_s": round(float(edges[i + 1]), 3), "records_per_s": round(float(counts[i] / width), 1)}
            for i in range(bins)]


def score_histograms(scores: dict[str, np.ndarray], bins: int = HIST_BINS) -> dict[str, dict[str, Any]]:
    """Per-head histogram over [0, 1] plus summary statistics (finite values only)."""
    out = {}
    for head in HEADS:
        s = np.asarray(scores[f"score_{head}"], dtype=np.float64)
        fin = s[np.isfinite(s)]
        counts, edges = np.histogram(np.clip(fin, 0, 1), bins=bins, range=(0.0, 1.0))
        out[head] = {"counts": counts.tolist(), "edges": [round(float(e), 4) for e in edges],
                     "n": int(len(s)), "non_finite": int(len(s) - len(fin)),
                     "mean": float(fin.mean()) if len(fin) else None,
                     "std": float(fin.std()) if len(fin) else None}
    return out


def summarise(batches: Sequence[dict[str, Any]], wall_s: float, rows_this_attempt: int,
              this_attempt: Sequence[dict[str, Any]] = (), started_at: float | None = None) -> dict[str, Any]:
    """The throughput / latency / padding / restart summary of one scoring pass.

    ``batches`` are all batches behind the committed rows (resumed ones too);
    ``this_attempt`` those scored by this driver, timed from ``started_at``.
    """
    rows = int(sum(b["n_rows"] for b in batches))
    real = int(sum(b["real_tokens"] for b in batches))
    padded = int(sum(b["n_rows"] * b["seq_len"] for b in batches))
    host = [b["prep_s"] + b["host_s"] for b in batches if b["n_rows"]]
    device = [b["device_s"] for b in batches if b["n_rows"]]
    total = [h + d for h, d in zip(host, device)]
    incarnations: dict[str, set[str]] = {}
    for b in batches:
        if b.get("actor_id"):
            incarnations.setdefault(b["actor_id"], set()).add(b["incarnation"])
    # An actor that Ray restarted shows a second incarnation under the same actor id.
    restarts = sum(len(v) - 1 for v in incarnations.values())
    seq_hist: dict[str, int] = {}
    for b in batches:
        if b["n_rows"]:
            seq_hist[str(b["seq_len"])] = seq_hist.get(str(b["seq_len"]), 0) + 1
    done_at = [b["done_at"] for b in this_attempt if b.get("done_at")]
    # Start-up (actor launch, engine load) shows here, not in the per-batch latencies.
    first = round(min(done_at) - started_at, 3) if done_at and started_at else None
    return {
        "time_to_first_batch_s": first,
        "rows_scored": rows,
        "rows_scored_this_attempt": int(rows_this_attempt),
        "batches": len([b for b in batches if b["n_rows"]]),
        "batches_per_seq_len": seq_hist,
        "mean_rows_per_batch": round(rows / max(1, len(device)), 1),
        "wall_s": round(float(wall_s), 3),
        "records_per_s": round(rows_this_attempt / wall_s, 1) if wall_s > 0 else None,
        "device_records_per_s": round(rows / sum(device), 1) if device and sum(device) > 0 else None,
        "padding_efficiency": round(real / padded, 4) if padded else None,
        "real_tokens": real,
        "padded_tokens": padded,
        "latency": {"host": percentiles_ms(host), "device": percentiles_ms(device),
                    "total": percentiles_ms(total)},
        "host_s_total": round(float(sum(host)), 3),
        "prep_s_total": round(float(sum(b["prep_s"] for b in batches)), 3),
        "device_s_total": round(float(sum(device)), 3),
        # Calls of a threaded actor (ray.actor_threads) waiting for its device lock.
        "device_wait_s_total": round(float(sum(b.get("device_wait_s", 0.0) for b in batches)), 3),
        "actors": len(incarnations),
        "actor_restarts": int(restarts),
    }


class PrometheusExporter:
    """Serves the run's metrics on ``scoring.prometheus_port``; use :func:`exporter_for`."""

    def __init__(self, port: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        self.registry = CollectorRegistry()
        self.rows = Counter("medscreen_emr_scored_rows", "EMR timelines scored", ["model", "precision"],
                            registry=self.registry)
        self.throughput = Gauge("medscreen_emr_records_per_second", "End-to-end scoring throughput",
                                ["model", "precision"], registry=self.registry)
        self.padding = Gauge("medscreen_emr_padding_efficiency", "Real tokens / padded tokens",
                             ["model"], registry=self.registry)
        self.restarts = Gauge("medscreen_emr_actor_restarts", "Engine actor restarts in the last run",
                              ["model"], registry=self.registry)
        self.qc = Gauge("medscreen_emr_qc_passed", "1 when the last run passed the QC gate",
                        ["model"], registry=self.registry)
        self.latency = Histogram("medscreen_emr_batch_latency_seconds", "Per-batch latency",
                                 ["part"], registry=self.registry,
                                 buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.server = start_http_server(port, registry=self.registry)
        self.port = port

    def publish(self, model: str, precision: str, summary: dict[str, Any],
                batches: Sequence[dict[str, Any]], qc_passed: bool) -> None:
        """Push one run's numbers into the registry."""
        self.rows.labels(model, precision).inc(summary["rows_scored_this_attempt"])
        if summary.get("records_per_s") is not None:
            self.throughput.labels(model, precision).set(summary["records_per_s"])
        if summary.get("padding_efficiency") is not None:
            self.padding.labels(model).set(summary["padding_efficiency"])
        self.restarts.labels(model).set(summary["actor_restarts"])
        self.qc.labels(model).set(1.0 if qc_passed else 0.0)
        for b in batches:
            if b["n_rows"]:
                self.latency.labels("host").observe(b["prep_s"] + b["host_s"])
                self.latency.labels("device").observe(b["device_s"])


_EXPORTERS: dict[int, PrometheusExporter] = {}


def exporter_for(port: int) -> PrometheusExporter:
    """The process's exporter on ``port`` (a port can be served only once per process)."""
    if port not in _EXPORTERS:
        _EXPORTERS[port] = PrometheusExporter(port)
    return _EXPORTERS[port]
