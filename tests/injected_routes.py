"""Routes injected by the tests through PORTABLE_MODELS_EXTRA_ROUTES: a converter that
fails, one that drifts (perturbed weights), one that segfaults, hangs or eats memory.
They run inside the real worker processes, tried before the built-in routes."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np

from portable_models.convert.base import ConvertJob, ConvertResult, RouteInfo
from portable_models.errors import ConversionError


def fail_convert(job: ConvertJob) -> ConvertResult:
    raise ConversionError("injected failure: this converter step always fails", stage="convert")


def drift_onnx(job: ConvertJob) -> ConvertResult:
    """The real ONNX route, then every float initializer scaled by 1.05."""
    import onnx
    from onnx import numpy_helper

    from portable_models.convert.onnx import convert_torch_onnx

    result = convert_torch_onnx(job)
    path = job.out_dir / result.file
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.size > 1:
            init.CopyFrom(numpy_helper.from_array(arr * np.float32(1.05), init.name))
    onnx.save(model, str(path))
    return result


def drift_c2_onnx(job: ConvertJob) -> ConvertResult:
    """The real ONNX route, then module ``c2``'s weights scaled by 1.05 (one layer off)."""
    from faults_onnx import corrupt
    from portable_models.convert.onnx import convert_torch_onnx

    result = convert_torch_onnx(job)
    corrupt(job.out_dir / result.file, "c2", 1.05, job.out_dir, {})
    return result


def segfault(job: ConvertJob) -> Any:
    os.kill(os.getpid(), signal.SIGSEGV)


def hang(job: ConvertJob) -> Any:
    time.sleep(3600)


def hog(job: ConvertJob) -> Any:
    chunks = []
    while True:
        chunks.append(np.ones(2**25))  # 256 MiB at a time, touched


def _row(name: str, target: str, fn: str, runtime: str) -> RouteInfo:
    return RouteInfo(name=name, target=target, source="torch", impl=f"injected_routes:{fn}",
                     requires=("torch",), runtime=runtime)


FAIL_TFLITE = (_row("test-fail-convert", "tflite", "fail_convert", "litert"),)
DRIFT_ONNX = (_row("test-drift-onnx", "onnx", "drift_onnx", "onnxruntime"),)
DRIFT_C2_ONNX = (_row("test-drift-c2", "onnx", "drift_c2_onnx", "onnxruntime"),)
MISBEHAVE = (
    _row("test-segfault", "torchscript", "segfault", "torchscript"),
    _row("test-hang", "onnx", "hang", "onnxruntime"),
    _row("test-hog", "executorch", "hog", "executorch"),
)
HANG_ONNX = (_row("test-hang", "onnx", "hang", "onnxruntime"),)


def fake_int8(job: ConvertJob) -> ConvertResult:
    """A mislabelled variant: the fp32 twin, copied and called int8."""
    import shutil

    from portable_models.convert.base import Step
    from portable_models.core.iomap import IoMap

    job.out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(job.prior_artifacts["onnx"], job.out_dir / "model_fake.onnx")
    return ConvertResult(file="model_fake.onnx", io=IoMap.identity(job.input_names, job.output_names),
                         precision=job.precision, steps=[Step(step="copy", version="0")])


def int8_without_calibration(job: ConvertJob) -> ConvertResult:
    """Calibration ignored: the dynamic-range quantiser's output, labelled static int8."""
    from onnxruntime import quantization as q

    from portable_models.convert.base import Step
    from portable_models.convert.quantize import _without_value_info
    from portable_models.core.iomap import IoMap

    job.out_dir.mkdir(parents=True, exist_ok=True)
    job.work_dir.mkdir(parents=True, exist_ok=True)
    twin = _without_value_info(job.prior_artifacts["onnx"], job.work_dir / "twin.onnx")
    q.quantize_dynamic(str(twin), str(job.out_dir / "model_dyn.onnx"), weight_type=q.QuantType.QInt8)
    return ConvertResult(file="model_dyn.onnx", io=IoMap.identity(job.input_names, job.output_names),
                         precision=job.precision, steps=[Step(step="quantize_dynamic", version="0")])


MISLABELLED_INT8 = (
    RouteInfo(name="test-fake-int8", target="onnx", source="torch", impl="injected_routes:fake_int8",
              requires=("onnx",), runtime="onnxruntime", framework="none", precisions=("int8-dynamic",)),
    RouteInfo(name="test-int8-uncalibrated", target="onnx", source="torch",
              impl="injected_routes:int8_without_calibration", requires=("onnx", "onnxruntime"),
              runtime="onnxruntime", framework="none", precisions=("int8",)),
)


def fake_pte_int8(job: ConvertJob) -> ConvertResult:
    """A mislabelled ExecuTorch variant: the float32 .pte twin, copied and called int8."""
    import shutil

    from portable_models.convert.base import Step
    from portable_models.core.iomap import IoMap

    job.out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(job.prior_artifacts["executorch"], job.out_dir / "model_int8.pte")
    return ConvertResult(file="model_int8.pte", io=IoMap.identity(job.input_names, job.output_names),
                         precision=job.precision, steps=[Step(step="copy", version="0")],
                         meta={"method": "forward", "positional_inputs": job.input_names})


MISLABELLED_PTE = (
    RouteInfo(name="test-fake-pte-int8", target="executorch", source="torch", impl="injected_routes:fake_pte_int8",
              requires=("torch",), runtime="executorch", framework="none", precisions=("int8",)),
)
