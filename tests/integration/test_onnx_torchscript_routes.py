"""The ``torch-onnx`` and ``torch-jit-trace`` routes with their real runtimes.

Each model is captured with ``torch.export`` (dynamic batch), converted by the route,
loaded by the runtime through the io map, and compared with the eager model at two
batch sizes (2, the capture size, and 3).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

from portable_models.convert.base import ConvertJob, ConvertResult, ensure_artifact  # noqa: E402
from portable_models.convert.onnx import convert_torch_onnx  # noqa: E402
from portable_models.convert.torchscript import convert_trace  # noqa: E402
from portable_models.core.iomap import IoMap  # noqa: E402
from portable_models.core.spec import DimSpec, TensorSpec  # noqa: E402
from portable_models.run.onnxruntime import OnnxRuntimeRunner  # noqa: E402
from portable_models.run.torchscript import TorchScriptRunner  # noqa: E402

pytestmark = pytest.mark.slow

ATOL, RTOL = 1e-4, 1e-3
ROUTES: dict[str, tuple[Callable[[ConvertJob], ConvertResult], type[Any]]] = {
    "torch-onnx": (convert_torch_onnx, OnnxRuntimeRunner),
    "torch-jit-trace": (convert_trace, TorchScriptRunner),
}


# -- models --------------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: Any) -> Any:
        y = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(y.view(y.size(0), -1))  # a size computed from the input


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation="gelu",
                                                batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: Any) -> Any:
        return self.head(self.norm(self.layer(self.emb(ids))).mean(1))


class TinyLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 12, batch_first=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: Any) -> Any:
        y, _ = self.lstm(x)
        return self.fc(y[:, -1])


class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, x: Any, y: Any) -> Any:
        h = self.a(x) + self.b(y)
        # insertion order (not sorted order) is the flat output order
        return {"score": h.sum(-1), "best": h.argmax(-1)}


class MixedDtypes(nn.Module):
    def forward(self, x: Any, mask: Any, n: Any) -> Any:
        value = torch.where(mask, x.float(), torch.zeros_like(x, dtype=torch.float32))
        return value + n.float(), n.long() * 3 + mask.long(), x * 2


@dataclass
class Case:
    model: nn.Module
    inputs: list[tuple[str, str, tuple[Any, ...]]]   # logical name, dtype, shape
    outputs: list[str]
    make: Callable[[int, np.random.Generator], dict[str, np.ndarray]]


def _cnn_case() -> Case:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
        model.bn.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
    return Case(model, [("image", "float32", ("batch", 3, 16, 16))], ["logits"],
                lambda b, r: {"image": r.standard_normal((b, 3, 16, 16), dtype=np.float32)})


def _encoder_case() -> Case:
    torch.manual_seed(1)
    return Case(TinyEncoder().eval(), [("tokens", "int64", ("batch", 7))], ["logits"],
                lambda b, r: {"tokens": r.integers(0, 50, (b, 7), dtype=np.int64)})


def _lstm_case() -> Case:
    torch.manual_seed(2)
    return Case(TinyLSTM().eval(), [("seq", "float32", ("batch", 5, 6))], ["pred"],
                lambda b, r: {"seq": r.standard_normal((b, 5, 6), dtype=np.float32)})


def _two_case() -> Case:
    torch.manual_seed(3)
    return Case(TwoInTwoOut().eval(),
                [("features", "float32", ("batch", 5)), ("extra", "float32", ("batch", 3))],
                ["score", "best"],
                lambda b, r: {"features": r.standard_normal((b, 5), dtype=np.float32),
                              "extra": r.standard_normal((b, 3), dtype=np.float32)})


def _mixed_case() -> Case:
    def make(b: int, r: np.random.Generator) -> dict[str, np.ndarray]:
        return {"x": r.standard_normal((b, 4)).astype(np.float16),
                "mask": r.random((b, 4)) > 0.5,
                "n": r.integers(-5, 5, (b, 4), dtype=np.int32)}

    return Case(MixedDtypes().eval(),
                [("x", "float16", ("batch", 4)), ("mask", "bool", ("batch", 4)),
                 ("n", "int32", ("batch", 4))], ["value", "count", "half"], make)


CASES: dict[str, Callable[[], Case]] = {
    "cnn": _cnn_case, "encoder": _encoder_case, "lstm": _lstm_case, "two_in_dict_out": _two_case,
    "mixed_dtypes": _mixed_case,
}


# -- helpers -------------------------------------------------------------------------
def _eager(model: nn.Module, arrays: dict[str, np.ndarray], names: list[str]) -> dict[str, Any]:
    with torch.no_grad():
        out = model(*[torch.from_numpy(a) for a in arrays.values()])
    leaves = list(out.values()) if isinstance(out, dict) else (
        list(out) if isinstance(out, tuple) else [out])
    return {n: t.numpy() for n, t in zip(names, leaves, strict=True)}


def make_job(case: Case, route: str, root: Path, **options: Any) -> ConvertJob:
    """What the lead's pipeline hands a route: a saved .pt2, specs, dims, sample."""
    sample = case.make(2, np.random.default_rng(0))
    batch = torch.export.Dim("batch", min=1, max=64)
    dynamic = tuple({0: batch} for _ in case.inputs)
    args = tuple(torch.from_numpy(a) for a in sample.values())
    ep = torch.export.export(case.model, args, dynamic_shapes=dynamic)
    (root / "source").mkdir(parents=True, exist_ok=True)
    source = root / "source" / "model.pt2"
    torch.export.save(ep, str(source))
    ref = _eager(case.model, sample, case.outputs)
    return ConvertJob(
        route=route, source_file=source, out_dir=root / "artifacts", work_dir=root / "work",
        inputs=[TensorSpec(name=n, dtype=d, shape=s) for n, d, s in case.inputs],
        outputs=[TensorSpec(name=n, dtype=str(a.dtype), shape=("batch", *a.shape[1:]))
                 for n, a in ref.items()],
        dims={"batch": DimSpec(name="batch", min=1, max=64)},
        sample_inputs=sample, options=dict(options),
    )


def run_artifact(runner_cls: type[Any], path: Path, io: IoMap,
                 inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with runner_cls(path, io) as runner:
        return dict(runner.run(inputs))


def assert_matches(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """Names, shapes and dtypes equal; floats within ATOL/RTOL, the rest exact."""
    assert list(got) == list(want)
    worst = 0.0
    for name, ref in want.items():
        out = got[name]
        assert out.shape == ref.shape, (name, out.shape, ref.shape)
        assert out.dtype == ref.dtype, (name, out.dtype, ref.dtype)
        if ref.dtype.kind == "f":
            tol = (1e-2, 1e-2) if ref.dtype == np.float16 else (ATOL, RTOL)
            np.testing.assert_allclose(out, ref, atol=tol[0], rtol=tol[1], err_msg=name)
            worst = max(worst, float(np.max(np.abs(out.astype(np.float64) - ref))))
        else:
            np.testing.assert_array_equal(out, ref, err_msg=name)
    return worst


# -- tests ---------------------------------------------------------------------------
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("case_name", list(CASES))
def test_route_matches_eager(case_name: str, route: str, tmp_path: Path) -> None:
    case = CASES[case_name]()
    job = make_job(case, route, tmp_path)
    convert, runner_cls = ROUTES[route]
    start = time.perf_counter()
    result = convert(job)
    convert_s = time.perf_counter() - start
    path = ensure_artifact(job, result)
    assert list(result.io.inputs) == job.input_names
    assert list(result.io.outputs) == job.output_names
    worst = 0.0
    for batch in (2, 3):  # the capture size, and another one along the dynamic dim
        inputs = case.make(batch, np.random.default_rng(10 + batch))
        got = run_artifact(runner_cls, path, result.io, inputs)
        worst = max(worst, assert_matches(got, _eager(case.model, inputs, case.outputs)))
    print(f"\n[{case_name} x {route}] convert {convert_s:.2f}s max_abs {worst:.3g} "
          f"steps {[s.to_dict() for s in result.steps]}")


def test_onnx_graph_keeps_dim_labels_and_names(tmp_path: Path) -> None:
    import onnx

    job = make_job(_two_case(), "torch-onnx", tmp_path)
    result = convert_torch_onnx(job)
    model = onnx.load(str(ensure_artifact(job, result)))
    assert [i.name for i in model.graph.input] == ["features", "extra"]
    assert [o.name for o in model.graph.output] == ["score", "best"]
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert result.meta["opset"] == result.steps[0].detail["opset"] >= 17
    assert not model.graph.initializer or all(
        not t.external_data for t in model.graph.initializer)


def test_torchscript_scripts_symbolic_sizes(tmp_path: Path) -> None:
    job = make_job(_cnn_case(), "torch-jit-trace", tmp_path)
    result = convert_trace(job)
    assert result.meta["method"] == "script"  # tracing would bake view(2, -1) in
    assert result.meta["dynamic_check"]["status"] == "pass"
    assert result.meta["positional_inputs"] == ["image"]
    job2 = make_job(_two_case(), "torch-jit-trace", tmp_path / "two")
    assert convert_trace(job2).meta["method"] == "trace"  # nothing symbolic: trace


def test_forced_trace_of_symbolic_sizes_is_refused(tmp_path: Path) -> None:
    from portable_models.errors import ConversionError

    job = make_job(_cnn_case(), "torch-jit-trace", tmp_path, torchscript_method="trace")
    with pytest.raises(ConversionError, match="dims change"):
        convert_trace(job)


def test_perturbed_onnx_weights_fail_parity(tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    case = _cnn_case()
    job = make_job(case, "torch-onnx", tmp_path)
    result = convert_torch_onnx(job)
    path = ensure_artifact(job, result)
    inputs = case.make(3, np.random.default_rng(7))
    want = _eager(case.model, inputs, case.outputs)
    assert_matches(run_artifact(OnnxRuntimeRunner, path, result.io, inputs), want)
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(init).copy()
    weights.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(weights, init.name))
    onnx.save(model, str(path))
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_matches(run_artifact(OnnxRuntimeRunner, path, result.io, inputs), want)


def test_perturbed_torchscript_weights_fail_parity(tmp_path: Path) -> None:
    case = _cnn_case()
    job = make_job(case, "torch-jit-trace", tmp_path, torchscript_freeze=False)
    result = convert_trace(job)
    path = ensure_artifact(job, result)
    inputs = case.make(2, np.random.default_rng(8))
    want = _eager(case.model, inputs, case.outputs)
    assert_matches(run_artifact(TorchScriptRunner, path, result.io, inputs), want)
    module = torch.jit.load(str(path))
    with torch.no_grad():
        module.fc.weight[0, 0] += 0.5
    torch.jit.save(module, str(path))
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_matches(run_artifact(TorchScriptRunner, path, result.io, inputs), want)


def test_a_torchscript_runs_thread_count_is_put_back_after_it(tmp_path: Path) -> None:
    # torch's thread count is the worker's: a verify's one-thread run must not leave it at one
    from portable_models.errors import RuntimeLoadError
    from portable_models.run.base import RunnerOptions

    path = tmp_path / "m.pt"
    torch.jit.trace(nn.Linear(4, 2).eval(), torch.rand(1, 4)).save(str(path))
    io = IoMap.identity(["x"], ["y"])
    before = torch.get_num_threads()
    with TorchScriptRunner(path, io, RunnerOptions(threads=before + 1)) as runner:
        assert torch.get_num_threads() == before + 1
        runner.run({"x": np.ones((2, 4), np.float32)})
    assert torch.get_num_threads() == before
    (tmp_path / "bad.pt").write_bytes(b"not a module")
    with pytest.raises(RuntimeLoadError):
        TorchScriptRunner(tmp_path / "bad.pt", io, RunnerOptions(threads=before + 1)).load()
    assert torch.get_num_threads() == before, "a failed load left its thread count"
