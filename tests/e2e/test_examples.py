"""The examples run as a user would run them, and gate on parity."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script", ["train_torch.py", "train_keras.py"])
def test_training_script_exports_and_passes(script: str, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    r = subprocess.run([sys.executable, str(EXAMPLES / script), "--out", str(out), "--epochs", "1",
                        "--targets", "onnx", "tflite"], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "contract.json").is_file() and "pass" in r.stdout


def test_workflow_verifies_on_linux_and_macos() -> None:
    text = (EXAMPLES / ".github" / "workflows" / "parity.yml").read_text()
    assert "portable-models verify" in text and "macos" in text and "ubuntu" in text
