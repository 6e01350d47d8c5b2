"""The route table. Listing routes imports nothing heavy: implementations are named
by dotted path and loaded only inside the worker that runs them.

Routes of a target are listed in order of preference; the first that converts,
loads and passes parity wins. Adding a route is one module plus one row here.
"""

from __future__ import annotations

from portable_models.errors import UsageError
from portable_models.targets.base import RouteInfo

__all__ = ["TARGETS", "ROUTES", "routes_for", "route_by_name"]

#: every target, in the order reports list them.
TARGETS = ("onnx", "torchscript", "executorch", "tflite", "coreml")

_TORCH_ONNX = ("torch", "onnx", "onnxscript")
_TORCH_ET = ("torch", "executorch")
_TORCH_LITERT = ("torch", "litert-torch", "ai-edge-litert")

ROUTES: tuple[RouteInfo, ...] = (
    # -- from a captured torch.export program (source/model.pt2) -----------------
    RouteInfo(name="torch-onnx", target="onnx", source="torch",
              impl="portable_models.targets.onnx:convert_torch_onnx",
              requires=_TORCH_ONNX, runtime="onnxruntime",
              description="torch.onnx.export(dynamo=True) from the ExportedProgram"),
    RouteInfo(name="torch-jit-trace", target="torchscript", source="torch",
              impl="portable_models.targets.torchscript:convert_trace",
              requires=("torch",), runtime="torchscript",
              description="torch.jit.trace of the captured program's module"),
    RouteInfo(name="executorch-xnnpack", target="executorch", source="torch",
              impl="portable_models.targets.executorch:convert_xnnpack",
              requires=_TORCH_ET, runtime="executorch",
              description="to_edge_transform_and_lower with the XNNPACK partitioner"),
    RouteInfo(name="executorch-portable", target="executorch", source="torch",
              impl="portable_models.targets.executorch:convert_portable",
              requires=_TORCH_ET, runtime="executorch",
              description="to_edge, portable kernels only (no delegate)"),
    RouteInfo(name="litert-torch", target="tflite", source="torch",
              impl="portable_models.targets.tflite:convert_litert_torch",
              requires=_TORCH_LITERT, runtime="litert",
              description="litert_torch.convert from the captured program"),
    RouteInfo(name="onnx2tf", target="tflite", source="torch",
              impl="portable_models.targets.tflite:convert_onnx2tf",
              requires=("torch", "onnx", "onnx2tf", "tensorflow", "tf-keras"), runtime="litert",
              framework="tf",
              description="the ONNX artifact through onnx2tf (NHWC inputs)"),
    RouteInfo(name="coremltools-export", target="coreml", source="torch",
              impl="portable_models.targets.coreml:convert_from_export",
              requires=("torch", "coremltools"), runtime="coreml",
              description="coremltools from the ExportedProgram (mlprogram)"),
    RouteInfo(name="coremltools-trace", target="coreml", source="torch",
              impl="portable_models.targets.coreml:convert_from_trace",
              requires=("torch", "coremltools"), runtime="coreml",
              description="coremltools from a traced TorchScript module (mlprogram)"),
)


def routes_for(target: str, source: str) -> list[RouteInfo]:
    """The routes that reach ``target`` from ``source``, in order of preference."""
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}", fix=f"use one of {', '.join(TARGETS)}")
    return [r for r in ROUTES if r.target == target and r.source == source]


def route_by_name(name: str) -> RouteInfo:
    for r in ROUTES:
        if r.name == name:
            return r
    raise UsageError(f"unknown route {name!r}",
                     fix=f"use one of {', '.join(r.name for r in ROUTES)}")
