"""A self-contained HTML report: no scripts, no external files, plots as inline SVG.

Per target: the distribution of absolute errors per output (by decade, with the
tolerance marked) and each output's max error against its tolerance; latency per
runtime when ``bench`` has run.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from portable_models.contract import Artifact, Contract
from portable_models.parity import format_float
from portable_models.reports.table import HEADERS, next_steps, rows

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


def _badge(status: str) -> str:
    return f'<span class="badge" style="background:{_COLORS.get(status, "#57606a")}">{escape(status)}</span>'


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
        if value and value > 0:
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


def _gauge_svg(max_abs: float | None, atol: float | None, status: str) -> str:
    """Max error as a fraction of atol, on a log scale from 1e-6 to 1e2 x atol."""
    w, h = 360, 34
    ratio = (max_abs or 0.0) / atol if atol else 0.0
    pos = 0.0 if ratio <= 0 else min(max((math.log10(ratio) + 6) / 8, 0.0), 1.0)
    mark = 6 / 8 * (w - 20) + 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">'
            f'<rect x="10" y="10" width="{w - 20}" height="10" fill="#eaeef2" rx="5"/>'
            f'<rect x="10" y="10" width="{pos * (w - 20):.1f}" height="10" fill="{_COLORS.get(status, "#57606a")}" rx="5"/>'
            f'<line x1="{mark:.1f}" y1="5" x2="{mark:.1f}" y2="25" stroke="#cf222e"/>'
            f'<text x="{mark + 3:.1f}" y="32" font-size="9" fill="#cf222e">atol</text>'
            f'<text x="10" y="32" font-size="9" fill="#57606a">max abs / atol = {ratio:.2g}</text></svg>')


def _artifact_section(art: Artifact) -> str:
    parts = [f'<h2>{escape(art.key)} {_badge(art.status)} <span class="muted">'
             f'{escape(art.route_name or "no artifact")} · {escape(str(art.parity.get("checked_by") or art.parity.get("runtime") or ""))}'
             "</span></h2>"]
    outputs = art.parity.get("outputs") or {}
    if not outputs:
        err = (art.parity.get("error") or {}).get("message") or art.parity.get("reason") or "not checked"
        parts.append(f"<p>{escape(str(err))}</p>")
    parts.append('<div class="plots">')
    for name, res in outputs.items():
        tol = res.get("tolerance") or {}
        parts.append(f'<div class="plot"><h3>{escape(name)} {_badge(res.get("status", "?"))}</h3>'
                     f'<div class="muted">max abs {format_float(res.get("max_abs"))} · max rel '
                     f'{format_float(res.get("max_rel"))} · cosine {format_float(res.get("cosine"))} · '
                     f'atol {format_float(tol.get("atol"))} rtol {format_float(tol.get("rtol"))}</div>')
        if res.get("reason"):
            parts.append(f"<div>{escape(str(res['reason']))}</div>")
        if res.get("abs_error_hist"):
            parts.append(_histogram_svg(res["abs_error_hist"], tol.get("atol"), res.get("max_abs")))
        if res.get("max_abs") is not None:
            parts.append(_gauge_svg(res.get("max_abs"), tol.get("atol"), res.get("status", "")))
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def _latency_section(contract: Contract) -> str:
    bench = [(a.key, a.timings["bench"]) for a in contract.artifacts if isinstance(a.timings.get("bench"), dict)]
    if not bench:
        return ""
    top = max(b.get("p90_ms", 0.0) for _, b in bench) or 1.0
    rows_svg = []
    for i, (key, b) in enumerate(bench):
        y = 8 + i * 22
        for field, color in (("p90_ms", "#8c959f"), ("p50_ms", "#0969da")):
            width = 300 * b.get(field, 0.0) / top
            rows_svg.append(f'<rect x="110" y="{y}" width="{width:.1f}" height="14" fill="{color}"/>')
        rows_svg.append(f'<text x="4" y="{y + 11}" font-size="11">{escape(key)}</text>'
                        f'<text x="{114 + 300 * b.get("p90_ms", 0.0) / top:.1f}" y="{y + 11}" font-size="10">'
                        f'p50 {b.get("p50_ms", 0):.3g} ms · p90 {b.get("p90_ms", 0):.3g} ms</text>')
    height = 16 + 22 * len(bench)
    return (f'<h2>Latency per runtime</h2><svg xmlns="http://www.w3.org/2000/svg" width="640" height="{height}">'
            + "".join(rows_svg) + "</svg>")


def to_html(contract: Contract, *, problems: list[str] | None = None) -> str:
    ok = not problems and bool(contract.artifacts) and all(a.status == "pass" for a in contract.artifacts)
    table = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows(contract))
    notes = (problems or []) + next_steps(contract)
    src = contract.source
    return "".join([
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>portable_models parity: {escape(contract.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Parity report: {escape(contract.name)} {_badge('pass' if ok else 'fail')}</h1>",
        f'<p class="muted">source {escape(src["framework"])} {escape(src["version"])} · '
        f'{contract.golden["cases"]} golden cases · portable_models {escape(contract.created["portable_models"])}'
        f' · {escape(contract.created["platform"])}</p>',
        "<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in HEADERS) + f"</tr>{table}</table>",
        ('<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>") if notes else "",
        *(_artifact_section(a) for a in contract.artifacts),
        _latency_section(contract),
        '<p class="muted">Verdicts: |artifact − reference| ≤ atol + rtol·|reference| per element (float64), '
        "cosine floor, exact integers, NaN/Inf by position. A Core ML verdict from the MIL reference "
        "executor checks the program's meaning (weights, layouts, attributes), not Apple's kernels.</p>",
        "</body></html>\n",
    ])
