"""Core ML routes from a captured torch program, the structural checks, the runner.

Off macOS Core ML cannot predict: these tests convert through the route table (first
route that works), check every package structurally, and check that the runner says
"unverified" instead of returning numbers. On macOS, the ``macos`` test also checks
parity against the torch model (``harness``: the library's parity engine). The models are
``models.ROUTE_MODELS``, captured by ``harness.route_job``.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import RouteJob, route_job
from models import ROUTE_MODELS
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


#: the dynamic dims each model is captured with here (``{}``: fixed shapes)
DIMS: dict[str, dict[str, dict[int, tuple[str, int, int]]] | None] = {
    "cnn": {"image": {0: ("batch", 1, 8)}},
    "encoder": {"tokens": {0: ("batch", 1, 4), 1: ("seq", 2, 16)}},
    "two_heads": {"x": {0: ("batch", 1, 8)}},
    "lstm": {"seq": {0: ("batch", 1, 8)}},
    "upsample_depthwise": {},
    "slice_ones_diff": None,  # the model's own: batch 1..8
}
MODELS = ("cnn", "encoder", "two_heads", "lstm", "upsample_depthwise")
#: the route each model takes today (coremltools 9.0, torch 2.13): the torch.export
#: frontend has no ``lstm`` op, the TorchScript frontend has.
EXPECTED_ROUTE = {"cnn": "coremltools-export", "encoder": "coremltools-export",
                  "two_heads": "coremltools-export", "lstm": "coremltools-trace",
                  "upsample_depthwise": "coremltools-export"}


def _job(name: str, root: Path, precision: str = "float32", **options: object) -> RouteJob:
    """What the pipeline does: capture with bounded dims, save the .pt2, make a job."""
    return route_job(ROUTE_MODELS[name](), root, precision=precision, options=options,
                     dynamic_dims=DIMS[name])


@dataclass
class Converted:
    built: RouteJob
    route: str
    result: ConvertResult
    errors: dict[str, str]
    seconds: float

    @property
    def job(self) -> ConvertJob:
        return self.built.job

    @property
    def path(self) -> Path:
        return self.job.out_dir / self.result.file


def _convert_first_working(built: RouteJob) -> Converted:
    """Try the coreml routes of the route table in order; the first that converts wins."""
    job = built.job
    errors: dict[str, str] = {}
    for info in routes_for("coreml", "torch"):
        job.route = info.name
        start = time.perf_counter()
        try:
            result = load_impl(info.impl)(job)
        except ConversionError as exc:
            errors[info.name] = exc.message
            continue
        return Converted(built, info.name, result, errors, time.perf_counter() - start)
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
    with CoreMLRunner(c.path, c.result.io) as runner:
        # names, shapes and values as before; the float dtype Core ML hands back is not
        # asserted (this runs on macOS only, where nobody has seen it yet)
        c.built.check(runner.run, [c.job.sample_inputs], exact_dtypes=False)


# -- what the io map and metadata say ------------------------------------------------
def test_int64_input_is_int32_and_says_so(converted: Callable[[str], Converted]) -> None:
    c = converted("encoder")
    assert c.result.meta["physical_dtypes"]["inputs"] == {"tokens": "INT32"}
    assert "int64 cast to int32" in c.result.meta["casts"]["tokens"]
    checked = structural_check(c.path, c.result.io, c.job.inputs, c.job.outputs, "float32",
                               dims=c.job.dims)
    assert any("'tokens'" in x and "INT32" in x and "[1..4, 2..16]" in x for x in checked)


def test_two_outputs_keep_their_names_and_order(converted: Callable[[str], Converted]) -> None:
    import coremltools as ct

    c = converted("two_heads")
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
    job = _job(name, tmp_path).job
    result = load_impl("portable_models.convert.coreml:convert_from_trace")(job)
    checked = structural_check(job.out_dir / result.file, result.io, job.inputs, job.outputs,
                               "float32", dims=job.dims)
    assert result.meta["frontend"] == "TorchScript"
    assert any(x.startswith("compute precision float32") for x in checked)


def test_trace_route_keeps_dynamic_sizes(tmp_path: Path) -> None:
    """``torch.jit.trace(ep.module())`` bakes sizes; the route rewrites the graph first
    and probes the trace at other sizes."""
    job = _job("encoder", tmp_path).job
    job.route = "coremltools-trace"
    result = load_impl("portable_models.convert.coreml:convert_from_trace")(job)
    trace = next(s for s in result.steps if s.step == "torch.jit.trace")
    assert trace.detail["probed_sizes"] == {"batch": 3, "seq": 8}
    assert "view" in trace.detail["rebound_ops"]
    checked = structural_check(job.out_dir / result.file, result.io, job.inputs, job.outputs,
                               "float32", dims=job.dims)
    assert any("'scores'" in x and "[?, ?, 4]" in x for x in checked)


def test_export_route_error_names_the_op(tmp_path: Path) -> None:
    job = _job("lstm", tmp_path).job
    with pytest.raises(ConversionError, match="lstm"):
        load_impl("portable_models.convert.coreml:convert_from_export")(job)
    assert not (job.out_dir / "model.mlpackage").exists()


def test_deployment_target_option(tmp_path: Path) -> None:
    job = _job("upsample_depthwise", tmp_path / "a", minimum_deployment_target="iOS17").job
    result = load_impl("portable_models.convert.coreml:convert_from_export")(job)
    assert result.meta["minimum_deployment_target"] == "iOS17"
    assert result.meta["specification_version"] == 8
    checked = structural_check(job.out_dir / result.file, result.io, job.inputs, job.outputs,
                               "float32", dims=job.dims)
    assert any("iOS17/macOS14" in x for x in checked)
    bad = _job("upsample_depthwise", tmp_path / "b", minimum_deployment_target="iOS99").job
    with pytest.raises(ConversionError, match="unknown Core ML deployment target"):
        load_impl("portable_models.convert.coreml:convert_from_export")(bad)


@pytest.mark.parametrize("impl", ["convert_from_export", "convert_from_trace"])
def test_unsupported_ops_are_decomposed(impl: str, tmp_path: Path) -> None:
    """Both routes decompose ``new_ones`` and ``diff`` first; the trace route keeps the
    dynamic slice end (checked by its probe)."""
    job = _job("slice_ones_diff", tmp_path).job
    result = load_impl(f"portable_models.convert.coreml:{impl}")(job)
    first = result.steps[0]
    assert first.detail["decomposed"] == ["aten.diff.default", "aten.new_ones.default"]
    if impl == "convert_from_trace":
        assert first.detail["rebound_ops"].count("slice") >= 1
        assert first.detail["probed_sizes"] == {"batch": 3}
    checked = structural_check(job.out_dir / result.file, result.io, job.inputs, job.outputs,
                               "float32", dims=job.dims)
    assert any("'d'" in x and "[?, ?]" in x for x in checked)
