"""Quantised variants of the ONNX target, made by onnxruntime's own quantiser from the fp32
twin (the ONNX artifact this export just checked): ``int8-dynamic`` with ``quantize_dynamic``
(int8 weights, activations quantised at run time) and ``int8`` with ``quantize_static`` (QDQ,
per-channel int8 weights, activation ranges calibrated on the user's calibration data). The
result, like any route's variant, must pass the truth check (:mod:`portable_models.convert.job`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.convert.base import ConvertJob, ConvertResult, Step
from portable_models.core.imports import package_version
from portable_models.core.iomap import IoMap
from portable_models.errors import ConversionError

__all__ = ["convert_ort_quantize"]

_FILES = {"int8-dynamic": "model_int8_dynamic.onnx", "int8": "model_int8.onnx"}


def convert_ort_quantize(job: ConvertJob) -> ConvertResult:
    from onnxruntime import quantization as q

    twin = job.prior_artifacts.get("onnx")
    if twin is None or job.precision not in _FILES:
        raise ConversionError(f"no fp32 ONNX twin to quantise to {job.precision}", stage="convert",
                              fix="the float32 ONNX artifact must pass first: see its attempts")
    work = job.work_dir / "quantize"
    work.mkdir(parents=True, exist_ok=True)
    prepared = _without_value_info(twin, work / "prepared.onnx")
    out = job.out_dir / _FILES[job.precision]
    job.out_dir.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {}
    if job.precision == "int8-dynamic":
        q.quantize_dynamic(str(prepared), str(out), weight_type=q.QuantType.QInt8, per_channel=True)
        detail: dict[str, Any] = {"weight_type": "QInt8", "per_channel": True}
        step = "onnxruntime.quantization.quantize_dynamic"
    else:
        calibration = job.options.get("calibration") or {}
        reader = _Reader(Path(calibration["file"]), job.input_names)
        q.quant_pre_process(str(prepared), str(work / "preprocessed.onnx"), skip_symbolic_shape=True)
        q.quantize_static(str(work / "preprocessed.onnx"), str(out), reader, quant_format=q.QuantFormat.QDQ, per_channel=True,
                          activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                          calibrate_method=q.CalibrationMethod.MinMax)
        detail = {"format": "QDQ", "per_channel": True, "activation_type": "QInt8", "weight_type": "QInt8",
                  "calibrate_method": "MinMax", "calibration_cases": reader.count}
        step = "onnxruntime.quantization.quantize_static"
        meta["calibration"] = {"sha256": calibration["sha256"], "cases": calibration["cases"]}
    shutil.rmtree(work, ignore_errors=True)
    return ConvertResult(file=out.name, io=IoMap.identity(job.input_names, job.output_names),
                         precision=job.precision, meta=meta,
                         steps=[Step(step=step, version=package_version("onnxruntime"), detail=detail)])


def _without_value_info(twin: Path, dest: Path) -> Path:
    """The fp32 twin without the exporter's intermediate shapes (the quantiser re-infers them;
    the exporter's also describe its initializers, which the quantiser's own shape inference
    then contradicts: "Inferred shape and existing shape differ")."""
    import onnx

    model = onnx.load(str(twin))
    del model.graph.value_info[:]
    onnx.save(model, str(dest))
    return dest


class _Reader:
    """onnxruntime's calibration data reader over the calibration cases (an ``.npz`` of
    ``<case>/<input>`` arrays, as the golden sets are stored)."""

    def __init__(self, path: Path, names: list[str]) -> None:
        from portable_models.core.golden import load_cases

        self.cases = load_cases(path)
        self.names = names
        self.count = len(self.cases)
        self._next = iter(self.cases)

    def get_next(self) -> dict[str, np.ndarray] | None:
        case = next(self._next, None)
        return None if case is None else {n: np.asarray(case[n]) for n in self.names}

    def rewind(self) -> None:
        self._next = iter(self.cases)
