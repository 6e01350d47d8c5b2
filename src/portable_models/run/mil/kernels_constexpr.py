"""numpy kernels for the constexpr ops that hold linearly quantised weights, written from the
MIL op specifications (coremltools' op docs), not delegated to coremltools' own decompression:
the weights a quantised Core ML variant is judged with are computed independently of the
quantiser that made them.

* ``constexpr_affine_dequantize`` (iOS16): ``scale * (quantized_data - zero_point)``;
  ``scale`` and ``zero_point`` are scalars or vectors of length ``quantized_data.shape[axis]``,
  broadcast along ``axis``. ``quantized_data`` is int8/uint8, ``zero_point`` int8/uint8/fp32,
  the output has the dtype of ``scale`` (fp16 or fp32).
* ``constexpr_blockwise_shift_scale`` (iOS18): ``scale[b] * (data - offset[b])`` where element
  ``i`` of ``data`` belongs to block ``b = floor(i / block_size)`` per dimension and
  ``block_size = data.shape / scale.shape``; ``scale``, ``offset`` (optional) and ``data`` have
  the same rank; ``data`` is int4/uint4/int8/uint8/fp16/fp32, the output has the dtype of
  ``scale``.

Both compute in the output dtype (the dtype of ``scale`` as the program declares it: the
executor hands kernels fp16 values as float32), converting the integer data to it first, as
the specs' "output = scale * (data - offset)" reads. For 8-bit and 4-bit data the difference
is an exact small integer and the product is rounded once, so the result is exact whatever
the order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["CONSTEXPR_KERNELS", "affine_dequantize", "blockwise_shift_scale"]

Args = Mapping[str, Any]


def _out_dtype(op: Any, scale: np.ndarray) -> np.dtype[Any]:
    """The output dtype: the declared one (``op`` given), else the dtype of ``scale``."""
    if op is None:
        return scale.dtype
    from portable_models.run.mil.loader import numpy_dtype

    return numpy_dtype(op.outputs[0].dtype)


def affine_dequantize(op: Any, args: Args) -> np.ndarray:
    """``constexpr_affine_dequantize``: per-tensor or per-axis affine dequantisation."""
    data = np.asarray(args["quantized_data"])
    dtype = _out_dtype(op, np.asarray(args["scale"]))
    axis = int(np.asarray(args["axis"]))
    axis = axis + data.ndim if axis < 0 else axis

    def along_axis(param: Any) -> np.ndarray:
        arr = np.asarray(param).astype(dtype)
        if arr.ndim == 0:
            return arr
        if arr.shape != (data.shape[axis],):
            raise ValueError(f"a vector parameter has shape {arr.shape}, expected ({data.shape[axis]},)")
        shape = [1] * data.ndim
        shape[axis] = data.shape[axis]
        return arr.reshape(shape)

    return along_axis(args["scale"]) * (data.astype(dtype) - along_axis(args["zero_point"]))


def blockwise_shift_scale(op: Any, args: Args) -> np.ndarray:
    """``constexpr_blockwise_shift_scale``: block-wise dequantisation."""
    data = np.asarray(args["data"])
    scale = np.asarray(args["scale"])
    dtype = _out_dtype(op, scale)
    offset = None if args.get("offset") is None else np.asarray(args["offset"])
    if scale.ndim != data.ndim or (offset is not None and offset.shape != scale.shape):
        shapes = f"data {data.shape}, scale {scale.shape}" + ("" if offset is None else f", offset {offset.shape}")
        raise ValueError(f"{shapes}: one rank for all, one shape for scale and offset")
    if any(d % s for d, s in zip(data.shape, scale.shape, strict=True)):
        raise ValueError(f"scale {scale.shape} does not divide data {data.shape} into whole blocks")
    # data as (n0, b0, n1, b1, ...): block counts interleaved with block sizes; the
    # parameters as (n0, 1, n1, 1, ...) broadcast over each block.
    blocked = [n for d, s in zip(data.shape, scale.shape, strict=True) for n in (s, d // s)]
    per_block = [n for s in scale.shape for n in (s, 1)]
    values = data.astype(dtype).reshape(blocked)
    if offset is not None:
        values = values - offset.astype(dtype).reshape(per_block)
    return (scale.astype(dtype).reshape(per_block) * values).reshape(data.shape)


CONSTEXPR_KERNELS = {
    "constexpr_affine_dequantize": affine_dequantize,
    "constexpr_blockwise_shift_scale": blockwise_shift_scale,
}
