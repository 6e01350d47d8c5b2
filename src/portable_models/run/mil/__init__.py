"""A numpy reference executor for Core ML ML programs (``.mlpackage``).

Core ML predicts only on macOS. This package runs a saved ML program op by op with
numpy instead, so a Core ML artifact gets real numerical checks anywhere: the program
is loaded with coremltools' own MIL loader, most ops are computed by coremltools' own
op definitions (their value inference), the rest by numpy kernels written from the
MIL op specifications. An op it cannot compute is refused with an
:class:`~portable_models.errors.UnverifiedError` naming the op, never guessed.

Importing this package imports numpy only; coremltools is imported when a package is
loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from portable_models.run.mil.executor import MilExecutor

__all__ = ["load_executor", "run_mlpackage", "supported_ops"]


def supported_ops() -> set[str]:
    """Every MIL op type the reference executor can run."""
    from portable_models.run.mil.kernels import supported_ops as _supported

    return _supported()


def load_executor(path: Path | str) -> MilExecutor:
    """Load ``path`` (an .mlpackage) and return an executor ready to run it."""
    from portable_models.run.mil.executor import MilExecutor
    from portable_models.run.mil.loader import load_mlpackage

    return MilExecutor(load_mlpackage(path))


def run_mlpackage(path: Path | str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the ML program in ``path`` once: feeds by the model's input names, outputs
    by the model's output names."""
    return load_executor(path).run(feeds)
