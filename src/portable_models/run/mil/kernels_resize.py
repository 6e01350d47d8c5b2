"""numpy kernels: resizing, cropping and space/depth rearrangements.

Sampling grids follow the MIL op definitions (``resize_bilinear``'s notes): for an
input of ``n_in`` samples resized to ``n_out``,

* ``STRICT_ALIGN_CORNERS`` / ``ALIGN_CORNERS``: ``i * (n_in - 1) / (n_out - 1)``
  (``ALIGN_CORNERS`` samples the centre when ``n_out == 1``);
* ``DEFAULT``: ``i * n_in / n_out``;
* ``OFFSET_CORNERS``: ``0.5 * delta + i * delta`` with ``delta = max(1, n_in - 1) / n_out``;
* ``UNALIGN_CORNERS`` (half-pixel centres): ``(i + 0.5) * n_in / n_out - 0.5``;

clamped to ``[0, n_in - 1]``, then interpolated linearly. Nearest-neighbour resizing
takes ``floor(i * n_in / n_out)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from portable_models.run.mil.kernels_infer import no_kernel_error

__all__ = ["RESIZE_KERNELS", "sample_grid", "linear_resize_axis"]

Args = Mapping[str, Any]


def sample_grid(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """Source coordinates (float64) of the ``n_out`` output samples along one axis."""
    i = np.arange(n_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if n_out == 1:
            grid = np.full(1, (n_in - 1) / 2.0 if mode == "ALIGN_CORNERS" else 0.0)
        else:
            grid = i * (n_in - 1) / (n_out - 1)
    elif mode == "DEFAULT":
        grid = i * n_in / n_out
    elif mode == "OFFSET_CORNERS":
        delta = max(1, n_in - 1) / n_out
        grid = 0.5 * delta + i * delta
    elif mode == "UNALIGN_CORNERS":
        grid = (i + 0.5) * n_in / n_out - 0.5
    else:
        raise ValueError(f"unknown sampling mode '{mode}'")
    return np.clip(grid, 0.0, n_in - 1)


def linear_resize_axis(x: np.ndarray, axis: int, n_out: int, mode: str) -> np.ndarray:
    n_in = x.shape[axis]
    grid = sample_grid(n_in, n_out, mode)
    lo = np.floor(grid).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (grid - lo).reshape([-1 if a == axis % x.ndim else 1 for a in range(x.ndim)])
    a, b = np.take(x, lo, axis=axis), np.take(x, hi, axis=axis)
    return a * (1.0 - frac) + b * frac


def _nearest_axis(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    n_in = x.shape[axis]
    idx = np.minimum(np.floor(np.arange(n_out) * n_in / n_out).astype(np.int64), n_in - 1)
    return np.take(x, idx, axis=axis)


def _scaled(size: int, factor: Any) -> int:
    """floor(size * factor), computed in the factor's own dtype as the op's type inference does."""
    return int(np.floor(np.asarray(factor) * size))


def upsample_nearest_neighbor(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"])
    h = _scaled(x.shape[-2], args.get("scale_factor_height", 1))
    w = _scaled(x.shape[-1], args.get("scale_factor_width", 1))
    return _nearest_axis(_nearest_axis(x, -2, h), -1, w)


def upsample_bilinear(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"], np.float64)
    align = bool(args.get("align_corners", True))
    half_pixel = bool(args.get("half_pixel_centers", not align))
    if align:
        mode = "STRICT_ALIGN_CORNERS"
    else:
        mode = "UNALIGN_CORNERS" if half_pixel else "DEFAULT"
    h = _scaled(x.shape[-2], args.get("scale_factor_height", 1))
    w = _scaled(x.shape[-1], args.get("scale_factor_width", 1))
    return linear_resize_axis(linear_resize_axis(x, -2, h, mode), -1, w, mode)


def resize_bilinear(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"], np.float64)
    mode = str(args.get("sampling_mode", "DEFAULT"))
    h, w = int(args.get("target_size_height", 1)), int(args.get("target_size_width", 1))
    return linear_resize_axis(linear_resize_axis(x, -2, h, mode), -1, w, mode)


def resize_nearest_neighbor(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"])
    h, w = int(args["target_size_height"]), int(args["target_size_width"])
    return _nearest_axis(_nearest_axis(x, -2, h), -1, w)


def resize(op: Any, args: Args) -> np.ndarray:
    """iOS17 ``resize``: the last ``resized_dims`` dims take sizes from ``shape``."""
    x = np.asarray(args["x"])
    shape = [int(v) for v in np.asarray(args["shape"]).reshape(-1)]
    dims = int(args["resized_dims"])
    interp = str(args.get("interpolation_mode", "LINEAR"))
    mode = str(args.get("sampling_mode", "DEFAULT"))
    if interp == "NEAREST_NEIGHBOR" and mode != "DEFAULT":
        raise no_kernel_error("resize", f"nearest-neighbour sampling_mode '{mode}' has no pinned semantics here")
    y = x.astype(np.float64) if interp == "LINEAR" else x
    for k in range(1, dims + 1):
        n_out = shape[-k] if shape[-k] != 0 else x.shape[-k]
        y = linear_resize_axis(y, -k, n_out, mode) if interp == "LINEAR" else _nearest_axis(y, -k, n_out)
    return y


def crop(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"])
    (t, b), (left, r) = [int(v) for v in args["crop_height"]], [int(v) for v in args["crop_width"]]
    return x[..., t:x.shape[-2] - b, left:x.shape[-1] - r]


# -- space / depth / batch rearrangements ------------------------------------------
def depth_to_space(op: Any, args: Args) -> np.ndarray:
    """out[n, c, h*b + i, w*b + j] = x[n, (i*b + j) * C_out + c, h, w] (DCR order)."""
    x = np.asarray(args["x"])
    b = int(args["block_size"])
    n, c, h, w = x.shape
    y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


def space_to_depth(op: Any, args: Args) -> np.ndarray:
    """The inverse of ``depth_to_space``."""
    x = np.asarray(args["x"])
    b = int(args["block_size"])
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


def pixel_shuffle(op: Any, args: Args) -> np.ndarray:
    """out[n, c, h*f + i, w*f + j] = x[n, c*f*f + i*f + j, h, w] (CRD order, as torch)."""
    x = np.asarray(args["x"])
    f = int(args["upscale_factor"])
    n, c, h, w = x.shape
    y = x.reshape(n, c // (f * f), f, f, h, w).transpose(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (f * f), h * f, w * f)


def pixel_unshuffle(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"])
    f = int(args["downscale_factor"])
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // f, f, w // f, f).transpose(0, 1, 3, 5, 2, 4)
    return y.reshape(n, c * f * f, h // f, w // f)


def space_to_batch(op: Any, args: Args) -> np.ndarray:
    """As tf.space_to_batch_nd on NCHW: batch index = (i * bw + j) * N + n."""
    x = np.asarray(args["x"])
    bh, bw = [int(v) for v in np.asarray(args["block_shape"]).reshape(-1)]
    pads = np.asarray(args["paddings"]).reshape(2, 2).astype(int)
    x = np.pad(x, [(0, 0), (0, 0), tuple(pads[0]), tuple(pads[1])])
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // bh, bh, w // bw, bw).transpose(3, 5, 0, 1, 2, 4)
    return y.reshape(bh * bw * n, c, h // bh, w // bw)


def batch_to_space(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"])
    bh, bw = [int(v) for v in np.asarray(args["block_shape"]).reshape(-1)]
    crops = np.asarray(args["crops"]).reshape(2, 2).astype(int)
    nb, c, h, w = x.shape
    n = nb // (bh * bw)
    y = x.reshape(bh, bw, n, c, h, w).transpose(2, 3, 4, 0, 5, 1).reshape(n, c, h * bh, w * bw)
    return y[:, :, crops[0, 0]:h * bh - crops[0, 1], crops[1, 0]:w * bw - crops[1, 1]]


RESIZE_KERNELS = {
    "upsample_nearest_neighbor": upsample_nearest_neighbor,
    "upsample_bilinear": upsample_bilinear,
    "resize_bilinear": resize_bilinear,
    "resize_nearest_neighbor": resize_nearest_neighbor,
    "resize": resize,
    "crop": crop,
    "depth_to_space": depth_to_space,
    "space_to_depth": space_to_depth,
    "pixel_shuffle": pixel_shuffle,
    "pixel_unshuffle": pixel_unshuffle,
    "space_to_batch": space_to_batch,
    "batch_to_space": batch_to_space,
}
