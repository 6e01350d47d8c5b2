"""LiteRT runner: ``ai_edge_litert`` interpreter, through a signature runner.

Inputs and outputs are bound by signature name, never by position. The signature
runner resizes its inputs on every call (non-strict resize), so named dynamic dims
just work; a dim that the signature fixes (not ``-1``) must match, or the run fails
with the expected and the given shape. Feeds are cast to the signature's dtype when
that loses nothing (litert-torch turns int64 inputs into int32 unless asked not to).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.errors import RuntimeLoadError, RuntimeRunError
from portable_models.run.base import Runner

__all__ = ["LiteRTRunner", "shape_fits", "signature_details"]

Details = dict[str, dict[str, Any]]


def signature_details(path: Path, key: str | None = None) -> tuple[Details, Details]:
    """Input and output details (name -> dtype, shape, shape_signature …) of one
    signature of a ``.tflite`` file: ``key``, or the only one."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    keys = list(interp.get_signature_list())
    if key is None and len(keys) != 1:
        raise RuntimeLoadError(f"{path.name} has signatures {keys}; name one",
                               file=str(path), stage="load:litert")
    runner = interp.get_signature_runner(key or keys[0])
    return runner.get_input_details(), runner.get_output_details()


def shape_fits(shape: Sequence[int], signature: Sequence[int]) -> bool:
    """``shape`` is allowed by a ``shape_signature`` (``-1``: any size)."""
    return len(shape) == len(signature) and all(
        int(s) in (-1, d) for d, s in zip(shape, signature, strict=True))


def _cast(name: str, arr: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """``arr`` as ``dtype``: integers to integers when every value fits, floats to
    floats; anything else is a RuntimeRunError."""
    if arr.dtype == dtype:
        return np.ascontiguousarray(arr)
    ints = arr.dtype.kind in "iu" and dtype.kind in "iu"
    if not ints and arr.dtype.kind != dtype.kind:
        raise RuntimeRunError(f"input {name!r} is {arr.dtype}, the artifact takes {dtype.name}",
                              stage="run:litert")
    out = arr.astype(dtype)
    if ints and not np.array_equal(out, arr):
        raise RuntimeRunError(f"input {name!r} ({arr.dtype}) has values outside the "
                              f"artifact's {dtype.name}", stage="run:litert")
    return np.ascontiguousarray(out)


class LiteRTRunner(Runner):
    """Runs a ``.tflite`` file with the LiteRT interpreter (CPU, XNNPACK by default)."""

    distribution = "ai-edge-litert"
    label = "LiteRT interpreter"

    _interp: Any = None
    _runner: Any = None
    _inputs: dict[str, dict[str, Any]]

    def _load_impl(self) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._interp = Interpreter(model_path=str(self.artifact),
                                   num_threads=self.options.threads)
        keys = list(self._interp.get_signature_list())
        key = self.options.extra.get("signature")
        if key is None:
            key = keys[0] if len(keys) == 1 else "serving_default"
        if key not in keys:
            raise RuntimeLoadError(
                f"{self.artifact.name} has signatures {keys}, not {key!r}",
                file=str(self.artifact), stage="load:litert",
                fix="name the signature in the runner options (extra={'signature': ...})")
        self._runner = self._interp.get_signature_runner(key)
        self._inputs = self._runner.get_input_details()
        outputs = self._runner.get_output_details()
        missing = [b.name for b in self.io.inputs.values() if b.name not in self._inputs]
        missing += [b.name for b in self.io.outputs.values() if b.name not in outputs]
        if missing:
            raise RuntimeLoadError(
                f"signature {key!r} of {self.artifact.name} lacks {missing} (it has inputs "
                f"{sorted(self._inputs)}, outputs {sorted(outputs)})",
                file=str(self.artifact), stage="load:litert")

    def _feed(self, name: str, value: np.ndarray) -> np.ndarray:
        detail = self._inputs[name]
        want = [int(d) for d in detail["shape_signature"]]
        if not shape_fits(value.shape, want):
            raise RuntimeRunError(
                f"input {name!r} has shape {list(value.shape)}; the artifact takes {want} "
                "(-1: any size)", file=str(self.artifact), stage="run:litert")
        return _cast(name, np.asarray(value), np.dtype(detail["dtype"]))

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prepared = {name: self._feed(name, value) for name, value in feeds.items()}
        if set(prepared) != set(self._inputs):
            raise RuntimeRunError(f"feeds {sorted(prepared)} do not match the signature's "
                                  f"inputs {sorted(self._inputs)}", stage="run:litert")
        results = self._runner(**prepared)
        return {name: np.array(value, copy=True) for name, value in results.items()}

    def _close_impl(self) -> None:
        self._runner = None
        self._interp = None
