"""The MIL reference executor on real Core ML conversions of small torch models.

Each model (from ``models``) is converted with coremltools (``ct.convert`` of a traced
module, ML program), saved as an ``.mlpackage``, then run by :class:`MilReferenceRunner`
and judged against the torch model by the library's parity engine (``harness``). A
corrupted program must fail the comparison and an op without a kernel must be refused by
name.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import models
from harness import assert_parity, max_abs
from portable_models.core.iomap import IoMap
from portable_models.errors import RuntimeRunError, UnverifiedError
from portable_models.run.mil_reference import MilReferenceRunner

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")
nn = torch.nn


# -- helpers ------------------------------------------------------------------------
def convert(model: Any, example: Any, path: Path, *, fp16: bool = False, target: Any = None,
            shape: Any = None) -> Path:
    model.eval()
    traced = torch.jit.trace(model, (example,), check_trace=False)
    dtype = np.int32 if example.dtype == torch.int64 else np.float32
    kwargs = {"minimum_deployment_target": target} if target is not None else {}
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name="x", shape=shape or tuple(example.shape), dtype=dtype)],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
        **kwargs,
    )
    mlmodel.save(str(path))
    return path


def output_names(package: Path) -> list[str]:
    return [o.name for o in ct.utils.load_spec(str(package)).description.output]


def run(package: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    io = IoMap.identity(["x"], output_names(package))
    with MilReferenceRunner(package, io) as runner:
        return runner.run({"x": x})


def reference(model: Any, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def check(package: Path, model: Any, x: np.ndarray, precision: str = "float32") -> float:
    """Judge the executor's outputs against the torch model's (matched in order: the
    package names them) with the library's parity engine at ``precision``'s default."""
    got = run(package, x)
    want = reference(model, x)
    assert len(got) == len(want), (list(got), len(want))
    # a float16 program converted here (not by a route, which keeps float32 io) hands back
    # float16 outputs: the dtype is asserted at float32 only, as a kind at float16
    return max_abs(assert_parity(got, dict(zip(got, want, strict=True)), precision=precision,
                                 exact_dtypes=precision == "float32"))


def rand(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def encoder() -> Any:
    return models.encoder(layers=2).model


@pytest.fixture(scope="module")
def encoder_package(tmp_path_factory: pytest.TempPathFactory, encoder: Any) -> Path:
    ids = torch.randint(0, 50, (2, 7))
    return convert(encoder, ids, tmp_path_factory.mktemp("enc") / "model.mlpackage")


# -- parity -------------------------------------------------------------------------
@pytest.mark.parametrize("fp16", [False, True])
def test_cnn_with_batchnorm(tmp_path: Path, fp16: bool) -> None:
    case = models.kernel_cnn()
    x = case.example[0].numpy()
    package = convert(case.model, case.example[0], tmp_path / "model.mlpackage", fp16=fp16)
    check(package, case.model, x, "float16" if fp16 else "float32")


def test_transformer_encoder_int64_ids(encoder: Any, encoder_package: Path) -> None:
    ids = np.random.default_rng(1).integers(0, 50, (2, 7)).astype(np.int64)
    check(encoder_package, encoder, ids)


def test_transformer_encoder_fp16_flexible_shapes(tmp_path: Path, encoder: Any) -> None:
    ids = torch.randint(0, 50, (2, 7))
    shape = (ct.RangeDim(1, 4, default=2), ct.RangeDim(1, 32, default=7))
    package = convert(encoder, ids, tmp_path / "model.mlpackage", fp16=True,
                      target=ct.target.iOS16, shape=shape)
    for dims in [(2, 7), (1, 3), (3, 12)]:
        x = np.random.default_rng(2).integers(0, 50, dims).astype(np.int64)
        check(package, encoder, x, "float16")


@pytest.mark.parametrize("fp16", [False, True])
def test_lstm_and_gru(tmp_path: Path, fp16: bool) -> None:
    case = models.recurrent()
    x = case.example[0].numpy()
    target = ct.target.iOS17 if fp16 else None  # fp16 lstm needs iOS17
    package = convert(case.model, case.example[0], tmp_path / "model.mlpackage", fp16=fp16,
                      target=target)
    check(package, case.model, x, "float16" if fp16 else "float32")


def test_upsample_and_resize(tmp_path: Path) -> None:
    case = models.resize()
    package = convert(case.model, case.example[0], tmp_path / "model.mlpackage")
    check(package, case.model, case.example[0].numpy())


# -- the checks must be able to fail ---------------------------------------------------
def _copy_with_spec(package: Path, dest: Path, spec: Any) -> Path:
    shutil.copytree(package, dest)
    (dest / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(spec.SerializeToString())
    return dest


def _ops(spec: Any) -> list[Any]:
    function = spec.mlProgram.functions["main"]
    return list(function.block_specializations[function.opset].operations)


def _const_feeding(spec: Any, op_type: str, param: str) -> Any:
    """The const op that feeds ``param`` of the first ``op_type`` op of the program."""
    ops = _ops(spec)
    user = next(op for op in ops if op.type == op_type)
    name = user.inputs[param].arguments[0].name
    return next(op for op in ops if op.type == "const" and op.outputs[0].name == name)


def test_corrupted_softmax_axis_fails_parity(tmp_path: Path, encoder: Any, encoder_package: Path) -> None:
    spec = ct.utils.load_spec(str(encoder_package))
    axis = _const_feeding(spec, "softmax", "axis").attributes["val"].immediateValue.tensor.ints.values
    assert list(axis) == [-1]
    axis[0] = -2  # attention normalised over queries instead of keys: same shapes, wrong values
    bad = _copy_with_spec(encoder_package, tmp_path / "bad.mlpackage", spec)
    ids = np.random.default_rng(1).integers(0, 50, (2, 7)).astype(np.int64)
    with pytest.raises(AssertionError, match=r"parity fail at float32:\n.*: fail: .* outside atol"):
        check(bad, encoder, ids)


def test_scaled_weight_fails_parity(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(6, 3), nn.Tanh()).eval()
    x = rand(4, 6)
    package = convert(model, torch.from_numpy(x), tmp_path / "model.mlpackage")
    check(package, model, x)
    spec = ct.utils.load_spec(str(package))
    bias = _const_feeding(spec, "linear", "bias").attributes["val"].immediateValue.tensor.floats.values
    bias[0] = bias[0] * 1.5 + 0.1
    bad = _copy_with_spec(package, tmp_path / "bad.mlpackage", spec)
    with pytest.raises(AssertionError, match=r"parity fail at float32:\n.*: fail: .* outside atol"):
        check(bad, model, x)


def test_op_without_kernel_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, encoder_package: Path) -> None:
    from portable_models.run.mil import kernels

    monkeypatch.delitem(kernels.KERNELS, "softmax")
    runner = MilReferenceRunner(encoder_package, IoMap.identity(["x"], output_names(encoder_package)))
    with pytest.raises(UnverifiedError, match="no kernel for op 'softmax'") as info:
        runner.load()
    assert info.value.checked  # says what was checked before giving up


def test_run_mlpackage_and_supported_ops(encoder_package: Path) -> None:
    from portable_models.run.mil import run_mlpackage, supported_ops

    ops = supported_ops()
    assert {"conv", "lstm", "softmax", "layer_norm", "gelu", "while_loop", "cond"} <= ops
    out = run_mlpackage(encoder_package, {"x": np.zeros((2, 7), np.int32)})
    assert list(out) == output_names(encoder_package)
    assert next(iter(out.values())).shape == (2, 7, 4)
    with pytest.raises(RuntimeRunError, match="outside int32"):  # int64 ids that int32 cannot hold
        run_mlpackage(encoder_package, {"x": np.full((2, 7), 2**40, np.int64)})
    with pytest.raises(RuntimeRunError, match="shape"):  # the program's static shape is (2, 7)
        run_mlpackage(encoder_package, {"x": np.zeros((2, 8), np.int32)})


def test_neuralnetwork_package_is_unverified_not_run(tmp_path: Path) -> None:
    """Only ML programs have a Linux executor; a neuralnetwork-format model is refused
    as unverified (its numbers are checked on macOS only), never passed."""
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    traced = torch.jit.trace(model, torch.rand(1, 4))
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 4))], convert_to="neuralnetwork")
    package = tmp_path / "nn.mlpackage"
    mlmodel.save(str(package))
    runner = MilReferenceRunner(package, IoMap.identity(["x"], output_names(package)))
    with pytest.raises(UnverifiedError, match="'neuralNetwork' model; the MIL reference executor runs ML programs only"):
        runner.load()
