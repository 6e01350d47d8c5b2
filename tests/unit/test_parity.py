"""The parity engine: each lie an artifact can tell must be caught by its own test."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from portable_models.compare.parity import OutputParity, compare_outputs, verdict
from portable_models.core.tolerance import (
    DEFAULT_TOLERANCES,
    Tolerance,
    TolerancePolicy,
    format_float,
)
from portable_models.errors import UsageError

RNG = np.random.default_rng(0)


def _one(ref, got, *, name="y", precision="float32", policy=None):
    """Compare one output over one case; return its OutputParity."""
    (result,) = compare_outputs(
        [{name: np.asarray(ref)}], [{name: np.asarray(got)}],
        precision=precision, policy=policy or TolerancePolicy(),
    )
    return result


def _json_round_trip(result: OutputParity) -> OutputParity:
    text = json.dumps(result.to_dict(), allow_nan=False)
    return OutputParity.from_dict(json.loads(text))


# --- honest outputs pass -------------------------------------------------------------


def test_identical_passes_with_exact_metrics():
    x = RNG.standard_normal((2, 10)).astype(np.float32)
    r = _one(x, x.copy())
    assert r.status == "pass" and r.reason is None
    assert r.max_abs == 0.0 and r.mismatch_ratio == 0.0 and r.min_atol == 0.0
    assert r.cosine == pytest.approx(1.0) and r.sqnr_db is None  # infinite: documented None
    assert r.top1 == 1.0 and r.nonfinite == 0
    assert r.ref_dtype == "float32" and r.dtype == "float32"
    assert r.ref_shapes == [[2, 10]] and r.shapes == [[2, 10]] and r.cases == 1
    assert verdict([r]) == "pass"


def test_within_tolerance_noise_passes():
    x = RNG.standard_normal((4, 100))
    noisy = (x + RNG.uniform(-5e-5, 5e-5, x.shape)).astype(np.float32)
    r = _one(x.astype(np.float32), noisy)
    assert r.status == "pass", r.reason
    assert 0 < r.max_abs < 1e-4 and r.sqnr_db is not None and r.sqnr_db > 60
    assert r.cosine is not None and r.cosine > 0.9999


def test_rtol_scales_with_the_reference():
    tol = Tolerance(atol=1e-4, rtol=1e-3)
    policy = TolerancePolicy(defaults={"float32": tol})
    # 0.5 off a reference of 1000 is inside 1e-4 + 1e-3·1000 = 1.0001 ...
    assert _one([1000.0, 2000.0], [1000.5, 2000.0], policy=policy).status == "pass"
    # ... but the same 0.5 off a reference of 1 is not.
    r = _one([1.0, 2.0], [1.5, 2.0], policy=policy)
    assert r.status == "fail" and "outside" in r.reason
    assert r.min_atol == pytest.approx(0.5 - 1e-3)
    assert r.worst == {"case": 0, "index": [0], "ref": 1.0, "got": 1.5}
    assert r.mismatch_ratio == 0.5 and r.max_rel == pytest.approx(0.5)


def test_per_output_override_from_the_policy():
    policy = TolerancePolicy(per_output={"logits": {"atol": 1.0}})
    assert policy.resolve("logits", "float32").atol == 1.0
    assert policy.resolve("logits", "float32").rtol == DEFAULT_TOLERANCES["float32"].rtol
    assert policy.resolve("other", "float32") == DEFAULT_TOLERANCES["float32"]
    ref = {"logits": np.array([100.0, 200.0, 300.0]), "other": np.array([100.0, 200.0, 300.0])}
    got = {k: v + np.array([0.5, -0.5, 0.5]) for k, v in ref.items()}
    results = compare_outputs([ref], [got], precision="float32", policy=policy)
    assert [(r.name, r.status) for r in results] == [("logits", "pass"), ("other", "fail")]
    assert results[0].tolerance.atol == 1.0
    assert verdict(results) == "fail"


# --- the lies ------------------------------------------------------------------------


def test_nan_at_different_positions_fails():
    r = _one([np.nan, 1.0, 2.0], [1.0, np.nan, 2.0])
    assert r.status == "fail" and "NaN/Inf differ at 2" in r.reason
    assert r.worst == {"case": 0, "index": [0], "ref": "nan", "got": 1.0}
    assert r.nonfinite == 1


def test_artifact_nan_where_reference_is_finite_fails():
    r = _one([0.0, 1.0, 2.0], [0.0, np.nan, 2.0])
    assert r.status == "fail" and "NaN/Inf differ" in r.reason
    assert r.worst is not None and r.worst["got"] == "nan" and r.worst["ref"] == 1.0
    assert r.nonfinite == 0  # counted in the reference


def test_nan_at_the_same_positions_and_rest_equal_passes():
    ref = np.array([[np.nan, 1.0], [np.inf, -np.inf], [3.0, 4.0]], np.float32)
    r = _one(ref, ref.copy())
    assert r.status == "pass", r.reason
    assert r.nonfinite == 3 and r.max_abs == 0.0


def test_inf_of_the_other_sign_fails():
    r = _one([np.inf, 1.0], [-np.inf, 1.0])
    assert r.status == "fail" and "NaN/Inf differ at 1" in r.reason


def test_nothing_finite_to_compare_fails():
    r = _one([np.nan, np.inf], [np.nan, np.inf])
    assert r.status == "fail" and "nothing finite" in r.reason


def test_all_zero_output_under_loose_atol_is_caught_by_cosine():
    ref = RNG.uniform(-0.01, 0.01, (1, 1000)).astype(np.float32)
    policy = TolerancePolicy(per_output={"y": {"atol": 1.0}})
    r = _one(ref, np.zeros_like(ref), policy=policy)
    assert r.mismatch_ratio == 0.0  # every element is "within" atol=1.0 ...
    assert r.status == "fail" and "cosine" in r.reason  # ... but it is not the output
    assert r.cosine == 0.0
    # switching the floor off for that output lets the lie through: the floor is the guard
    off = TolerancePolicy(per_output={"y": {"atol": 1.0, "cosine_min": None}})
    assert _one(ref, np.zeros_like(ref), policy=off).status == "pass"


def test_empty_outputs_fail():
    r = _one(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32))
    assert r.status == "fail" and r.reason == "empty output: nothing was compared"


def test_broadcastable_shape_fails_naming_both_shapes():
    ref = np.full((1000,), 0.5, np.float32)
    r = _one(ref, np.array([0.5], np.float32))  # would broadcast and "match" everywhere
    assert r.status == "fail"
    assert r.reason == "shape (1,) != reference (1000,)"
    assert r.shapes == [[1]] and r.ref_shapes == [[1000]]


def test_uint8_wraparound_fails():
    r = _one(np.array([250, 260, 300], np.int64), np.array([250, 4, 44], np.uint8))
    assert r.status == "fail" and "2 of 3 values differ" in r.reason
    assert r.ref_dtype == "int64" and r.dtype == "uint8"
    assert r.worst == {"case": 0, "index": [1], "ref": 260, "got": 4}  # first of a tie


def test_int_widths_compare_values_exactly():
    r = _one(np.array([1, -2, 3], np.int64), np.array([1, -2, 3], np.int32))
    assert r.status == "pass" and (r.ref_dtype, r.dtype) == ("int64", "int32")
    assert r.min_atol is None
    assert _one(np.array([1, 2]), np.array([1, 3], np.int32)).status == "fail"


def test_int_compare_ignores_atol():
    policy = TolerancePolicy(per_output={"y": {"atol": 10.0}})
    assert _one(np.array([5, 6]), np.array([5, 7]), policy=policy).status == "fail"


def test_uint64_beyond_int64_compares_exactly():
    big = np.array([2**64 - 1, 2**63], np.uint64)
    assert _one(big, big.copy()).status == "pass"
    r = _one(big, np.array([2**64 - 2, 2**63], np.uint64))
    assert r.status == "fail" and r.worst["ref"] == 2**64 - 1


def test_bool_outputs_compare_exactly():
    assert _one(np.array([True, False]), np.array([True, False])).status == "pass"
    assert _one(np.array([True, False]), np.array([True, True])).status == "fail"


@pytest.mark.parametrize(("ref", "got"), [
    (np.array([1.0, 0.0]), np.array([1, 0])),
    (np.array([1, 0]), np.array([True, False])),
    (np.array([True, False]), np.array([1.0, 0.0], np.float32)),
])
def test_dtype_kind_mismatch_fails(ref, got):
    r = _one(ref, got)
    assert r.status == "fail" and "dtype" in r.reason and "!= reference" in r.reason


def test_swapped_outputs_both_fail():
    a, b = RNG.standard_normal((2, 8)), RNG.standard_normal((2, 8))
    results = compare_outputs([{"a": a, "b": b}], [{"a": b, "b": a}],
                              precision="float32", policy=TolerancePolicy())
    assert [(r.name, r.status) for r in results] == [("a", "fail"), ("b", "fail")]


def test_nhwc_compared_as_nchw_fails_even_with_square_dims():
    nchw = RNG.standard_normal((1, 3, 3, 3)).astype(np.float32)
    nhwc = np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))  # same shape (1, 3, 3, 3)
    assert nhwc.shape == nchw.shape
    r = _one(nchw, nhwc)
    assert r.status == "fail" and "outside" in r.reason


# --- names, cases and order ----------------------------------------------------------


def test_missing_output_in_one_case_fails():
    ref = [{"y": np.ones(3)}, {"y": np.ones(3)}]
    got = [{"y": np.ones(3)}, {"z": np.ones(3)}]
    (r,) = compare_outputs(ref, got, precision="float32", policy=TolerancePolicy())
    assert r.status == "fail" and r.reason.startswith("missing output")
    assert r.shapes == [[3], None]


def test_extra_outputs_are_ignored_and_reference_order_kept():
    ref = [{"b": np.ones(2), "a": np.zeros(2)}]
    got = [{"a": np.zeros(2), "extra": np.ones(5), "b": np.ones(2)}]
    results = compare_outputs(ref, got, precision="float32", policy=TolerancePolicy())
    assert [r.name for r in results] == ["b", "a"] and verdict(results) == "pass"


def test_case_count_must_match():
    ref = [{"y": np.ones(2)}, {"y": np.ones(2)}]
    (r,) = compare_outputs(ref, ref[:1], precision="float32", policy=TolerancePolicy())
    assert r.status == "fail" and "1 case(s), reference has 2" in r.reason


def test_output_names_selects_and_missing_reference_fails():
    ref = [{"a": np.ones(2), "b": np.ones(2)}]
    results = compare_outputs(ref, ref, precision="float32", policy=TolerancePolicy(),
                              output_names=["b", "nope"])
    assert [(r.name, r.status) for r in results] == [("b", "pass"), ("nope", "fail")]
    assert "missing from the reference" in results[1].reason


def test_metrics_span_all_cases_and_worst_names_the_case():
    ref = [{"y": np.array([[1.0, 2.0]])}, {"y": np.array([[3.0, 4.0]])}]
    got = [{"y": np.array([[1.0, 2.0]])}, {"y": np.array([[3.0, 4.5]])}]
    (r,) = compare_outputs(ref, got, precision="float32", policy=TolerancePolicy())
    assert r.cases == 2 and r.mismatch_ratio == 0.25 and r.max_abs == 0.5
    assert r.worst == {"case": 1, "index": [0, 1], "ref": 4.0, "got": 4.5}


def test_top1_floor():
    ref = np.array([[0.1, 0.9], [0.8, 0.2]])
    got = np.array([[0.1, 0.9], [0.2, 0.8]])
    loose = TolerancePolicy(per_output={"y": {"atol": 1.0, "cosine_min": None,
                                              "top1_min": 0.9}})
    r = _one(ref, got, policy=loose)
    assert r.top1 == 0.5 and r.status == "fail" and "top-1" in r.reason
    assert _one(np.ones((4,)), np.ones((4,))).top1 is None  # rank 1: not class scores


def test_top1_and_metrics_agree_between_the_finite_and_the_nan_paths():
    # cases of different class counts: counted case by case; a NaN in the same place in
    # both takes the general path, which must give the same top-1 over the finite rows
    loose = TolerancePolicy(per_output={"y": {"atol": 1.0, "cosine_min": None}})
    ref = [{"y": np.array([[0.1, 0.9], [0.8, 0.2]])}, {"y": np.array([[0.1, 0.2, 0.7]])}]
    got = [{"y": np.array([[0.1, 0.9], [0.2, 0.8]])}, {"y": np.array([[0.1, 0.8, 0.1]])}]
    (r,) = compare_outputs(ref, got, precision="float32", policy=loose)
    assert r.top1 == pytest.approx(1 / 3) and r.status == "pass"
    x = RNG.standard_normal((3, 5))
    y = x + 1e-5
    fast = _one(x, y)
    x[0, 0] = y[0, 0] = np.nan
    slow = _one(x, y)
    assert slow.status == fast.status == "pass" and slow.top1 == fast.top1 == 1.0
    assert slow.max_abs == pytest.approx(fast.max_abs) and slow.nonfinite == 1


def test_verdict_needs_at_least_one_result():
    assert verdict([]) == "fail"


def test_bfloat16_outputs_compare_as_floats():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.array([1.0, 2.0, 3.0], dtype=ml_dtypes.bfloat16)
    r = _one(np.array([1.0, 2.0, 3.0], np.float32), x, precision="bfloat16")
    assert r.status == "pass" and r.dtype == "bfloat16"


# --- serialisation and tolerances ----------------------------------------------------


def test_output_parity_json_round_trip_with_nan():
    r = _one([np.nan, 1.0, 2.0], [1.0, np.nan, 2.0])
    back = _json_round_trip(r)
    assert back == r and back.to_dict() == r.to_dict()
    ok = _one(np.ones((2, 3)), np.ones((2, 3)))  # sqnr_db None (infinite)
    assert _json_round_trip(ok) == ok


def test_to_dict_turns_nonfinite_metrics_into_none():
    r = _one([1.0], [1.0])
    r.max_rel = float("inf")
    r.cosine = float("nan")
    d = r.to_dict()
    assert d["max_rel"] is None and d["cosine"] is None
    json.dumps(d, allow_nan=False)


def test_tolerance_policy_round_trip():
    policy = TolerancePolicy(per_output={"logits": {"atol": 1e-3, "cosine_min": None}})
    d = policy.to_dict()
    assert set(d) == {"float32", "float16", "bfloat16", "int8-weight", "int8-dynamic", "int8", "outputs"}
    assert TolerancePolicy.from_dict(json.loads(json.dumps(d))) == policy
    partial = TolerancePolicy.from_dict({"float32": {"atol": 1e-3}})
    assert partial.resolve("y", "float32").atol == 1e-3
    assert partial.resolve("y", "float32").rtol == DEFAULT_TOLERANCES["float32"].rtol


@pytest.mark.parametrize("bad", [
    {"atol": -1.0, "rtol": 0.0},
    {"atol": "x", "rtol": 0.0},
    {"atol": float("nan"), "rtol": 0.0},
    {"atol": 0.0, "rtol": 0.0, "cosine_min": 1.5},
    {"atol": 0.0, "rtol": 0.0, "top1_min": -0.1},
    {"atol": 0.0, "rtol": 0.0, "speed": 1},
    {"atol": 0.0},
])
def test_bad_tolerances_are_refused(bad):
    with pytest.raises(UsageError):
        Tolerance.from_dict(bad)


def test_bad_override_and_unknown_precision_are_refused():
    with pytest.raises(UsageError):
        TolerancePolicy(per_output={"y": {"atoll": 1.0}})
    with pytest.raises(UsageError):
        TolerancePolicy().resolve("y", "int4")


def test_default_tolerances_do_not_flag_honest_rounding():
    """Casting an fp32 reference to each precision must pass that precision's defaults."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    ref = RNG.standard_normal((8, 1000)).astype(np.float32)
    for precision, dtype in (("float32", np.float32), ("float16", np.float16),
                             ("bfloat16", ml_dtypes.bfloat16)):
        got = ref.astype(dtype).astype(np.float32)
        r = _one(ref, got, precision=precision)
        assert r.status == "pass", (precision, r.reason)


def test_format_float():
    assert format_float(3.1e-08) == "3.1e-08"
    assert format_float(3.14159) == "3.14"
    assert format_float(0) == "0"
    assert format_float(None) == "n/a"
    assert format_float(float("nan")) == "nan" and format_float(float("-inf")) == "-inf"


def test_importing_parity_stays_light():
    code = ("import sys, portable_models.compare.parity; "
            "heavy = {'torch', 'tensorflow', 'onnx', 'onnxruntime', 'keras'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_budget_judges_by_its_floors_not_by_elements() -> None:
    """int8 variants: no element bound; the cosine and SQNR floors decide."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 10)).astype(np.float32)
    noisy = ref + 0.05 * rng.standard_normal(ref.shape).astype(np.float32)  # ~26 dB
    policy = TolerancePolicy()
    (res,) = compare_outputs([{"y": ref}], [{"y": noisy}], precision="int8", policy=policy)
    assert res.status == "pass" and res.tolerance.budget and res.sqnr_db and res.sqnr_db > 20
    (res,) = compare_outputs([{"y": ref}], [{"y": noisy}], precision="float32", policy=policy)
    assert res.status == "fail"  # the same noise is far outside float32's element bound
    loud = ref + 0.3 * rng.standard_normal(ref.shape).astype(np.float32)  # ~10 dB
    (res,) = compare_outputs([{"y": ref}], [{"y": loud}], precision="int8", policy=policy)
    assert res.status == "fail" and "cosine similarity" in (res.reason or "")  # the first floor that fails
    with pytest.raises(UsageError, match="budget"):
        Tolerance(atol=None, rtol=None)


def test_diagnose_localises_a_variant_by_its_budget_and_a_float_artifact_by_its_bound() -> None:
    """A quantised variant's modules are judged by its cosine and SQNR floors (8 bits drift past
    any element bound from the first layer on), a float artifact's by the output tolerance
    scaled to each tensor; the span names the modules not seen apart before the first."""
    from portable_models.core.tolerance import DEFAULT_TOLERANCES
    from portable_models.diagnosis.job import first_divergent

    def rec(module: str, max_abs: float, sqnr: float, status: str = "compared") -> dict:
        return {"module": module, "status": status, "max_abs": max_abs, "ref_max": 1.0, "cosine": 0.9999,
                "sqnr_db": sqnr}

    records = [rec("c1", 0.005, 45.0), rec("bn", 0, 0, status="fused (not in the artifact)"),
               rec("c2", 0.02, 12.0), rec("fc", 0.03, 10.0)]
    first = first_divergent([dict(r) for r in records], DEFAULT_TOLERANCES["int8"])
    assert first is not None and first["module"] == "c2" and first["span"] == ["bn", "c2"]
    assert first_divergent([dict(r) for r in records], DEFAULT_TOLERANCES["float32"])["module"] == "c1"
