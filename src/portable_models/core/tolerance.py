"""Tolerance is data: how close is close enough, per output and per precision, as the
contract records it and the parity engine applies it (``|a − g| ≤ atol + rtol·|g|``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from portable_models.errors import UsageError

__all__ = ["DEFAULT_TOLERANCES", "Tolerance", "TolerancePolicy", "format_float"]


_TOL_KEYS = ("atol", "rtol", "cosine_min", "top1_min", "sqnr_min")


def format_float(x: float | None) -> str:
    """``x`` with 3 significant digits for reports (``3.1e-08``); ``None`` is ``n/a``."""
    if x is None:
        return "n/a"
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.3g}"


def _as_float(key: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"tolerance {key} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise UsageError(f"tolerance {key} must be finite, got {value!r}")
    return out


@dataclass(frozen=True, kw_only=True)
class Tolerance:
    """How close is close enough for one output at one precision.

    An element passes iff ``|a − g| ≤ atol + rtol·|g|``. ``cosine_min`` is a floor on
    the cosine similarity of all elements together, ``top1_min`` on the top-1 agreement
    of class-score outputs, ``sqnr_min`` on the signal-to-quantisation-noise ratio (dB);
    ``None`` means no floor. A *budget* (the quantised variants') has no element bound:
    ``atol`` and ``rtol`` are ``None`` and the floors judge the output as a whole.
    """

    atol: float | None
    rtol: float | None
    cosine_min: float | None = None
    top1_min: float | None = None
    sqnr_min: float | None = None

    def __post_init__(self) -> None:
        if (self.atol is None) != (self.rtol is None):
            raise UsageError("tolerance atol and rtol are both numbers, or both None (a budget)")
        if self.atol is None and self.cosine_min is None and self.sqnr_min is None:
            raise UsageError("a budget (atol and rtol None) needs a cosine_min or sqnr_min floor")
        for key, low, high in (("atol", 0.0, math.inf), ("rtol", 0.0, math.inf),
                               ("cosine_min", -1.0, 1.0), ("top1_min", 0.0, 1.0), ("sqnr_min", -200.0, 400.0)):
            value = getattr(self, key)
            if value is None:
                continue
            number = _as_float(key, value)
            if not low <= number <= high:
                raise UsageError(f"tolerance {key}={value!r} is outside [{low}, {high}]")
            object.__setattr__(self, key, number)

    @property
    def budget(self) -> bool:
        """No element bound: judged by its floors only (a quantised variant's)."""
        return self.atol is None

    def to_dict(self) -> dict[str, float | None]:
        return {key: getattr(self, key) for key in _TOL_KEYS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tolerance:
        unknown = sorted(set(data) - set(_TOL_KEYS))
        if unknown:
            raise UsageError(f"unknown tolerance key(s) {unknown}; known: {list(_TOL_KEYS)}")
        if "atol" not in data or "rtol" not in data:
            raise UsageError(f"a tolerance needs atol and rtol (None for a budget), got {dict(data)}")
        return cls(**{key: data[key] for key in data})


# Why these values. float32: the artifact runs in fp32 too, but kernels fuse ops, tile
# GEMMs and reorder sums (XNNPACK, MPS, oneDNN), so each op adds ~1e-7..1e-6 relative
# error that grows with depth; 1e-4 absolute / 1e-3 relative passes deep nets and still
# fails any real bug. float16: unit roundoff 2^-11 ≈ 4.9e-4 per op → 1e-2. bfloat16: unit
# roundoff 2^-8 ≈ 3.9e-3 per op → 5e-2. The cosine floors are what catch structurally
# wrong outputs (all zeros, swapped, transposed) hiding under atol on small values; they
# sit ~1-2 orders below 1 - (relative error)² so honest rounding never trips them.
# top1_min is off by default: on near-ties the argmax may flip while every element passes.
# int8 variants are budgets, not element bounds: 8 bits leave ~2^-8 of each tensor's range as
# rounding noise per op, so elements of a deep net drift far beyond any atol while the output
# as a whole follows the reference. A cosine of 0.98 and an SQNR of 15 dB (noise at ~3% of the
# signal's power) pass honest per-channel int8 of the nets tried here (25-45 dB) and fail a
# variant that lost a channel to an outlier or ignored its calibration. Weight-only int8 keeps
# activations float, so only the weights' rounding remains: cosine 0.99, SQNR 20 dB.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(atol=1e-4, rtol=1e-3, cosine_min=0.9999),
    "float16": Tolerance(atol=1e-2, rtol=1e-2, cosine_min=0.999),
    "bfloat16": Tolerance(atol=5e-2, rtol=5e-2, cosine_min=0.99),
    "int8-weight": Tolerance(atol=None, rtol=None, cosine_min=0.99, sqnr_min=20.0),
    "int8-dynamic": Tolerance(atol=None, rtol=None, cosine_min=0.98, sqnr_min=15.0),
    "int8": Tolerance(atol=None, rtol=None, cosine_min=0.98, sqnr_min=15.0),
}


@dataclass(kw_only=True)
class TolerancePolicy:
    """A default tolerance per precision plus partial overrides per output name.

    ``per_output["logits"] = {"atol": 1e-3}`` changes only ``atol`` for ``logits``; a
    ``None`` floor (``{"cosine_min": None}``) switches that floor off for the output.
    Loosening ``atol`` alone keeps the cosine floor: loosen both when errors of that
    size are acceptable on that output.
    """

    defaults: dict[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    per_output: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, override in self.per_output.items():
            try:  # validate keys and values now, not at the first compare
                Tolerance.from_dict({"atol": 0.0, "rtol": 0.0, **override})
            except UsageError as exc:
                raise UsageError(f"tolerance override for output {name!r}: {exc}") from None

    def resolve(self, output: str, precision: str) -> Tolerance:
        """The tolerance for ``output`` at ``precision``: the default, then the override."""
        base = self.defaults.get(precision)
        if base is None:
            raise UsageError(f"no tolerance for precision {precision!r}",
                             fix=f"use one of {sorted(self.defaults)} or add it to the policy")
        override = self.per_output.get(output)
        return Tolerance.from_dict({**base.to_dict(), **override}) if override else base

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {p: tol.to_dict() for p, tol in self.defaults.items()}
        out["outputs"] = {name: dict(o) for name, o in self.per_output.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TolerancePolicy:
        """Inverse of :meth:`to_dict`. Precisions missing keep their defaults; a known
        precision may be given partially (merged onto its default)."""
        defaults = dict(DEFAULT_TOLERANCES)
        for precision, value in data.items():
            if precision != "outputs":
                base = defaults.get(precision)
                merged = {**base.to_dict(), **value} if base else dict(value)
                defaults[precision] = Tolerance.from_dict(merged)
        outputs = data.get("outputs") or {}
        return cls(defaults=defaults, per_output={str(n): dict(o) for n, o in outputs.items()})
