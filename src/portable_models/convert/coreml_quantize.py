"""The Core ML ``int8-weight`` variant, made by coremltools' own compression API
(``coremltools.optimize.coreml.linear_quantize_weights``) from the fp32 ``.mlpackage`` twin,
whichever route made that. Nothing is predicted (Core ML predicts only on macOS): the twin is
read with ``skip_model_load=True`` and rewritten at the MIL level.

The config: ``OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
granularity="per_channel", weight_threshold=2048)``, the same for every op. Weights of 2048
elements or more are stored as int8 with one float scale per output channel (zero point 0);
smaller tensors (biases, a first conv of a few channels) stay float, where int8 would save
little and cost accuracy. The compute stays float32: each quantised weight is a constexpr op
that Core ML dequantises at load time (``constexpr_affine_dequantize`` for an iOS16/17 twin,
``constexpr_blockwise_shift_scale`` from iOS18). The MIL reference executor runs both.

The io map is the twin's (the quantiser changes no input or output). The package's
``portable_models`` metadata stays the twin's, its ``precision`` still the compute precision
(float32, as the Core ML runner's structural check reads it), with ``"weights": "int8"``
added. The result must pass the truth check (:mod:`portable_models.convert.job`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from portable_models.convert.base import ConvertJob, ConvertResult, Step
from portable_models.core.coremltools_import import import_coremltools
from portable_models.core.imports import package_version
from portable_models.core.iomap import IoMap
from portable_models.errors import ConversionError, PortableModelsError

__all__ = ["QUANTIZER_CONFIG", "convert_coreml_optimize"]

_FILES = {"int8-weight": "model_int8_weight.mlpackage"}
_METADATA_KEY = "portable_models"

#: the OpLinearQuantizerConfig every op gets (recorded in the step)
QUANTIZER_CONFIG: dict[str, Any] = {"mode": "linear_symmetric", "dtype": "int8", "granularity": "per_channel",
                                    "weight_threshold": 2048}


def convert_coreml_optimize(job: ConvertJob) -> ConvertResult:
    """``int8-weight``: linear symmetric per-channel int8 weights of the fp32 twin."""
    twin = job.prior_artifacts.get("coreml")
    if twin is None or job.precision not in _FILES:
        raise ConversionError(f"no fp32 Core ML twin to quantise to {job.precision}", stage="convert",
                              fix="the float32 Core ML artifact must pass first: see its attempts")
    ct = import_coremltools()
    from coremltools.optimize import coreml as cto

    out = job.out_dir / _FILES[job.precision]
    if out.exists():
        shutil.rmtree(out)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        model = ct.models.MLModel(str(twin), skip_model_load=True)
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(**QUANTIZER_CONFIG))
        quantised = cto.linear_quantize_weights(model, config)
        _mark_metadata(quantised)
        quantised.save(str(out))
    except PortableModelsError:
        raise
    except Exception as exc:  # the quantiser's own failure fails this route only
        raise ConversionError(f"coremltools.optimize failed: {type(exc).__name__}: {exc}"[:600], stage="convert",
                              file=str(twin), fix="see logs/coreml-int8-weight.log") from exc
    spec = quantised.get_spec()
    return ConvertResult(
        file=out.name, io=_twin_io(job, twin), precision=job.precision,
        meta={"weights": "int8", "compute_precision": "FLOAT32",
              "specification_version": int(spec.specificationVersion),
              "coremltools_version": package_version("coremltools")},
        steps=[Step(step="coremltools.optimize.coreml.linear_quantize_weights",
                    version=package_version("coremltools"),
                    detail={"config": "OpLinearQuantizerConfig", **QUANTIZER_CONFIG, "from": twin.name})])


def _twin_io(job: ConvertJob, twin: Path) -> IoMap:
    """The twin's io map: as the build handed it over, else as the twin's metadata records it,
    else the logical names themselves."""
    handed = job.options.get("prior_io", {}).get("coreml")
    if handed:
        return IoMap.from_dict(handed)
    record = _metadata(twin)
    if record.get("io"):
        return IoMap.from_dict(record["io"])
    return IoMap.identity(job.input_names, job.output_names)


def _metadata(twin: Path) -> dict[str, Any]:
    import coremltools as ct

    text = ct.models.MLModel(str(twin), skip_model_load=True).get_spec().description.metadata.userDefined.get(
        _METADATA_KEY)
    return dict(json.loads(text)) if text else {}


def _mark_metadata(model: Any) -> None:
    """Add ``"weights": "int8"`` to the twin's ``portable_models`` record (kept by the quantiser);
    its ``precision`` stays the compute precision."""
    text = model.user_defined_metadata.get(_METADATA_KEY)
    if text:
        model.user_defined_metadata[_METADATA_KEY] = json.dumps({**json.loads(text), "weights": "int8"},
                                                                sort_keys=True)
