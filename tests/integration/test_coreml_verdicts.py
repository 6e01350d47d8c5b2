"""Core ML verdicts through the whole pipeline: what checked the numbers, fp16 with its
fp32 twin, and an op the MIL reference executor cannot run.

Off macOS the MIL reference executor gives Core ML artifacts a real pass/fail, and the
verdict says so; an op it has no kernel for leaves the artifact ``unverified`` naming
the op, which fails the gate unless the user allows it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

import portable_models as pm
from models import CORE_ML_CHECKER
from portable_models.contract.reports.table import REFERENCE_CAVEAT
from portable_models.errors import UsageError

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
pytest.importorskip("coremltools")

OFF_MACOS = sys.platform != "darwin"


def _by_key(bundle: Any) -> dict[str, Any]:
    return {a.key: a for a in bundle.contract.artifacts}


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A small encoder (embedding, attention, layer norm, GELU) asked for fp16 Core ML:
    the bundle holds the fp16 artifact and its fp32 twin."""
    from models import transformer

    case = transformer()
    out = tmp_path_factory.mktemp("fp16") / "bundle"
    return pm.export(case.model, case.example, out=out, targets=["coreml"], precision="fp16", **case.options)


def test_fp16_passes_under_its_preset_and_its_fp32_twin_tightly(fp16_bundle: Any) -> None:
    arts = _by_key(fp16_bundle)
    assert sorted(arts) == ["coreml", "coreml-float16"], fp16_bundle.report()
    fp32, fp16 = arts["coreml"], arts["coreml-float16"]
    assert fp16.file and fp16.file.endswith("model_fp16.mlpackage")
    for art in (fp32, fp16):
        assert art.status == "pass", fp16_bundle.report()
        assert art.parity["checked_by"] == CORE_ML_CHECKER
    for name, res in fp16.parity["outputs"].items():
        assert res["tolerance"]["atol"] == pytest.approx(1e-2), (name, res)
        assert res["mismatch_ratio"] == 0, (name, res)  # every value finite where the source is
    for name, res in fp32.parity["outputs"].items():
        assert res["tolerance"]["atol"] == pytest.approx(1e-4), (name, res)
        assert res["max_abs"] < 1e-4, (name, res)
    # the fp16 artifact really computes in fp16: its error sits well above the fp32 twin's
    worst16 = max(r["max_abs"] for r in fp16.parity["outputs"].values())
    worst32 = max(r["max_abs"] for r in fp32.parity["outputs"].values())
    assert worst16 > 10 * worst32, (worst16, worst32)


@pytest.mark.skipif(not OFF_MACOS, reason="off macOS only: the caveat is about the reference")
def test_report_names_the_checker_and_its_limits(fp16_bundle: Any) -> None:
    report = fp16_bundle.report()
    assert "pass (MIL reference, numpy)" in report
    assert REFERENCE_CAVEAT in report
    html = (fp16_bundle.path / "reports" / "report.html").read_text()
    assert "MIL reference, numpy" in html and "not Apple&#x27;s kernels" in html


def test_verify_rechecks_both_from_the_bundle(fp16_bundle: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from portable_models.isolation.pool import WorkerPool

    kinds: list[str] = []
    real = WorkerPool.call

    def counted(self: WorkerPool, **kwargs: Any) -> Any:
        kinds.append(kwargs["kind"])
        return real(self, **kwargs)

    monkeypatch.setattr(WorkerPool, "call", counted)
    for jobs in (1, 2):
        kinds.clear()
        report = pm.verify(fp16_bundle.path, jobs=jobs)
        assert report.ok, report.table()
        assert {a.key: a.parity["checked_by"] for a in report.contract.artifacts} == {
            "coreml": CORE_ML_CHECKER, "coreml-float16": CORE_ML_CHECKER}
        # off macOS both structural checks and both MIL-reference runs go in one worker job,
        # or each artifact's two in the job of its lane when two workers run side by side
        assert kinds in ([["many"]] if jobs == 1 else [["many"], ["many", "many"]]) if OFF_MACOS else kinds, kinds
        if OFF_MACOS:
            for art in report.contract.artifacts:
                assert art.parity["structural"], art.parity


class RandomNoise(torch.nn.Module):  # type: ignore[misc]
    """Converts to a program with a ``random_uniform`` op, which the reference executor
    has no kernel for (the noise is multiplied by zero, so the source is deterministic)."""

    def forward(self, x: Any) -> Any:
        return torch.relu(x) + 0.0 * torch.rand_like(x)


@pytest.mark.skipif(not OFF_MACOS, reason="on macOS the real runtime runs random_uniform")
def test_op_without_kernel_is_unverified_naming_it(tmp_path: Path) -> None:
    bundle = pm.export(RandomNoise().eval(), (torch.randn(2, 4),), out=tmp_path / "b", targets=["coreml"])
    (art,) = bundle.contract.artifacts
    assert art.status == "unverified", bundle.report()
    assert art.file is not None, "the converted artifact is kept"
    assert "no kernel for op 'random_uniform'" in art.parity["error"]["message"]
    assert any("saves and reloads" in c for c in art.parity["checked"]), "structural checks are listed"
    assert "unverified" in bundle.report() and "random_uniform" in bundle.report()
    assert not bundle.passed()
    assert bundle.passed(allow_unverified=["coreml"])
    report = pm.verify(bundle.path)
    assert not report.ok
    assert pm.verify(bundle.path, allow_unverified=["coreml"]).ok


def test_unknown_compute_units_is_a_usage_error(fp16_bundle: Any) -> None:
    with pytest.raises(UsageError, match="unknown compute units 'GPU'"):
        pm.verify(fp16_bundle.path, compute_units="GPU")
