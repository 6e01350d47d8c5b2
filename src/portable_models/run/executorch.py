"""Run a ``.pte`` with the ExecuTorch runtime's Python bindings.

``Runtime.get().load_program(path).load_method("forward")``; inputs go in
positionally, in the order of the io map's inputs (physical names are the logical
names); outputs come back as a flat list, named in order with the io map's physical
output names. At load the method's declared numbers of inputs and outputs are checked
against the io map; before each call every feed's dtype, rank and sizes are checked
against the planned tensors, so a wrong feed fails with a clear message instead of an
ExecuTorch error code.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from portable_models.core.arrays import to_numpy
from portable_models.errors import MissingDependencyError, RuntimeLoadError, RuntimeRunError
from portable_models.run.base import Runner

__all__ = ["ExecuTorchRunner", "describe_error"]

#: c10 ScalarType codes (what ``TensorInfo.dtype()`` returns) -> numpy dtype names.
_SCALAR_TYPES = {
    0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16",
    6: "float32", 7: "float64", 11: "bool", 15: "bfloat16",
}

#: ``executorch::runtime::Error`` codes, for messages.
_ERRORS = {
    0x01: "Internal", 0x02: "InvalidState", 0x03: "EndOfMethod", 0x04: "AlreadyLoaded",
    0x10: "NotSupported", 0x11: "NotImplemented", 0x12: "InvalidArgument",
    0x13: "InvalidType", 0x14: "OperatorMissing", 0x20: "NotFound",
    0x21: "MemoryAllocationFailed", 0x22: "AccessFailed", 0x23: "InvalidProgram",
    0x24: "InvalidExternalData", 0x25: "OutOfResources",
    0x30: "DelegateInvalidCompatibility", 0x31: "DelegateMemoryAllocationFailed",
    0x32: "DelegateInvalidHandle",
}


def describe_error(text: str) -> str:
    """``"... failed with error 0x12"`` -> the same text plus the error's name."""
    m = re.search(r"error (0x[0-9a-fA-F]+)", text)
    if not m:
        return text
    name = _ERRORS.get(int(m.group(1), 16))
    return f"{text} ({name})" if name else text


class ExecuTorchRunner(Runner):
    """One method (``forward`` unless ``options.extra["method"]`` says otherwise) of a
    .pte, loaded with ``executorch.runtime``."""

    distribution = "executorch"
    label = "ExecuTorch runtime"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._program: Any = None
        self._method: Any = None
        self._inputs: list[tuple[str, tuple[int, ...]] | None] = []
        self._threads_before: int | None = None

    @property
    def method_name(self) -> str:
        return str(self.options.extra.get("method", "forward"))

    # -- hooks -----------------------------------------------------------------------
    def _load_impl(self) -> None:
        runtime = _runtime()
        if self.options.threads:  # the pool is the process's: put back at close
            import executorch.extension.pybindings.portable_lib as lib

            before = int(lib._threadpool_get_thread_count())
            if before != int(self.options.threads):
                lib._unsafe_reset_threadpool(int(self.options.threads))
                self._threads_before = before
        self._program = runtime.load_program(self.artifact)
        if self.method_name not in self._program.method_names:
            raise RuntimeLoadError(
                f"{self.artifact.name} has no method {self.method_name!r} "
                f"(it has {sorted(self._program.method_names)})",
                file=str(self.artifact), stage="load:executorch")
        self._method = self._program.load_method(self.method_name)
        meta = self._method.metadata
        self._check_counts(meta.num_inputs(), meta.num_outputs())
        self._inputs = [_input_info(meta, i) for i in range(meta.num_inputs())]

    def _check_counts(self, n_in: int, n_out: int) -> None:
        want_in, want_out = len(self.io.inputs), len(self.io.outputs)
        if (n_in, n_out) != (want_in, want_out):
            raise RuntimeLoadError(
                f"{self.artifact.name} method {self.method_name!r} takes {n_in} inputs and "
                f"returns {n_out} outputs, but the io map names {want_in} inputs "
                f"{list(self.io.inputs)} and {want_out} outputs {list(self.io.outputs)}",
                file=str(self.artifact), stage="load:executorch",
                fix="the artifact and its contract do not belong together: re-export")

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        names = [b.name for b in self.io.inputs.values()]
        args = []
        for pos, name in enumerate(names):
            arr = np.ascontiguousarray(feeds[name])
            planned = self._inputs[pos]
            if planned is not None:
                self._check_feed(name, arr, *planned)
            args.append(torch.from_numpy(arr.copy()))
        try:
            outs = self._method.execute(args)
        except RuntimeError as exc:
            raise RuntimeRunError(
                f"executorch {self.artifact.name} {self.method_name}: "
                f"{describe_error(str(exc))}",
                file=str(self.artifact), stage="run:executorch",
                fix="a delegate (XNNPACK) failure falls back to the executorch-portable "
                    "route") from exc
        return self._name_outputs(list(outs))

    def _check_feed(self, name: str, arr: np.ndarray, dtype: str,
                    planned: tuple[int, ...]) -> None:
        problem = ""
        if str(arr.dtype) != dtype:
            problem = f"is {arr.dtype}, the program takes {dtype}"
        elif arr.ndim != len(planned):
            problem = f"has rank {arr.ndim}, the program takes rank {len(planned)}"
        elif any(a > p for a, p in zip(arr.shape, planned, strict=True)):
            problem = (f"has shape {list(arr.shape)}, above the sizes {list(planned)} "
                       "the program was planned for (dynamic dims at their max)")
        if problem:
            raise RuntimeRunError(f"input {name!r} {problem}", file=str(self.artifact),
                                  stage="run:executorch")

    def _name_outputs(self, outs: list[Any]) -> dict[str, np.ndarray]:
        names = [b.name for b in self.io.outputs.values()]
        if len(outs) != len(names):
            raise RuntimeRunError(
                f"{self.artifact.name} returned {len(outs)} outputs, the io map names "
                f"{len(names)} {names}", file=str(self.artifact), stage="run:executorch")
        return {name: to_numpy(v, copy=True) for name, v in zip(names, outs, strict=True)}

    def _close_impl(self) -> None:
        self._method = None
        self._program = None
        self._inputs = []
        if self._threads_before is not None:
            import executorch.extension.pybindings.portable_lib as lib

            lib._unsafe_reset_threadpool(self._threads_before)
            self._threads_before = None


def _runtime() -> Any:
    try:
        from executorch.runtime import Runtime
    except ImportError as exc:
        raise MissingDependencyError(
            f"the ExecuTorch runtime is not importable: {exc}", stage="load:executorch",
            fix="pip install 'portable-models[executorch]'") from exc
    return Runtime.get()


def _input_info(meta: Any, index: int) -> tuple[str, tuple[int, ...]] | None:
    """(dtype name, planned sizes) of a tensor input; None for a non-tensor input."""
    try:
        info = meta.input_tensor_meta(index)
    except RuntimeError:
        return None
    code = int(info.dtype())
    return _SCALAR_TYPES.get(code, f"ScalarType {code}"), tuple(int(s) for s in info.sizes())
