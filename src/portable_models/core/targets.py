"""The target registry: one row per target, in code, saying what its artifacts are and how
they are made and checked. A contract cannot say otherwise (the runtime follows the target),
and the rest of the flow reads a target's facts here rather than keeping lists of its own.
Adding a target is a row here, its routes (``convert/registry.py``) and its runtime
(``run/registry.py``)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["TARGETS", "TARGET_INFO", "TargetInfo", "checker_for"]


@dataclass(frozen=True, kw_only=True)
class TargetInfo:
    """What a target's artifacts are, in code: a contract cannot say otherwise."""

    #: the runtime that runs them (:data:`portable_models.run.registry.RUNTIMES`).
    runtime: str
    #: the file format they must have, checked before loading (:mod:`portable_models.run.formats`).
    file_format: str
    #: loading one can run code it carries: verified only in a sandbox or when trusted.
    runs_code: bool = False
    #: the precisions it is built at (float32, the reference twin, always first).
    precisions: tuple[str, ...] = ("float32",)
    #: relative cost of a conversion (the demo's, measured by ``make bench``): how ``--jobs``
    #: spreads targets over lanes.
    cost: float = 5.0
    #: targets of one family share converters (and a worker's imports): ``--jobs`` keeps them
    #: in one lane, in registry order.
    family: str = ""
    #: earlier targets whose float32 artifact its routes may convert from (onnx2tf reads the
    #: ONNX artifact; the ONNX int8 variants quantise the fp32 twin): those are built first and
    #: handed over.
    consumes: tuple[str, ...] = ()
    #: where its runtime cannot run (``runtime_platforms``), the runtime that checks it instead.
    checker: str | None = None
    #: the platforms (``sys.platform``) its runtime runs on (empty: every one).
    runtime_platforms: tuple[str, ...] = ()
    #: why a precision it does not list is not built (the report says it; never a silent copy)
    not_built: Mapping[str, str] = field(default_factory=dict)


TARGET_INFO: dict[str, TargetInfo] = {
    "onnx": TargetInfo(runtime="onnxruntime", file_format="onnx", precisions=("float32", "int8-dynamic", "int8"),
                       cost=4.8, family="onnx", consumes=("onnx",)),
    "torchscript": TargetInfo(
        runtime="torchscript", file_format="torchscript", runs_code=True, cost=0.2, family="torch",
        not_built={p: "TorchScript's int8 path is torch.ao's eager quantize_dynamic, which swaps nn.Linear modules: "
                      "the captured program the route traces has none (it would be a silent fp32 copy), and torch.ao "
                      "quantisation is deprecated for torchao in torch 2.13; ExecuTorch, ONNX and TFLite carry int8"
                   for p in ("int8-weight", "int8-dynamic", "int8")}),
    "executorch": TargetInfo(runtime="executorch", file_format="pte", precisions=("float32", "int8-dynamic", "int8"),
                             cost=8.0, family="torch", consumes=("executorch",)),
    "tflite": TargetInfo(runtime="litert", file_format="tflite",
                         precisions=("float32", "float16", "int8-weight", "int8-dynamic", "int8"), cost=10.7,
                         family="onnx", consumes=("onnx", "tflite")),
    "coreml": TargetInfo(runtime="coreml", file_format="mlpackage", precisions=("float32", "float16", "int8-weight"),
                         cost=3.2, family="torch", consumes=("coreml",), checker="mil-reference",
                         runtime_platforms=("darwin",),
                         not_built={p: "coremltools quantises activations by calibrating on predictions "
                                       "(coremltools.optimize.coreml.linear_quantize_activations), which need the "
                                       "Core ML runtime (macOS), so no route makes them yet; int8-weight is built everywhere"
                                    for p in ("int8-dynamic", "int8")}),
}

#: every target, in the order reports list them.
TARGETS = tuple(TARGET_INFO)


def not_built_reason(target: str, precision: str, source: str = "") -> str:
    """Why no ``precision`` variant of ``target`` is built here (from a ``source`` model)."""
    info = TARGET_INFO[target]
    if precision in info.precisions:  # the target carries it, but no route makes it from this source
        return f"no route makes a {precision} {target} from a {source or 'this'} source"
    return info.not_built.get(precision) or (
        f"no {target} route here makes {precision} (this target carries {', '.join(info.precisions)})")


def checker_for(runtime: str) -> str | None:
    """The runtime that checks artifacts of ``runtime`` on this platform instead, when
    ``runtime`` cannot run here (Core ML off macOS: the MIL reference executor); else None."""
    for info in TARGET_INFO.values():
        if info.runtime == runtime and info.runtime_platforms and sys.platform not in info.runtime_platforms:
            return info.checker
    return None
