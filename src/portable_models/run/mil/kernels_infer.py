"""Ops computed by coremltools' own op definitions (their ``value_inference``).

For these op types the executor calls the loaded op's own ``value_inference`` (so the
op class of the program's opset, with its semantics) after giving the op's input Vars,
for the duration of the call, concrete types and the run-time values: a value
inference that reads static shapes sees the real ones, also in programs with flexible
shapes. A value inference that declines (raises ``NotImplementedError`` or returns
nothing) is reported as an op without a kernel, never as a made-up output.

Only op types whose value inference was read and found complete are listed here;
the others have numpy kernels in the sibling modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from portable_models.errors import RuntimeRunError, UnverifiedError

__all__ = ["INFERRED_OPS", "infer_with_coremltools", "no_kernel_error"]

#: op types delegated to coremltools' value inference.
INFERRED_OPS: frozenset[str] = frozenset({
    # elementwise unary
    "abs", "acos", "asin", "atan", "atanh", "ceil", "cos", "cosh", "exp", "exp2", "floor",
    "inverse", "log", "logical_not", "round", "rsqrt", "sign", "sin", "sinh", "sqrt",
    "square", "tan", "tanh", "cast",
    # elementwise binary
    "add", "sub", "mul", "real_div", "floor_div", "mod", "pow", "maximum", "minimum",
    "equal", "not_equal", "greater", "greater_equal", "less", "less_equal",
    "logical_and", "logical_or", "logical_xor",
    # activations
    "clamped_relu", "elu", "leaky_relu", "linear_activation", "prelu", "relu", "relu6",
    "scaled_tanh", "sigmoid", "sigmoid_hard", "softplus", "softplus_parametric",
    "softsign", "softmax", "threshold", "clip",
    # linear algebra and normalisation
    "linear", "matmul", "einsum", "layer_norm", "l2_norm", "scaled_dot_product_attention",
    # reductions
    "reduce_argmax", "reduce_argmin", "reduce_l1_norm", "reduce_l2_norm", "reduce_log_sum",
    "reduce_log_sum_exp", "reduce_max", "reduce_mean", "reduce_min", "reduce_prod",
    "reduce_sum", "reduce_sum_square",
    # tensor manipulation
    "expand_dims", "fill", "gather", "gather_along_axis",
    "identity", "non_zero", "pad", "reshape", "reverse",
    "slice_by_size", "split", "stack", "tile", "topk", "transpose",
    "argsort", "quantize",
})


def no_kernel_error(op_type: str, detail: str = "", checked: list[str] | None = None) -> UnverifiedError:
    """The one error for an op this executor cannot compute."""
    message = f"MIL reference executor has no kernel for op '{op_type}'"
    if detail:
        message += f" ({detail})"
    return UnverifiedError(message, checked=checked or [])


class _Value:
    """Stands in for a MIL builtin value: ``Var.val`` reads ``_sym_val.val``."""

    __slots__ = ("val",)

    def __init__(self, val: Any) -> None:
        self.val = val


def _as_const(value: Any) -> Any:
    """A run-time value in the form MIL constants have (numpy scalars, python bools)."""
    if isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0:
        if value.dtype == np.bool_ or value.dtype == object:
            return value.item()  # numpy rejects np.bool_ for flags such as keepdims
        return value.dtype.type(value.item())
    if isinstance(value, np.ndarray):
        view = value.view()
        view.flags.writeable = False  # a value inference that writes in place fails loudly
        return view
    return value


def _sym_type(value: Any) -> Any:
    from coremltools.converters.mil.mil import types

    if isinstance(value, np.ndarray):
        return types.tensor(types.numpy_type_to_builtin_type(value.dtype), value.shape)
    if isinstance(value, str):
        return types.str
    return types.type_to_builtin_type(type(value))


class _Bound:
    """Gives an op's input Vars concrete types and values for one value inference, and
    puts their own back afterwards (the loaded program is left as it was)."""

    def __init__(self, op: Any, args: Mapping[str, Any]) -> None:
        self.pairs: list[tuple[Any, Any]] = []
        for name, value in args.items():
            var = op.inputs.get(name)
            if isinstance(var, (list, tuple)):
                self.pairs.extend(zip(var, value, strict=True))
            elif var is not None:
                self.pairs.append((var, value))
        self.saved: list[tuple[Any, Any, Any]] = []

    def __enter__(self) -> _Bound:
        for var, value in self.pairs:
            const = _as_const(value)
            self.saved.append((var, var._sym_type, var._sym_val))
            var._sym_type = _sym_type(const)
            var._sym_val = _Value(const)
        return self

    def __exit__(self, *exc: object) -> None:
        for var, sym_type, sym_val in reversed(self.saved):
            var._sym_type = sym_type
            var._sym_val = sym_val


def infer_with_coremltools(op: Any, args: Mapping[str, Any]) -> Any:
    """Compute ``op`` on ``args`` with coremltools' value inference for its op class."""
    try:
        with _Bound(op, args):
            result = op.value_inference()
    except NotImplementedError as exc:
        raise no_kernel_error(op.op_type, f"coremltools' value inference declined: {exc}") from exc
    except Exception as exc:  # coremltools' code, not ours: report it as a failed op
        raise RuntimeRunError(f"op '{op.name}' ({op.op_type}): coremltools' value inference "
                              f"failed: {type(exc).__name__}: {exc}") from exc
    values = list(result) if isinstance(result, (list, tuple)) and len(op.outputs) > 1 else [result]
    if any(v is None for v in values):
        raise no_kernel_error(op.op_type, "coremltools' value inference declined these inputs")
    return values[0] if len(values) == 1 else tuple(values)
