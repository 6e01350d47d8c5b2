"""Run an ONNX artifact with onnxruntime on the CPU execution provider."""

from __future__ import annotations

from typing import Any

import numpy as np

from portable_models.errors import MissingDependencyError, RuntimeLoadError
from portable_models.run.base import Runner

__all__ = ["OnnxRuntimeRunner"]


class OnnxRuntimeRunner(Runner):
    """``onnxruntime.InferenceSession`` with ``CPUExecutionProvider``; feeds and
    outputs by physical name. ``options.threads`` sets the intra-op thread count."""

    distribution = "onnxruntime"
    label = "onnxruntime"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._session: Any = None
        self._output_names: list[str] = []

    def _load_impl(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise MissingDependencyError(
                f"onnxruntime is not importable: {exc}", stage="load:onnxruntime",
                fix="pip install 'portable-models[onnx]'") from exc
        opts = ort.SessionOptions()
        if self.options.threads:
            opts.intra_op_num_threads = int(self.options.threads)
        self._session = ort.InferenceSession(
            str(self.artifact), sess_options=opts, providers=["CPUExecutionProvider"])
        have = {i.name for i in self._session.get_inputs()}
        wanted = [b.name for b in self.io.inputs.values()]
        missing = [n for n in wanted if n not in have]
        if missing:
            raise RuntimeLoadError(
                f"{self.artifact.name} has no inputs named {missing} (it has {sorted(have)})",
                file=str(self.artifact), stage="load:onnxruntime",
                fix="the io map does not match the artifact; re-export the bundle")
        self._output_names = [o.name for o in self._session.get_outputs()]

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._session.run(self._output_names, feeds)
        return {name: np.asarray(v) for name, v in zip(self._output_names, values, strict=True)}

    def _close_impl(self) -> None:
        self._session = None
