"""Core ML artifacts checked with the MIL reference executor (numpy), on any system.

The Core ML runtime predicts only on macOS. :class:`MilReferenceRunner` runs the ML
program inside a ``.mlpackage`` op by op with numpy (see
:mod:`portable_models.run.mil`), so its outputs go through the same compare
engine as any other runtime's. It is a reference implementation of the MIL op
semantics, not Apple's runtime: reports name it as such ("MIL reference, numpy").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from portable_models.core.coremltools_import import import_coremltools
from portable_models.run.base import Runner

if TYPE_CHECKING:
    from portable_models.run.mil.executor import MilExecutor

__all__ = ["MilReferenceRunner"]


class MilReferenceRunner(Runner):
    """Runs a Core ML ML program with the numpy MIL reference executor."""

    distribution = "coremltools"
    label = "MIL reference, numpy"

    _executor: MilExecutor | None = None

    def _load_impl(self) -> None:
        from portable_models.run.mil import load_executor

        import_coremltools()
        self._executor = load_executor(self.artifact)

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Physical feeds by the model's input names; integer feeds are cast to the
        integer dtype the program declares (int64 ids -> int32) after a range check."""
        assert self._executor is not None
        return self._executor.run(feeds)

    def _close_impl(self) -> None:
        self._executor = None
