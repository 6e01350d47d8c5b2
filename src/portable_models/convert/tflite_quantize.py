"""The TFLite ``int8-weight`` variant, made by ai-edge-quantizer (the LiteRT project's own
quantiser) from the fp32 TFLite twin, whichever route made that: its weight-only recipe stores
the weights of every op it supports as int8 with explicit DEQUANTIZE ops before them, so the
compute stays float (the recipe's words: "retain model quality"; dynamic-range int8 is the
latency choice). The io map is the twin's. The result must pass the truth check
(:mod:`portable_models.convert.job`).
"""

from __future__ import annotations

from pathlib import Path

from portable_models.convert.base import ConvertJob, ConvertResult, Step
from portable_models.core.imports import package_version
from portable_models.core.iomap import IoMap
from portable_models.errors import ConversionError, PortableModelsError

__all__ = ["convert_ai_edge_quantizer"]

_FILES = {"int8-weight": "model_int8_weight.tflite"}


def convert_ai_edge_quantizer(job: ConvertJob) -> ConvertResult:
    from ai_edge_quantizer import quantizer, recipe

    twin = job.prior_artifacts.get("tflite")
    if twin is None or job.precision not in _FILES:
        raise ConversionError(f"no fp32 TFLite twin to quantise to {job.precision}", stage="convert",
                              fix="the float32 TFLite artifact must pass first: see its attempts")
    twin_io = job.options.get("prior_io", {}).get("tflite")
    job.out_dir.mkdir(parents=True, exist_ok=True)
    out = job.out_dir / _FILES[job.precision]
    try:
        qt = quantizer.Quantizer(Path(twin), recipe.weight_only_wi8_afp32())
        qt.quantize().export_model(out, overwrite=True)
    except PortableModelsError:
        raise
    except Exception as exc:  # the quantiser's own failure fails this route only
        raise ConversionError(f"ai-edge-quantizer failed: {type(exc).__name__}: {exc}"[:600], stage="convert",
                              file=str(twin), fix="see logs/tflite-int8-weight.log") from exc
    io = IoMap.from_dict(twin_io) if twin_io else IoMap.identity(job.input_names, job.output_names)
    return ConvertResult(file=out.name, io=io, precision=job.precision, meta={"weights": "int8"},
                         steps=[Step(step="ai_edge_quantizer.Quantizer (weight_only_wi8_afp32)",
                                     version=package_version("ai-edge-quantizer"),
                                     detail={"recipe": "weight_only_wi8_afp32", "num_bits": 8,
                                             "algorithm": "min_max_uniform_quant", "from": twin.name})])
