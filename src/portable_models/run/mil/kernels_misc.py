"""numpy kernels: indexing, scatter/gather, lists, constants and small tensor ops.

Also the ops whose coremltools value inference is incomplete or slow: ``squeeze``
returns a wrong shape when everything is squeezed, ``flatten2d`` fails for axis 0,
``cumsum`` mishandles ``exclusive``, ``band_part`` loops in Python, ``range_1d``
gives up on long ranges, ``reverse_sequence`` is not implemented, ``concat`` ignores
``interleave``, ``scatter_along_axis`` ignores ``mode`` and ``select`` fails on a 0-d branch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from portable_models.run.mil.kernels_infer import no_kernel_error

__all__ = ["MISC_KERNELS", "slice_by_index_slices"]

Args = Mapping[str, Any]


def _mask(value: Any, rank: int) -> list[bool]:
    return [False] * rank if value is None else [bool(v) for v in np.asarray(value).reshape(-1)]


def slice_by_index_slices(shape: tuple[int, ...], args: Args) -> tuple[tuple[Any, ...], list[int]]:
    """Python slices for ``slice_by_index`` and the axes its squeeze mask removes."""
    rank = len(shape)
    begin = [int(v) for v in np.asarray(args["begin"]).reshape(-1)]
    end = [int(v) for v in np.asarray(args["end"]).reshape(-1)]
    stride = [1] * rank if args.get("stride") is None else [int(v) for v in np.asarray(args["stride"]).reshape(-1)]
    begin_mask, end_mask = _mask(args.get("begin_mask"), rank), _mask(args.get("end_mask"), rank)
    squeeze = _mask(args.get("squeeze_mask"), rank)
    index: list[Any] = []
    for i in range(rank):
        if squeeze[i]:
            b = begin[i] + shape[i] if begin[i] < 0 else begin[i]
            index.append(slice(b, b + 1))
            continue
        index.append(slice(None if begin_mask[i] else begin[i], None if end_mask[i] else end[i], stride[i]))
    return tuple(index), [i for i in range(rank) if squeeze[i]]


def slice_by_index(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"])
    index, squeeze_axes = slice_by_index_slices(x.shape, args)
    return np.squeeze(x[index], axis=tuple(squeeze_axes)) if squeeze_axes else x[index]


def slice_update(op: Any, args: Args) -> np.ndarray:
    """x with the ``slice_by_index`` region replaced by ``update``."""
    x = np.array(args["x"])
    index, _ = slice_by_index_slices(x.shape, args)
    x[index] = np.reshape(np.asarray(args["update"]), x[index].shape)
    return x


def squeeze(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"])
    if args.get("axes") is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(int(a) for a in np.asarray(args["axes"]).reshape(-1)))


def flatten2d(op: Any, args: Args) -> np.ndarray:
    """(prod(shape[:axis]), prod(shape[axis:])); coremltools' own fails for axis 0 / rank."""
    x = np.asarray(args["x"])
    axis = int(args.get("axis", 1)) % (x.ndim + 1)
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def shape(op: Any, args: Args) -> np.ndarray:
    return np.asarray(np.shape(args["x"]), np.int32)


def select(op: Any, args: Args) -> np.ndarray:
    """``cond ? a : b`` with numpy broadcasting; coremltools' own value inference fails when a
    branch is a 0-d tensor (``torch.where(c, x, 0.0)`` once its scalar is a tensor)."""
    a, b = np.asarray(args["a"]), np.asarray(args["b"])
    return np.where(np.asarray(args["cond"]).astype(bool), a, b).astype(np.result_type(a, b), copy=False)


def fill_like(op: Any, args: Args) -> np.ndarray:
    return np.full(np.shape(args["ref_tensor"]), args.get("value", 0.0))


def range_1d(op: Any, args: Args) -> np.ndarray:
    return np.arange(args["start"], args["end"], args["step"])


def band_part(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"])
    lower, upper = int(args.get("lower", -1)), int(args.get("upper", -1))
    m, n = x.shape[-2:]
    diff = np.arange(m)[:, None] - np.arange(n)[None, :]
    keep = ((lower < 0) | (diff <= lower)) & ((upper < 0) | (-diff <= upper))
    return np.where(keep, x, np.zeros((), x.dtype))


def cumsum(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"])
    axis = int(args.get("axis", 0))
    data = np.flip(x, axis) if bool(args.get("reverse", False)) else x
    out = np.cumsum(data, axis=axis, dtype=np.float64 if x.dtype.kind == "f" else None)
    if bool(args.get("exclusive", False)):
        out = np.concatenate([np.zeros_like(np.take(out, [0], axis=axis)),
                              np.take(out, np.arange(out.shape[axis] - 1), axis=axis)], axis=axis)
    return np.flip(out, axis) if bool(args.get("reverse", False)) else out


def reverse_sequence(op: Any, args: Args) -> np.ndarray:
    x = np.array(args["x"])
    lengths = np.asarray(args["lengths"]).reshape(-1)
    seq_axis, batch_axis = int(args.get("seq_axis", 0)) % x.ndim, int(args.get("batch_axis", 0)) % x.ndim
    out = x.copy()
    for b, n in enumerate(lengths):
        src = [slice(None)] * x.ndim
        src[batch_axis] = slice(b, b + 1)
        src[seq_axis] = slice(0, int(n))
        out[tuple(src)] = np.flip(x[tuple(src)], axis=seq_axis)
    return out


def one_hot(op: Any, args: Args) -> np.ndarray:
    indices = np.asarray(args["indices"]).astype(np.int64)
    depth = int(args["one_hot_vector_size"])
    on, off = args.get("on_value", 1), args.get("off_value", 0)
    hot = indices[..., None] == np.arange(depth)
    out = np.where(hot, on, off)
    axis = int(args.get("axis", -1))
    return np.moveaxis(out, -1, axis if axis >= 0 else axis + out.ndim)


def gather_nd(op: Any, args: Args) -> np.ndarray:
    x, idx = np.asarray(args["x"]), np.asarray(args["indices"]).astype(np.int64)
    bd = int(args.get("batch_dims", 0))
    batch = x.shape[:bd]
    xb = x.reshape((-1, *x.shape[bd:]))
    ib = idx.reshape((-1, *idx.shape[bd:]))
    k = ib.shape[-1]
    rows = []
    for b in range(xb.shape[0]):
        flat = ib[b].reshape(-1, k)
        rows.append(np.stack([xb[b][tuple(i)] for i in flat]) if len(flat) else
                    np.zeros((0, *xb.shape[1 + k:]), x.dtype))
    out = np.stack(rows)
    return out.reshape((*batch, *idx.shape[bd:-1], *x.shape[bd + k:]))


_SCATTER_UFUNC = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
                  "max": np.maximum, "min": np.minimum}


def _scatter_into(out: np.ndarray, index: Any, update: np.ndarray, mode: str) -> None:
    if mode == "update":
        out[index] = update
    elif mode in _SCATTER_UFUNC:
        out[index] = _SCATTER_UFUNC[mode](out[index], update)
    else:
        raise ValueError(f"unknown scatter mode '{mode}'")


def scatter(op: Any, args: Args) -> np.ndarray:
    """TF-style scatter along ``axis``: ``indices`` may have any rank; ``updates`` has
    shape ``data.shape[:axis] + indices.shape + data.shape[axis + 1:]``."""
    data = np.array(args["data"])
    raw = np.asarray(args["indices"])
    indices = raw.reshape(-1).astype(np.int64)
    axis = int(args.get("axis", 0)) % data.ndim
    updates = np.asarray(args["updates"]).reshape((*data.shape[:axis], indices.size, *data.shape[axis + 1:]))
    mode = str(args.get("mode", "add"))
    for i, target in enumerate(indices):
        dst: list[Any] = [slice(None)] * data.ndim
        dst[axis] = int(target)
        _scatter_into(data, tuple(dst), np.take(updates, i, axis=axis), mode)
    return data


def scatter_along_axis(op: Any, args: Args) -> np.ndarray:
    """data[..., indices[i, j, ...], ...] (op)= updates[i, j, ...] along ``axis``; every
    mode, not only ``update`` (coremltools' own value inference ignores ``mode``)."""
    data = np.array(args["data"])
    indices = np.asarray(args["indices"]).astype(np.int64)
    updates = np.broadcast_to(np.asarray(args["updates"]), indices.shape)
    axis = int(args.get("axis", 0)) % data.ndim
    mode = str(args.get("mode", "update"))
    indices = np.where(indices < 0, indices + data.shape[axis], indices)
    for pos in np.ndindex(*indices.shape):
        dst = list(pos)
        dst[axis] = int(indices[pos])
        _scatter_into(data, tuple(dst), updates[pos], mode)
    return data


def concat(op: Any, args: Args) -> np.ndarray:
    """``interleave=True`` takes one slice of each value in turn (equal shapes); scalars
    (shape pieces in flexible-shape programs) count as 1-element vectors."""
    values = [np.atleast_1d(np.asarray(v)) for v in args["values"]]
    axis = int(args["axis"])
    if not bool(args.get("interleave", False)):
        return np.concatenate(values, axis=axis)
    axis %= values[0].ndim
    stacked = np.stack(values, axis=axis + 1)
    shape = list(values[0].shape)
    shape[axis] *= len(values)
    return stacked.reshape(shape)


def scatter_nd(op: Any, args: Args) -> np.ndarray:
    data = np.array(args["data"])
    indices = np.asarray(args["indices"]).astype(np.int64)
    updates = np.asarray(args["updates"])
    k = indices.shape[-1]
    flat_idx = indices.reshape(-1, k)
    flat_upd = updates.reshape((-1, *data.shape[k:]))
    mode = str(args.get("mode", "add"))
    for idx, upd in zip(flat_idx, flat_upd, strict=False):
        _scatter_into(data, tuple(int(i) for i in idx), upd, mode)
    return data


def reshape_like(op: Any, args: Args) -> np.ndarray:
    dims: list[int] = []
    for ref, b, e, m in zip(args["ref_tensors"], args["begins"], args["ends"], args["end_masks"], strict=False):
        ref_shape = np.shape(ref)
        dims.extend(ref_shape[int(b):] if bool(m) else ref_shape[int(b):int(e)])
    return np.reshape(args["x"], dims)


def sliding_windows(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"])
    axis = int(args["axis"]) % x.ndim
    size, stride = int(args["size"]), int(args.get("stride", 1))
    win = np.lib.stride_tricks.sliding_window_view(x, size, axis=axis)
    win = np.take(win, np.arange(0, win.shape[axis], stride), axis=axis)
    return np.moveaxis(win, -1, axis + 1)


def dequantize(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["input"]).astype(np.float64)
    scale = np.asarray(args["scale"], np.float64)
    zero = np.asarray(args.get("zero_point", 0)).astype(np.float64)
    if (scale.ndim == 1 and scale.size > 1) or (zero.ndim == 1 and zero.size > 1):
        axis = int(args.get("axis", 0)) % x.ndim
        shape = [1] * x.ndim
        shape[axis] = -1
        scale = scale.reshape(shape) if scale.size > 1 else scale.reshape(())
        zero = zero.reshape(shape) if zero.size > 1 else zero.reshape(())
    return (x - zero) * scale


def constexpr(op: Any, args: Args) -> Any:
    """Compressed weights: coremltools' own decompression of the constexpr op."""
    value = op.materialized_val_inference()
    values = value if isinstance(value, tuple) else (value,)
    if any(v is None for v in values):
        raise no_kernel_error(op.op_type, "the compressed value could not be materialised")
    arrays = tuple(np.asarray(v) for v in values)
    return arrays if isinstance(value, tuple) else arrays[0]


def const(op: Any, args: Args) -> Any:
    return op.outputs[0].val


def classify(op: Any, args: Args) -> tuple[Any, dict[Any, float]]:
    """(label, {class: probability}); the executor reports the dict as a probability array."""
    probs = np.asarray(args["probabilities"]).reshape(-1)
    classes = list(args["classes"])
    return classes[int(np.argmax(probs))], {c: float(p) for c, p in zip(classes, probs, strict=False)}


# -- lists (TensorArray-like values: python lists of arrays) -----------------------
def make_list(op: Any, args: Args) -> list[Any]:
    shape = [int(d) if isinstance(d, (int, np.integer)) else None for d in args.get("elem_shape", [])]
    dtype = str(args.get("dtype", "fp32"))
    np_dtype = {"fp32": np.float32, "fp16": np.float16, "int32": np.int32, "bool": np.bool_}.get(dtype, np.float32)
    n = int(args.get("init_length", 1))
    if any(d is None for d in shape):
        return [None] * n
    return [np.zeros(shape, np_dtype) for _ in range(n)]


def _grown(ls: list[Any], size: int, like: np.ndarray) -> list[Any]:
    """The list extended to ``size``; unwritten elements read as zeros (MIL lists are
    zero-initialised auto-resizing arrays)."""
    out = [np.zeros_like(like) if item is None else item for item in ls]
    out.extend(np.zeros_like(like) for _ in range(size - len(out)))
    return out


def list_write(op: Any, args: Args) -> list[Any]:
    value = np.asarray(args["value"])
    i = int(args["index"])
    ls = _grown(list(args["ls"]), i + 1, value)
    ls[i] = value
    return ls


def list_read(op: Any, args: Args) -> np.ndarray:
    item = args["ls"][int(args["index"])]
    if item is None:
        raise ValueError(f"list_read of element {int(args['index'])}, which was never written")
    return np.asarray(item)


def list_gather(op: Any, args: Args) -> np.ndarray:
    ls = args["ls"]
    return np.stack([np.asarray(ls[int(i)]) for i in np.asarray(args["indices"]).reshape(-1)])


def list_scatter(op: Any, args: Args) -> list[Any]:
    values = np.asarray(args["value"])
    indices = [int(i) for i in np.asarray(args["indices"]).reshape(-1)]
    if not indices:
        return list(args["ls"])
    ls = _grown(list(args["ls"]), max(indices) + 1, values[0])
    for k, i in enumerate(indices):
        ls[i] = values[k]
    return ls


def list_length(op: Any, args: Args) -> np.ndarray:
    return np.asarray(len(args["ls"]), np.int32)


MISC_KERNELS = {
    "slice_by_index": slice_by_index, "slice_update": slice_update, "squeeze": squeeze, "flatten2d": flatten2d, "shape": shape,
    "fill_like": fill_like, "select": select,
    "range_1d": range_1d, "band_part": band_part, "cumsum": cumsum,
    "reverse_sequence": reverse_sequence, "one_hot": one_hot, "gather_nd": gather_nd,
    "scatter": scatter, "scatter_nd": scatter_nd, "scatter_along_axis": scatter_along_axis,
    "concat": concat, "reshape_like": reshape_like,
    "sliding_windows": sliding_windows, "dequantize": dequantize, "const": const,
    "classify": classify, "make_list": make_list, "list_write": list_write,
    "list_read": list_read, "list_gather": list_gather, "list_scatter": list_scatter,
    "list_length": list_length,
}
