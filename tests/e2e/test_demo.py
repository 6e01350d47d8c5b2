"""The README's main job: ``portable-models demo``, end to end, through the real CLI."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from clihelp import cli

pytestmark = pytest.mark.slow

ALL = ["onnx", "torchscript", "executorch", "tflite", "coreml"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "demo"
    r = cli("demo", "--out", str(out), timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r.stdout


def test_every_target_passes_and_says_what_checked_it(demo: tuple[Path, str]) -> None:
    out, table = demo
    rows = {line.split()[0]: line for line in table.splitlines() if line.split()[:1] and line.split()[0] in ALL}
    assert list(rows) == ALL, table
    for target, line in rows.items():
        assert re.search(r"\bpass \(", line), f"{target}: {line}"
    if sys.platform != "darwin":
        assert "pass (MIL reference, numpy)" in rows["coreml"], rows["coreml"]
        assert "not Apple's kernels" in table  # the reference's limits are printed
    data = json.loads((out / "reports" / "parity.json").read_text())
    assert data["ok"] is True
    assert {a["target"]: a["status"] for a in data["artifacts"]} == dict.fromkeys(ALL, "pass")


def test_demo_bundle_verifies_without_allowances(demo: tuple[Path, str]) -> None:
    out, _ = demo
    r = cli("verify", str(out), "--format", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    coreml = next(a for a in json.loads(r.stdout)["artifacts"] if a["target"] == "coreml")
    assert coreml["status"] == "pass"
    assert coreml["checked_by"] == ("Core ML runtime, macOS" if sys.platform == "darwin" else "MIL reference, numpy")
    contract = json.loads((out / "contract.json").read_text())
    recorded = next(a for a in contract["artifacts"] if a["target"] == "coreml")
    assert recorded["parity"]["checked_by"] == coreml["checked_by"]  # the contract records it


def test_bench_times_no_core_ml_latency_off_macos(demo: tuple[Path, str]) -> None:
    """The MIL reference executor's time says nothing about Apple's runtime: off macOS, bench
    prints n/a for Core ML and records no latency for it."""
    out, _ = demo
    r = cli("bench", str(out), "--runs", "2", "--warmup", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    coreml_line = next(line for line in r.stdout.splitlines() if line.startswith("coreml"))
    contract = json.loads((out / "contract.json").read_text())
    coreml = next(a for a in contract["artifacts"] if a["target"] == "coreml")
    if sys.platform == "darwin":
        assert "bench" in coreml["timings"]
    else:
        assert "n/a off macOS" in coreml_line and "ms" not in coreml_line
        assert "bench" not in coreml["timings"]
    onnx = next(a for a in contract["artifacts"] if a["target"] == "onnx")
    assert onnx["timings"]["bench"]["p50_ms"] > 0
    assert cli("verify", str(out)).returncode == 0  # bench's rewrite left the bundle whole
