"""Translations that coremltools' TorchScript frontend lacks (coremltools 9.0), registered with
its own ``register_torch_op`` in the worker of a Core ML route before it converts.

``new_ones`` (``attention_mask.new_ones(...)`` in BERT- and GPT-style models) has no
translation in the TorchScript frontend, so the eager model's trace of those models cannot
convert; the torch.export routes reach the op through a decomposition instead (see
:mod:`portable_models.convert.coreml`). A translation coremltools already has is never
replaced: registering is skipped for it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["register"]

#: torch dtype numbers (TorchScript's ScalarType) a ``new_*`` op may name
_BOOL, _FLOATS = 11, frozenset({5, 6, 7, 15})
_REGISTERED: list[str] = []


def register() -> list[str]:
    """Register the missing translations once per process; the names registered."""
    if _REGISTERED:
        return list(_REGISTERED)
    from coremltools.converters.mil.frontend.torch import register_torch_op
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    for func in (new_ones,):
        if _TORCH_OPS_REGISTRY.get_func(func.__name__) is None:
            register_torch_op(func)
            _REGISTERED.append(func.__name__)
    return list(_REGISTERED)


def new_ones(context: Any, node: Any) -> None:
    """``x.new_ones(size, dtype=None, ...)``: a tensor of ones of ``size``, of ``dtype`` or
    else of ``x``'s dtype (Core ML's ``fill`` takes bool, int32 and float values)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    inputs = [context[name] for name in node.inputs]
    x, size = inputs[0], inputs[1]
    if isinstance(size, list):  # a dynamic size: one scalar per dim
        size = mb.concat(values=[mb.reshape(x=s, shape=[1]) for s in size], axis=0)
    if types.is_float(size.dtype):
        size = mb.cast(x=size, dtype="int32")
    dtype = inputs[2].val if len(inputs) > 2 and inputs[2] is not None else None
    value: Any
    if dtype == _BOOL or (dtype is None and types.is_bool(x.dtype)):
        value = True
    elif dtype in _FLOATS or (dtype is None and types.is_float(x.dtype)):
        value = 1.0
    else:
        value = 1
    context.add(mb.fill(shape=size, value=value, name=node.name))
