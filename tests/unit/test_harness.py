"""The tests' parity assertion (``harness.assert_parity``) is the library's engine with the
library's defaults: it passes what the engine passes, fails what it fails, and says why."""

from __future__ import annotations

import numpy as np
import pytest

from harness import ParityMismatch, Tolerance, assert_parity, max_abs

REF = {"y": np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4),
       "k": np.arange(3, dtype=np.int64)}


def test_within_the_float32_default_passes_and_reports_metrics() -> None:
    got = {"y": REF["y"] + np.float32(5e-5), "k": REF["k"].copy()}
    results = assert_parity(got, REF)
    assert [r.name for r in results] == ["y", "k"] and all(r.passed for r in results)
    assert 4e-5 < max_abs(results) < 6e-5


def test_outside_the_default_fails_naming_output_and_metrics() -> None:
    got = {"y": REF["y"] + np.float32(1e-2), "k": REF["k"].copy()}
    with pytest.raises(ParityMismatch, match=r"(?s)y: fail: .* outside atol.*max_abs 0\.01"):
        assert_parity(got, REF)
    assert assert_parity(got, REF, precision="float16")  # the float16 default allows it


def test_integers_exact_and_cases_judged_together() -> None:
    bad = {"y": REF["y"], "k": REF["k"] + 1}
    with pytest.raises(ParityMismatch, match=r"k: fail: 3 of 6 values differ .* at case 1 "):
        assert_parity([REF, bad], [REF, REF])


def test_names_order_and_dtypes_are_exact() -> None:
    with pytest.raises(AssertionError, match="outputs"):
        assert_parity({"k": REF["k"], "y": REF["y"]}, REF)
    with pytest.raises(AssertionError, match="dtypes"):
        assert_parity({"y": REF["y"].astype(np.float64), "k": REF["k"]}, REF)
    assert_parity({"y": REF["y"].astype(np.float64), "k": REF["k"]}, REF, exact_dtypes=False)


def test_an_explicit_tolerance_needs_a_reason_and_applies() -> None:
    tight = Tolerance(atol=1e-6, rtol=0.0)
    got = {"y": REF["y"] + np.float32(5e-5), "k": REF["k"]}
    with pytest.raises(AssertionError, match="reason"):
        assert_parity(got, REF, tolerance=tight)
    with pytest.raises(ParityMismatch, match="atol 1e-06"):
        assert_parity(got, REF, tolerance=tight, why="this test asks for more than the default")
