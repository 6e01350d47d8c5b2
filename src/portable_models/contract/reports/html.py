"""A self-contained HTML report: no scripts, no external files, plots as inline SVG.

Per target: the distribution of absolute errors per output (by decade, with the
tolerance marked) and each output's max error against its tolerance; latency per
runtime when ``bench`` has run.
"""

from __future__ import annotations

import math
from typing import Any

from portable_models.contract.model import Artifact, Contract
from portable_models.contract.reports.table import (
    HEADERS,
    NOTE_MAX,
    fmt,
    message,
    next_steps,
    number,
    outputs_of,
    rows,
)
from portable_models.core.text import escape_html as escape

__all__ = ["to_html"]

_COLORS = {"pass": "#1a7f37", "fail": "#cf222e", "error": "#cf222e", "unverified": "#9a6700",
           "skipped": "#57606a"}
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;
color:#1f2328;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de}
h3{font-size:14px;margin:14px 0 4px}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{padding:4px 8px;border-bottom:1px solid #eaeef2;
text-align:left;white-space:nowrap}th{background:#f6f8fa}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-weight:600;font-size:12px}
.muted{color:#57606a}.notes li{margin:2px 0}.plots{display:flex;flex-wrap:wrap;gap:18px}
.plot{border:1px solid #d0d7de;border-radius:6px;padding:8px}code{background:#f6f8fa;padding:0 4px}
"""


def _badge(status: Any) -> str:
    color = _COLORS.get(status, "#57606a") if isinstance(status, str) else "#57606a"
    return f'<span class="badge" style="background:{color}">{escape(status, limit=32)}</span>'


def _histogram_ok(hist: Any) -> bool:
    """Whether a recorded error histogram can be drawn: decades and counts of one length,
    numbers throughout (a contract's records are not trusted to be well formed)."""
    if not isinstance(hist, dict):
        return False
    decades, counts = hist.get("decades"), hist.get("counts")
    return (isinstance(decades, list) and isinstance(counts, list) and 0 < len(decades) == len(counts) <= 64
            and all(_finite(d) and abs(d) < 400 for d in decades)
            and all(_finite(c) and c >= 0 for c in [*counts, hist.get("zeros", 0)]))


def _finite(value: Any) -> bool:
    n = number(value)
    return n is not None and math.isfinite(n)


def _histogram_svg(hist: dict[str, Any], atol: float | None, max_abs: float | None) -> str:
    """Bars per decade of |error|; a red line at atol, a dark tick at the max error."""
    w, h, left, bottom = 360, 150, 34, 28
    decades, counts, zeros = hist["decades"], hist["counts"], hist.get("zeros", 0)
    labels = ["0"] + [f"1e{int(d)}" for d in decades]
    values = [zeros, *counts]
    top = max(values) or 1
    bw = (w - left - 6) / len(values)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
             f'<line x1="{left}" y1="{h - bottom}" x2="{w - 4}" y2="{h - bottom}" stroke="#8c959f"/>']
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        bh = (h - bottom - 12) * (math.log1p(v) / math.log1p(top))
        x = left + i * bw
        parts.append(f'<rect x="{x + 1:.1f}" y="{h - bottom - bh:.1f}" width="{bw - 2:.1f}" height="{bh:.1f}" '
                     f'fill="#0969da"><title>|error| in [{label}, …): {v}</title></rect>')
        if i % 2 == 0:
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{h - bottom + 12}" font-size="9" text-anchor="middle" '
                         f'fill="#57606a">{label}</text>')
    for value, color, name in ((atol, "#cf222e", "atol"), (max_abs, "#1f2328", "max")):
        if value and value > 0 and math.isfinite(value):
            pos = min(max(math.log10(value), decades[0]), decades[-1] + 1)
            x = left + (1 + pos - decades[0]) * bw
            parts.append(f'<line x1="{x:.1f}" y1="8" x2="{x:.1f}" y2="{h - bottom}" stroke="{color}" '
                         f'stroke-dasharray="{"4 3" if name == "atol" else "0"}"/>'
                         f'<text x="{x + 3:.1f}" y="16" font-size="10" fill="{color}">{name}</text>')
    parts.append(f'<text x="4" y="{h - bottom - 2}" font-size="9" fill="#57606a" '
                 f'transform="rotate(-90 8 {h - bottom - 2})">count (log)</text>')
    parts.append(f'<text x="{w / 2}" y="{h - 2}" font-size="10" text-anchor="middle" fill="#57606a">'
                 "absolute error |artifact − reference|</text></svg>")
    return "".join(parts)


def _gauge_svg(max_abs: float | None, atol: float | None, status: Any) -> str:
    """Max error as a fraction of atol, on a log scale from 1e-6 to 1e2 x atol."""
    w, h = 360, 34
    ratio = (max_abs or 0.0) / atol if atol else 0.0
    ratio = ratio if math.isfinite(ratio) else 0.0
    pos = 0.0 if ratio <= 0 else min(max((math.log10(ratio) + 6) / 8, 0.0), 1.0)
    mark = 6 / 8 * (w - 20) + 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">'
            f'<rect x="10" y="10" width="{w - 20}" height="10" fill="#eaeef2" rx="5"/>'
            f'<rect x="10" y="10" width="{pos * (w - 20):.1f}" height="10" fill="{_color(status)}" rx="5"/>'
            f'<line x1="{mark:.1f}" y1="5" x2="{mark:.1f}" y2="25" stroke="#cf222e"/>'
            f'<text x="{mark + 3:.1f}" y="32" font-size="9" fill="#cf222e">atol</text>'
            f'<text x="10" y="32" font-size="9" fill="#57606a">max abs / atol = {ratio:.2g}</text></svg>')


def _color(status: Any) -> str:
    return _COLORS.get(status, "#57606a") if isinstance(status, str) else "#57606a"


def _artifact_section(art: Artifact) -> str:
    by = art.parity.get("checked_by") or art.parity.get("runtime") or ""
    parts = [f'<h2>{escape(art.key)} {_badge(art.status)} <span class="muted">'
             f'{escape(art.route_name or "no artifact", limit=200)} · {escape(by, limit=200)}'
             "</span></h2>"]
    outputs = outputs_of(art)
    if not outputs:
        err = message(art.parity.get("error")) or art.parity.get("reason") or "not checked"
        parts.append(f"<p>{escape(err, limit=NOTE_MAX)}</p>")
    parts.append('<div class="plots">')
    for name, res in outputs.items():
        recorded = res.get("tolerance")
        tol: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
        atol, max_abs = number(tol.get("atol")), number(res.get("max_abs"))
        parts.append(f'<div class="plot"><h3>{escape(name, limit=200)} {_badge(res.get("status", "?"))}</h3>'
                     f'<div class="muted">max abs {fmt(max_abs)} · max rel '
                     f'{fmt(res.get("max_rel"))} · cosine {fmt(res.get("cosine"))} · '
                     f'atol {fmt(atol)} rtol {fmt(tol.get("rtol"))}</div>')
        if res.get("reason"):
            parts.append(f"<div>{escape(res['reason'], limit=NOTE_MAX)}</div>")
        if _histogram_ok(res.get("abs_error_hist")):
            parts.append(_histogram_svg(res["abs_error_hist"], atol, max_abs))
        if max_abs is not None:
            parts.append(_gauge_svg(max_abs, atol, res.get("status", "")))
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def _latency_section(contract: Contract) -> str:
    bench = [(a.key, {k: _ms(a.timings["bench"].get(k)) for k in ("p50_ms", "p90_ms")})
             for a in contract.artifacts if isinstance(a.timings.get("bench"), dict)]
    if not bench:
        return ""
    top = max(b["p90_ms"] for _, b in bench) or 1.0
    rows_svg = []
    for i, (key, b) in enumerate(bench):
        y = 8 + i * 22
        for field, color in (("p90_ms", "#8c959f"), ("p50_ms", "#0969da")):
            width = 300 * b[field] / top
            rows_svg.append(f'<rect x="110" y="{y}" width="{width:.1f}" height="14" fill="{color}"/>')
        rows_svg.append(f'<text x="4" y="{y + 11}" font-size="11">{escape(key)}</text>'
                        f'<text x="{114 + 300 * b["p90_ms"] / top:.1f}" y="{y + 11}" font-size="10">'
                        f'p50 {b["p50_ms"]:.3g} ms · p90 {b["p90_ms"]:.3g} ms</text>')
    height = 16 + 22 * len(bench)
    return (f'<h2>Latency per runtime</h2><svg xmlns="http://www.w3.org/2000/svg" width="640" height="{height}">'
            + "".join(rows_svg) + "</svg>")


def _ms(value: Any) -> float:
    """A recorded latency, or 0 when it is not a finite number >= 0."""
    ms = number(value)
    return ms if ms is not None and math.isfinite(ms) and ms >= 0 else 0.0


_LINE_COLORS = ("#0969da", "#cf222e", "#1a7f37", "#8250df", "#9a6700", "#57606a")


def _diagnose_section(diagnosis: dict[str, Any] | None) -> str:
    """Error per source module along the network (max abs over its bound, log scale), one
    line per diagnosed artifact, the first divergent module marked; then where each diverges."""
    results = [r for r in (diagnosis or {}).get("artifacts", []) if r.get("records")]
    if not diagnosis:
        return ""
    items = []
    for res in diagnosis.get("artifacts", []):
        first = res.get("first")
        text = (f"not localised: {res['error']}" if res.get("error") else
                f"first diverges at {first['module']} ({first.get('op')})" + (f", {first['where']}" if first.get("where") else "")
                if first else "every module agrees within tolerance")
        items.append(f"<li><b>{escape(res.get('key'))}</b>: {escape(text, limit=NOTE_MAX)}</li>")
    modules = list(dict.fromkeys(rec["module"] for r in results for rec in r["records"]))
    svg = ""
    if modules:
        w, h, left, bottom = 640, 220, 40, 60
        step = (w - left - 10) / max(len(modules) - 1, 1)

        def y(ratio: float) -> float:  # log10(max abs / bound), clipped to [-6, 3]; 0 is the bound
            return 10 + (3 - max(-6.0, min(3.0, math.log10(max(ratio, 1e-12))))) * (h - bottom - 10) / 9

        parts = [f'<svg width="{w}" height="{h}" role="img" aria-label="error per module">',
                 f'<line x1="{left}" x2="{w - 10}" y1="{y(1):.1f}" y2="{y(1):.1f}" stroke="#999" stroke-dasharray="4"/>',
                 f'<text x="2" y="{y(1) + 4:.1f}" font-size="10">bound</text>']
        for i, name in enumerate(modules):
            parts.append(f'<text x="{left + i * step:.1f}" y="{h - bottom + 12}" font-size="9" '
                         f'transform="rotate(40 {left + i * step:.1f} {h - bottom + 12})">{escape(name, limit=40)}</text>')
        for k, res in enumerate(results):
            color = _LINE_COLORS[k % len(_LINE_COLORS)]
            points = [(modules.index(rec["module"]), number(rec.get("max_abs")), number(rec.get("bound")))
                      for rec in res["records"] if rec.get("status") == "compared"]
            xy = [(left + i * step, y(m / b if b else (0.0 if m == 0 else 1e3))) for i, m, b in points
                  if m is not None and b is not None and math.isfinite(m)]
            if xy:
                parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="'
                             + " ".join(f"{a:.1f},{b:.1f}" for a, b in xy) + '"/>')
                parts.append(f'<text x="{w - 150}" y="{14 + 12 * k}" font-size="11" fill="{color}">'
                             f'{escape(res.get("key"), limit=40)}</text>')
        parts.append("</svg>")
        svg = "".join(parts)
    return ("<h2>Where it diverges</h2><ul class='notes'>" + "".join(items) + "</ul>" + svg
            + '<p class="muted">Per source module in execution order: the artifact\'s max abs error on that '
              "module's output over the output tolerance scaled to it (log scale; above the dashed line "
              "is over). Details: reports/diagnose.json.</p>")


def to_html(contract: Contract, *, problems: list[str] | None = None,
            diagnosis: dict[str, Any] | None = None) -> str:
    """The report page. Every string from the contract goes through
    :func:`text.escape_html` (controls made visible, then HTML's entities)."""
    ok = not problems and bool(contract.artifacts) and all(a.status == "pass" for a in contract.artifacts)
    table = "".join("<tr>" + "".join(f"<td>{escape(c, limit=200)}</td>" for c in r) + "</tr>"
                    for r in rows(contract))
    notes = (problems or []) + next_steps(contract)
    src = contract.source
    return "".join([
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>portable_models parity: {escape(contract.name, limit=200)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Parity report: {escape(contract.name, limit=200)} {_badge('pass' if ok else 'fail')}</h1>",
        f'<p class="muted">source {escape(src.get("framework"))} {escape(src.get("version"), limit=64)} · '
        f'{escape(contract.golden.get("cases"))} golden cases · portable_models '
        f'{escape(contract.created.get("portable_models"), limit=64)}'
        f' · {escape(contract.created.get("platform"), limit=64)}</p>',
        "<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in HEADERS) + f"</tr>{table}</table>",
        ('<ul class="notes">' + "".join(f"<li>{escape(n, limit=NOTE_MAX)}</li>" for n in notes) + "</ul>")
        if notes else "",
        *(_artifact_section(a) for a in contract.artifacts),
        _latency_section(contract),
        _diagnose_section(diagnosis),
        '<p class="muted">Verdicts: |artifact − reference| ≤ atol + rtol·|reference| per element (float64), '
        "cosine floor, exact integers, NaN/Inf by position. A Core ML verdict from the MIL reference "
        "executor checks the program's meaning (weights, layouts, attributes), not Apple's kernels.</p>",
        "</body></html>\n",
    ])
