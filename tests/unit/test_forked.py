"""The forked capture step: results and errors come back, a crash fails cleanly, and the
caller's memory does not grow by the step's."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from portable_models.capture.fork import CAPTURE_ENV, fork_unavailable, run_forked
from portable_models.errors import CaptureError, UsageError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked capture is Linux-only")


def _square_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def _usage() -> None:
    raise UsageError("bad input", file="model.pt", fix="do better")


def _boom() -> None:
    raise ValueError("nope")


def _segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def _grow() -> int:
    hog = bytearray(300 * 2**20)  # 300 MB touched in the child only
    hog[:: 4096] = b"x" * len(hog[:: 4096])
    return len(hog)


def test_result_comes_back_from_another_process() -> None:
    value, pid = run_forked(_square_pid, 7, stage="capture")
    assert value == 49 and pid != os.getpid()


def test_our_errors_keep_their_type_and_fields() -> None:
    with pytest.raises(UsageError, match="bad input") as info:
        run_forked(_usage, stage="capture")
    assert info.value.file == "model.pt" and info.value.fix == "do better"


def test_other_exceptions_become_capture_errors() -> None:
    with pytest.raises(CaptureError, match="ValueError: nope"):
        run_forked(_boom, stage="capture")


def test_a_crash_fails_the_capture_not_the_caller() -> None:
    with pytest.raises(CaptureError, match=r"crashed \(SIGSEGV\)"):
        run_forked(_segfault, stage="capture")


def test_the_callers_memory_does_not_grow() -> None:
    import psutil

    before = psutil.Process().memory_info().rss
    assert run_forked(_grow, stage="capture") == 300 * 2**20
    assert psutil.Process().memory_info().rss - before < 50 * 2**20


def test_switch_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fork_unavailable() is None
    monkeypatch.setenv(CAPTURE_ENV, "inprocess")
    assert fork_unavailable() == f"{CAPTURE_ENV}=inprocess"
