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
