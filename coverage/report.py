"""coverage/results.md from the per-model results in coverage/runs/*.json.

Kept apart from the runner so that ``run.py --report-only`` rewrites the page from the
JSON alone, and so that the page's layout can change without rerunning an hour of exports.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from models import ENTRIES

#: characters of a failure signature shown in a matrix cell (the full one is in the groups)
CELL_CHARS = 48


def load(runs: Path) -> list[dict[str, Any]]:
    """Every model's result, in the corpus's order; results left by models no longer in the
    corpus (renamed, removed) are not shown."""
    order = {e.name: i for i, e in enumerate(ENTRIES)}
    records = [json.loads(p.read_text()) for p in runs.glob("*.json") if p.stem in order]
    return sorted(records, key=lambda r: order[r["name"]])


def _fmt_err(value: float | None) -> str:
    return "" if value is None else f"{value:.1e}"


def _route(c: dict[str, Any]) -> str:
    return "+".join([c.get("route") or "?", *c.get("passes", [])])


def _header(records: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    runs = meta.get("runs", [])
    wall = sum(r["wall_s"] for r in runs)
    jobs = sorted({r["jobs"] for r in runs})
    found: dict[str, set[str]] = defaultdict(set)
    for r in records:
        for pkg, ver in (r.get("versions") or {}).items():
            found[pkg].add(ver or "not installed")
    lines = [
        "# Coverage corpus: results",
        "",
        "Written by `make coverage` (`python coverage/run.py`); not part of `make test`. Every",
        "model of `coverage/models.py` exported to all five targets (fp32, `diagnose=False`, no",
        "cache), each artifact run in its real runtime and compared with the source. A Core ML",
        "cell passes only on numbers: off macOS the MIL reference executor runs the saved program",
        "(a package checked only structurally would read `unverified`, never `pass`).",
        "",
        f"- written: {time.strftime('%Y-%m-%d %H:%M')}; models: {len(records)}",
        f"- wall time: {wall / 60:.1f} min over {len(runs)} run(s), jobs: {', '.join(map(str, jobs)) or '?'}"
        f" (sum of per-model seconds: {sum(r.get('seconds', 0) for r in records) / 60:.1f} min)",
        "- versions: " + ", ".join(f"{p} {' / '.join(sorted(v))}" for p, v in sorted(found.items())),
        "",
    ]
    return lines


def _totals(records: list[dict[str, Any]], targets: Sequence[str]) -> list[str]:
    lines = ["## Totals per target", "", "| target | pass | cells | pass % |", "|---|---:|---:|---:|"]
    total = passed = 0
    for t in targets:
        cells = [r["cells"].get(t) for r in records]
        n, ok = len(cells), sum(1 for c in cells if c and c["status"] == "pass")
        total, passed = total + n, passed + ok
        lines.append(f"| {t} | {ok} | {n} | {100 * ok / n if n else 0:.0f} |")
    lines += [f"| **all** | **{passed}** | **{total}** | **{100 * passed / total if total else 0:.0f}** |", ""]
    return lines


def _signature_ids(records: list[dict[str, Any]], targets: Sequence[str]) -> dict[str, str]:
    """S1, S2, … by how many cells share the signature (most first)."""
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        for t in targets:
            sig = (r["cells"].get(t) or {}).get("signature")
            if sig:
                counts[sig] += 1
    ranked = sorted(counts, key=lambda s: (-counts[s], s))
    return {sig: f"S{i + 1}" for i, sig in enumerate(ranked)}


def _cell(c: dict[str, Any] | None, ids: dict[str, str]) -> str:
    if c is None:
        return "—"
    if c["status"] == "pass":
        return f"✓ {_route(c)} {_fmt_err(c.get('max_abs'))}".strip()
    sig = c.get("signature") or c["status"]
    short = sig if len(sig) <= CELL_CHARS else sig[: CELL_CHARS - 1] + "…"
    return f"✗ {c['status']} [{ids.get(sig, '?')}] {_md(short)}"


def _md(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("`", "'").replace("\n", " ")


def _matrix(records: list[dict[str, Any]], targets: Sequence[str], ids: dict[str, str]) -> list[str]:
    lines = ["## Matrix", "",
             "✓: route+passes and the max abs error over outputs; ✗: status, [signature id] and its start.", "",
             f"| model | family | {' | '.join(targets)} | s |", f"|---|---|{'---|' * len(targets)}---:|"]
    for r in records:
        cells = " | ".join(_cell(r["cells"].get(t), ids) for t in targets)
        lines.append(f"| {r['name']} | {r.get('family', '')} | {cells} | {r.get('seconds', 0):.0f} |")
    return [*lines, ""]


def _groups(records: list[dict[str, Any]], targets: Sequence[str], ids: dict[str, str]) -> list[str]:
    where: dict[str, list[str]] = defaultdict(list)
    for r in records:
        for t in targets:
            sig = (r["cells"].get(t) or {}).get("signature")
            if sig:
                where[sig].append(f"{r['name']} ({t})")
    lines = ["## Failures grouped by signature", "", "| id | cells | signature | model (target) |",
             "|---|---:|---|---|"]
    for sig, sid in ids.items():
        lines.append(f"| {sid} | {len(where[sig])} | `{_md(sig)}` | {', '.join(where[sig])} |")
    return [*lines, ""]


#: the targets whose routes had a fixed-shape fallback before issue #25 (Core ML's and
#: ExecuTorch's came with it)
FIXED_BEFORE = frozenset({"tflite"})


def _passed_before(c: dict[str, Any], target: str, new_routes: Collection[str]) -> bool:
    if c.get("fixed_shape") and target not in FIXED_BEFORE:
        return False
    return any(a["status"] == "pass" and "+" not in a["route"] and a["route"] not in new_routes
               for a in c.get("attempts", []))


def _before(records: list[dict[str, Any]], targets: Sequence[str], new_routes: Collection[str]) -> list[str]:
    lines = ["## Before the passes", "",
             "Per target, cells that pass now; that would pass with only the routes and passes that",
             "existed before issue #25 (a passing attempt whose route has no compatibility pass, no",
             f"`+`, and is none of {', '.join(f'`{r}`' for r in sorted(new_routes))}; a fixed-shape",
             "artifact only where that target had a fixed-shape fallback then: TFLite); and where any",
             "single attempt passed.", "",
             "| target | pass now | before the passes | any single converter | cells |", "|---|---:|---:|---:|---:|"]
    for t in targets:
        cells = [c for r in records if (c := r["cells"].get(t))]
        now = sum(1 for c in cells if c["status"] == "pass")
        before = sum(1 for c in cells if _passed_before(c, t, new_routes))
        anyone = sum(1 for c in cells if any(a["status"] == "pass" for a in c.get("attempts", [])))
        lines.append(f"| {t} | {now} | {before} | {anyone} | {len(cells)} |")
    return [*lines, ""]


def render(records: list[dict[str, Any]], meta: dict[str, Any], targets: Sequence[str],
           new_routes: Collection[str]) -> str:
    ids = _signature_ids(records, targets)
    parts = [_header(records, meta), _totals(records, targets), _matrix(records, targets, ids),
             _groups(records, targets, ids), _before(records, targets, new_routes)]
    return "\n".join(line for part in parts for line in part)


def write_report(runs: Path, out: Path, targets: Sequence[str], new_routes: Collection[str]) -> None:
    meta_path = runs / "_runs.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    out.write_text(render(load(runs) if runs.exists() else [], meta, targets, new_routes))
