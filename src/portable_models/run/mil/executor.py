"""Walk a MIL function op by op with numpy: the reference executor.

The executor keeps an environment of values by ``Var``; every op's inputs are read
from it (or from the op's constants), the op's kernel computes its outputs, and the
outputs are rounded to the dtype the program declares (an fp16 program is computed
in float32 and stored as float16 after every op, as Core ML stores it) and checked
against the shapes the program declares. ``cond`` and ``while_loop`` run their nested
blocks recursively.

Before anything runs, every op type of the function (nested blocks included) must
have a kernel; a program with an op this executor cannot compute is refused with an
:class:`~portable_models.errors.UnverifiedError` naming the op.

Notes: float16 results are rounded after every op, as the program's types say (and as
the GPU and the Neural Engine store them); Core ML's CPU path may keep float32
intermediates, so fp16 programs can differ from it by about an fp16 ulp per op. An
executor is not thread-safe (ops delegated to coremltools are given their run-time
values on the loaded program's own Vars for the duration of the call). All
intermediate values of one run are kept until the run ends.

Intermediate values can be watched: ``run(feeds, observer=f)`` calls ``f(op, values)``
after every op it computes (nested blocks included, once per loop iteration), and
:meth:`MilExecutor.stream` yields each top-level op with its values as it is computed
(``diagnose`` compares them as they come). Ops folded when the program was loaded are
constants and are not reported. A plain ``run`` pays one ``is None`` test per op.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any

import numpy as np

from portable_models.errors import PortableModelsError, RuntimeRunError
from portable_models.run.mil.kernels import CONTROL_FLOW_OPS, KERNELS, Kernel
from portable_models.run.mil.kernels_infer import no_kernel_error
from portable_models.run.mil.loader import LoadedProgram, numpy_dtype

__all__ = ["MilExecutor", "Observer", "iter_ops", "op_types"]

#: called with an op and its outputs' values (as stored: in the program's dtypes)
Observer = Callable[[Any, list[Any]], None]

_CACHED_PREFIX = "constexpr_"


def iter_ops(block: Any) -> Iterator[Any]:
    """Every op of ``block`` and of the blocks nested in it, in program order."""
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from iter_ops(inner)


def op_types(block: Any) -> set[str]:
    return {op.op_type for op in iter_ops(block)}


def _upcast(value: Any) -> Any:
    """float16 values are computed in float32 (outputs are rounded back afterwards)."""
    if isinstance(value, np.ndarray) and value.dtype == np.float16:
        return value.astype(np.float32)
    if isinstance(value, np.float16):
        return np.float32(value)
    if isinstance(value, list):
        return [_upcast(v) for v in value]
    return value


class MilExecutor:
    """Runs one loaded ML program function on numpy inputs."""

    def __init__(self, loaded: LoadedProgram, kernels: Mapping[str, Kernel] | None = None) -> None:
        self.loaded = loaded
        self.function = loaded.function
        self.kernels = KERNELS if kernels is None else kernels
        self._cache: dict[Any, Any] = {}
        self._observer: Observer | None = None
        self.check_coverage()
        # ops whose outputs coremltools already computed when it loaded the program
        self._folded = {id(op) for op in iter_ops(self.function)
                        if all(o.val is not None for o in op.outputs)}

    # -- coverage ------------------------------------------------------------------
    def missing_kernels(self) -> list[str]:
        """Op types of the program that have no kernel here, sorted."""
        known = set(self.kernels) | CONTROL_FLOW_OPS
        return sorted(op_types(self.function) - known)

    def checked(self) -> list[str]:
        ops = list(iter_ops(self.function))
        return [
            f"{self.loaded.path.name} loaded with coremltools' MIL loader",
            f"{len(ops)} ops of {len(op_types(self.function))} op types read",
        ]

    def check_coverage(self) -> None:
        missing = self.missing_kernels()
        if missing:
            extra = f"also missing: {', '.join(missing[1:])}" if len(missing) > 1 else ""
            raise no_kernel_error(missing[0], extra, checked=self.checked())

    # -- running -------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray], *, observer: Observer | None = None) -> dict[str, np.ndarray]:
        """Feeds by program input name -> outputs by model output name; ``observer`` (if
        given) sees every op's outputs as they are computed."""
        env = self._bind(feeds)
        self._observer = observer
        try:
            with np.errstate(all="ignore"):
                self.run_block(self.function, env)
        finally:
            self._observer = None
        return self._results(env)

    def stream(self, feeds: Mapping[str, np.ndarray]) -> Generator[tuple[Any, list[Any]], None, dict[str, np.ndarray]]:
        """Run the function one top-level op at a time, yielding ``(op, values)`` for each
        op computed (a ``while_loop`` or ``cond`` once, with its results); the outputs by
        model output name are the generator's return value."""
        env = self._bind(feeds)
        for op in self.function.operations:
            with np.errstate(all="ignore"):
                computed = self._run_op(op, env)
            if computed:
                yield op, [self.value(v, env) for v in op.outputs]
        return self._results(env)

    def _bind(self, feeds: Mapping[str, np.ndarray]) -> dict[Any, Any]:
        env: dict[Any, Any] = {}
        for name, var in self.function.inputs.items():
            if name not in feeds:
                raise RuntimeRunError(f"input '{name}' not fed (the model takes {list(self.function.inputs)})")
            env[var] = self._coerce_input(name, var, feeds[name])
        return env

    def _results(self, env: Mapping[Any, Any]) -> dict[str, np.ndarray]:
        results: dict[str, np.ndarray] = {}
        by_name = {v.name: v for v in self.function.outputs}
        for name in self.loaded.outputs:
            results[name] = _as_output_array(self.value(by_name[name], env))
        return results

    def run_block(self, block: Any, env: dict[Any, Any]) -> list[Any]:
        for op in block.operations:
            self._run_op(op, env)
        return [self.value(v, env) for v in block.outputs]

    def value(self, var: Any, env: Mapping[Any, Any]) -> Any:
        """The run-time value of ``var`` (as stored: in the program's dtype)."""
        if var in env:
            return env[var]
        if var in self._cache:
            return self._cache[var]
        val = var.val
        if val is None:
            raise RuntimeRunError(f"value of '{var.name}' is not available when it is used")
        return val

    def _args(self, op: Any, env: Mapping[Any, Any]) -> dict[str, Any]:
        args: dict[str, Any] = {}
        for name, var in op.inputs.items():
            if isinstance(var, (list, tuple)):
                args[name] = [_upcast(self.value(v, env)) for v in var]
            else:
                args[name] = _upcast(self.value(var, env))
        return args

    def _run_op(self, op: Any, env: dict[Any, Any]) -> bool:
        """Compute ``op`` into ``env``; False for an op whose value is already known."""
        op_type = op.op_type
        if op_type in CONTROL_FLOW_OPS:
            values = self._run_control_flow(op, env)
        else:
            kernel = self.kernels.get(op_type)
            if kernel is None:
                raise no_kernel_error(op_type, checked=self.checked())
            if id(op) in self._folded or op.outputs[0] in self._cache:
                return False  # folded when the program was loaded, or a cached constexpr
            values = _call(kernel, op, self._args(op, env))
        outs = list(values) if len(op.outputs) > 1 else [values]
        if len(outs) != len(op.outputs):
            raise RuntimeRunError(f"op '{op.name}' ({op_type}) gave {len(outs)} outputs, expected {len(op.outputs)}")
        store = self._cache if op_type.startswith(_CACHED_PREFIX) else env
        for var, val in zip(op.outputs, outs, strict=False):
            store[var] = _coerce_output(op, var, val)
        if self._observer is not None:
            self._observer(op, [store[var] for var in op.outputs])
        return True

    def _run_control_flow(self, op: Any, env: dict[Any, Any]) -> Any:
        if op.op_type == "cond":
            pred = bool(np.asarray(self.value(op.pred, env)).reshape(-1)[0])
            outs = self.run_block(op.blocks[0] if pred else op.blocks[1], env)
        else:
            outs = self._run_while(op, env)
        return tuple(outs) if len(op.outputs) > 1 else outs[0]

    def _run_while(self, op: Any, env: dict[Any, Any]) -> list[Any]:
        cond_block, body_block = op.blocks
        state = [self.value(v, env) for v in op.loop_vars]
        while True:
            for var, val in zip(cond_block.inputs, state, strict=False):
                env[var] = val
            (keep_going,) = self.run_block(cond_block, env)
            if not bool(np.asarray(keep_going).reshape(-1)[0]):
                return state
            for var, val in zip(body_block.inputs, state, strict=False):
                env[var] = val
            state = self.run_block(body_block, env)

    def _coerce_input(self, name: str, var: Any, value: Any) -> np.ndarray:
        want = numpy_dtype(var.dtype)
        arr = np.asarray(value)
        if arr.dtype != want:
            if np.issubdtype(want, np.integer) and np.issubdtype(arr.dtype, np.integer):
                info = np.iinfo(want)
                if arr.size and (arr.min() < info.min or arr.max() > info.max):
                    raise RuntimeRunError(f"input '{name}' has values outside {want} (the model declares {want})")
            arr = arr.astype(want)
        _check_shape(f"input '{name}'", var, arr)
        return arr


def _call(kernel: Kernel, op: Any, args: dict[str, Any]) -> Any:
    """Run one kernel; a failure names the op (programming errors pass unchanged)."""
    try:
        return kernel(op, args)
    except (PortableModelsError, TypeError, AssertionError, NameError, AttributeError):
        raise
    except Exception as exc:
        raise RuntimeRunError(f"op '{op.name}' ({op.op_type}) failed: {exc}") from exc


def _as_output_array(value: Any) -> np.ndarray:
    """A copy of an output value; a classifier's probability dict becomes the array of
    its probabilities in class order."""
    if isinstance(value, dict):
        return np.array(list(value.values()), dtype=np.float32)
    return np.array(value)


def _coerce_output(op: Any, var: Any, value: Any) -> Any:
    """Round a kernel's result to the declared dtype and check the declared shape."""
    from coremltools.converters.mil.mil import types

    sym_type = var.sym_type
    if types.is_list(sym_type) or types.is_dict(sym_type) or types.is_str(sym_type):
        return value
    if not (types.is_tensor(sym_type) or types.is_scalar(sym_type)):
        return value
    arr = np.asarray(value).astype(numpy_dtype(var.dtype), copy=False)
    if not var.shape and arr.size == 1:
        arr = arr.reshape(())
    _check_shape(f"op '{op.name}' ({op.op_type}) output '{var.name}'", var, arr)
    return arr


def _check_shape(what: str, var: Any, arr: np.ndarray) -> None:
    declared = tuple(var.shape)
    ok = len(declared) == arr.ndim and all(
        not isinstance(d, (int, np.integer)) or int(d) == a for d, a in zip(declared, arr.shape, strict=False)
    )
    if not ok:
        raise RuntimeRunError(f"{what} has shape {arr.shape}, the program declares {declared}")
