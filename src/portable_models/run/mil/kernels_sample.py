"""numpy kernels: ``resample`` (grid sampling), ``affine`` and ``crop_resize``.

coremltools lowers torch's ``grid_sample`` to ``resample`` and ``affine_grid`` +
``grid_sample`` to ``affine``, so the coordinate conventions are torch's: normalised
coordinates map to pixel centres (``align_corners=True``) or pixel edges (``False``).
Padding modes as the MIL definition draws them for ``|1, 2, 3|``: ``constant`` pads
with a value, ``border`` repeats the edge, ``reflection`` mirrors about the edge
pixel's centre (``2, 3, 2, 1, 2, 3, 2, 1``), ``symmetric`` about its outer edge
(``3, 2, 1, 1, 2, 3, 3, 2, 1``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["SAMPLE_KERNELS", "grid_sample"]

Args = Mapping[str, Any]


def _to_pixels(coord: np.ndarray, size: int, mode: str, align: bool) -> np.ndarray:
    if mode == "unnormalized":
        return coord
    if mode == "normalized_zero_to_one":
        coord = coord * 2.0 - 1.0
    elif mode != "normalized_minus_one_to_one":
        raise ValueError(f"unknown coordinates_mode '{mode}'")
    return (coord + 1.0) / 2.0 * (size - 1) if align else ((coord + 1.0) * size - 1.0) / 2.0


def _reflect(coord: np.ndarray, low: float, high: float) -> np.ndarray:
    span = high - low
    if span <= 0:
        return np.zeros_like(coord)
    folded = np.mod(np.abs(coord - low), 2.0 * span)
    return low + np.where(folded > span, 2.0 * span - folded, folded)


def _apply_padding(coord: np.ndarray, size: int, padding: str) -> np.ndarray:
    if padding == "border":
        return np.clip(coord, 0.0, size - 1)
    if padding == "reflection":
        return np.clip(_reflect(coord, 0.0, size - 1.0), 0.0, size - 1)
    if padding == "symmetric":
        return np.clip(_reflect(coord, -0.5, size - 0.5), 0.0, size - 1)
    if padding == "constant":
        return coord
    raise ValueError(f"unknown padding_mode '{padding}'")


def _taps(x: np.ndarray, iy: np.ndarray, ix: np.ndarray, pad_value: float) -> np.ndarray:
    """x[b, :, iy, ix] per batch, ``pad_value`` where (iy, ix) falls outside the image."""
    _, _, h, w = x.shape
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    cy, cx = np.clip(iy, 0, h - 1), np.clip(ix, 0, w - 1)
    batch = np.arange(x.shape[0]).reshape(-1, 1, 1)
    vals = x[batch, :, cy, cx]  # (B, H2, W2, C)
    vals = np.where(inside[..., None], vals, pad_value)
    return np.moveaxis(vals, -1, 1)


def grid_sample(x: np.ndarray, gx: np.ndarray, gy: np.ndarray, *, sampling: str, padding: str,
                pad_value: float) -> np.ndarray:
    """Sample ``x`` (B, C, H, W) at pixel coordinates ``gx``/``gy`` (B, H2, W2)."""
    h, w = x.shape[2:]
    gx, gy = _apply_padding(gx, w, padding), _apply_padding(gy, h, padding)
    if sampling == "nearest":
        return _taps(x, np.rint(gy).astype(np.int64), np.rint(gx).astype(np.int64), pad_value)
    if sampling != "bilinear":
        raise ValueError(f"unknown sampling_mode '{sampling}'")
    x0, y0 = np.floor(gx), np.floor(gy)
    fx, fy = (gx - x0)[:, None], (gy - y0)[:, None]
    x0i, y0i = x0.astype(np.int64), y0.astype(np.int64)
    top = _taps(x, y0i, x0i, pad_value) * (1 - fx) + _taps(x, y0i, x0i + 1, pad_value) * fx
    bottom = _taps(x, y0i + 1, x0i, pad_value) * (1 - fx) + _taps(x, y0i + 1, x0i + 1, pad_value) * fx
    return top * (1 - fy) + bottom * fy


def resample(op: Any, args: Args) -> np.ndarray:
    x = np.asarray(args["x"], np.float64)
    coords = np.asarray(args["coordinates"], np.float64)
    mode, align = str(args["coordinates_mode"]), bool(args["align_corners"])
    gx = _to_pixels(coords[..., 0], x.shape[3], mode, align)
    gy = _to_pixels(coords[..., 1], x.shape[2], mode, align)
    return grid_sample(x, gx, gy, sampling=str(args["sampling_mode"]), padding=str(args["padding_mode"]),
                       pad_value=float(args["padding_value"]))


def _base_grid(n: int, align: bool) -> np.ndarray:
    if align:
        return np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)
    return (2.0 * np.arange(n) + 1.0) / n - 1.0


def affine(op: Any, args: Args) -> np.ndarray:
    """Output (h, w) samples the input at ``[a0 a1 a2; b0 b1 b2] @ (x, y, 1)`` (normalised)."""
    x = np.asarray(args["x"], np.float64)
    theta = np.asarray(args["transform_matrix"], np.float64).reshape(-1, 2, 3)
    theta = np.broadcast_to(theta, (x.shape[0], 2, 3))
    out_h, out_w = int(args["output_height"]), int(args["output_width"])
    align = bool(args["align_corners"])
    bx, by = np.meshgrid(_base_grid(out_w, align), _base_grid(out_h, align))
    base = np.stack([bx, by, np.ones_like(bx)], axis=-1)  # (H2, W2, 3)
    grid = np.einsum("hwk,bjk->bhwj", base, theta)
    mode = str(args["coordinates_mode"])
    gx = _to_pixels(grid[..., 0], x.shape[3], mode, align)
    gy = _to_pixels(grid[..., 1], x.shape[2], mode, align)
    return grid_sample(x, gx, gy, sampling=str(args["sampling_mode"]), padding=str(args["padding_mode"]),
                       pad_value=float(args["padding_value"]))


# -- crop_resize (TF crop_and_resize, torchvision roi_align) ---------------------------
def _box_corners(boxes: np.ndarray, mode: str) -> np.ndarray:
    """(N, 4) boxes in ``mode`` -> (N, 4) as ``[h_start, w_start, h_end, w_end]``."""
    a, b, c, d = boxes.T
    if mode == "CORNERS_HEIGHT_FIRST":
        return np.stack([a, b, c, d], 1)
    if mode == "CORNERS_WIDTH_FIRST":
        return np.stack([b, a, d, c], 1)
    if mode == "CENTER_SIZE_HEIGHT_FIRST":
        return np.stack([a - c / 2, b - d / 2, a + c / 2, b + d / 2], 1)
    if mode == "CENTER_SIZE_WIDTH_FIRST":
        return np.stack([b - d / 2, a - c / 2, b + d / 2, a + c / 2], 1)
    raise ValueError(f"unknown box_coordinate_mode '{mode}'")


def _box_grid(start: float, end: float, n: int, mode: str) -> np.ndarray:
    if n == 1:
        return np.array([(start + end) / 2.0 if mode == "ALIGN_CORNERS" else start])
    return start + np.arange(n) * (end - start) / (n - 1)


def _crop_one(image: np.ndarray, box: np.ndarray, size: tuple[int, int], mode: str, pad: float) -> np.ndarray:
    """Bilinear samples of ``image`` (C, H, W) on the box grid; ``pad`` outside the image."""
    h, w = image.shape[1:]
    gy, gx = np.meshgrid(_box_grid(box[0], box[2], size[0], mode), _box_grid(box[1], box[3], size[1], mode),
                         indexing="ij")
    out = grid_sample(image[None], gx[None], gy[None], sampling="bilinear", padding="constant", pad_value=pad)[0]
    outside = (gy < 0) | (gy > h - 1) | (gx < 0) | (gx > w - 1)
    return np.where(outside[None], pad, out)


def crop_resize(op: Any, args: Args) -> np.ndarray:
    """Each box resampled to ``target_height x target_width`` (align-corners grids only:
    the modes both coremltools frontends emit)."""
    from portable_models.run.mil.kernels_infer import no_kernel_error

    mode = str(args.get("sampling_mode", "DEFAULT"))
    if mode not in ("ALIGN_CORNERS", "STRICT_ALIGN_CORNERS"):
        raise no_kernel_error("crop_resize", f"sampling_mode '{mode}' has no pinned semantics here")
    x = np.asarray(args["x"], np.float64)
    size = (int(args.get("target_height", 1)), int(args.get("target_width", 1)))
    pad = float(args.get("pad_value", 0.0))
    shape: tuple[int, ...]
    if "boxes" in args:  # iOS17: boxes (N, 4) + box_indices -> (N, C, h, w)
        boxes = np.asarray(args["boxes"], np.float64).reshape(-1, 4)
        index = np.asarray(args.get("box_indices", np.arange(len(boxes)))).reshape(-1).astype(int)
        pairs, shape = list(zip(index, range(len(boxes)), strict=True)), (len(boxes), x.shape[1])
    else:  # iOS15/16: roi (N, 1, 4 or 5, 1, 1) -> (N, B or 1, C, h, w)
        roi = np.asarray(args["roi"], np.float64).reshape(-1, np.shape(args["roi"])[2])
        boxes = roi[:, -4:]
        if roi.shape[1] == 5:
            pairs, shape = [(int(b), n) for n, b in enumerate(roi[:, 0])], (len(roi), 1, x.shape[1])
        else:
            pairs = [(b, n) for n in range(len(roi)) for b in range(x.shape[0])]
            shape = (len(roi), x.shape[0], x.shape[1])
    corners = _box_corners(boxes, str(args.get("box_coordinate_mode", "CORNERS_HEIGHT_FIRST")))
    if bool(args.get("normalized_coordinates", False)):
        corners = corners * np.array([x.shape[2] - 1, x.shape[3] - 1] * 2, np.float64)
    corners = corners * float(args.get("spatial_scale", 1.0))
    crops = [_crop_one(x[b], corners[n], size, mode, pad) for b, n in pairs]
    return np.stack(crops).reshape(*shape, *size)


SAMPLE_KERNELS = {"resample": resample, "affine": affine, "crop_resize": crop_resize}
