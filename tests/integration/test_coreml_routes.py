"""Core ML routes from a captured torch program, the structural checks, the runner.

Off macOS Core ML cannot predict: these tests convert through the route table (first
route that works), check every package structurally, and check that the runner says
"unverified" instead of returning numbers. On macOS, the ``macos`` test also checks
parity against the torch model.
"""

from __future__ import annotations

import inspect
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from portable_models.convert.base import ConvertJob, ConvertResult, ensure_artifact
from portable_models.convert.registry import routes_for
from portable_models.core.imports import load_impl
from portable_models.core.iomap import Binding, IoMap
from portable_models.core.spec import DimSpec, TensorSpec
from portable_models.errors import ConversionError, RuntimeLoadError, UnverifiedError
from portable_models.run.base import RunnerOptions
from portable_models.run.coreml import CoreMLRunner, structural_check

pytestmark = pytest.mark.slow
ON_MACOS = sys.platform == "darwin"


# -- tiny models ----------------------------------------------------------------------
class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class TinyEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(100, 32)
        self.layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.emb(ids)))


class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(12, 6)
        self.b = torch.nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tanh(self.a(x)), torch.sigmoid(self.b(x))


class TinyLSTM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(8, 16, batch_first=True)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)
        return self.head(y[:, -1])


class UpsampleDepthwise(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Upsample(scale_factor=2, mode="nearest")
        self.dw = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.pw = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(torch.relu(self.dw(self.up(x))))


class SliceOnesDiff(torch.nn.Module):
    """``new_ones`` and ``diff`` (no coremltools converter for either) and a slice whose
    end depends on a dynamic size."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head = x[:, : x.shape[0] + 1]
        mask = x.new_ones(x.shape[0], x.shape[0] + 1)
        return torch.diff(head * mask, dim=1), head.flip(1)


@dataclass
class Model:
    make: Callable[[], torch.nn.Module]
    samples: dict[str, np.ndarray]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: dict[str, DimSpec]


def _model(name: str) -> Model:
    rng = np.random.default_rng(0)
    f32 = np.float32
    if name == "cnn":
        return Model(SmallCNN, {"image": rng.standard_normal((2, 3, 16, 16), dtype=f32)},
                     [TensorSpec(name="image", dtype="float32", shape=("batch", 3, 16, 16),
                                 layout="NCHW")],
                     [TensorSpec(name="logits", dtype="float32", shape=("batch", 10))],
                     {"batch": DimSpec(name="batch", min=1, max=8)})
    if name == "encoder":
        return Model(TinyEncoder, {"token_ids": rng.integers(0, 100, (2, 7)).astype(np.int64)},
                     [TensorSpec(name="token_ids", dtype="int64", shape=("batch", "seq"))],
                     [TensorSpec(name="scores", dtype="float32", shape=("batch", "seq", 5))],
                     {"batch": DimSpec(name="batch", min=1, max=4),
                      "seq": DimSpec(name="seq", min=2, max=16)})
    if name == "two_outputs":
        return Model(TwoHeads, {"x": rng.standard_normal((3, 12), dtype=f32)},
                     [TensorSpec(name="x", dtype="float32", shape=("batch", 12))],
                     [TensorSpec(name="head.a", dtype="float32", shape=("batch", 6)),
                      TensorSpec(name="head_b", dtype="float32", shape=("batch", 6))],
                     {"batch": DimSpec(name="batch", min=1, max=8)})
    if name == "lstm":
        return Model(TinyLSTM, {"seq": rng.standard_normal((2, 5, 8), dtype=f32)},
                     [TensorSpec(name="seq", dtype="float32", shape=("batch", 5, 8))],
                     [TensorSpec(name="y", dtype="float32", shape=("batch", 3))],
                     {"batch": DimSpec(name="batch", min=1, max=8)})
    if name == "slice_ones_diff":
        return Model(SliceOnesDiff, {"x": rng.standard_normal((2, 10), dtype=f32)},
                     [TensorSpec(name="x", dtype="float32", shape=("batch", 10))],
                     [TensorSpec(name="d", dtype="float32", shape=("batch", "b_minus")),
                      TensorSpec(name="f", dtype="float32", shape=("batch", "b_plus"))],
                     {"batch": DimSpec(name="batch", min=1, max=8)})
    assert name == "upsample_dw"
    return Model(UpsampleDepthwise, {"image": rng.standard_normal((1, 4, 8, 8), dtype=f32)},
                 [TensorSpec(name="image", dtype="float32", shape=(1, 4, 8, 8), layout="NCHW")],
                 [TensorSpec(name="out", dtype="float32", shape=(1, 2, 16, 16), layout="NCHW")],
                 {})


MODELS = ("cnn", "encoder", "two_outputs", "lstm", "upsample_dw")
#: the route each model takes today (coremltools 9.0, torch 2.13): the torch.export
#: frontend has no ``lstm`` op, the TorchScript frontend has.
EXPECTED_ROUTE = {"cnn": "coremltools-export", "encoder": "coremltools-export",
                  "two_outputs": "coremltools-export", "lstm": "coremltools-trace",
                  "upsample_dw": "coremltools-export"}


def _job(name: str, root: Path, precision: str = "float32", **options: object) -> ConvertJob:
    """What the pipeline does: torch.export with bounded dims, save the .pt2, make a job."""
    m = _model(name)
    module = m.make().eval()
    params = list(inspect.signature(module.forward).parameters)
    tdims = {k: torch.export.Dim(k, min=d.min, max=d.max) for k, d in m.dims.items()}
    dynamic = {params[i]: ({a: tdims[lbl] for a, lbl in s.dynamic_axes.items()} or None)
               for i, s in enumerate(m.inputs)}
    args = tuple(torch.from_numpy(m.samples[s.name]) for s in m.inputs)
    ep = torch.export.export(module, args, dynamic_shapes=dynamic)
    (root / "source").mkdir(parents=True, exist_ok=True)
    (root / "work").mkdir(exist_ok=True)
    torch.export.save(ep, str(root / "source" / "model.pt2"))
    torch.save(module.state_dict(), root / "work" / "state.pt")
    return ConvertJob(route="", source_file=root / "source" / "model.pt2",
                      out_dir=root / "artifacts", work_dir=root / "work", inputs=m.inputs,
                      outputs=m.outputs, dims=m.dims, sample_inputs=m.samples,
                      precision=precision, options=dict(options))


@dataclass
class Converted:
    job: ConvertJob
    route: str
    result: ConvertResult
    errors: dict[str, str]
    seconds: float

    @property
    def path(self) -> Path:
        return self.job.out_dir / self.result.file


def _convert_first_working(job: ConvertJob) -> Converted:
    """Try the coreml routes of the route table in order; the first that converts wins."""
    errors: dict[str, str] = {}
    for info in routes_for("coreml", "torch"):
        job.route = info.name
        start = time.perf_counter()
        try:
            result = load_impl(info.impl)(job)
        except ConversionError as exc:
            errors[info.name] = exc.message
            continue
        return Converted(job, info.name, result, errors, time.perf_counter() - start)
    pytest.fail(f"no Core ML route converted {job.source_file}: {errors}")


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Converted]:
    cache: dict[str, Converted] = {}

    def get(name: str) -> Converted:
        if name not in cache:
            cache[name] = _convert_first_working(_job(name, tmp_path_factory.mktemp(name)))
        return cache[name]

    return get


# -- every model: a route converts, the package passes its checks, run() is honest -------
@pytest.mark.parametrize("name", MODELS)
def test_converts_and_checks_structurally(name: str,
                                          converted: Callable[[str], Converted]) -> None:
    c = converted(name)
    print(f"\n{name}: route {c.route} in {c.seconds:.2f}s (coremltools.convert "
          f"{c.result.meta['convert_s']}s); failed routes: {c.errors}")
    assert c.route == EXPECTED_ROUTE[name], c.errors
    ensure_artifact(c.job, c.result)
    assert c.result.file == "model.mlpackage" and c.path.is_dir()
    assert c.result.precision == "float32"
    meta = c.result.meta
    assert meta["compute_precision"] == "FLOAT32" and meta["convert_to"] == "mlprogram"
    assert meta["minimum_deployment_target"] == "iOS16" and "macOS13" in meta["deployment_targets"]
    assert [s.step for s in c.result.steps][-1] == "coremltools.convert"
    assert all(s.version for s in c.result.steps)

    checked = structural_check(c.path, c.result.io, c.job.inputs, c.job.outputs, "float32",
                               dims=c.job.dims)
    text = "\n".join(checked)
    assert "saves and reloads" in text and "mlProgram" in text and "weight blob" in text
    assert "compute precision float32: no fp16 value" in text
    for spec in [*c.job.inputs, *c.job.outputs]:
        assert f"'{spec.name}'" in text, f"{spec.name} not checked:\n{text}"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.skipif(ON_MACOS, reason="on macOS Core ML predicts; see the macos test")
def test_run_is_unverified_off_macos(name: str, converted: Callable[[str], Converted]) -> None:
    c = converted(name)
    runner = CoreMLRunner(c.path, c.result.io)
    outputs = None
    with runner:
        assert runner.checked, "load() must record the structural checks"
        with pytest.raises(UnverifiedError) as info:
            outputs = runner.run(c.job.sample_inputs)
    assert outputs is None
    assert "converted and checked structurally; numbers not checked" in info.value.message
    assert f"Core ML cannot run on {platform.system()}" in info.value.message
    assert info.value.checked == runner.checked
    assert info.value.code == "unverified"


@pytest.mark.macos
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.skipif(not ON_MACOS, reason="Core ML predicts only on macOS")
def test_predict_parity_on_macos(name: str, converted: Callable[[str], Converted]) -> None:
    c = converted(name)
    module = _model(name).make().eval()
    module.load_state_dict(torch.load(c.job.work_dir / "state.pt", weights_only=True))
    with torch.no_grad():
        ref = module(*(torch.from_numpy(c.job.sample_inputs[s.name]) for s in c.job.inputs))
    refs = ref if isinstance(ref, tuple) else (ref,)
    with CoreMLRunner(c.path, c.result.io) as runner:
        got = runner.run(c.job.sample_inputs)
    for spec, want in zip(c.job.outputs, refs, strict=True):
        np.testing.assert_allclose(got[spec.name], want.numpy(), atol=1e-4, rtol=1e-3)


# -- what the io map and metadata say ------------------------------------------------
def test_int64_input_is_int32_and_says_so(converted: Callable[[str], Converted]) -> None:
    c = converted("encoder")
    assert c.result.meta["physical_dtypes"]["inputs"] == {"token_ids": "INT32"}
    assert "int64 cast to int32" in c.result.meta["casts"]["token_ids"]
    checked = structural_check(c.path, c.result.io, c.job.inputs, c.job.outputs, "float32",
                               dims=c.job.dims)
    assert any("'token_ids'" in x and "INT32" in x and "[1..4, 2..16]" in x for x in checked)


def test_two_outputs_keep_their_names_and_order(converted: Callable[[str], Converted]) -> None:
    import coremltools as ct

    c = converted("two_outputs")
    io = c.result.io
    assert io.outputs["head.a"].name == "head_a" and io.outputs["head_b"].name == "head_b"
    spec = ct.models.MLModel(str(c.path), skip_model_load=True).get_spec()
    assert [o.name for o in spec.description.output] == ["head_a", "head_b"]
    main = spec.mlProgram.functions["main"]
    producer = {out.name: op.type for op in main.block_specializations[main.opset].operations
                for out in op.outputs}
    assert producer["head_a"] == "tanh" and producer["head_b"] == "sigmoid"


# -- precision ----------------------------------------------------------------------
def test_float16_program_is_told_from_float32(tmp_path: Path,
                                              converted: Callable[[str], Converted]) -> None:
    fp32 = converted("cnn")
    fp16 = _convert_first_working(_job("cnn", tmp_path, precision="float16"))
    assert fp16.result.precision == "float16"
    assert fp16.result.meta["compute_precision"] == "FLOAT16"
    # the io contract stays float32 even in a float16 program
    assert fp16.result.meta["physical_dtypes"]["outputs"] == {"logits": "FLOAT32"}
    job = fp16.job
    checked = structural_check(fp16.path, fp16.result.io, job.inputs, job.outputs, "float16",
                               dims=job.dims)
    assert any(x.startswith("compute precision float16") for x in checked)
    with pytest.raises(RuntimeLoadError, match="asked float32, but the program holds"):
        structural_check(fp16.path, fp16.result.io, job.inputs, job.outputs, "float32",
                         dims=job.dims)
    with pytest.raises(RuntimeLoadError, match="asked float16, but only 0 of"):
        structural_check(fp32.path, fp32.result.io, job.inputs, job.outputs, "float16",
                         dims=job.dims)


# -- mismatches are caught ------------------------------------------------------------
def test_structural_mismatch_is_caught(converted: Callable[[str], Converted]) -> None:
    c = converted("cnn")
    job = c.job

    def check(io: IoMap, inputs: list[TensorSpec] = job.inputs,
              dims: dict[str, DimSpec] = job.dims) -> None:
        structural_check(c.path, io, inputs, job.outputs, "float32", dims=dims)

    missing = IoMap(inputs={"image": Binding(name="pixels")}, outputs=dict(c.result.io.outputs))
    with pytest.raises(RuntimeLoadError, match="no input named 'pixels'"):
        check(missing)
    with pytest.raises(RuntimeLoadError, match=r"axis 0 \(batch\) is 1..8, expected 1..32"):
        check(c.result.io, dims={"batch": DimSpec(name="batch", min=1, max=32)})
    wrong_dtype = [TensorSpec(name="image", dtype="int64", shape=("batch", 3, 16, 16))]
    with pytest.raises(RuntimeLoadError, match="is FLOAT32, expected INT32"):
        check(c.result.io, inputs=wrong_dtype)
    wrong_shape = [TensorSpec(name="image", dtype="float32", shape=("batch", 3, 32, 32))]
    with pytest.raises(RuntimeLoadError, match="axis 2 is 16, expected 32"):
        check(c.result.io, inputs=wrong_shape)
    # the runner runs the same checks on load, against the package's own record ...
    runner = CoreMLRunner(c.path, missing)
    with pytest.raises(RuntimeLoadError, match="pixels"):
        runner.load()
    assert not runner.loaded
    # ... or against what the pipeline passes (the contract's specs and precision)
    told = RunnerOptions(extra={"inputs": [s.to_dict() for s in job.inputs],
                                "outputs": job.outputs, "precision": "float16",
                                "dims": {"batch": {"min": 1, "max": 8}}})
    with pytest.raises(RuntimeLoadError, match="asked float16"):
        CoreMLRunner(c.path, c.result.io, told).load()


# -- route details ------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_trace_route_converts_every_model(name: str, tmp_path: Path) -> None:
    """The fallback route must stand on its own, not only where the first one fails."""
    job = _job(name, tmp_path)
    result = load_impl("portable_models.convert.coreml:convert_from_trace")(job)
    checked = structural_check(job.out_dir / result.file, result.io, job.inputs, job.outputs,
                               "float32", dims=job.dims)
    assert result.meta["frontend"] == "TorchScript"
    assert any(x.startswith("compute precision float32") for x in checked)


def test_trace_route_keeps_dynamic_sizes(tmp_path: Path) -> None:
    """``torch.jit.trace(ep.module())`` bakes sizes; the route rewrites the graph first
    and probes the trace at other sizes."""
    job = _job("encoder", tmp_path)
    job.route = "coremltools-trace"
    result = load_impl("portable_models.convert.coreml:convert_from_trace")(job)
    trace = next(s for s in result.steps if s.step == "torch.jit.trace")
    assert trace.detail["probed_sizes"] == {"batch": 3, "seq": 8}
    assert "view" in trace.detail["rebound_ops"]
    checked = structural_check(job.out_dir / result.file, result.io, job.inputs, job.outputs,
                               "float32", dims=job.dims)
    assert any("'scores'" in x and "[?, ?, 5]" in x for x in checked)


def test_export_route_error_names_the_op(tmp_path: Path) -> None:
    job = _job("lstm", tmp_path)
    with pytest.raises(ConversionError, match="lstm"):
        load_impl("portable_models.convert.coreml:convert_from_export")(job)
    assert not (job.out_dir / "model.mlpackage").exists()


def test_deployment_target_option(tmp_path: Path) -> None:
    job = _job("upsample_dw", tmp_path / "a", minimum_deployment_target="iOS17")
    result = load_impl("portable_models.convert.coreml:convert_from_export")(job)
    assert result.meta["minimum_deployment_target"] == "iOS17"
    assert result.meta["specification_version"] == 8
    checked = structural_check(job.out_dir / result.file, result.io, job.inputs, job.outputs,
                               "float32", dims=job.dims)
    assert any("iOS17/macOS14" in x for x in checked)
    bad = _job("upsample_dw", tmp_path / "b", minimum_deployment_target="iOS99")
    with pytest.raises(ConversionError, match="unknown Core ML deployment target"):
        load_impl("portable_models.convert.coreml:convert_from_export")(bad)


@pytest.mark.parametrize("impl", ["convert_from_export", "convert_from_trace"])
def test_unsupported_ops_are_decomposed(impl: str, tmp_path: Path) -> None:
    """Both routes decompose ``new_ones`` and ``diff`` first; the trace route keeps the
    dynamic slice end (checked by its probe)."""
    job = _job("slice_ones_diff", tmp_path)
    result = load_impl(f"portable_models.convert.coreml:{impl}")(job)
    first = result.steps[0]
    assert first.detail["decomposed"] == ["aten.diff.default", "aten.new_ones.default"]
    if impl == "convert_from_trace":
        assert first.detail["rebound_ops"].count("slice") >= 1
        assert first.detail["probed_sizes"] == {"batch": 3}
    checked = structural_check(job.out_dir / result.file, result.io, job.inputs, job.outputs,
                               "float32", dims=job.dims)
    assert any("'d'" in x and "[?, ?]" in x for x in checked)
