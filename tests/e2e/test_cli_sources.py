"""The real CLI converting every other kind of saved model: .keras, legacy .h5, a TF
SavedModel folder (trusted) and .onnx — exit codes, reports and verify."""

from __future__ import annotations

import json
import os
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from clihelp import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    keras.utils.set_random_seed(0)
    d = tmp_path_factory.mktemp("keras")
    inp = keras.Input((8, 8, 3), name="image")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    out = keras.layers.Dense(3, name="scores")(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out)
    model.save(str(d / "net.keras"))
    model.save(str(d / "net.h5"))
    model.export(str(d / "saved"))
    return {"keras": d / "net.keras", "h5": d / "net.h5", "saved": d / "saved"}


def _converted(out: Path, *args: str) -> dict:
    r = cli("convert", *args, "--out", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert ET.parse(out / "reports" / "junit.xml").getroot().get("failures") == "0"
    assert cli("verify", str(out)).returncode == 0
    return json.loads((out / "contract.json").read_text())


@pytest.mark.parametrize("kind", ["keras", "h5"])
def test_keras_files(keras_files: dict[str, Path], tmp_path: Path, kind: str) -> None:
    contract = _converted(tmp_path / kind, str(keras_files[kind]), "--targets", "tflite", "onnx")
    assert contract["source"]["framework"] == "keras"
    assert contract["inputs"][0]["layout"] == "NHWC" and contract["outputs"][0]["name"] == "scores"


def test_savedmodel_needs_trust_then_converts(keras_files: dict[str, Path], tmp_path: Path) -> None:
    r = cli("convert", str(keras_files["saved"]), "--out", str(tmp_path / "no"), "--targets", "tflite")
    assert r.returncode == 2 and "--trust-model" in r.stderr
    contract = _converted(tmp_path / "sm", str(keras_files["saved"]), "--targets", "tflite",
                          "--trust-model")
    assert contract["source"]["trust"] == "trusted"


def test_onnx_source(tmp_path: Path) -> None:
    import torch
    from nets import make  # type: ignore[import-not-found]

    onnx_path = tmp_path / "net.onnx"
    torch.onnx.export(make(), (torch.rand(2, 3, 8, 8),), str(onnx_path), dynamo=True,
                      input_names=["image"], output_names=["scores"])
    contract = _converted(tmp_path / "o", str(onnx_path), "--input", "image:2x3x8x8:float32:0..1")
    assert contract["source"]["framework"] == "onnx"
    targets = {a["target"]: a["status"] for a in contract["artifacts"]}
    assert targets == {"onnx": "pass", "tflite": "pass"}  # "all" = every target reachable from ONNX
