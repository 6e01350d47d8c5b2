"""Capture: turn what the user gave into one canonical source file plus golden data."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.core.golden import Cases
from portable_models.core.spec import DimSpec, TensorSpec

__all__ = ["CaptureOptions", "Captured", "framework_of"]


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


@dataclass(kw_only=True)
class CaptureOptions:
    """What the capture of any source is told besides the model and its example inputs
    (:class:`portable_models.ExportOptions` adds what the rest of the flow is told)."""

    input_names: Sequence[str] | None = None
    output_names: Sequence[str] | None = None
    dynamic_dims: Mapping[str, Mapping[int, Any]] | None = None
    input_ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    layouts: Mapping[str, str | None] = field(default_factory=dict)
    samples: Sequence[Mapping[str, np.ndarray]] | None = None
    #: held-out real inputs, appended to the golden cases after the samples (or the seeded
    #: random cases): every artifact is judged on both, and a quantised variant by the real ones
    eval_samples: Sequence[Mapping[str, np.ndarray]] | None = None
    cases: int = 4
    seed: int = 0
    #: allow loading that can run code (Keras Lambda layers) — the caller's explicit opt-in.
    trust_model: bool = False
    #: reuse an earlier capture of the unchanged model (see :mod:`.fingerprint`).
    cache: bool = True
