"""Contract strings are untrusted: escape sequences, newlines, NUL, bidi overrides and
markup in a bundle's name, route names, output names, runtime labels and messages show as
visible text in the terminal table, Markdown, HTML and JUnit XML — they never act."""

from __future__ import annotations

import json
import re
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from portable_models.contract.model import Contract, load_contract
from portable_models.contract.reports import FORMATS, render, write_reports
from portable_models.core.text import escape, escape_html, escape_md

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny_bundle"

HOSTILE = "a\x1b[2Jb\n## injected\rc\x00d\u202ee</testcase><testcase name='x'>f|g`h<script>i&#x202e;j\x9bk\u2028l"
#: what must never reach any report as it is
RAW = ("\x1b", "\r", "\x00", "\u202e", "\x9b", "\u2028", "\n## injected")


def _hostile_contract(tmp_path: Path) -> Contract:
    """The tiny bundle's contract with every printed string hostile, written and loaded back
    (as a bundle from someone else would be)."""
    data = json.loads((TINY / "contract.json").read_text())
    data["name"] = HOSTILE
    art = data["artifacts"][0]
    art["route_name"] = HOSTILE
    art["status"] = "fail"
    art["parity"]["status"] = "fail"
    art["parity"]["checked_by"] = HOSTILE
    art["parity"]["runtime"] = HOSTILE
    art["parity"]["reason"] = HOSTILE
    out = art["parity"]["outputs"].pop("scores")
    out["status"], out["reason"] = "fail", HOSTILE
    art["parity"]["outputs"][HOSTILE] = out
    art["attempts"] = [
        {"route": HOSTILE, "status": "error", "stage": HOSTILE, "error": {"code": "x", "message": HOSTILE}},
        {"route": "torch-onnx", "status": "fail", "seconds": 1.0},
    ]
    art["meta"]["fixed_shape"] = True
    art["meta"]["cases_checked"] = [0]
    (tmp_path / "contract.json").write_text(json.dumps(data))
    return load_contract(tmp_path)


def _assert_clean(text: str) -> None:
    for raw in RAW:
        assert raw not in text, (raw, text[:2000])
    text.encode("utf-8")  # no lone surrogates


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_shows_hostile_strings_without_their_raw_characters(tmp_path: Path, fmt: str) -> None:
    contract = _hostile_contract(tmp_path)
    text = render(contract, fmt, problems=[f"changed file: {HOSTILE}"])
    _assert_clean(text)
    if fmt != "json":  # JSON is escaped by the encoder; the others show the escapes
        shown = "\\\\" if fmt == "md" else "\\"  # Markdown escapes the escape's backslash too
        assert f"{shown}x1b" in text and f"{shown}u202e" in text


def test_markdown_gets_no_injected_heading_line_or_cell(tmp_path: Path) -> None:
    text = render(_hostile_contract(tmp_path), "md", problems=[HOSTILE])
    lines = text.splitlines()
    assert [ln for ln in lines if ln.lstrip().startswith("#")] == [lines[0]]
    assert lines[0].startswith("### portable_models parity: ")
    table = [ln for ln in lines if ln.startswith("|")]
    cells = {len(re.split(r"(?<!\\)\|", ln)) for ln in table}
    assert len(cells) == 1, table  # no row gained a cell through a '|'
    assert "<script>" not in text and "&#x202e;" not in text


def test_junit_parses_with_one_testcase_per_output_and_problem(tmp_path: Path) -> None:
    text = render(_hostile_contract(tmp_path), "junit", problems=[HOSTILE, "missing file: x"])
    root = ET.fromstring(text.split("\n", 1)[1])
    cases = root.findall("testcase")
    assert len(cases) == 3 and root.get("tests") == "3"
    assert root.get("failures") == "3"
    assert not any(c.get("name") == "x" for c in cases)
    message = cases[0].find("failure")
    assert message is not None and "</testcase>" in (message.get("message") or "")  # shown, as text


def test_junit_with_every_control_character_is_valid_xml(tmp_path: Path) -> None:
    contract = _hostile_contract(tmp_path)
    every = "".join(chr(c) for c in range(0x20)) + "\x7f\x85\ud800\udfff\ufffe\uffff"
    contract.name = every
    contract.artifacts[0].route_name = every
    ET.fromstring(render(contract, "junit", problems=[every]).split("\n", 1)[1])


def test_html_escapes_markup_and_controls(tmp_path: Path) -> None:
    text = render(_hostile_contract(tmp_path), "html", problems=[HOSTILE])
    assert "<script>" not in text and "<testcase" not in text
    assert "&lt;script&gt;" in text


def test_table_lines_are_not_moved_or_added(tmp_path: Path) -> None:
    contract = _hostile_contract(tmp_path)
    text = render(contract, "table", problems=[HOSTILE])
    assert not any(ln.startswith("## injected") for ln in text.splitlines())


def test_reports_written_into_a_bundle_are_clean(tmp_path: Path) -> None:
    contract = _hostile_contract(tmp_path)
    write_reports(contract, tmp_path / "reports")
    for f in (tmp_path / "reports").iterdir():
        _assert_clean(f.read_text(encoding="utf-8"))
    ET.parse(tmp_path / "reports" / "junit.xml")


def test_escape_renders_each_kind_visibly() -> None:
    assert escape("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert escape("1\n2\r3\t4\x00") == "1\\n2\\r3\\t45".replace("45", "4\\x00")
    assert escape("\x7f\x85\x9b") == "\\x7f\\x85\\x9b"
    assert escape("x\u202ey\u2066z\u200f") == "x\\u202ey\\u2066z\\u200f"
    assert escape("\ud800") == "\\ud800" and escape("\u2028") == "\\u2028"
    assert escape("plain ünïcode ✓ 日本") == "plain ünïcode ✓ 日本"
    assert escape("abcdef", limit=3) == "abc…"
    assert escape(3.5) == "3.5"
    assert escape_md("# h | [l](u) <b> &amp; `c` *e*") == (
        "\\# h \\| \\[l\\](u) \\<b\\> \\&amp; \\`c\\` \\*e\\*")
    assert escape_html("<a href='x'>\x1b</a>") == "&lt;a href=&#x27;x&#x27;&gt;\\x1b&lt;/a&gt;"


def test_the_tiny_bundles_reports_render_as_before() -> None:
    contract = load_contract(TINY)
    table = render(contract, "table")
    assert "onnx" in table and "torch-onnx" in table and "pass (onnxruntime)" in table
    md = render(contract, "md")
    assert md.startswith("### portable_models parity: tiny\n")
    assert "| onnx | torch-onnx | float32 | pass (onnxruntime) | scores |" in md
