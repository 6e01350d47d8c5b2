"""The ``torch-onnx`` and ``torch-jit-trace`` routes with their real runtimes.

Each model (``models.ROUTE_MODELS``) is captured by ``harness.route_job`` (dynamic batch),
converted by the route, loaded by the runtime through the io map, and judged against the
eager model by the library's parity engine at two batch sizes (2, the capture size, and 3).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

from harness import RouteJob, assert_parity, max_abs, route_job  # noqa: E402
from models import ROUTE_MODELS  # noqa: E402
from portable_models.convert.base import ConvertJob, ConvertResult, ensure_artifact  # noqa: E402
from portable_models.convert.onnx import convert_torch_onnx  # noqa: E402
from portable_models.convert.torchscript import convert_trace  # noqa: E402
from portable_models.core.iomap import IoMap  # noqa: E402
from portable_models.run.onnxruntime import OnnxRuntimeRunner  # noqa: E402
from portable_models.run.torchscript import TorchScriptRunner  # noqa: E402

pytestmark = pytest.mark.slow

BATCH = (1, 64)
ROUTES: dict[str, tuple[Callable[[ConvertJob], ConvertResult], type[Any]]] = {
    "torch-onnx": (convert_torch_onnx, OnnxRuntimeRunner),
    "torch-jit-trace": (convert_trace, TorchScriptRunner),
}
CASES = ["cnn", "encoder", "lstm", "two_in_two_out", "mixed_dtypes"]


def make_job(name: str, route: str, root: Path, **options: Any) -> RouteJob:
    """What the lead's pipeline hands a route: a saved .pt2, specs, a dynamic batch, samples."""
    return route_job(ROUTE_MODELS[name](), root, route=route, options=options, batch=BATCH)


def run_artifact(runner_cls: type[Any], path: Path, io: IoMap,
                 inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with runner_cls(path, io) as runner:
        return dict(runner.run(inputs))


# -- tests ---------------------------------------------------------------------------
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("case_name", CASES)
def test_route_matches_eager(case_name: str, route: str, tmp_path: Path) -> None:
    built = make_job(case_name, route, tmp_path)
    job = built.job
    convert, runner_cls = ROUTES[route]
    result, path, convert_s = built.convert(convert)
    assert list(result.io.inputs) == job.input_names
    assert list(result.io.outputs) == job.output_names
    # the golden cases: the capture size (2) and another one along the dynamic dim (3)
    assert [c[job.input_names[0]].shape[0] for c in built.cases] == [2, 3]
    with runner_cls(path, result.io) as runner:
        parity = built.check(runner.run)
    print(f"\n[{case_name} x {route}] convert {convert_s:.2f}s max_abs {max_abs(parity):.3g} "
          f"steps {[s.to_dict() for s in result.steps]}")


def test_onnx_graph_keeps_dim_labels_and_names(tmp_path: Path) -> None:
    import onnx

    job = make_job("two_in_two_out", "torch-onnx", tmp_path).job
    result = convert_torch_onnx(job)
    model = onnx.load(str(ensure_artifact(job, result)))
    assert [i.name for i in model.graph.input] == ["features", "extra"]
    assert [o.name for o in model.graph.output] == ["score", "best"]  # insertion order
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert result.meta["opset"] == result.steps[0].detail["opset"] >= 17
    assert not model.graph.initializer or all(
        not t.external_data for t in model.graph.initializer)


def test_torchscript_scripts_symbolic_sizes(tmp_path: Path) -> None:
    job = make_job("cnn", "torch-jit-trace", tmp_path).job
    result = convert_trace(job)
    assert result.meta["method"] == "script"  # tracing would bake view(2, -1) in
    assert result.meta["dynamic_check"]["status"] == "pass"
    assert result.meta["positional_inputs"] == ["image"]
    job2 = make_job("two_in_two_out", "torch-jit-trace", tmp_path / "two").job
    assert convert_trace(job2).meta["method"] == "trace"  # nothing symbolic: trace


def test_forced_trace_of_symbolic_sizes_is_refused(tmp_path: Path) -> None:
    from portable_models.errors import ConversionError

    job = make_job("cnn", "torch-jit-trace", tmp_path, torchscript_method="trace").job
    with pytest.raises(ConversionError, match="dims change"):
        convert_trace(job)


def test_perturbed_onnx_weights_fail_parity(tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    built = make_job("cnn", "torch-onnx", tmp_path)
    result, path, _ = built.convert(convert_torch_onnx)
    inputs = built.feeds({"batch": 3}, seed=7)
    want = built.eager(inputs)
    assert_parity(run_artifact(OnnxRuntimeRunner, path, result.io, inputs), want)
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(init).copy()
    weights.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(weights, init.name))
    onnx.save(model, str(path))
    with pytest.raises(AssertionError, match=r"logits: fail: .* outside atol"):
        assert_parity(run_artifact(OnnxRuntimeRunner, path, result.io, inputs), want)


def test_perturbed_torchscript_weights_fail_parity(tmp_path: Path) -> None:
    built = make_job("cnn", "torch-jit-trace", tmp_path, torchscript_freeze=False)
    result, path, _ = built.convert(convert_trace)
    inputs = built.feeds({"batch": 2}, seed=8)
    want = built.eager(inputs)
    assert_parity(run_artifact(TorchScriptRunner, path, result.io, inputs), want)
    module = torch.jit.load(str(path))
    with torch.no_grad():
        module.fc.weight[0, 0] += 0.5
    torch.jit.save(module, str(path))
    with pytest.raises(AssertionError, match=r"logits: fail: .* outside atol"):
        assert_parity(run_artifact(TorchScriptRunner, path, result.io, inputs), want)


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
