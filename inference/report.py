"""The run report: one self-contained HTML file (inline SVG, no scripts, no CDN).

Rendered from the same dict that is written to metrics.json, so the report
never shows a number the metrics do not hold. Contains no patient keys.
"""
from __future__ import annotations

import html
from typing import Any

from lake.schemas import HEADS

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f4f4f4}.ok{color:#0a7d2c;font-weight:600}.bad{color:#b00020;font-weight:600}
.muted{color:#666;font-size:13px}.row{display:flex;gap:18px;flex-wrap:wrap}.card{border:1px solid #ddd;padding:8px;border-radius:4px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(x: Any) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:,.4g}" if abs(x) < 1000 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return _e(x if x is not None else "—")


def histogram_svg(counts: list[int], edges: list[float], title: str, width: int = 320, height: int = 180) -> str:
    """A bar chart of one head's score histogram."""
    pad_l, pad_b, pad_t = 40, 28, 22
    w, h = width - pad_l - 10, height - pad_b - pad_t
    peak = max(counts) if counts and max(counts) > 0 else 1
    n = max(1, len(counts))
    bars = []
    for i, c in enumerate(counts):
        bh = h * c / peak
        bars.append(f'<rect x="{pad_l + i * w / n:.1f}" y="{pad_t + h - bh:.1f}" width="{max(w / n - 1, 1):.1f}" '
                    f'height="{bh:.1f}" fill="#3b6ea8"><title>{edges[i]:.2f}–{edges[i + 1]:.2f}: {c}</title></rect>')
    axis = (f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" stroke="#444"/>'
            f'<text x="{pad_l}" y="{height - 8}" font-size="11">0</text>'
            f'<text x="{pad_l + w / 2 - 8}" y="{height - 8}" font-size="11">0.5</text>'
            f'<text x="{pad_l + w - 8}" y="{height - 8}" font-size="11">1</text>'
            f'<text x="4" y="{pad_t + 10}" font-size="11">{peak}</text>'
            f'<text x="{pad_l}" y="14" font-size="13" font-weight="600">{_e(title)}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img" aria-label="{_e(title)}">{axis}{"".join(bars)}</svg>')


def line_svg(points: list[dict[str, float]], x: str, y: str, title: str, width: int = 660,
             height: int = 200) -> str:
    """A line chart (throughput over time)."""
    pad_l, pad_b, pad_t = 60, 28, 22
    w, h = width - pad_l - 12, height - pad_b - pad_t
    if not points:
        return f'<p class="muted">{_e(title)}: no batches were scored in this attempt.</p>'
    xmax = max(p[x] for p in points) or 1.0
    ymax = max(p[y] for p in points) or 1.0
    coords = " ".join(f"{pad_l + w * p[x] / xmax:.1f},{pad_t + h - h * p[y] / ymax:.1f}" for p in points)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{_e(title)}">'
            f'<text x="{pad_l}" y="14" font-size="13" font-weight="600">{_e(title)}</text>'
            f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" stroke="#444"/>'
            f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + h}" stroke="#444"/>'
            f'<text x="4" y="{pad_t + 10}" font-size="11">{ymax:,.0f}/s</text>'
            f'<text x="{pad_l + w - 30}" y="{height - 8}" font-size="11">{xmax:.1f} s</text>'
            f'<text x="{pad_l}" y="{height - 8}" font-size="11">0 s</text>'
            f'<polyline fill="none" stroke="#c0392b" stroke-width="2" points="{coords}"/></svg>')


def reliability_svg(curve: dict[str, Any], title: str, width: int = 320, height: int = 240) -> str:
    """A reliability (calibration) curve: mean predicted probability against the observed rate
    per bin, with the diagonal of perfect calibration; bin sizes in the tooltips."""
    pad_l, pad_b, pad_t, pad_r = 40, 30, 22, 10
    w, h = width - pad_l - pad_r, height - pad_b - pad_t
    bins = curve.get("bins") or []

    def xy(px: float, py: float) -> str:
        return f"{pad_l + w * px:.1f},{pad_t + h - h * py:.1f}"

    points = " ".join(xy(b["mean_predicted"], b["observed_rate"]) for b in bins)
    dots = "".join(
        f'<circle cx="{xy(b["mean_predicted"], b["observed_rate"]).split(",")[0]}" '
        f'cy="{xy(b["mean_predicted"], b["observed_rate"]).split(",")[1]}" r="3" fill="#3b6ea8">'
        f'<title>predicted {b["mean_predicted"]:.3f}, observed {b["observed_rate"]:.3f}, n={b["n"]}</title></circle>'
        for b in bins)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{_e(title)}">'
            f'<text x="{pad_l}" y="14" font-size="13" font-weight="600">{_e(title)}</text>'
            f'<rect x="{pad_l}" y="{pad_t}" width="{w}" height="{h}" fill="none" stroke="#444"/>'
            f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t}" stroke="#999" stroke-dasharray="4 3"/>'
            f'<polyline fill="none" stroke="#3b6ea8" stroke-width="2" points="{points}"/>{dots}'
            f'<text x="{pad_l}" y="{height - 16}" font-size="11">0</text>'
            f'<text x="{pad_l + w - 8}" y="{height - 16}" font-size="11">1</text>'
            f'<text x="{pad_l + w / 2 - 40}" y="{height - 4}" font-size="11">mean predicted</text>'
            f'<text x="4" y="{pad_t + 10}" font-size="11">1</text>'
            f'<text x="4" y="{pad_t + h / 2}" font-size="11">observed</text></svg>')


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else _fmt(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _verdict(ok: bool | None) -> _Raw:
    if ok is None:
        return _Raw('<span class="muted">n/a</span>')
    return _Raw('<span class="ok">PASS</span>' if ok else '<span class="bad">FAIL</span>')


def render(summary: dict[str, Any]) -> str:
    """The report for one scoring run (``summary`` = the metrics.json dict)."""
    t = summary.get("throughput", {})
    eng = summary.get("engine", {})
    qc = summary.get("qc", {})
    lat = t.get("latency", {})
    status = summary.get("status", "?")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>medscreen {_e(summary.get('stage'))} "
             f"{_e(summary.get('as_of'))}</title><style>{_CSS}</style></head><body>",
             f"<h1>EMR risk scoring — as of {_e(summary.get('as_of'))}</h1>",
             f"<p class='muted'>run {_e(summary.get('run_id'))} · {_e(summary.get('started_at'))} → "
             f"{_e(summary.get('finished_at'))} · status "
             f"<span class='{'ok' if status == 'ok' else 'bad'}'>{_e(status)}</span></p>"]
    if summary.get("fp32_safe_mode"):
        parts.append("<p class='bad'>FP32 safe mode: the low-precision engine failed QC; "
                     "these scores come from the fp32 engine.</p>")
    parts.append("<h2>Engine</h2>" + _table(
        [(k, eng.get(k)) for k in ("model", "model_version", "fingerprint", "precision", "backend",
                                   "backend_version", "providers", "gate_passed") if k in eng],
        ("field", "value")))
    parts.append("<h2>Throughput</h2>" + _table([
        ("records/s (end to end)", t.get("records_per_s")),
        ("records/s (device time only)", t.get("device_records_per_s")),
        ("rows scored (this attempt / total)", f"{t.get('rows_scored_this_attempt', 0):,} / {t.get('rows_scored', 0):,}"),
        ("batches · mean rows per batch", f"{t.get('batches')} · {t.get('mean_rows_per_batch')}"),
        ("padding efficiency (real / padded tokens)", t.get("padding_efficiency")),
        ("fragments (total / resumed)", f"{summary.get('throughput', {}).get('fragments')} / "
                                        f"{summary.get('throughput', {}).get('fragments_resumed')}"),
        ("actors · restarts", f"{t.get('actors')} · {t.get('actor_restarts')}"),
        ("wall time (s) · first batch done at (s)", f"{t.get('wall_s')} · {t.get('time_to_first_batch_s')}"),
    ], ("metric", "value")))
    parts.append(line_svg(summary.get("throughput_over_time", []), "t_s", "records_per_s",
                          "Scored records per second over the run"))
    parts.append("<h2>Per-batch latency (ms)</h2>" + _table(
        [(part, *(lat.get(part, {}).get(k) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")))
         for part in ("host", "device", "total")], ("", "p50", "p95", "p99", "max")) +
        "<p class='muted'>host = padding on CPU tasks (shared out by padded tokens) + decode in the actor; "
        "device = the engine's infer call.</p>")
    hist = summary.get("histograms", {})
    cards = []
    for h in HEADS:
        if h in hist:
            d = hist[h]
            title = f"{h} (n={d['n']:,})"
            cards.append(f"<div class='card'>{histogram_svg(d['counts'], d['edges'], title)}"
                         f"<div class='muted'>mean {_fmt(d['mean'])} · std {_fmt(d['std'])} · "
                         f"non-finite {d['non_finite']}</div></div>")
    parts.append("<h2>Score distributions</h2><div class='row'>" + "".join(cards) + "</div>")
    cal = summary.get("calibration")
    parts.append("<h2>Calibration</h2><p class='muted'>" + (
        f"{_e(cal.get('method'))} calibration {_e(cal.get('id'))} from the model card, applied to every "
        "engine's output" if cal else "none: these scores are the engine's raw outputs") + "</p>")
    curves = summary.get("reliability")
    if curves:
        cells = []
        for h in HEADS:
            if h in curves:
                title = f"{h} (n={curves[h].get('n', 0):,})"
                cells.append(f"<div class='card'>{reliability_svg(curves[h], title)}<div class='muted'>"
                             f"expected calibration error {_fmt(curves[h].get('ece'))}</div></div>")
        parts.append("<div class='row'>" + "".join(cells) + "</div><p class='muted'>Reliability against this "
                     "as-of's labels (incident diagnosis within the horizon; prevalent and lost-to-follow-up "
                     "patients have none).</p>")
    checks = qc.get("checks", [])
    parts.append(f"<h2>QC gate {_verdict(qc.get('passed'))}</h2>" + _table(
        [(c["check"], c["head"], c["value"], c["threshold"], _verdict(c["passed"])) for c in checks],
        ("check", "head", "value", "threshold", "verdict")) +
        f"<p class='muted'>PSI reference: {_e(qc.get('reference') or 'none (no earlier committed as-of)')}</p>")
    for a in summary.get("attempts", []):
        if len(summary.get("attempts", [])) > 1:
            parts.append(f"<p>attempt {_e(a['precision'])} ({_e(a['engine_fingerprint'])}): "
                         f"{_verdict(a['qc'].get('passed'))} {_e('; '.join(a['qc'].get('reasons', [])))}</p>")
    ledgers = [summary.get("ledger")] + ([summary["ledger_screening"]] if summary.get("ledger_screening") else [])
    parts.append("<h2>Ledger</h2>" + _table(
        [(lg["stage"], lg["records_in"], lg["records_out"],
          ", ".join(f"{k}: {v}" for k, v in lg["quarantined"].items()) or "0",
          ", ".join(f"{k}: {v}" for k, v in lg["ignored"].items()) or "0", _verdict(lg["balanced"]))
         for lg in ledgers if lg], ("stage", "in", "out", "quarantined", "ignored by rule", "balanced")))
    parts.append("</body></html>")
    return "\n".join(parts)
