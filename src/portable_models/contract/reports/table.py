"""The parity table a person reads in the terminal (plain text, no colour needed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from portable_models.contract.model import Artifact, Contract
from portable_models.core.text import escape
from portable_models.core.tolerance import format_float

__all__ = ["render_table", "rows", "worst_output", "next_steps", "number", "fmt", "outputs_of", "message",
           "NOTE_MAX"]

HEADERS = ("target", "route", "precision", "status", "worst output", "max abs", "max rel",
           "tolerance", "convert", "size")


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return "-"


def number(value: Any) -> float | None:
    """``value`` when it is a number (a report never trusts a contract's field types)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def fmt(value: Any) -> str:
    """A metric for a report: :func:`format_float` of a number, ``n/a`` for anything else."""
    return format_float(number(value))


def outputs_of(art: Artifact) -> dict[str, dict[str, Any]]:
    """The artifact's per-output parity records (those that are records at all)."""
    outs = art.parity.get("outputs")
    if not isinstance(outs, dict):
        return {}
    return {str(k): v for k, v in outs.items() if isinstance(v, dict)}


def worst_output(art: Artifact) -> tuple[str, dict[str, Any]] | None:
    """The output that failed, or else the one with the largest error."""
    outs = outputs_of(art)
    if not outs:
        return None
    failing = [(k, v) for k, v in outs.items() if v.get("status") != "pass"]
    pool = failing or list(outs.items())
    return max(pool, key=lambda kv: number(kv[1].get("max_abs")) or 0.0)


def status_text(art: Artifact) -> str:
    by = art.parity.get("checked_by")
    if art.status == "pass" and by:
        return f"pass ({by})"
    return art.status


def message(record: Any, default: str = "") -> str:
    """The ``message`` of an error record (a dict), else ``default``."""
    msg = record.get("message") if isinstance(record, dict) else None
    return msg if isinstance(msg, str) and msg else default


def rows(contract: Contract) -> list[tuple[str, ...]]:
    """The table's cells, as the contract has them: each format escapes them its own way."""
    out: list[tuple[str, ...]] = []
    for art in contract.artifacts:
        w = worst_output(art)
        name, res = (w[0], w[1]) if w else ("-", {})
        tol = res.get("tolerance")
        tol_text = _tolerance_text(tol)
        conv = number(art.timings.get("convert_s"))
        conv_text = f"{conv:.1f} s" if conv is not None else "-"
        if art.meta.get("cache") == "hit":
            conv_text += " (cached)"
        out.append((art.target, art.route_name or "-", art.precision, status_text(art), name,
                    fmt(res.get("max_abs")), fmt(res.get("max_rel")), tol_text,
                    conv_text, _size(art.bytes)))
    return out


def next_steps(contract: Contract) -> list[str]:
    """One line per problem: which route failed at which stage, why, and where the log is."""
    lines = []
    constant = contract.golden.get("constant_outputs") or []
    if constant:
        lines.append(f"weak evidence: output(s) {', '.join(map(repr, constant))} are the same for every "
                     "golden case (still checked: every artifact must give the same values); pass real "
                     "inputs as samples= (--samples FILE.npz) so that they vary")
    not_built = contract.options.get("not_built") if isinstance(contract.options, dict) else None
    for item in not_built if isinstance(not_built, list) else []:
        if isinstance(item, dict):
            lines.append(f"{item.get('target')}-{item.get('precision')}: not built: {item.get('reason')}")
    for art in contract.artifacts:
        truth = art.meta.get("truth")
        if isinstance(truth, dict) and art.status in ("pass", "fail"):
            ratio = art.meta.get("size_ratio_to_fp32")
            judged = "; ".join(f"{name}: cosine {fmt(res.get('cosine'))}, SQNR {fmt(res.get('sqnr_db'))} dB"
                               for name, res in outputs_of(art).items())
            ops = (f"ops {', '.join(sorted(truth.get('quant_ops') or {})) or 'none'}" if truth.get("quant_ops")
                   else f"{truth.get('dynamic_ops', 0)} dynamic-range ops")
            lines.append(f"{art.key}: {fmt(ratio)}x the fp32 size; truth: {fmt(100 * truth.get('int8_share', 0))}% of "
                         f"weight bytes int8, {truth.get('quantized_activations', 0)} quantised activations, "
                         f"{ops}; {judged}")
        split = art.parity.get("real_vs_random")
        if isinstance(split, dict) and split.get("real") != split.get("random"):
            lines.append(f"{art.key}: the {split.get('random_cases')} random golden cases say {split.get('random')}, "
                         f"the {split.get('real_cases')} held-out real ones say {split.get('real')}"
                         + (" (real data rules a quantised variant)" if split.get("rules") == "real"
                            else " (every case must pass at this precision)"))
        acc = art.parity.get("accuracy")
        if isinstance(acc, dict):
            lines.append(f"{art.key}: accuracy {fmt(acc.get('artifact'))} against the source's {fmt(acc.get('source'))} "
                         f"on {acc.get('rows')} labelled rows: drop {fmt(acc.get('drop_points'))} points "
                         f"(budget {fmt(acc.get('drop_max_points'))}) — {acc.get('status')}")
        for att in art.attempts:
            if att.status == "pass" or (att.route == art.route_name and att.status == art.status):
                continue
            reason = (att.parity or {}).get("reason")
            msg = message(att.error) or (reason if isinstance(reason, str) else "") or att.status
            msg = (msg.splitlines() or [""])[0]
            then = f"; then {art.route_name} {art.status}" if art.status in ("pass", "unverified") else ""
            lines.append(f"{art.key}: {att.route} {att.status} at {att.stage or '?'}: {msg[:200]}"
                         f" (log: logs/{art.key}.log){then}")
        if art.meta.get("fixed_shape"):
            checked = art.meta.get("cases_checked") or []
            lines.append(f"{art.key}: fixed-shape artifact ({art.route_name} keeps no dynamic dims): "
                         f"checked on golden cases {checked} only")
        if art.status == "unverified":
            checked = art.parity.get("checked") or []
            listed = ", ".join(str(c) for c in checked) if isinstance(checked, list) else str(checked)
            lines.append(f"{art.key}: unverified — {message(art.parity.get('error'))}"
                         + (f"; checked: {listed}" if checked else ""))
        elif art.status in ("fail", "error", "skipped") and (
                not art.attempts or art.attempts[-1].status == "pass"):  # e.g. failed again in verify
            reason = art.parity.get("reason") or message(art.parity.get("error"))
            lines.append(f"{art.key}: {art.status}: {reason}")
    by_reference = [a.key for a in contract.artifacts
                    if a.parity.get("checker") == "mil-reference" and a.status in ("pass", "fail")]
    if by_reference:
        lines.append(f"{', '.join(by_reference)}: {REFERENCE_CAVEAT}")
    return lines


#: what a verdict of the MIL reference executor does and does not cover.
REFERENCE_CAVEAT = ("numbers checked by the MIL reference executor (numpy), which runs the program's "
                    "ops as saved: it checks the artifact's meaning (weights, layouts, attributes, graph "
                    "passes, casts), not Apple's kernels or GPU/Neural Engine precision; "
                    "`portable-models verify` on macOS runs the real Core ML runtime as well")


def render_table(contract: Contract, *, problems: Sequence[str] = ()) -> str:
    """The parity table for a terminal: every cell and note escaped (:func:`text.escape`), so
    a contract's strings cannot move the cursor, clear the screen or add lines."""
    body = [tuple(escape(c, limit=_CELL_MAX) for c in r) for r in rows(contract)]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(HEADERS)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    text = [line(HEADERS), line(tuple("-" * w for w in widths))]
    text += [line(r) for r in body]
    notes = list(problems) + next_steps(contract)
    if notes:
        text.append("")
        text += [escape(n, limit=NOTE_MAX) for n in notes]
    return "\n".join(text)


#: longest cell and note a report shows (a contract's strings are bounded, not short).
_CELL_MAX = 120
NOTE_MAX = 2000


def _tolerance_text(tol: Any) -> str:
    """``atol/rtol``, or a budget's floors (``cos≥0.98 sqnr≥15dB``)."""
    if not isinstance(tol, dict) or not tol:
        return "-"
    if tol.get("atol") is None:
        floors = [f"cos≥{fmt(tol['cosine_min'])}" if tol.get("cosine_min") is not None else "",
                  f"sqnr≥{fmt(tol['sqnr_min'])}dB" if tol.get("sqnr_min") is not None else ""]
        return " ".join(f for f in floors if f) or "-"
    return f"{fmt(tol.get('atol'))}/{fmt(tol.get('rtol'))}"
