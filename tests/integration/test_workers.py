"""Worker isolation: a job that crashes, hangs, eats memory or reaches for the network
fails alone, with a status that says so; the pool carries on; no process survives."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from portable_models.errors import (
    NetworkRequiredError,
    PortableModelsError,
    WorkerCrashed,
    WorkerOutOfMemory,
    WorkerTimeout,
)
from portable_models.isolation.pool import JobFailed, WorkerLimits, WorkerPool
from worker_jobs import CALL


@pytest.fixture
def pool(tmp_path: Path) -> WorkerPool:
    with WorkerPool(scratch=tmp_path / "scratch", limits=WorkerLimits(timeout_s=3, memory_mb=700)) as p:
        yield p


def _fail(pool: WorkerPool, action: str, tmp_path: Path) -> JobFailed:
    with pytest.raises(JobFailed) as info:
        pool.call(kind="call", payload={**CALL, "action": action}, framework="none", step=f"test {action}",
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
    result, _ = pool.call(kind="call", payload={**CALL, "action": "cwd"}, framework="none", step="cwd",
                          work_dir=tmp_path / "work")
    assert Path(result["cwd"]) == tmp_path / "work"
    assert str(tmp_path / "scratch") in result["home"]
    assert list(caller.iterdir()) == []
    assert not (Path.home() / "written-by-worker.txt").exists()


def test_job_output_goes_to_its_log(pool: WorkerPool, tmp_path: Path) -> None:
    _fail(pool, "raise", tmp_path)
    text = (tmp_path / "job.log").read_text()
    assert "asked to fail" in text and "Traceback" in text


def test_jobs_sharing_a_folder_keep_it_and_a_removed_folder_or_log_is_made_again(pool: WorkerPool,
                                                                                  tmp_path: Path) -> None:
    work, log = tmp_path / "work", tmp_path / "jobs.log"
    for n in range(3):
        result, _ = pool.call(kind="call", payload={**CALL, "action": "cwd"}, framework="none", step=f"job{n}",
                              work_dir=work, log=log)
        assert Path(result["cwd"]) == work
        if n == 1:  # the folder and the log go away between two jobs
            shutil.rmtree(work)
            log.unlink()
    text = log.read_text()
    assert "job2" in text and "job0" not in text and "job1" not in text
    assert work.is_dir()


def test_what_is_printed_after_a_job_never_goes_to_that_jobs_log(pool: WorkerPool, tmp_path: Path) -> None:
    """An export's logs are files of its bundle: a worker's later output (a job without a
    log, an import's warning, a runtime's thread) must not change them."""
    log = tmp_path / "bundle-file.log"
    pool.call(kind="call", payload={**CALL, "action": "print", "text": "during the job"}, framework="none",
              step="one", log=log)
    before = log.read_text()
    pool.call(kind="call", payload={**CALL, "action": "print", "text": "after it"}, framework="none", step="two")
    assert "during the job" in before and log.read_text() == before


def test_lanes_warmed_one_by_one_import_one_after_the_other(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers importing torch at once each take about twice as long: a lane warmed
    ``one_by_one`` starts importing when the previous lane's worker is ready."""
    from portable_models.isolation.pool import LimitedPool

    (tmp_path / "pm_slow_import.py").write_text(
        "import os, time\n"
        "start = time.time()\n"
        "time.sleep(0.5)\n"
        f"open(os.path.join({str(tmp_path)!r}, 'import-%d.txt' % os.getpid()), 'w').write("
        "'%r %r' % (start, time.time()))\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with WorkerPool(scratch=tmp_path / "s") as pool:
        view = LimitedPool(pool, WorkerLimits())
        view.prewarm("none", ["pm_slow_import"], lanes=[0, 1], threads=1, one_by_one=True)
        for k in range(2):  # each lane's job waits for its lane's warm-up
            view.lane_view(k, 1).call(kind="ping", payload={}, framework="none", step="p")
        assert pool.started == 2
    spans = sorted(tuple(map(float, f.read_text().split())) for f in tmp_path.glob("import-*.txt"))
    assert len(spans) == 2 and spans[1][0] >= spans[0][1], f"the imports overlapped: {spans}"


def test_a_lane_cloned_from_a_warm_worker_imports_nothing_again_and_lives_on_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lane 1's worker is forked from lane 0's once that one is warm: one import for both;
    then a worker of its own (process, session, scratch folder, memory account), whose crash
    is reported like any worker's and leaves lane 0's working; closing the pool stops both."""
    from portable_models.isolation.pool import LimitedPool
    from portable_models.isolation.process import _group_rss_mb

    (tmp_path / "pm_counted_import.py").write_text(
        "import os\n"
        f"open(os.path.join({str(tmp_path)!r}, 'import-%d.txt' % os.getpid()), 'w').write('x')\n"
        "BALLAST = bytearray(200 * 2**20)\n")  # touched: resident in both processes
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with WorkerPool(scratch=tmp_path / "s") as pool:
        view = LimitedPool(pool, WorkerLimits())
        view.prewarm("none", ["pm_counted_import"], lanes=[0], threads=1, clones=[1])
        lane0, lane1 = view.lane_view(0, 1), view.lane_view(1, 1)
        ask = {**CALL, "action": "loaded", "modules": ["pm_counted_import"]}
        first = lane0.call(kind="call", payload=ask, framework="none", step="t")[0]
        clone = lane1.call(kind="call", payload=ask, framework="none", step="t")[0]
        assert clone["pid"] != first["pid"] and pool.started == 2
        assert clone["loaded"] == ["pm_counted_import"] == first["loaded"]
        assert [f.name for f in tmp_path.glob("import-*.txt")] == [f"import-{first['pid']}.txt"], \
            "the clone imported the module again"
        assert clone["session"] == clone["pid"] != first["session"]
        home = lane1.call(kind="call", payload={**CALL, "action": "cwd"}, framework="none", step="t",
                          work_dir=tmp_path / "w1")[0]["home"]
        assert Path(home).parent.parent == tmp_path / "s" and "worker-1" not in home
        # each is policed for its own memory: lane 0's account leaves its clone (its child) out
        source = next(w for w in pool._idle if w.proc.pid == first["pid"])
        assert source.clones == [clone["pid"]]
        assert _group_rss_mb(first["pid"], source.clones) < 1.5 * _group_rss_mb(clone["pid"])
        assert _group_rss_mb(first["pid"]) > 1.5 * _group_rss_mb(clone["pid"]), "the clone is not its child"

        with pytest.raises(JobFailed) as info:
            lane1.call(kind="call", payload={**CALL, "action": "segfault"}, framework="none", step="t",
                       timeout_s=60)
        assert isinstance(info.value.error, WorkerCrashed) and "crashed (SIGSEGV)" in str(info.value.error)
        assert not _alive(clone["pid"])
        assert lane0.call(kind="ping", payload={}, framework="none", step="p")[0]["pid"] == first["pid"]
        again = lane1.call(kind="ping", payload={}, framework="none", step="p")[0]["pid"]
        assert again not in (first["pid"], clone["pid"])
    assert not _alive(first["pid"]) and not _alive(again)


def test_a_clone_that_cannot_set_itself_up_fails_fast_and_its_source_works_on(tmp_path: Path) -> None:
    import time

    from portable_models.errors import WorkerError
    from portable_models.isolation.process import Worker

    with WorkerPool(scratch=tmp_path / "s") as pool:
        pid = pool.call(kind="ping", payload={}, framework="none", step="p")[0]["pid"]
        source = pool._idle[0]
        start = time.monotonic()
        with pytest.raises(WorkerError, match="clone did not start"):  # its log's folder is missing
            source.clone(tmp_path / "twin", tmp_path / "no" / "such" / "folder.log", 1, WorkerLimits())
        assert time.monotonic() - start < 10, "the caller waited out the clone's whole deadline"
        assert pool.call(kind="ping", payload={}, framework="none", step="p")[0]["pid"] == pid
        assert isinstance(source, Worker) and not list((tmp_path / "twin").glob("fifo-*"))


def test_a_many_job_answers_each_of_its_jobs_as_it_ends(pool: WorkerPool, tmp_path: Path) -> None:
    subs = [{"kind": "call", "payload": {**CALL, }, "step": "one"},
            {"kind": "call", "payload": {**CALL, "action": "raise"}, "step": "two", "log": str(tmp_path / "two.log")},
            {"kind": "call", "payload": {**CALL, }, "step": "three"}]
    seen: list[dict] = []
    result, _ = pool.call(kind="many", payload={"jobs": subs}, framework="none", step="many",
                          on_partial=seen.append)
    assert result == {"jobs": 3}
    assert [(p["index"], p["ok"]) for p in seen] == [(0, True), (1, False), (2, True)]
    assert "asked to fail" in seen[1]["error"]["message"], "a failing job answers for itself"
    assert "Traceback" in (tmp_path / "two.log").read_text(), "each job writes to its own log"
    assert seen[0]["result"]["pid"] == seen[2]["result"]["pid"], "one worker ran them all"
    # a crash ends the job: the jobs before it were answered, the caller sees which one died
    seen.clear()
    subs[1] = {"kind": "call", "payload": {**CALL, "action": "segfault"}, "step": "two"}
    with pytest.raises(JobFailed) as info:
        pool.call(kind="many", payload={"jobs": subs}, framework="none", step="many", on_partial=seen.append)
    assert isinstance(info.value.error, WorkerCrashed)
    assert [p["index"] for p in seen] == [0]


def test_a_run_that_kills_its_worker_fails_alone_and_the_runs_after_it_still_run(tmp_path: Path) -> None:
    """verify runs a bundle's artifacts in one worker job; one that crashes its worker fails
    alone (stage: its runtime), and the ones after it run in a new worker."""
    from portable_models.compare import check as checks
    from portable_models.core.iomap import IoMap
    from portable_models.core.tolerance import TolerancePolicy
    from portable_models.isolation import lanes

    class Scripted(checks.CheckJob):
        action = ""

        def sub_job(self, runtime: str, cases: object, threads: object = None) -> dict:
            return {"kind": "call", "payload": {**CALL, "action": self.action}, "step": f"run:{runtime}"}

    def job(action: str) -> Scripted:
        made = Scripted(pool=pool, artifact=tmp_path / "a", io=IoMap(inputs={}, outputs={}),
                        golden_inputs=tmp_path / "g", golden_outputs=[], policy=TolerancePolicy(),
                        precision="float32", log=tmp_path / "log", work_dir=tmp_path / "w",
                        timeout_s=None, output_names=None, options={})
        made.action = action
        return made

    got: dict[int, checks._Ran] = {}
    with WorkerPool(scratch=tmp_path / "s", limits=WorkerLimits(timeout_s=60)) as pool:
        runs = [(n, job(a), "onnxruntime", None) for n, a in enumerate(("pid", "segfault", "pid", "pid"))]
        lanes.run_many(pool, runs, got.__setitem__, None)
    assert sorted(got) == [0, 1, 2, 3]
    assert [r.failure is None for r in (got[0], got[2], got[3])] == [True, True, True]
    failure = got[1].failure
    assert failure is not None and failure["status"] == "error" and failure["stage"] == "run:onnxruntime"
    assert "crashed (SIGSEGV)" in failure["error"]["message"]
    assert got[0].result["pid"] != got[2].result["pid"] == got[3].result["pid"], "the rest ran in a new worker"

    got.clear()  # two lanes side by side: a crash in one fails its run alone, the other lane runs on
    with WorkerPool(scratch=tmp_path / "s2", limits=WorkerLimits(timeout_s=60)) as pool:
        groups: Any = [((0, None), [(n, job(a), "onnxruntime", None) for n, a in ((0, "pid"), (1, "pid"))]),
                       ((1, None), [(n, job(a), "onnxruntime", None) for n, a in ((2, "segfault"), (3, "pid"))])]
        lanes.side_by_side(pool, groups, got.__setitem__, None, None)
        assert pool.started == 3, "lane 1's worker was not replaced after its crash"
    assert sorted(got) == [0, 1, 2, 3] and [got[n].failure is None for n in range(4)] == [True, True, False, True]
    assert got[0].result["pid"] == got[1].result["pid"] != got[3].result["pid"]


# -- one pool per process -------------------------------------------------------------
def test_shared_pool_keeps_warm_workers_between_calls_until_shutdown() -> None:
    from portable_models.isolation.pool import shared_pool, shutdown_workers

    shutdown_workers()
    first, _ = shared_pool().call(kind="ping", payload={}, framework="torch", step="ping")
    again, _ = shared_pool().call(kind="ping", payload={}, framework="torch", step="ping")
    assert first["pid"] == again["pid"], "a second call (export, then verify) reuses the warm worker"
    shutdown_workers()
    assert not _alive(first["pid"])
    fresh, _ = shared_pool().call(kind="ping", payload={}, framework="torch", step="ping")
    assert fresh["pid"] != first["pid"]
    shutdown_workers()


def test_each_view_applies_its_own_limits(tmp_path: Path) -> None:
    from portable_models.isolation.pool import shared_pool, shutdown_workers

    strict = shared_pool(WorkerLimits(timeout_s=1, memory_mb=None))
    with pytest.raises(JobFailed) as info:
        strict.call(kind="call", payload={**CALL, "action": "hang"}, framework="none", step="hang",
                    work_dir=tmp_path / "w")
    assert "timeout after 1 s" in str(info.value.error)
    result, _ = shared_pool().call(kind="ping", payload={}, framework="none", step="ping")
    assert result["pid"] > 0
    shutdown_workers()


def test_idle_workers_are_stopped_after_idle_s(tmp_path: Path) -> None:
    import time

    with WorkerPool(scratch=tmp_path / "s", idle_s=0.5) as pool:
        pid = pool.call(kind="ping", payload={}, framework="none", step="ping")[0]["pid"]
        assert pool.idle_workers() == 1
        deadline = time.monotonic() + 10
        # the reaper takes the worker off the idle list, then kills it
        while (pool.idle_workers() or _alive(pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pool.idle_workers() == 0 and not _alive(pid)
        again = pool.call(kind="ping", payload={}, framework="none", step="ping")[0]["pid"]
        assert again != pid  # started afresh when needed


def test_closed_pool_refuses_jobs(tmp_path: Path) -> None:
    pool = WorkerPool(scratch=tmp_path / "s")
    pool.close()
    with pytest.raises(JobFailed, match="shut down"):
        pool.call(kind="ping", payload={}, framework="none", step="ping")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone in all that matters
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_a_changed_environment_gets_a_fresh_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with WorkerPool(scratch=tmp_path / "s") as pool:
        first = pool.call(kind="ping", payload={}, framework="none", step="ping")[0]["pid"]
        monkeypatch.setenv("PORTABLE_MODELS_EXTRA_ROUTES", "somewhere:ROUTES")
        second = pool.call(kind="ping", payload={}, framework="none", step="ping")[0]["pid"]
        assert second != first and not _alive(first), "the old worker is not reused, and is stopped"
        assert pool.call(kind="ping", payload={}, framework="none", step="ping")[0]["pid"] == second


def test_prewarm_starts_one_worker_per_lane_that_jobs_then_reuse(tmp_path: Path) -> None:
    from portable_models.isolation.pool import LimitedPool

    with WorkerPool(scratch=tmp_path / "s") as pool:
        view = LimitedPool(pool, WorkerLimits())
        view.prewarm("none", ["json", "decimal"], lanes=2, threads=1)
        # jobs on those lanes wait for the warming workers instead of starting more
        pids = {view.lane_view(k, 1).call(kind="ping", payload={}, framework="none", step="p")[0]["pid"]
                for k in range(2)}
        assert len(pids) == 2 and pool.started == 2, "each lane found its warm worker"
        assert pool.idle_workers() == 2
        view.prewarm("none", ["no_such_module_anywhere"])  # a failed warm-up is harmless
        assert view.call(kind="ping", payload={}, framework="none", step="p")[0]["pid"] > 0
