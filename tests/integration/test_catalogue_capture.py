"""The bad-input catalogue, model semantics: each case is refused at capture with a typed
error naming what is wrong and how to fix it, and nothing is left at the destination."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import portable_models as pm
from portable_models.errors import CaptureError, GoldenSetError, UsageError


class Fn(nn.Module):
    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.fn = fn

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> Any:
        return self.fn(self.lin(x), x, *rest)


def _refused(tmp_path: Path, model: nn.Module, example: Any, error: type, match: str, **kw: Any) -> Any:
    out = tmp_path / "dest with spaces ü"
    with pytest.raises(error, match=match) as info:
        pm.export(model.eval(), example, out=out, targets=["onnx"], **kw)
    assert not out.exists(), "a refused export left a bundle behind"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging or lock left behind"
    assert info.value.fix, "every error says how to fix it"
    return info.value


X = (torch.rand(2, 4),)


@pytest.mark.parametrize(("fn", "error", "match"), [
    (lambda h, x: {"a": h, "b": {"c": 3}}, CaptureError, "'b.c' is a int, not a tensor"),
    (lambda h, x: (h, "text"), CaptureError, "is a str, not a tensor"),
    (lambda h, x: h * float("nan"), GoldenSetError, "NaN or Inf"),
    (lambda h, x: h * 0.0, GoldenSetError, "identical for every golden case"),
    (lambda h, x: h[:, :0], GoldenSetError, "empty"),
])
def test_bad_outputs_are_refused(tmp_path: Path, fn: Any, error: type, match: str) -> None:
    _refused(tmp_path, Fn(fn), X, error, match)


def test_nested_tuple_is_flattened_and_none_entries_refused(tmp_path: Path) -> None:
    from portable_models.capture.torch import flatten_outputs

    h = torch.rand(2, 3)
    names, tensors = flatten_outputs((h, (h + 1, h - 1), {"z": h * 2}), None)
    assert names == ["output_0", "output_1.0", "output_1.1", "output_2.z"] and len(tensors) == 4
    _refused(tmp_path, Fn(lambda h, x: (h, None)), X, CaptureError, "'1' is None")


def test_train_mode_is_refused(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    with pytest.raises(UsageError, match="training mode"):
        pm.export(model, X, out=tmp_path / "o", targets=["onnx"])


def test_nondeterministic_reference_is_refused(tmp_path: Path) -> None:
    _refused(tmp_path, Fn(lambda h, x: h + torch.rand_like(h)), X, CaptureError, "not deterministic")


def test_float64_to_a_float32_model(tmp_path: Path) -> None:
    err = _refused(tmp_path, Fn(lambda h, x: h), (torch.rand(2, 4, dtype=torch.float64),), CaptureError,
                   "failed on golden case 0")
    assert "dtype" in (err.fix or "")


def test_wrong_rank(tmp_path: Path) -> None:
    _refused(tmp_path, nn.Conv2d(3, 4, 3), (torch.rand(3, 8),), CaptureError, "failed on golden case 0")


def test_missing_and_extra_input_names(tmp_path: Path) -> None:
    _refused(tmp_path, Fn(lambda h, x: h), X, UsageError, "input_names has 2 names for 1 inputs",
             input_names=["x", "y"])
    _refused(tmp_path, Fn(lambda h, x: h), X, UsageError, "dynamic_dims names unknown inputs",
             dynamic_dims={"nope": {0: "batch"}})
    _refused(tmp_path, Fn(lambda h, x: h), X, UsageError, "output_names has 2 names",
             output_names=["a", "b"])


def test_integer_input_without_range(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Embedding(10, 4))
    _refused(tmp_path, model, (torch.randint(0, 10, (2, 3)),), UsageError, "no value range")


def test_bool_input_needs_no_range(tmp_path: Path) -> None:
    model = Fn(lambda h, x, m: torch.where(m, h, -h))
    out = tmp_path / "dir with spaces ü" / "bündle"
    bundle = pm.export(model.eval(), (torch.rand(2, 4), torch.rand(2, 4) > 0.5), out=out,
                       targets=["onnx"])
    assert pm.verify(out).ok
    assert bundle.ok, bundle.report()
    assert bundle.contract.inputs[1].dtype == "bool"


def test_int64_output_compares_exactly(tmp_path: Path) -> None:
    model = Fn(lambda h, x: {"label": h.argmax(dim=1), "score": h})
    bundle = pm.export(model.eval(), X, out=tmp_path / "b", targets=["onnx", "torchscript"])
    assert bundle.ok, bundle.report()
    label = bundle.contract.artifacts[0].parity["outputs"]["label"]
    assert bundle.contract.outputs[0].dtype == "int64" and label["max_abs"] == 0


def test_output_path_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageError, match="existing file"):
        pm.export(Fn(lambda h, x: h).eval(), X, out=f, targets=["onnx"])
    assert f.read_text() == "x"


def test_read_only_output_folder(tmp_path: Path) -> None:
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root): permissions are not enforced")
        with pytest.raises(pm.errors.BundleWriteError, match="not writable"):
            pm.export(Fn(lambda h, x: h).eval(), X, out=ro / "b", targets=["onnx"])
    finally:
        ro.chmod(0o755)


def test_read_only_output_folder_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same refusal where permissions are not enforced (root): the folder reports itself
    read-only, as it would to any other user."""
    import os

    from portable_models.contract import bundle

    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(bundle.os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    with pytest.raises(pm.errors.BundleWriteError, match="not writable") as info:
        pm.export(Fn(lambda h, x: h).eval(), X, out=ro / "b", targets=["onnx"])
    assert info.value.file == str(ro) and list(ro.iterdir()) == []
