"""coremltools imported without the packages it imports for nothing (TensorFlow for a torch
program, scikit-learn, transformers), and a worker that did so is replaced for a job that
needs coremltools' TensorFlow frontend."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

from portable_models.isolation.pool import WorkerLimits, WorkerPool
from worker_jobs import CALL

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("coremltools", "tensorflow")),
    reason="needs coremltools and TensorFlow")


def _coremltools(pool: WorkerPool, **payload: Any) -> dict[str, Any]:
    result, _ = pool.call(kind="call", payload={**CALL, "action": "coremltools", **payload}, framework="torch",
                          step="import coremltools")
    return result


def test_lean_import_then_a_tensorflow_job_runs_in_a_fresh_worker(tmp_path: Path) -> None:
    with WorkerPool(scratch=tmp_path / "scratch", limits=WorkerLimits(timeout_s=300, memory_mb=None)) as pool:
        lean = _coremltools(pool)
        assert lean["tf_frontend"] is False
        assert lean["loaded"] == []  # neither TensorFlow nor scikit-learn nor transformers
        # hidden for coremltools' own import only: the same worker still imports them
        warm, _ = pool.call(kind="warm", payload={"modules": ["tensorflow", "sklearn"]}, framework="torch",
                            step="import")
        assert warm["pid"] == lean["pid"] and pool.started == 1
        again = _coremltools(pool)  # coremltools already imported: nothing changes
        assert again["pid"] == lean["pid"] and again["tf_frontend"] is False

        full = _coremltools(pool, tensorflow=True)
        assert full["tf_frontend"] is True and "tensorflow" in full["loaded"]
        assert full["pid"] != lean["pid"] and pool.started == 2
        with pytest.raises(ProcessLookupError):  # the unfit worker was stopped, not kept
            os.kill(lean["pid"], 0)
        assert _coremltools(pool)["pid"] == full["pid"]  # the fresh worker is the one kept
