"""Worker isolation: a job that crashes, hangs, eats memory or reaches for the network
fails alone, with a status that says so; the pool carries on; no process survives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from portable_models.errors import (
    NetworkRequiredError,
    PortableModelsError,
    WorkerCrashed,
    WorkerOutOfMemory,
    WorkerTimeout,
)
from portable_models.workers import JobFailed, WorkerLimits, WorkerPool


@pytest.fixture
def pool(tmp_path: Path) -> WorkerPool:
    with WorkerPool(scratch=tmp_path / "scratch", limits=WorkerLimits(timeout_s=3, memory_mb=700)) as p:
        yield p


def _fail(pool: WorkerPool, action: str, tmp_path: Path) -> JobFailed:
    with pytest.raises(JobFailed) as info:
        pool.call(kind="test", payload={"action": action}, framework="none", step=f"test {action}",
                  log=tmp_path / "job.log", work_dir=tmp_path / "work",
                  timeout_s=None if action == "hang" else 120)
    return info.value


@pytest.mark.parametrize(("action", "error", "text"), [
    ("segfault", WorkerCrashed, "crashed (SIGSEGV)"),
    ("abort", WorkerCrashed, "crashed (SIGABRT)"),
    ("hang", WorkerTimeout, "timeout after 3 s"),
    ("memory", WorkerOutOfMemory, "killed: memory limit 700 MiB"),
    ("network", NetworkRequiredError, "network required: test network"),
    ("raise", PortableModelsError, "asked to fail"),
])
def test_misbehaving_job_fails_alone(pool: WorkerPool, tmp_path: Path, action: str,
                                     error: type, text: str) -> None:
    failed = _fail(pool, action, tmp_path)
    assert isinstance(failed.error, error)
    assert text in str(failed.error)
    result, _ = pool.call(kind="ping", payload={}, framework="none", step="ping")
    assert result["pid"] > 0  # the pool still works after the failure


def test_worker_is_reused_until_it_dies(pool: WorkerPool, tmp_path: Path) -> None:
    first, _ = pool.call(kind="ping", payload={}, framework="torch", step="ping")
    again, _ = pool.call(kind="ping", payload={}, framework="torch", step="ping")
    assert first["pid"] == again["pid"] and pool.started == 1
    _fail(pool, "segfault", tmp_path)
    after, _ = pool.call(kind="ping", payload={}, framework="torch", step="ping")
    assert after["pid"] != first["pid"]


def test_killed_worker_leaves_no_process(pool: WorkerPool, tmp_path: Path) -> None:
    pid, _ = pool.call(kind="ping", payload={}, framework="none", step="ping")
    _fail(pool, "hang", tmp_path)
    pool.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid["pid"], 0)


def test_cwd_and_home_are_private(pool: WorkerPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    caller = tmp_path / "caller"
    caller.mkdir()
    monkeypatch.chdir(caller)
    result, _ = pool.call(kind="test", payload={"action": "cwd"}, framework="none", step="cwd",
                          work_dir=tmp_path / "work")
    assert Path(result["cwd"]) == tmp_path / "work"
    assert str(tmp_path / "scratch") in result["home"]
    assert list(caller.iterdir()) == []
    assert not (Path.home() / "written-by-worker.txt").exists()


def test_job_output_goes_to_its_log(pool: WorkerPool, tmp_path: Path) -> None:
    _fail(pool, "raise", tmp_path)
    text = (tmp_path / "job.log").read_text()
    assert "asked to fail" in text and "Traceback" in text
