"""Route fallback and isolation with injected routes: a failing first route is recorded
and the next one taken; a drifting artifact is rejected rather than chosen; a converter
that segfaults, hangs or eats memory fails its own attempt while every target completes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import portable_models as pm
from models import ZOO
from portable_models.convert.registry import EXTRA_ROUTES_ENV

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent.parent


def _inject(monkeypatch: pytest.MonkeyPatch, attr: str) -> None:
    monkeypatch.setenv("PYTHONPATH", str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv(EXTRA_ROUTES_ENV, f"injected_routes:{attr}")


def _export(tmp_path: Path, targets: list[str], **kw: Any) -> Any:
    case = ZOO["cnn"]()
    return pm.export(case.model, case.example, out=tmp_path / "b", targets=targets,
                     **{**case.options, **kw})


def test_failing_first_route_is_recorded_and_the_next_taken(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _inject(monkeypatch, "FAIL_TFLITE")
    bundle = _export(tmp_path, ["tflite"])
    art = bundle.contract.artifact("tflite")
    assert art is not None and art.status == "pass", bundle.report()
    assert [a.route for a in art.attempts][:2] == ["test-fail-convert", "litert-torch"]
    first = art.attempts[0]
    assert first.status == "error" and first.stage == "convert"
    assert "injected failure" in first.error["message"]
    assert art.route_name != "test-fail-convert"
    assert "test-fail-convert error at convert: injected failure" in bundle.report()
    # litert-torch refuses the dynamic batch dim; its fixed-shape conversion waits for the
    # next route, which keeps the dim, so it never runs
    refused, kept = art.attempts[1:]
    assert refused.error["code"] == "dynamic_dims_refused", refused
    assert kept.route == art.route_name == "onnx2tf" and kept.status == "pass"
    assert not art.meta.get("fixed_shape")


def test_fixed_shape_fallback_runs_when_no_later_route_keeps_the_dims(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from portable_models.convert import build as pipeline
    from portable_models.convert.registry import route_by_name

    _inject(monkeypatch, "FAIL_TFLITE")
    order = [route_by_name("litert-torch"), route_by_name("test-fail-convert")]
    monkeypatch.setattr(pipeline, "routes_for", lambda target, source, precision=None: order if target == "tflite" else [])
    bundle = _export(tmp_path, ["tflite"])
    art = bundle.contract.artifact("tflite")
    assert art is not None and art.status == "pass", bundle.report()
    assert [(a.route, a.status) for a in art.attempts] == [
        ("litert-torch", "error"), ("test-fail-convert", "error"), ("litert-torch", "pass")]
    assert art.attempts[0].error["code"] == "dynamic_dims_refused"
    assert art.route_name == "litert-torch" and art.meta["fixed_shape"] is True
    assert pm.verify(bundle.path).ok


def test_drifting_artifact_is_rejected_not_chosen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _inject(monkeypatch, "DRIFT_ONNX")
    bundle = _export(tmp_path, ["onnx"])
    art = bundle.contract.artifact("onnx")
    assert art is not None and art.status == "pass" and art.route_name == "torch-onnx"
    drift = art.attempts[0]
    assert drift.route == "test-drift-onnx" and drift.status == "fail" and drift.stage == "compare"
    assert "logits" in drift.parity["reason"]
    assert pm.verify(bundle.path).ok


def test_crash_hang_and_memory_fail_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _inject(monkeypatch, "MISBEHAVE")
    bundle = _export(tmp_path, ["onnx", "torchscript", "executorch"], timeout_s=60, memory_mb=3000)
    statuses = {a.target: a for a in bundle.contract.artifacts}
    assert all(a.status == "pass" for a in statuses.values()), bundle.report()
    first = {t: a.attempts[0] for t, a in statuses.items()}
    assert "crashed (SIGSEGV)" in first["torchscript"].error["message"]
    assert "timeout after 60 s" in first["onnx"].error["message"]
    assert "memory limit 3000 MiB" in first["executorch"].error["message"]
    assert not list(tmp_path.glob(".b.*")), "staging or lock left behind"
