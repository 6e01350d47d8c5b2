"""The runtime table: one row per runtime, implementations named by dotted path."""

from __future__ import annotations

from portable_models.errors import UsageError
from portable_models.run.base import RuntimeInfo

__all__ = ["RUNTIMES", "runtime_info"]

RUNTIMES: dict[str, RuntimeInfo] = {
    "onnxruntime": RuntimeInfo(name="onnxruntime", requires=("onnxruntime",),
                               impl="portable_models.run.onnxruntime:OnnxRuntimeRunner",
                               description="onnxruntime, CPU execution provider"),
    "torchscript": RuntimeInfo(name="torchscript", requires=("torch",), framework="torch",
                               impl="portable_models.run.torchscript:TorchScriptRunner",
                               description="torch.jit.load"),
    "executorch": RuntimeInfo(name="executorch", requires=("executorch",), framework="torch",
                              impl="portable_models.run.executorch:ExecuTorchRunner",
                              description="ExecuTorch runtime Python bindings"),
    "litert": RuntimeInfo(name="litert", requires=("ai-edge-litert",),
                          impl="portable_models.run.litert:LiteRTRunner",
                          description="ai_edge_litert interpreter, signature runner"),
    "coreml": RuntimeInfo(name="coreml", requires=("coremltools",), framework="coreml",
                          impl="portable_models.run.coreml:CoreMLRunner",
                          description="coremltools predict (macOS only)"),
    "mil-reference": RuntimeInfo(name="mil-reference", requires=("coremltools",), framework="coreml",
                                 impl="portable_models.run.mil_reference:MilReferenceRunner",
                                 description="Core ML ML programs executed op by op with numpy "
                                             "(the artifact's meaning, not Apple's kernels)"),
}


def runtime_info(name: str) -> RuntimeInfo:
    try:
        return RUNTIMES[name]
    except KeyError:
        raise UsageError(f"unknown runtime {name!r}", fix=f"use one of {', '.join(RUNTIMES)}") from None
