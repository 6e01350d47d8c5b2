"""``jobs=2``: targets convert side by side in lanes of their own workers, and the bundle is
the same as a sequential export's (same targets, order, verdicts)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import portable_models as pm
from models import cnn

pytestmark = pytest.mark.slow
pytest.importorskip("torch")

TARGETS = ["onnx", "torchscript", "executorch"]


def test_two_jobs_overlap_and_give_the_same_bundle(tmp_path: Path) -> None:
    events: list[tuple[float, str, str]] = []
    lock = threading.Lock()

    def progress(key: str, status: str, detail: str = "") -> None:
        with lock:
            events.append((time.monotonic(), key, status))

    case = cnn()
    par = pm.export(case.model, case.example, out=tmp_path / "par", targets=TARGETS, jobs=2,
                    cache=False, progress=progress, **case.options)
    seq = pm.export(case.model, case.example, out=tmp_path / "seq", targets=TARGETS, cache=False,
                    **case.options)
    assert [a.key for a in par.contract.artifacts] == TARGETS == [a.key for a in seq.contract.artifacts]
    assert [a.status for a in par.contract.artifacts] == ["pass"] * 3, par.report()
    for a, b in zip(par.contract.artifacts, seq.contract.artifacts, strict=True):
        assert a.route_name == b.route_name
    assert _max_concurrent(events) == 2, events
    if sys.platform.startswith("linux"):  # lane 1's worker was forked from lane 0's warm one
        from portable_models.isolation.pool import shared_pool

        pool = shared_pool().pool
        assert any(w.lane == 1 and w.cloned for w in pool._idle), [(w.lane, w.cloned) for w in pool._idle]


def _max_concurrent(events: list[tuple[float, str, Any]]) -> int:
    """How many targets were between 'converting' and their verdict at the same time."""
    active: set[str] = set()
    most = 0
    for _, key, status in sorted(events):
        if status == "converting":
            active.add(key)
        elif status in ("pass", "fail", "error", "unverified", "skipped"):
            active.discard(key)
        most = max(most, len(active))
    return most
