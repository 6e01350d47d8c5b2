"""No orphans: a CLI killed with SIGKILL mid-export (nothing of it can clean up) leaves no
worker or capture running, and the next export into the same folder removes the staging
folder it left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from clihelp import cli, cli_env, tagged

TESTS = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _tagged(tag: str) -> list[int]:
    return tagged("PM_ORPHAN_TAG", tag)


def _wait(what: str, until: float, check: object) -> None:
    while time.monotonic() < until:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_mid_export_leaves_no_process_and_the_next_export_cleans_up(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    out = tmp_path / "demo"
    env = {**cli_env(), "PM_ORPHAN_TAG": tag, "PORTABLE_MODELS_CACHE": str(tmp_path / "cache"),
           "PORTABLE_MODELS_EXTRA_ROUTES": "injected_routes:HANG_ONNX"}
    env["PYTHONPATH"] = str(TESTS) + os.pathsep + env["PYTHONPATH"]
    # the ONNX converter hangs: a worker is mid-job, where it cannot hear its caller go
    proc = subprocess.Popen([sys.executable, "-m", "portable_models.cli", "demo", "--out", str(out), "-q"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait("the hanging conversion", time.monotonic() + 240,
              lambda: any("test-hang" in p.read_text(errors="replace")
                          for p in tmp_path.glob(".demo.staging-*/logs/*.log")))
        time.sleep(1.0)
        assert proc.poll() is None, "the export ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        _wait("the workers to go", time.monotonic() + 10, lambda: not _tagged(tag))
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _tagged(tag):
            os.kill(pid, signal.SIGKILL)
    assert list(tmp_path.glob(".demo.staging-*")), "the killed export left nothing to clean (test is void)"
    r = cli("demo", "--out", str(out), "-q", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not list(tmp_path.glob(".demo.staging-*")) and not list(tmp_path.glob(".demo.old-*"))
    assert not (tmp_path / ".demo.lock").exists()
