"""Reports for people (table, Markdown) and machines (JSON, JUnit XML)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from portable_models.contract.model import Artifact, Contract
from portable_models.contract.reports.html import to_html
from portable_models.contract.reports.table import (
    HEADERS,
    NOTE_MAX,
    fmt,
    message,
    next_steps,
    outputs_of,
    render_table,
    rows,
)
from portable_models.core.text import escape, escape_md

__all__ = ["render", "write_reports", "FORMATS", "to_html", "to_json", "to_junit", "to_markdown"]

FORMATS = ("table", "json", "junit", "md", "html")
REPORT_SCHEMA = "portable-models/report/v1"


def to_json(contract: Contract, *, problems: list[str] | None = None) -> str:
    data: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "name": contract.name,
        "ok": not problems and bool(contract.artifacts)
        and all(a.status == "pass" for a in contract.artifacts),
        "problems": problems or [],
        "tolerance": contract.tolerance,
        "artifacts": [
            {"target": a.target, "key": a.key, "precision": a.precision, "status": a.status,
             "route": a.route_name, "runtime": a.parity.get("runtime"), "checked_by": a.parity.get("checked_by"),
             "reason": a.parity.get("reason") or (a.parity.get("error") or {}).get("message"),
             "file": a.file, "bytes": a.bytes, "timings": a.timings,
             "outputs": a.parity.get("outputs") or {}, "attempts": [t.to_dict() for t in a.attempts]}
            for a in contract.artifacts
        ],
    }
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def to_junit(contract: Contract, *, problems: list[str] | None = None) -> str:
    """One testcase per artifact x output; metrics as properties. Every string from the
    contract is escaped (:func:`text.escape`): XML 1.0 cannot hold most control characters
    even as references, and a CI page must not show a contract's escape sequences."""
    suite = ET.Element("testsuite", name=escape(f"portable_models.{contract.name}"))
    count = failures = errors = skipped = 0
    for art in contract.artifacts:
        outputs: dict[str, dict[str, Any] | None] = dict(outputs_of(art)) or {
            o.name: None for o in contract.outputs}
        for name, res in outputs.items():
            count += 1
            case = ET.SubElement(suite, "testcase", classname=escape(f"parity.{art.key}"),
                                 name=escape(f"{art.key}-{name}"))
            props = ET.SubElement(case, "properties")
            for k in ("max_abs", "mean_abs", "max_rel", "cosine", "sqnr_db", "mismatch_ratio", "min_atol", "top1"):
                if res and res.get(k) is not None:
                    ET.SubElement(props, "property", name=k, value=escape(res[k], limit=64))
            ET.SubElement(props, "property", name="route", value=escape(art.route_name))
            status = res.get("status") if res else art.status
            if status == "pass":
                continue
            text = escape(_failure_message(art, res), limit=NOTE_MAX)
            if art.status == "unverified":
                skipped += 1
                ET.SubElement(case, "skipped", message=f"unverified: {text}")
            elif res is None:
                errors += 1
                ET.SubElement(case, "error", message=text)
            else:
                failures += 1
                ET.SubElement(case, "failure", message=text)
    for p in problems or []:
        count += 1
        failures += 1
        case = ET.SubElement(suite, "testcase", classname="bundle", name="integrity")
        ET.SubElement(case, "failure", message=escape(p, limit=NOTE_MAX))
    suite.set("tests", str(count))
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    suite.set("skipped", str(skipped))
    ET.indent(suite)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def _failure_message(art: Artifact, res: dict[str, Any] | None) -> str:
    for reason in ((res or {}).get("reason"), art.parity.get("reason"), message(art.parity.get("error"))):
        if reason:
            return str(reason)
    return art.status


def to_markdown(contract: Contract, *, problems: list[str] | None = None) -> str:
    """A Markdown summary (a CI job's summary page): every string from the contract goes
    through :func:`text.escape_md`, so it shows as text and adds no line, heading or cell."""
    lines = [f"### portable_models parity: {escape_md(contract.name, limit=200)}", ""]
    lines.append("| " + " | ".join(HEADERS) + " |")
    lines.append("|" + "---|" * len(HEADERS))
    for r in rows(contract):
        lines.append("| " + " | ".join(escape_md(c, limit=120) for c in r) + " |")
    notes = (problems or []) + next_steps(contract)
    if notes:
        lines += ["", *[f"- {escape_md(n, limit=NOTE_MAX)}" for n in notes]]
    tol = contract.tolerance
    lines += ["", "Tolerances: " + ", ".join(
        f"{escape_md(k, limit=64)} atol {fmt(v.get('atol'))} rtol {fmt(v.get('rtol'))}"
        for k, v in tol.items() if isinstance(v, dict) and "atol" in v)]
    return "\n".join(lines) + "\n"


def render(contract: Contract, fmt: str, *, problems: list[str] | None = None) -> str:
    if fmt == "table":
        return render_table(contract, problems=problems or []) + "\n"
    if fmt == "json":
        return to_json(contract, problems=problems)
    if fmt == "junit":
        return to_junit(contract, problems=problems)
    if fmt == "md":
        return to_markdown(contract, problems=problems)
    if fmt == "html":
        return to_html(contract, problems=problems)
    raise ValueError(f"unknown report format {fmt!r}")


def write_reports(contract: Contract, folder: Path, *, diagnosis: dict[str, Any] | None = None) -> None:
    """parity.json/.md, junit.xml and report.html; diagnose.json too when export diagnosed a failure."""
    folder.mkdir(parents=True, exist_ok=True)
    if diagnosis is not None:
        (folder / "diagnose.json").write_text(json.dumps(diagnosis, indent=1, allow_nan=False), encoding="utf-8")
    (folder / "parity.json").write_text(to_json(contract), encoding="utf-8")
    (folder / "parity.md").write_text(to_markdown(contract), encoding="utf-8")
    (folder / "junit.xml").write_text(to_junit(contract), encoding="utf-8")
    (folder / "report.html").write_text(to_html(contract, diagnosis=diagnosis), encoding="utf-8")
