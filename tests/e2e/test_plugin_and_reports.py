"""The pytest plugin, assert_parity and the reports, on a pre-built tiny bundle
(tests/data/tiny_bundle, made by tools/make_tiny_bundle.py): no conversion needed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from portable_models.testing import ParityAssertionError, assert_parity

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny_bundle"


def _pytest(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def _tampered(tmp_path: Path) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(TINY, bad)
    with open(bad / "artifacts" / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    return bad


def test_plugin_makes_one_test_per_artifact_output(tmp_path: Path) -> None:
    r = _pytest("--pm-bundle", str(TINY), "-v", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test_parity[onnx-scores] PASSED" in r.stdout and "test_integrity PASSED" in r.stdout


def test_plugin_fails_a_tampered_bundle(tmp_path: Path) -> None:
    r = _pytest("--pm-bundle", str(_tampered(tmp_path)), cwd=tmp_path)
    assert r.returncode == 1
    assert "changed file: artifacts/model.onnx" in r.stdout


def test_assert_parity(tmp_path: Path) -> None:
    assert_parity(TINY)
    with pytest.raises(ParityAssertionError, match="changed file"):
        assert_parity(_tampered(tmp_path))


def test_json_report_validates_against_its_schema() -> None:
    import jsonschema

    from portable_models.api import verify
    from portable_models.contract.reports import to_json

    schema = json.loads(resources.files("portable_models").joinpath("contract/schema/report-v1.json").read_text())
    report = verify(TINY)
    jsonschema.validate(json.loads(to_json(report.contract, problems=report.problems)), schema)
    jsonschema.validate(json.loads((TINY / "reports" / "parity.json").read_text()), schema)


def test_junit_report_parses() -> None:
    from xml.etree import ElementTree as ET

    root = ET.parse(TINY / "reports" / "junit.xml").getroot()
    case = root.find("testcase")
    assert root.get("tests") == "1" and case is not None and case.get("name") == "onnx-scores"
    names = {p.get("name") for p in case.iter("property")}
    assert {"max_abs", "cosine", "route"} <= names


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (apt-get install chromium)")
def test_html_report_renders_in_a_real_browser(tmp_path: Path) -> None:
    from PIL import Image

    page = TINY / "reports" / "report.html"
    shot = tmp_path / "report.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 900)
    colours = image.getcolors(maxcolors=1 << 16) or []
    assert len(colours) > 20, "the screenshot is (almost) blank"
    html = page.read_text()
    assert "<svg" in html and "<script" not in html and "http://" not in html.replace(
        "http://www.w3.org/2000/svg", "")


def test_bench_writes_latency_into_contract_and_reports(tmp_path: Path) -> None:
    from clihelp import cli

    from portable_models.contract.model import load_contract

    bundle = tmp_path / "tiny"
    shutil.copytree(TINY, bundle)
    r = cli("bench", str(bundle), "--runs", "5", "--warmup", "1", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "onnxruntime" in r.stdout and "p50" in r.stdout
    b = load_contract(bundle).artifacts[0].timings["bench"]
    assert b["runs"] == 5 and b["threads"] == 1 and 0 < b["min_ms"] <= b["p50_ms"] <= b["p90_ms"]
    assert b["load_s"] > 0
    assert "Latency per runtime" in (bundle / "reports" / "report.html").read_text()
    assert cli("verify", str(bundle)).returncode == 0  # the bundle stays consistent
