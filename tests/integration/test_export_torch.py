"""The core pipeline end to end on real converters and runtimes: each zoo model is
exported once (module-scoped) to the core targets, then verified from the bundle alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import portable_models as pm
from models import CORE_ML_CHECKER, ZOO
from portable_models.core.golden import load_cases

pytestmark = pytest.mark.slow
CORE = ["onnx", "torchscript", "executorch"]
ALL = [*CORE, "tflite", "coreml"]


@pytest.fixture(scope="module", params=sorted(ZOO))
def exported(request: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any]:
    case = ZOO[request.param]()
    out = tmp_path_factory.mktemp(request.param) / "bundle"
    bundle = pm.export(case.model, case.example, out=out, targets=ALL, **case.options)
    return request.param, bundle


def test_every_target_passes(exported: tuple[str, Any]) -> None:
    """Every target passes parity; off macOS Core ML passes through the MIL reference
    executor, and says so."""
    name, bundle = exported
    by_target = {a.target: a for a in bundle.contract.artifacts}
    assert list(by_target) == ALL
    for target in ALL:
        assert by_target[target].status == "pass", f"{name}/{target}:\n{bundle.report()}"
    coreml = by_target["coreml"]
    assert coreml.parity["checked_by"] == CORE_ML_CHECKER, coreml.parity
    assert coreml.parity["structural"], "the structural checks ran before the numbers"


def test_contract_records_route_hash_and_io(exported: tuple[str, Any]) -> None:
    _, bundle = exported
    contract = pm.load_contract(bundle.path)
    for art in contract.artifacts:
        if art.status == "unverified":
            continue
        assert art.file and (bundle.path / art.file).exists()
        assert art.sha256 and len(art.sha256) == 64 and art.bytes and art.bytes > 0
        assert art.route and all(step["version"] for step in art.route)
        assert art.io is not None
        assert list(art.io.inputs) == [s.name for s in contract.inputs]
        assert list(art.io.outputs) == [s.name for s in contract.outputs]
        for out in contract.outputs:
            res = art.parity["outputs"][out.name]
            assert res["status"] == "pass" and res["max_abs"] is not None


def test_verify_from_bundle_alone(exported: tuple[str, Any]) -> None:
    _, bundle = exported
    report = pm.verify(bundle.path)
    assert report.ok, report.table()
    assert [a.status for a in report.contract.artifacts] == [a.status for a in bundle.contract.artifacts]
    assert "pass" in report.table()


def test_golden_cases_cover_two_sizes_of_dynamic_dims(exported: tuple[str, Any]) -> None:
    _, bundle = exported
    contract = bundle.contract
    cases = load_cases(bundle.path / contract.golden["inputs"])
    assert len(cases) == contract.golden["cases"] == 4
    for spec in contract.inputs:
        for axis in spec.dynamic_axes:
            assert len({c[spec.name].shape[axis] for c in cases}) >= 2


def test_dict_outputs_are_named_by_key() -> None:
    case = ZOO["two_in_dict_out"]()
    from portable_models.capture.torch import flatten_outputs

    names, _ = flatten_outputs(case.model(*case.example), None)
    assert names == ["label", "value"]


def _swap_artifact(bundle_dir: Path, target: str, replacement: Path) -> None:
    """Put another artifact in place and make the contract's hashes agree with it, so only
    parity can catch it."""
    contract_path = bundle_dir / "contract.json"
    data = json.loads(contract_path.read_text())
    art = next(a for a in data["artifacts"] if a["target"] == target)
    shutil.copyfile(replacement, bundle_dir / art["file"])
    from portable_models.core.hashing import sha256_path

    digest = sha256_path(bundle_dir / art["file"])
    art["sha256"], art["bytes"] = digest, (bundle_dir / art["file"]).stat().st_size
    for entry in data["files"]:
        if entry["path"] == art["file"]:
            entry["sha256"], entry["bytes"] = digest, art["bytes"]
    contract_path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    case = ZOO["cnn"]()
    out = tmp_path_factory.mktemp("tamper") / "bundle"
    pm.export(case.model, case.example, out=out, targets=["onnx"], **case.options)
    return out


def test_one_flipped_byte_fails_verify_with_hash_error(cnn_onnx: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(cnn_onnx, bundle)
    path = bundle / "artifacts" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    report = pm.verify(bundle)
    assert not report.ok
    assert any("artifacts/model.onnx" in p for p in report.problems)
    art = report.contract.artifact("onnx")
    assert art is not None and art.status == "error" and art.parity["stage"] == "integrity"


def test_perturbed_weights_fail_parity_naming_output_and_metric(cnn_onnx: Path, tmp_path: Path) -> None:
    import torch

    case = ZOO["cnn"]()
    with torch.no_grad():
        case.model.head.weight.add_(0.05 * torch.randn_like(case.model.head.weight))
    wrong = pm.export(case.model, case.example, out=tmp_path / "wrong", targets=["onnx"], **case.options)
    bundle = tmp_path / "b"
    shutil.copytree(cnn_onnx, bundle)
    _swap_artifact(bundle, "onnx", wrong.path / "artifacts" / "model.onnx")
    report = pm.verify(bundle)
    assert not report.ok and not report.problems
    art = report.contract.artifact("onnx")
    assert art is not None and art.status == "fail"
    logits = art.parity["outputs"]["logits"]
    assert logits["status"] == "fail" and logits["max_abs"] > 1e-3
    assert "logits" in report.table() and "fail" in report.table()


def test_golden_outputs_match_eager_model(cnn_onnx: Path) -> None:
    import torch

    case = ZOO["cnn"]()
    cases_in = load_cases(cnn_onnx / "golden" / "inputs.npz")
    cases_out = load_cases(cnn_onnx / "golden" / "outputs.npz")
    with torch.no_grad():
        for cin, cout in zip(cases_in, cases_out, strict=True):
            ref = case.model(torch.from_numpy(cin["image"])).numpy()
            np.testing.assert_array_equal(ref, cout["logits"])


def test_varargs_forward_takes_dynamic_dims(tmp_path: Path) -> None:
    """``forward(self, *args)`` (a wrapper around a model): the dynamic dims of the inputs that
    land in ``*args`` reach torch.export laid out as the signature takes them."""
    import torch

    class Wrapper(torch.nn.Module):
        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return args[0] * 2 + args[1].sum(dim=1, keepdim=True)

    dims = {"input_0": {0: ("batch", 1, 4)}, "input_1": {0: ("batch", 1, 4)}}
    bundle = pm.export(Wrapper().eval(), (torch.rand(2, 3), torch.rand(2, 4)), out=tmp_path / "varargs",
                       targets=["torchscript"], dynamic_dims=dims, cache=False)
    assert bundle.ok, bundle.report()
    assert [s.shape[0] for s in bundle.contract.inputs] == ["batch", "batch"]
