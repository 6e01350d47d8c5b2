"""Capture: turn what the user gave into one canonical source file plus golden data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portable_models.core.golden import Cases
from portable_models.core.spec import DimSpec, TensorSpec

__all__ = ["Captured", "framework_of"]


@dataclass(kw_only=True)
class Captured:
    """The canonical source and its golden data, ready to be written into a bundle."""

    framework: str
    version: str
    source_file: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: dict[str, DimSpec]
    golden_inputs: Cases
    golden_outputs: Cases
    meta: dict[str, Any] = field(default_factory=dict)


def framework_of(model: object) -> str:
    """'torch', 'keras' or 'onnx', judged from the class hierarchy without importing either."""
    if type(model).__name__ == "OnnxModelFile" and type(model).__module__ == "portable_models.capture.onnx":
        return "onnx"
    for cls in type(model).__mro__:
        qual = f"{cls.__module__}.{cls.__qualname__}"
        if qual == "torch.nn.modules.module.Module":
            return "torch"
        if cls.__module__.startswith(("keras.", "tf_keras.")) and cls.__name__ in ("Model", "Layer"):
            return "keras"
    return "unknown"
