"""The parity engine: does an artifact's output match the reference, within a tolerance?

Tolerance is data: a :class:`TolerancePolicy` holds one :class:`Tolerance` per precision
plus partial overrides per output, and goes into the contract as it is. The engine
compares outputs **by name**, with exact shapes (no broadcasting), integers and booleans
exactly, floats elementwise with ``|a − g| ≤ atol + rtol·|g|`` in float64, NaN/±Inf
position by position, and a cosine floor that catches what a loose ``atol`` lets through
(an all-zero output against a small-valued reference). Pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from portable_models.core.tolerance import (
    DEFAULT_TOLERANCES,
    Tolerance,
    TolerancePolicy,
    format_float,
)

__all__ = [
    "DEFAULT_TOLERANCES",
    "OutputParity",
    "Tolerance",
    "TolerancePolicy",
    "compare_outputs",
    "format_float",
    "verdict",
]  # the tolerance model lives in core.tolerance (the contract records it); re-exported here

_METRICS = ("max_abs", "mean_abs", "max_rel", "cosine", "sqnr_db", "mismatch_ratio", "min_atol")
_MAX_CLASSES = 100_000
_TINY = float(np.finfo(np.float64).tiny)
_INT64_MAX = int(np.iinfo(np.int64).max)


@dataclass(kw_only=True)
class OutputParity:
    """The parity result for one artifact, one output.

    Metrics cover the finite positions of all cases together and are ``None`` when
    undefined or not finite (``sqnr_db`` is ``None`` for an exact match). ``worst`` is the
    first NaN/Inf mismatch, else the element with the largest excess over its allowance
    (set even when the output passes: it is the closest call).
    """

    name: str
    status: str
    reason: str | None
    tolerance: Tolerance
    ref_dtype: str
    dtype: str | None = None
    ref_shapes: list[list[int]] = field(default_factory=list)
    shapes: list[list[int] | None] = field(default_factory=list)
    cases: int = 0
    max_abs: float | None = None
    mean_abs: float | None = None
    max_rel: float | None = None
    cosine: float | None = None
    sqnr_db: float | None = None
    mismatch_ratio: float | None = None
    min_atol: float | None = None
    top1: float | None = None
    nonfinite: int = 0
    worst: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: ``json.dumps(result.to_dict(), allow_nan=False)`` works."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["tolerance"] = self.tolerance.to_dict()
        for key in (*_METRICS, "top1"):
            out[key] = _clean(out[key])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutputParity:
        kwargs = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        kwargs["tolerance"] = Tolerance.from_dict(data["tolerance"])
        kwargs["ref_shapes"] = [list(s) for s in data.get("ref_shapes", [])]
        kwargs["shapes"] = [None if s is None else list(s) for s in data.get("shapes", [])]
        return cls(**kwargs)


def verdict(results: Sequence[OutputParity]) -> str:
    """``"pass"`` iff there is at least one result and every result passes."""
    return "pass" if results and all(r.passed for r in results) else "fail"


def compare_outputs(
    reference: Sequence[Mapping[str, np.ndarray]],
    actual: Sequence[Mapping[str, np.ndarray]],
    *,
    precision: str,
    policy: TolerancePolicy,
    output_names: Sequence[str] | None = None,
) -> list[OutputParity]:
    """Compare an artifact's outputs (``actual``, logical layout) with the golden cases.

    One :class:`OutputParity` per reference output name (or per ``output_names``), in
    reference order. Outputs only in ``actual`` are ignored.
    """
    names = list(output_names) if output_names is not None else _reference_names(reference)
    return [_compare_one(n, reference, actual, policy.resolve(n, precision)) for n in names]


def _reference_names(reference: Sequence[Mapping[str, np.ndarray]]) -> list[str]:
    names: dict[str, None] = {}
    for case in reference:
        names.update(dict.fromkeys(case))
    return list(names)


def _compare_one(name: str, reference: Sequence[Mapping[str, np.ndarray]],
                 actual: Sequence[Mapping[str, np.ndarray]], tol: Tolerance) -> OutputParity:
    res = OutputParity(name=name, status="fail", reason=None, tolerance=tol, ref_dtype="",
                       cases=len(reference))
    refs, gots, reason = _collect(res, reference, actual)
    if reason is None:
        reason = _check_structure(refs, gots)
    if reason is None:
        exact = _kind(refs[0].dtype) in ("int", "bool")
        reason = _compare_exact(res, refs, gots) if exact else _compare_float(res, refs, gots)
    res.reason = reason
    res.status = "pass" if reason is None else "fail"
    return res


def _collect(res: OutputParity, reference: Sequence[Mapping[str, np.ndarray]],
             actual: Sequence[Mapping[str, np.ndarray]]
             ) -> tuple[list[np.ndarray], list[np.ndarray], str | None]:
    """Gather the arrays of one output and fill in dtypes and shapes."""
    name = res.name
    if not reference:
        return [], [], "no golden cases to compare"
    absent = [i for i, case in enumerate(reference) if name not in case]
    if absent:
        return [], [], f"missing from the reference (case {absent[0]})"
    refs = [np.asarray(case[name]) for case in reference]
    got_opt = [np.asarray(case[name]) if name in case else None for case in actual]
    gots = [g for g in got_opt if g is not None]
    res.ref_dtype, res.dtype = str(refs[0].dtype), str(gots[0].dtype) if gots else None
    res.ref_shapes = [list(r.shape) for r in refs]
    res.shapes = [None if g is None else list(g.shape) for g in got_opt]
    res.nonfinite = sum(_count_nonfinite(r) for r in refs)
    if len(actual) != len(reference):
        return refs, gots, f"artifact gave {len(actual)} case(s), reference has {len(reference)}"
    missing = [i for i, g in enumerate(got_opt) if g is None]
    if missing:
        return refs, gots, f"missing output (case {missing[0]} of {len(reference)})"
    return refs, gots, None


def _check_structure(refs: list[np.ndarray], gots: list[np.ndarray]) -> str | None:
    kind = _kind(refs[0].dtype)
    for i, (r, g) in enumerate(zip(refs, gots, strict=True)):
        where = f" in case {i}" if len(refs) > 1 else ""
        if _kind(r.dtype) == "other" or _kind(r.dtype) != kind:
            return f"unsupported or inconsistent reference dtype {r.dtype}{where}"
        if _kind(g.dtype) != kind:
            return f"dtype {g.dtype} ({_kind(g.dtype)}) != reference {r.dtype} ({kind}){where}"
        if g.shape != r.shape:
            return f"shape {tuple(g.shape)} != reference {tuple(r.shape)}{where}"
    if sum(r.size for r in refs) == 0:
        return "empty output: nothing was compared"
    return None


def _kind(dtype: np.dtype) -> str:
    if dtype.kind == "b":
        return "bool"
    if dtype.kind in "iu":
        return "int"
    if dtype.kind == "f" or dtype.name.startswith(("bfloat16", "float8")):  # ml_dtypes
        return "float"
    return "other"


def _count_nonfinite(array: np.ndarray) -> int:
    if _kind(array.dtype) != "float":
        return 0
    if array.dtype.kind != "f":  # ml_dtypes' floats: numpy's isfinite may not know them
        array = array.astype(np.float64)
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def _exact_ints(array: np.ndarray) -> np.ndarray:
    """Integers without wraparound: int64, or Python ints for uint64 beyond int64."""
    if array.dtype.kind == "u" and array.dtype.itemsize == 8 and array.size \
            and int(array.max()) > _INT64_MAX:
        return array.astype(object).ravel()
    return array.astype(np.int64).ravel()


def _compare_exact(res: OutputParity, refs: list[np.ndarray], gots: list[np.ndarray]) -> str | None:
    g = np.concatenate([_exact_ints(r) for r in refs])
    a = np.concatenate([_exact_ints(x) for x in gots])
    bad = np.asarray(a != g, dtype=bool)
    gf, af = g.astype(np.float64), a.astype(np.float64)
    _fill_metrics(res, af, gf, rtol=0.0)
    res.min_atol = None  # integers match exactly; no atol applies
    res.mismatch_ratio = float(np.mean(bad))
    if not bad.any():
        return None
    flat = int(np.argmax(np.where(bad, np.abs(af - gf), -1.0)))
    res.worst = _locate(flat, refs, g[flat], a[flat])
    return (f"{int(bad.sum())} of {bad.size} values differ (integers must match exactly); "
            f"worst {_where(res.worst)}")


def _classes(x: np.ndarray) -> np.ndarray:
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf."""
    return np.select([np.isnan(x), np.isposinf(x), np.isneginf(x)], [1, 2, 3], 0)


def _compare_float(res: OutputParity, refs: list[np.ndarray], gots: list[np.ndarray]) -> str | None:
    tol = res.tolerance
    g = np.concatenate([r.astype(np.float64).ravel() for r in refs])
    a = np.concatenate([x.astype(np.float64).ravel() for x in gots])
    abs_g = np.abs(g)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a - g)
        excess = (diff - (tol.atol + tol.rtol * abs_g) if tol.atol is not None and tol.rtol is not None
                  else np.full(diff.shape, -np.inf))  # a budget: no element bound
    ok = excess <= 0
    mismatched = 0  # positions where NaN/+Inf/-Inf differ between the two
    if np.isfinite(g).all() and np.isfinite(a).all():  # the usual case: no class arrays needed
        finite: np.ndarray | slice = slice(None)
        any_finite = True
    else:
        cg, ca = _classes(g), _classes(a)
        both = (cg == 0) & (ca == 0)
        any_finite = bool(both.any())
        excess = np.where(both, excess, -np.inf)
        ok = np.where(both, ok, cg == ca)
        finite = both
        differ = cg != ca
        mismatched = int(np.count_nonzero(differ))
    bad = ok.size - int(np.count_nonzero(ok))
    res.mismatch_ratio = bad / ok.size
    if any_finite:
        _fill_metrics(res, a[finite], g[finite], rtol=tol.rtol or 0.0, diff=diff[finite], abs_g=abs_g[finite])
        res.top1 = _top1(refs, g, a)
    flat = int(np.argmax(differ)) if mismatched else int(np.argmax(excess))
    if mismatched or any_finite:
        res.worst = _locate(flat, refs, g[flat], a[flat])
    return _float_reason(res, mismatched, bad, ok.size, any_finite)


def _float_reason(res: OutputParity, nonfinite_bad: int, bad: int, total: int,
                  any_finite: bool) -> str | None:
    tol = res.tolerance
    if nonfinite_bad:
        return f"NaN/Inf differ at {nonfinite_bad} of {total} positions; first {_where(res.worst)}"
    if not any_finite:
        return "nothing finite to compare: every element is NaN or Inf"
    if bad:
        return (f"{bad} of {total} elements ({format_float(100 * bad / total)}%) outside "
                f"atol {format_float(tol.atol)} + rtol {format_float(tol.rtol)}·|ref|; "
                f"worst {_where(res.worst)}; would pass with atol ≥ {format_float(res.min_atol)}")
    if tol.cosine_min is not None and res.cosine is not None and res.cosine < tol.cosine_min:
        return (f"cosine similarity {format_float(res.cosine)} < floor "
                f"{format_float(tol.cosine_min)}: the output does not follow the reference")
    if tol.top1_min is not None and res.top1 is not None and res.top1 < tol.top1_min:
        return f"top-1 agreement {format_float(res.top1)} < floor {format_float(tol.top1_min)}"
    if tol.sqnr_min is not None and res.sqnr_db is not None and res.sqnr_db < tol.sqnr_min:
        return (f"SQNR {format_float(res.sqnr_db)} dB < floor {format_float(tol.sqnr_min)} dB: the "
                "quantisation noise is too loud for this output")
    return None


def _fill_metrics(res: OutputParity, a: np.ndarray, g: np.ndarray, *, rtol: float,
                  diff: np.ndarray | None = None, abs_g: np.ndarray | None = None) -> None:
    """Metrics over finite positions of all cases together (a, g: flat float64; ``diff``
    and ``abs_g``: ``|a - g|`` and ``|g|`` when the caller has them already)."""
    with np.errstate(over="ignore", invalid="ignore"):
        diff = np.abs(a - g) if diff is None else diff
        abs_g = np.abs(g) if abs_g is None else abs_g
        res.max_abs = _clean(np.max(diff))
        res.mean_abs = _clean(np.mean(diff))
        res.max_rel = _clean(np.max(diff / np.maximum(abs_g, _TINY)))
        res.min_atol = _clean(max(0.0, float(np.max(diff - rtol * abs_g))))
        res.cosine = _cosine(a, g, abs_g)
        res.sqnr_db = _sqnr_db(a, g, abs_g)


def _cosine(a: np.ndarray, g: np.ndarray, abs_g: np.ndarray) -> float:
    """Cosine similarity, scale-safe; both zero → 1.0, one zero → 0.0."""
    sa, sg = float(np.max(np.abs(a))), float(np.max(abs_g))
    if sa == 0.0 or sg == 0.0:
        return 1.0 if sa == sg else 0.0
    an, gn = a / sa, g / sg
    cos = float(np.dot(an, gn) / (np.linalg.norm(an) * np.linalg.norm(gn)))
    return min(1.0, max(-1.0, cos))


def _sqnr_db(a: np.ndarray, g: np.ndarray, abs_g: np.ndarray) -> float | None:
    """10·log10(Σg² / Σ(a−g)²); ``None`` when infinite either way (exact match: no noise,
    or a zero reference) or when it overflows."""
    noise = a - g
    sg, sn = float(np.max(abs_g)), float(np.max(np.abs(noise)))
    scale = max(sg, sn)
    if sg == 0.0 or sn == 0.0 or not math.isfinite(scale):
        return None
    ratio = float(np.sum((g / scale) ** 2) / np.sum((noise / scale) ** 2))
    return _clean(10.0 * math.log10(ratio)) if ratio > 0 else None


def _top1(refs: list[np.ndarray], g: np.ndarray, a: np.ndarray) -> float | None:
    """Argmax agreement over the last axis, when the output looks like class scores (``g``,
    ``a``: every case's reference and artifact values, flat, one after the other)."""
    if any(r.ndim < 2 or not 2 <= r.shape[-1] <= _MAX_CLASSES for r in refs):
        return None
    hits = rows = start = 0
    for r in refs:
        rr = g[start:start + r.size].reshape(-1, r.shape[-1])
        gg = a[start:start + r.size].reshape(-1, r.shape[-1])
        hits += int(np.count_nonzero(np.argmax(rr, axis=1) == np.argmax(gg, axis=1)))
        rows += rr.shape[0]
        start += r.size
    return hits / rows if rows else None


def _locate(flat: int, refs: list[np.ndarray], ref: Any, got: Any) -> dict[str, Any]:
    """Turn a flat index into the concatenation back into (case, index)."""
    offsets = np.cumsum([0] + [r.size for r in refs])
    case = int(np.searchsorted(offsets, flat, side="right") - 1)
    index = np.unravel_index(flat - int(offsets[case]), refs[case].shape)
    return {"case": case, "index": [int(i) for i in index],
            "ref": _scalar(ref), "got": _scalar(got)}


def _where(worst: dict[str, Any] | None) -> str:
    if worst is None:
        return "n/a"
    return (f"at case {worst['case']} index {worst['index']}: "
            f"reference {worst['ref']}, artifact {worst['got']}")


def _scalar(value: Any) -> int | float | str:
    """A JSON-safe scalar: ints stay exact, NaN/Inf become strings."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    number = float(value)
    return number if math.isfinite(number) else format_float(number)


def _clean(value: Any) -> float | None:
    """A plain float, or ``None`` when missing or not finite."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None
