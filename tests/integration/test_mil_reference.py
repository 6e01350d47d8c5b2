"""The MIL reference executor on real Core ML conversions of small torch models.

Each model is converted with coremltools (``ct.convert`` of a traced module, ML
program), saved as an ``.mlpackage``, then run by :class:`MilReferenceRunner` and
compared with the torch model. A corrupted program must fail the comparison and an op
without a kernel must be refused by name.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from portable_models.core.iomap import IoMap
from portable_models.errors import RuntimeRunError, UnverifiedError
from portable_models.run.mil_reference import MilReferenceRunner

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")
nn = torch.nn
F = torch.nn.functional

FP32 = {"atol": 1e-4, "rtol": 1e-3}
FP16 = {"atol": 1e-2, "rtol": 1e-2}


# -- models -------------------------------------------------------------------------
class ConvNet(nn.Module):
    """Conv + BatchNorm (folded into the conv by the converter) and a BatchNorm after
    pooling (kept as batch_norm), grouped/strided conv, pooling, SiLU, softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, groups=2, dilation=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 3 * 3, 10)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)

    def forward(self, x: Any) -> Any:
        x = F.relu(self.bn1(self.c1(x)))
        x = F.max_pool2d(F.silu(self.c2(x)), 2)
        x = self.bn2(F.avg_pool2d(x, 3, 1, padding=1, count_include_pad=False))
        return torch.softmax(self.fc(x.flatten(1)), -1)


class Encoder(nn.Module):
    """Embedding of int64 ids, multi-head attention, layer norm, GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation="gelu", batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: Any) -> Any:
        return self.head(self.enc(self.emb(ids)))


class Recurrent(nn.Module):
    """A 2-layer bidirectional LSTM, then a GRU (which coremltools lowers to a while_loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(16, 5, batch_first=True)

    def forward(self, x: Any) -> Any:
        y, _ = self.lstm(x)
        z, _ = self.gru(y)
        return z


class Resize(nn.Module):
    def forward(self, x: Any) -> tuple[Any, Any]:
        a = F.interpolate(x, scale_factor=2, mode="nearest")
        b = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        c = F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=True)
        d = F.pixel_shuffle(torch.cat([x, x * 2, -x, x + 1], 1), 2)
        return a + b + d, c


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


def assert_parity(package: Path, model: Any, x: np.ndarray, tol: dict[str, float]) -> float:
    got = run(package, x)
    want = reference(model, x)
    assert len(got) == len(want)
    worst = 0.0
    for (name, actual), expected in zip(got.items(), want, strict=True):
        assert actual.shape == expected.shape, name
        np.testing.assert_allclose(actual, expected, **tol, err_msg=name)
        worst = max(worst, float(np.abs(actual.astype(np.float64) - expected).max()))
    return worst


def rand(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def encoder() -> Any:
    torch.manual_seed(0)
    return Encoder().eval()


@pytest.fixture(scope="module")
def encoder_package(tmp_path_factory: pytest.TempPathFactory, encoder: Any) -> Path:
    ids = torch.randint(0, 50, (2, 7))
    return convert(encoder, ids, tmp_path_factory.mktemp("enc") / "model.mlpackage")


# -- parity -------------------------------------------------------------------------
@pytest.mark.parametrize("fp16", [False, True])
def test_cnn_with_batchnorm(tmp_path: Path, fp16: bool) -> None:
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = rand(2, 3, 16, 16)
    package = convert(model, torch.from_numpy(x), tmp_path / "model.mlpackage", fp16=fp16)
    assert_parity(package, model, x, FP16 if fp16 else FP32)


def test_transformer_encoder_int64_ids(encoder: Any, encoder_package: Path) -> None:
    ids = np.random.default_rng(1).integers(0, 50, (2, 7)).astype(np.int64)
    assert_parity(encoder_package, encoder, ids, FP32)


def test_transformer_encoder_fp16_flexible_shapes(tmp_path: Path, encoder: Any) -> None:
    ids = torch.randint(0, 50, (2, 7))
    shape = (ct.RangeDim(1, 4, default=2), ct.RangeDim(1, 32, default=7))
    package = convert(encoder, ids, tmp_path / "model.mlpackage", fp16=True,
                      target=ct.target.iOS16, shape=shape)
    for dims in [(2, 7), (1, 3), (3, 12)]:
        x = np.random.default_rng(2).integers(0, 50, dims).astype(np.int64)
        assert_parity(package, encoder, x, FP16)


@pytest.mark.parametrize("fp16", [False, True])
def test_lstm_and_gru(tmp_path: Path, fp16: bool) -> None:
    torch.manual_seed(0)
    model = Recurrent().eval()
    x = rand(2, 5, 6)
    target = ct.target.iOS17 if fp16 else None  # fp16 lstm needs iOS17
    package = convert(model, torch.from_numpy(x), tmp_path / "model.mlpackage", fp16=fp16, target=target)
    assert_parity(package, model, x, FP16 if fp16 else FP32)


def test_upsample_and_resize(tmp_path: Path) -> None:
    model = Resize().eval()
    x = rand(1, 2, 4, 5)
    package = convert(model, torch.from_numpy(x), tmp_path / "model.mlpackage")
    assert_parity(package, model, x, FP32)


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
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_parity(bad, encoder, ids, FP32)


def test_scaled_weight_fails_parity(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(6, 3), nn.Tanh()).eval()
    x = rand(4, 6)
    package = convert(model, torch.from_numpy(x), tmp_path / "model.mlpackage")
    assert_parity(package, model, x, FP32)
    spec = ct.utils.load_spec(str(package))
    bias = _const_feeding(spec, "linear", "bias").attributes["val"].immediateValue.tensor.floats.values
    bias[0] = bias[0] * 1.5 + 0.1
    bad = _copy_with_spec(package, tmp_path / "bad.mlpackage", spec)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_parity(bad, model, x, FP32)


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
