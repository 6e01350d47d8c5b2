"""numpy kernels: convolution, pooling, normalisation and activations.

Each kernel takes ``(op, args)``: the MIL operation (for its name and declared types)
and its inputs' run-time values by input name (float16 already widened to float32;
optional inputs the program leaves out are absent). Padding rules follow the MIL op
definitions: ``same`` puts the odd extra element after, ``same_lower`` before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["NN_KERNELS", "erf", "spatial_pads"]

Args = Mapping[str, Any]


# -- padding -------------------------------------------------------------------------
def spatial_pads(
    pad_type: str, in_sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
    dilations: Sequence[int], custom: Sequence[int] | None,
) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim for a conv/pool ``pad_type``."""
    n = len(in_sizes)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        pads = [int(p) for p in (custom if custom is not None else [0] * 2 * n)]
        return [(pads[2 * i], pads[2 * i + 1]) for i in range(n)]
    if pad_type not in ("same", "same_lower"):
        raise ValueError(f"unknown pad_type '{pad_type}'")
    out: list[tuple[int, int]] = []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=False):
        eff = (int(k) - 1) * int(d) + 1
        total = max(0, (math.ceil(size / s) - 1) * s + eff - size)
        small, big = total // 2, total - total // 2
        out.append((small, big) if pad_type == "same" else (big, small))
    return out


def _ints(value: Any, n: int, default: int) -> list[int]:
    if value is None:
        return [default] * n
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _windows(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int],
             dilations: Sequence[int]) -> np.ndarray:
    """(N, C, *out, *kernel) view of the (already padded) input."""
    nsp = len(kernel)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=False)]
    win = sliding_window_view(x, eff, axis=tuple(range(2, 2 + nsp)))  # type: ignore[call-overload]
    index = (slice(None), slice(None), *tuple(slice(None, None, s) for s in strides))
    index += tuple(slice(None, None, d) for d in dilations)
    return win[index]


# -- convolution -----------------------------------------------------------------------
def conv(op: Any, args: Args) -> np.ndarray:
    x, w = np.asarray(args["x"], np.float32), np.asarray(args["weight"], np.float32)
    nsp = x.ndim - 2
    strides = _ints(args.get("strides"), nsp, 1)
    dilations = _ints(args.get("dilations"), nsp, 1)
    groups = int(args.get("groups", 1))
    pads = spatial_pads(str(args.get("pad_type", "valid")), x.shape[2:], w.shape[2:], strides,
                        dilations, args.get("pad"))
    x = np.pad(x, [(0, 0), (0, 0), *pads])
    win = _windows(x, w.shape[2:], strides, dilations)
    y = _grouped_tensordot(win, w, groups)
    if args.get("bias") is not None:
        y = y + np.asarray(args["bias"], np.float32).reshape((1, -1) + (1,) * nsp)
    return y


def _grouped_tensordot(win: np.ndarray, w: np.ndarray, groups: int) -> np.ndarray:
    """(N, C_in, *out, *K) windows x (C_out, C_in / groups, *K) weights -> (N, C_out, *out)."""
    nsp = w.ndim - 2
    k_axes = list(range(2 + nsp, 2 + 2 * nsp))
    if groups == 1:
        y = np.tensordot(win, w, axes=([1, *k_axes], [1, *range(2, 2 + nsp)]))
        return np.moveaxis(y, -1, 1)
    n, out = win.shape[0], win.shape[2:2 + nsp]
    wg = win.reshape(n, groups, w.shape[1], *out, *w.shape[2:])
    kg = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])
    letters = "defghijk"[:nsp], "lmnopqrs"[:nsp]  # spatial out dims, kernel dims
    spec = f"agc{letters[0]}{letters[1]},gbc{letters[1]}->agb{letters[0]}"
    y = np.einsum(spec, wg, kg, optimize=True)
    return y.reshape(n, w.shape[0], *out)


def conv_transpose(op: Any, args: Args) -> np.ndarray:
    x, w = np.asarray(args["x"], np.float32), np.asarray(args["weight"], np.float32)
    nsp = x.ndim - 2
    strides = _ints(args.get("strides"), nsp, 1)
    dilations = _ints(args.get("dilations"), nsp, 1)
    groups = int(args.get("groups", 1))
    kernel = w.shape[2:]
    full = _conv_transpose_full(x, w, strides, dilations, groups)
    out_sizes = _conv_transpose_sizes(op, args, x.shape[2:], kernel, strides, dilations)
    y = _crop_transpose(full, out_sizes, str(args.get("pad_type", "valid")), args.get("pad"))
    if args.get("bias") is not None:
        y = y + np.asarray(args["bias"], np.float32).reshape((1, -1) + (1,) * nsp)
    return y


def _conv_transpose_full(x: np.ndarray, w: np.ndarray, strides: Sequence[int],
                         dilations: Sequence[int], groups: int) -> np.ndarray:
    """The un-padded transposed convolution: (in - 1) * stride + dilated kernel."""
    cin_g, cout_g = x.shape[1] // groups, w.shape[1]
    kernel = w.shape[2:]
    sizes = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(x.shape[2:], strides, kernel, dilations, strict=False)]
    y = np.zeros((x.shape[0], cout_g * groups, *sizes), np.float32)
    for g in range(groups):
        xg = x[:, g * cin_g:(g + 1) * cin_g]
        wg = w[g * cin_g:(g + 1) * cin_g]
        for pos in np.ndindex(*kernel):
            contrib = np.tensordot(xg, wg[(slice(None), slice(None), *pos)], axes=([1], [0]))
            contrib = np.moveaxis(contrib, -1, 1)
            index = tuple(slice(p * d, p * d + (i - 1) * s + 1, s)
                          for p, d, i, s in zip(pos, dilations, x.shape[2:], strides, strict=False))
            y[(slice(None), slice(g * cout_g, (g + 1) * cout_g), *index)] += contrib
    return y


def _conv_transpose_sizes(op: Any, args: Args, in_sizes: Sequence[int], kernel: Sequence[int],
                          strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    nsp = len(in_sizes)
    if args.get("output_shape") is not None:
        return [int(v) for v in np.asarray(args["output_shape"]).reshape(-1)[-nsp:]]
    pad_type = str(args.get("pad_type", "valid"))
    full = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(in_sizes, strides, kernel, dilations, strict=False)]
    if pad_type == "same":
        return [i * s for i, s in zip(in_sizes, strides, strict=False)]
    if pad_type == "custom":
        pads = _ints(args.get("pad"), 2 * nsp, 0)
        return [f - pads[2 * i] - pads[2 * i + 1] for i, f in enumerate(full)]
    return full


def _crop_transpose(full: np.ndarray, out_sizes: Sequence[int], pad_type: str, pad: Any) -> np.ndarray:
    nsp = full.ndim - 2
    pads = _ints(pad, 2 * nsp, 0) if pad_type == "custom" else [0] * 2 * nsp
    index: list[slice] = [slice(None), slice(None)]
    widths: list[tuple[int, int]] = [(0, 0), (0, 0)]
    for i, want in enumerate(out_sizes):
        have = full.shape[2 + i]
        start = pads[2 * i] if pad_type == "custom" else max(0, have - want) // 2
        stop = min(have, start + want)
        index.append(slice(start, stop))
        widths.append((0, want - (stop - start)))
    return np.pad(full[tuple(index)], widths)


# -- pooling ------------------------------------------------------------------------
def _pool_geometry(args: Args, x: np.ndarray) -> tuple[list[int], list[int], list[tuple[int, int]], list[int]]:
    """kernel, strides, explicit pads and the extra end padding ceil_mode needs."""
    nsp = x.ndim - 2
    kernel = _ints(args["kernel_sizes"], nsp, 1)
    strides = _ints(args.get("strides"), nsp, 1)
    pads = spatial_pads(str(args["pad_type"]), x.shape[2:], kernel, strides, [1] * nsp, args.get("pad"))
    extra = [0] * nsp
    if bool(args.get("ceil_mode", False)):
        for i, (size, k, s, (lo, hi)) in enumerate(zip(x.shape[2:], kernel, strides, pads, strict=False)):
            out = (size + lo + hi - k + s - 1) // s + 1
            if (out - 1) * s >= size + lo and lo + hi > 0:
                out -= 1
            extra[i] = max(0, (out - 1) * s + k - (size + lo + hi))
    return kernel, strides, pads, extra


def _pool_windows(x: np.ndarray, args: Args, fill: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows of x padded with ``fill``, and windows of the real / real-or-pad masks."""
    kernel, strides, pads, extra = _pool_geometry(args, x)
    widths = [(0, 0), (0, 0)] + [(lo, hi + e) for (lo, hi), e in zip(pads, extra, strict=False)]
    xp = np.pad(x, widths, constant_values=fill)
    real = np.pad(np.ones((1, 1, *x.shape[2:]), np.float32), widths)
    counted = np.pad(np.ones((1, 1, *(s + lo + hi for s, (lo, hi) in zip(x.shape[2:], pads, strict=False))), np.float32),
                     [(0, 0), (0, 0)] + [(0, e) for e in extra])
    ones = [1] * len(kernel)
    return (_windows(xp, kernel, strides, ones), _windows(real, kernel, strides, ones),
            _windows(counted, kernel, strides, ones))


def _window_axes(x: np.ndarray) -> tuple[int, ...]:
    nsp = x.ndim - 2
    return tuple(range(2 + nsp, 2 + 2 * nsp))


def max_pool(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"], np.float32)
    win, _, _ = _pool_windows(x, args, -np.inf)
    return win.max(axis=_window_axes(x))


def avg_pool(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"], np.float32)
    win, real, counted = _pool_windows(x, args, 0.0)
    axes = _window_axes(x)
    total = win.sum(axis=axes, dtype=np.float64)
    divisor = (real if bool(args.get("exclude_padding_from_average", False)) else counted).sum(axis=axes)
    return (total / np.maximum(divisor, 1.0)).astype(np.float32)


def l2_pool(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"], np.float32)
    win, _, _ = _pool_windows(x, args, 0.0)
    return np.sqrt(np.square(win, dtype=np.float64).sum(axis=_window_axes(x))).astype(np.float32)


# -- normalisation ------------------------------------------------------------------
def _channel(v: Any, ndim: int) -> np.ndarray:
    return np.asarray(v, np.float64).reshape((1, -1) + (1,) * (ndim - 2))


def _scale_shift(y: np.ndarray, args: Args) -> np.ndarray:
    """The optional per-channel ``gamma`` scale and ``beta`` shift of the norm ops."""
    if args.get("gamma") is not None:
        y = y * _channel(args["gamma"], y.ndim)
    if args.get("beta") is not None:
        y = y + _channel(args["beta"], y.ndim)
    return y


def batch_norm(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"], np.float64)
    eps = float(args.get("epsilon", 1e-5))
    return _scale_shift((x - _channel(args["mean"], x.ndim)) / np.sqrt(_channel(args["variance"], x.ndim) + eps),
                        args)


def instance_norm(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"], np.float64)
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = np.square(x - mean).mean(axis=axes, keepdims=True)
    return _scale_shift((x - mean) / np.sqrt(var + float(args.get("epsilon", 1e-5))), args)


def local_response_norm(op: Any, args: Args) -> np.ndarray:
    """x / (k + alpha / size * sum of x^2 over a window of ``size`` channels)^beta, the
    window reaching size // 2 channels back and (size - 1) // 2 forward."""
    x = np.asarray(args["x"], np.float64)
    size = int(args["size"])
    sq = np.pad(np.square(x), [(0, 0), (size // 2, (size - 1) // 2)] + [(0, 0)] * (x.ndim - 2))
    total = sliding_window_view(sq, size, axis=1).sum(axis=-1)
    scale = float(args.get("k", 1.0)) + float(args.get("alpha", 1e-4)) / size * total
    return x / np.power(scale, float(args.get("beta", 0.75)))


# -- activations --------------------------------------------------------------------
def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise, in float64."""
    try:
        from scipy.special import erf as scipy_erf
    except ImportError:  # scipy is optional: math.erf per element is exact, only slower
        return np.vectorize(math.erf, otypes=[np.float64])(np.asarray(x, np.float64))
    return np.asarray(scipy_erf(np.asarray(x, np.float64)))


def erf_kernel(op: Any, args: Args) -> np.ndarray:
    return erf(args["x"])


def gelu(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"], np.float64)
    mode = str(args.get("mode", "EXACT"))
    if mode == "EXACT":
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-1.702 * x))
    raise ValueError(f"gelu: unknown mode '{mode}'")


def silu(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"], np.float64)
    return x / (1.0 + np.exp(-x))


def thresholded_relu(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"])
    return np.where(x >= float(args.get("alpha", 1.0)), x, 0).astype(x.dtype)


NN_KERNELS = {
    "conv": conv,
    "conv_transpose": conv_transpose,
    "max_pool": max_pool,
    "avg_pool": avg_pool,
    "l2_pool": l2_pool,
    "batch_norm": batch_norm,
    "instance_norm": instance_norm,
    "local_response_norm": local_response_norm,
    "erf": erf_kernel,
    "gelu": gelu,
    "silu": silu,
    "thresholded_relu": thresholded_relu,
}
