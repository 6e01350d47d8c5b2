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
    assert "no per-module taps for torchscript" in ts["error"]  # said, not skipped silently


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
