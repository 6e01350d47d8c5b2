"""The route table. Listing routes imports nothing heavy: implementations are named
by dotted path and loaded only inside the worker that runs them.

Routes of a target are listed in order of preference; the first that converts,
loads and passes parity wins. Adding a route is one module plus one row here.
"""

from __future__ import annotations

import importlib
from functools import cache

from portable_models.convert.base import RouteInfo
from portable_models.core.settings import EXTRA_ROUTES_ENV, extra_routes
from portable_models.core.targets import TARGETS
from portable_models.errors import UsageError

__all__ = ["ROUTES", "EXTRA_ROUTES_ENV", "all_routes", "routes_for", "route_by_name"]



_TORCH_ONNX = ("torch", "onnx", "onnxscript")
_TORCH_ET = ("torch", "executorch")
_TORCH_LITERT = ("torch", "litert-torch", "ai-edge-litert")

ROUTES: tuple[RouteInfo, ...] = (
    # -- from a captured torch.export program (source/model.pt2) -----------------
    RouteInfo(name="torch-onnx", target="onnx", source="torch",
              impl="portable_models.convert.onnx:convert_torch_onnx",
              requires=_TORCH_ONNX, runtime="onnxruntime",
              description="torch.onnx.export(dynamo=True) from the ExportedProgram"),
    RouteInfo(name="torch-onnx-legacy", target="onnx", source="torch",
              impl="portable_models.convert.onnx:convert_torch_onnx_legacy",
              requires=("torch", "onnx"), runtime="onnxruntime",
              description="torch.onnx.export(dynamo=False), the TorchScript-based exporter, from the "
                          "eager model's trace made at capture"),
    RouteInfo(name="torch-jit-trace", target="torchscript", source="torch",
              impl="portable_models.convert.torchscript:convert_trace",
              requires=("torch",), runtime="torchscript",
              description="torch.jit.trace of the captured program's module"),
    RouteInfo(name="torch-jit-eager-trace", target="torchscript", source="torch",
              impl="portable_models.convert.torchscript:convert_eager_trace",
              requires=("torch",), runtime="torchscript",
              description="the eager model's torch.jit.trace made at capture, frozen"),
    RouteInfo(name="executorch-xnnpack", target="executorch", source="torch",
              impl="portable_models.convert.executorch:convert_xnnpack",
              requires=_TORCH_ET, runtime="executorch", fixed_fallback=True,
              description="to_edge_transform_and_lower with the XNNPACK partitioner"),
    RouteInfo(name="executorch-xnnpack-pt2e", target="executorch", source="torch",
              impl="portable_models.convert.executorch:convert_xnnpack_quantized",
              requires=_TORCH_ET, runtime="executorch", precisions=("int8-dynamic", "int8"),
              description="PT2E with the XNNPACK quantizer (per-channel int8; int8: calibrated static, "
                          "int8-dynamic: activations quantised at run time), lowered to XNNPACK"),
    RouteInfo(name="executorch-portable", target="executorch", source="torch",
              impl="portable_models.convert.executorch:convert_portable",
              requires=_TORCH_ET, runtime="executorch", fixed_fallback=True,
              description="to_edge, portable kernels only (no delegate)"),
    RouteInfo(name="litert-torch", target="tflite", source="torch",
              impl="portable_models.convert.tflite:convert_litert_torch",
              requires=_TORCH_LITERT, runtime="litert", fixed_fallback=True,
              description="litert_torch.convert from the captured program"),
    RouteInfo(name="litert-torch-pt2e", target="tflite", source="torch",
              impl="portable_models.convert.tflite:convert_litert_torch_pt2e",
              requires=(*_TORCH_LITERT, "torchao"), runtime="litert", precisions=("int8-dynamic", "int8"),
              description="PT2E quantisation with litert-torch's quantizer (per-channel int8; int8: "
                          "calibrated, fully integer), then litert_torch.convert; fixed shapes"),
    RouteInfo(name="onnx2tf", target="tflite", source="torch",
              impl="portable_models.convert.onnx2tf:convert_onnx2tf",
              requires=("torch", "onnx", "onnx2tf", "tensorflow", "tf-keras"), runtime="litert",
              framework="tf",
              description="the ONNX artifact through onnx2tf (NHWC inputs)"),
    RouteInfo(name="coremltools-export", target="coreml", source="torch",
              impl="portable_models.convert.coreml:convert_from_export",
              requires=("torch", "coremltools"), runtime="coreml",
              description="coremltools from the ExportedProgram (mlprogram)"),
    RouteInfo(name="coremltools-trace", target="coreml", source="torch",
              impl="portable_models.convert.coreml:convert_from_trace",
              requires=("torch", "coremltools"), runtime="coreml", fixed_fallback=True,
              description="coremltools from a traced TorchScript module (mlprogram)"),
    RouteInfo(name="coremltools-eager-trace", target="coreml", source="torch",
              impl="portable_models.convert.coreml:convert_from_eager_trace",
              requires=("torch", "coremltools"), runtime="coreml", fixed_fallback=True,
              description="coremltools' TorchScript frontend on the eager model's trace made at capture"),
    # -- from an ONNX file (source/model.onnx) ---------------------------------------
    RouteInfo(name="onnx-source", target="onnx", source="onnx",
              impl="portable_models.convert.onnx:convert_onnx_passthrough",
              requires=("onnx",), runtime="onnxruntime", framework="none",
              description="the ONNX source itself, checked with onnxruntime"),
    RouteInfo(name="onnx-onnx2tf", target="tflite", source="onnx",
              impl="portable_models.convert.onnx2tf:convert_onnx2tf",
              requires=("onnx", "onnx2tf", "tensorflow", "tf-keras", "onnxruntime"), runtime="litert",
              framework="tf", description="onnx2tf from the ONNX source (NHWC inputs)"),
    # -- from a captured Keras model (source/model.keras): TF-native routes first, then the
    # -- torch-backend bridge to the PyTorch routes above (portable_models.convert.keras_bridge)
    RouteInfo(name="keras-tf2onnx", target="onnx", source="keras",
              impl="portable_models.convert.keras_tf:convert_tf2onnx",
              requires=("keras", "tensorflow", "tf2onnx", "onnx"), runtime="onnxruntime",
              framework="tf", description="tf2onnx from a tf.function of the model"),
    RouteInfo(name="keras-export-onnx", target="onnx", source="keras",
              impl="portable_models.convert.keras_tf:convert_keras_onnx",
              requires=("keras", "tensorflow", "tf2onnx", "onnx"), runtime="onnxruntime",
              framework="tf", description="Keras's own model.export(format='onnx')"),
    RouteInfo(name="keras-torch-onnx", target="onnx", source="keras",
              impl="portable_models.convert.keras_bridge:convert_bridge_onnx",
              requires=("keras", *_TORCH_ONNX), runtime="onnxruntime", framework="keras-torch",
              description="torch backend -> torch.export -> torch.onnx.export"),
    RouteInfo(name="keras-torch-jit-trace", target="torchscript", source="keras",
              impl="portable_models.convert.keras_bridge:convert_bridge_torchscript",
              requires=("keras", "torch"), runtime="torchscript", framework="keras-torch",
              description="torch backend -> torch.export -> torch.jit.trace"),
    RouteInfo(name="keras-executorch-xnnpack", target="executorch", source="keras",
              impl="portable_models.convert.keras_bridge:convert_bridge_xnnpack",
              requires=("keras", *_TORCH_ET), runtime="executorch", framework="keras-torch",
              description="torch backend -> torch.export -> ExecuTorch with XNNPACK"),
    RouteInfo(name="keras-executorch-portable", target="executorch", source="keras",
              impl="portable_models.convert.keras_bridge:convert_bridge_portable",
              requires=("keras", *_TORCH_ET), runtime="executorch", framework="keras-torch",
              description="torch backend -> torch.export -> ExecuTorch, portable kernels"),
    RouteInfo(name="keras-tflite", target="tflite", source="keras",
              impl="portable_models.convert.keras_tf:convert_tf_tflite",
              requires=("keras", "tensorflow", "ai-edge-litert"), runtime="litert",
              framework="tf", precisions=("float32", "float16", "int8-dynamic", "int8"),
              description="TFLiteConverter from a frozen tf.function (int8: the converter's own "
                          "quantiser, dynamic range or with the calibration data as representative dataset)"),
    RouteInfo(name="keras-litert-torch", target="tflite", source="keras",
              impl="portable_models.convert.keras_bridge:convert_bridge_litert",
              requires=("keras", *_TORCH_LITERT), runtime="litert", framework="keras-torch",
              fixed_fallback=True, description="torch backend -> torch.export -> litert_torch.convert"),
    RouteInfo(name="keras-coreml-tf", target="coreml", source="keras",
              impl="portable_models.convert.keras_tf:convert_tf_coreml",
              requires=("keras", "tensorflow", "coremltools"), runtime="coreml",
              framework="tf", description="coremltools from one concrete tf.function (mlprogram)"),
    RouteInfo(name="keras-coremltools-export", target="coreml", source="keras",
              impl="portable_models.convert.keras_bridge:convert_bridge_coreml_export",
              requires=("keras", "torch", "coremltools"), runtime="coreml", framework="keras-torch",
              description="torch backend -> torch.export -> coremltools (mlprogram)"),
    RouteInfo(name="keras-coremltools-trace", target="coreml", source="keras",
              impl="portable_models.convert.keras_bridge:convert_bridge_coreml_trace",
              requires=("keras", "torch", "coremltools"), runtime="coreml", framework="keras-torch",
              description="torch backend -> torch.export -> jit.trace -> coremltools"),
    # -- quantised variants, from the target's fp32 twin (any source) ------------------------
    *(RouteInfo(name=name, target="onnx", source=source,
                impl="portable_models.convert.quantize:convert_ort_quantize",
                requires=("onnx", "onnxruntime"), runtime="onnxruntime", framework="none",
                precisions=("int8-dynamic", "int8"),
                description="onnxruntime.quantization on the fp32 ONNX twin: quantize_dynamic (int8-dynamic), "
                            "quantize_static QDQ per-channel with the calibration data (int8)")
      for name, source in (("ort-quantize", "torch"), ("keras-ort-quantize", "keras"),
                           ("onnx-ort-quantize", "onnx"))),
    *(RouteInfo(name=name, target="tflite", source=source,
                impl="portable_models.convert.tflite_quantize:convert_ai_edge_quantizer",
                requires=("ai-edge-quantizer", "ai-edge-litert"), runtime="litert", framework="none",
                precisions=("int8-weight",),
                description="ai-edge-quantizer's weight-only int8 recipe on the fp32 TFLite twin")
      for name, source in (("aeq-quantize", "torch"), ("keras-aeq-quantize", "keras"), ("onnx-aeq-quantize", "onnx"))),
    *(RouteInfo(name=name, target="coreml", source=source,
                impl="portable_models.convert.coreml_quantize:convert_coreml_optimize",
                requires=("coremltools",), runtime="coreml", framework="none",
                precisions=("int8-weight",),
                description="coremltools.optimize.coreml linear weight quantisation (int8, per channel) "
                            "of the fp32 Core ML twin")
      for name, source in (("coreml-optimize", "torch"), ("keras-coreml-optimize", "keras"))),
)


@cache
def _extra_routes(spec: str) -> tuple[RouteInfo, ...]:
    found: list[RouteInfo] = []
    for item in filter(None, (p.strip() for p in spec.split(","))):
        module, _, attr = item.partition(":")
        try:
            rows = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise UsageError(f"{EXTRA_ROUTES_ENV}: cannot load {item!r}: {exc}",
                             fix="name module:attr of a sequence of RouteInfo, importable here") from exc
        found.extend(r for r in rows if isinstance(r, RouteInfo))
    return tuple(found)


def all_routes() -> tuple[RouteInfo, ...]:
    """Extra routes (from ``PORTABLE_MODELS_EXTRA_ROUTES``) first, then the built-in ones."""
    return _extra_routes(extra_routes()) + ROUTES


def routes_for(target: str, source: str, precision: str | None = None) -> list[RouteInfo]:
    """The routes that reach ``target`` from ``source`` (making ``precision``, where given),
    in order of preference."""
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}", fix=f"use one of {', '.join(TARGETS)}")
    return [r for r in all_routes() if r.target == target and r.source == source
            and (precision is None or precision in r.precisions)]


def route_by_name(name: str) -> RouteInfo:
    for r in all_routes():
        if r.name == name:
            return r
    raise UsageError(f"unknown route {name!r}",
                     fix=f"use one of {', '.join(r.name for r in all_routes())}")
