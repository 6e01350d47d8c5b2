"""diagnose names the first source module whose output differs in an artifact: an ONNX file
whose second convolution's weights were changed (and the bundle resealed, as a corrupted
or hand-edited artifact would be) is localised to that convolution, not the layers before it,
with its source line; an intact bundle agrees everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from clihelp import cli

from portable_models.contract.bundle import list_files, sha256_path

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow


class Stack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y))  # the line diagnose must name
        return self.head(y.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import portable_models as pm

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("diag") / "stack"
    made = pm.export(Stack().eval(), (torch.rand(2, 3, 8, 8),), out=out, targets=["onnx", "torchscript"],
                     input_names=["x"], output_names=["y"], input_ranges={"x": (0.0, 1.0)})
    assert made.ok, made.report()
    return out


def test_an_intact_bundle_agrees_everywhere(bundle: Path) -> None:
    r = cli("diagnose", str(bundle), "--format", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(r.stdout)
    onnx = next(a for a in data["artifacts"] if a["target"] == "onnx")
    assert onnx["first"] is None
    compared = [rec["module"] for rec in onnx["records"] if rec["status"] == "compared"]
    assert {"c1", "c2", "head"} <= set(compared), onnx["records"]
    ts = next(a for a in data["artifacts"] if a["target"] == "torchscript")
    assert ts.get("first") is None and (ts["records"] or ts["error"])  # agrees, or says why it cannot tell


def test_a_changed_layer_is_named_first(bundle: Path, tmp_path: Path) -> None:
    import shutil

    import onnx
    from onnx import numpy_helper

    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    path = broken / "artifacts" / "model.onnx"
    model = onnx.load(str(path))
    changed = [init for init in model.graph.initializer if "c2" in init.name and init.name.endswith("weight")]
    assert changed, [i.name for i in model.graph.initializer]
    for init in changed:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.05), init.name))
    onnx.save(model, str(path))
    contract = json.loads((broken / "contract.json").read_text())
    onnx_entry = next(a for a in contract["artifacts"] if a["target"] == "onnx")
    onnx_entry["sha256"], onnx_entry["bytes"] = sha256_path(path), path.stat().st_size
    contract["files"] = list_files(broken)
    (broken / "contract.json").write_text(json.dumps(contract))

    assert cli("verify", str(broken), "--targets", "onnx").returncode == 1  # parity breaks
    r = cli("diagnose", str(broken), "--targets", "onnx")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "first diverges at c2 (aten.conv2d.default), " in r.stdout, r.stdout
    line = Path(__file__).read_text().splitlines().index(
        "        y = torch.relu(self.c2(y))  # the line diagnose must name") + 1
    assert f"test_diagnose.py:{line}" in r.stdout  # the source line of c2's call
    data = json.loads(cli("diagnose", str(broken), "--targets", "onnx", "--format", "json").stdout)
    records = {rec["module"]: rec for rec in data["artifacts"][0]["records"]}
    assert records["c1"]["max_abs"] <= records["c1"]["bound"]  # the layer before agrees


def test_export_diagnoses_a_failing_artifact_by_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A route whose artifact has one layer off (c2): export names c2 in its report, in
    reports/diagnose.json and in report.html's plot, and the bundle is still whole (verify
    finds the same failure and no stray file); diagnose=False and a passing export write none."""
    import os

    import portable_models as pm

    tests = str(Path(__file__).resolve().parent.parent)  # injected_routes and faults_onnx, for the workers
    monkeypatch.setenv("PYTHONPATH", tests + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("PORTABLE_MODELS_EXTRA_ROUTES", "injected_routes:DRIFT_C2_ONNX")
    torch.manual_seed(0)
    options = {"targets": ["onnx"], "input_names": ["x"], "output_names": ["y"], "cache": False,
               "routes": {"onnx": "test-drift-c2"}}
    made = pm.export(Stack().eval(), (torch.rand(1, 3, 8, 8),), out=tmp_path / "off", **options)
    assert not made.ok and made.contract.artifacts[0].status == "fail"
    assert "diagnose [onnx]: first diverges at c2" in made.report(), made.report()
    saved = json.loads((tmp_path / "off" / "reports" / "diagnose.json").read_text())
    assert saved["artifacts"][0]["first"]["module"] == "c2" and saved["bundle"] == "."
    html = (tmp_path / "off" / "reports" / "report.html").read_text()
    assert "Where it diverges" in html and "<polyline" in html
    r = cli("verify", str(tmp_path / "off"), "--format", "json")
    assert r.returncode == 1 and json.loads(r.stdout)["problems"] == [], r.stdout  # parity, nothing else

    quiet = pm.export(Stack().eval(), (torch.rand(1, 3, 8, 8),), out=tmp_path / "quiet", diagnose=False, **options)
    assert quiet.diagnosis is None and not (tmp_path / "quiet" / "reports" / "diagnose.json").exists()
    monkeypatch.delenv("PORTABLE_MODELS_EXTRA_ROUTES")
    fine = pm.export(Stack().eval(), (torch.rand(1, 3, 8, 8),), out=tmp_path / "fine",
                     **{**options, "routes": {}})
    assert fine.ok and fine.diagnosis is None and not (tmp_path / "fine" / "reports" / "diagnose.json").exists()


def test_a_keras_source_is_localised_per_layer(tmp_path: Path) -> None:
    """A Keras model's reference is per layer; its tf2onnx artifact's nodes and its TFLite
    tensors are mapped back by their name scopes (Keras's unique-scope suffix dropped;
    channels-first values compared in the layer's channels-last layout). One layer's kernel
    changed in the ONNX file: that layer is named first."""
    keras = pytest.importorskip("keras")
    import onnx
    from onnx import numpy_helper

    import portable_models as pm
    from diagnose_faults import reseal

    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 12, 3), name="image")
    x = keras.layers.ReLU(name="relu1")(keras.layers.Conv2D(8, 3, padding="same", name="conv1")(inp))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv2")(x)
    out = keras.layers.Dense(4, name="fc")(keras.layers.GlobalAveragePooling2D(name="pool")(x))
    made = pm.export(keras.Model(inp, out), (np.random.default_rng(0).random((1, 12, 12, 3), dtype=np.float32),),
                     out=tmp_path / "k", targets=["onnx", "tflite"])
    assert made.ok, made.report()
    fine = {r["target"]: r for r in pm.diagnose(tmp_path / "k").results}
    assert not any(r.get("first") or r.get("error") for r in fine.values()), fine
    compared = {t: {rec["module"] for rec in r["records"] if rec["status"] == "compared"} for t, r in fine.items()}
    assert compared["onnx"] >= {"conv2", "pool", "fc"} and compared["tflite"] >= {"relu1", "conv2", "pool"}, compared

    path = tmp_path / "k" / made.contract.artifacts[0].file
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    kernel = max((i for n in model.graph.node if "/conv2" in n.name for i in n.input if i in inits),
                 key=lambda name: inits[name].dims[0] * inits[name].dims[-1])
    inits[kernel].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[kernel]) * np.float32(1.05), kernel))
    onnx.save(model, str(path))
    reseal(tmp_path / "k")
    report = pm.diagnose(tmp_path / "k", targets=["onnx"])
    assert report.results[0]["first"]["module"] == "conv2", report.table()
