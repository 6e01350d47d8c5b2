"""The verify driver (:func:`run_planned`): one worker job per round; a run that an ask
names as ``then`` is made in that same job, ahead of its ask, handed over when the check
asks for it and dropped when the check settles without it. Real onnxruntime runs of the
tiny bundle in real workers."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from portable_models.compare.check import Ask, CheckJob, Judge, PlannedRun, run_planned
from portable_models.contract.model import load_contract
from portable_models.core import golden
from portable_models.core.tolerance import TolerancePolicy
from portable_models.isolation.pool import WorkerPool

pytest.importorskip("onnxruntime")

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny_bundle"


def _planned(pool: WorkerPool, tmp_path: Path, plan: Generator[Ask, Any, Judge], name: str = "",
             cost_hint: float = 0.0, run_ms: float = 0.0) -> PlannedRun:
    contract = load_contract(TINY)
    art = contract.artifacts[0]
    assert art.file and art.io
    job = CheckJob(pool=pool, artifact=TINY / art.file, io=art.io, golden_inputs=TINY / contract.golden["inputs"],
                   golden_outputs=golden.load_cases(TINY / contract.golden["outputs"]),
                   policy=TolerancePolicy.from_dict(contract.tolerance), precision=art.precision,
                   log=tmp_path / "run.log", work_dir=tmp_path / "run", name=name, cost_hint=cost_hint, run_ms=run_ms)
    return PlannedRun(job=job, plan=plan)


def _judged(ran: list[Any]) -> Generator[Ask, Any, Judge]:
    got = yield Ask("onnxruntime", None)
    ran.append(got)
    return got.judge  # type: ignore[no-any-return]


def _trace(pool: WorkerPool) -> tuple[list[dict[str, Any]], Any]:
    """Record every call made through ``pool``: the list the calls go to, and the real call."""
    calls: list[dict[str, Any]] = []
    real = pool.call

    def traced(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(**kwargs)

    pool.call = traced  # type: ignore[method-assign]
    return calls, real


def test_two_checks_run_side_by_side_in_two_workers_each_run_on_one_thread(tmp_path: Path) -> None:
    with WorkerPool(scratch=tmp_path / "s") as pool:
        calls, real = _trace(pool)
        for round_ in range(2):  # cold (both workers start now), then warm (both idle)
            ran: list[Any] = []
            done: dict[int, Judge] = {}
            planned = [_planned(pool, tmp_path, _judged(ran), name=f"c{n}") for n in range(3)]
            run_planned(pool, planned, done.__setitem__, lanes=2)
            assert sorted(done) == [0, 1, 2] and [done[i]()[0]["status"] for i in range(3)] == ["pass"] * 3
            assert sorted(int(c.get("lane", -1)) for c in calls) == [0, 1], f"round {round_}: {calls}"
            assert [sub["payload"].get("threads") for c in calls for sub in c["payload"]["jobs"]] == [1] * 3
            pids = {c["lane"]: real(kind="ping", payload={}, framework="onnx", step="ping", lane=c["lane"])[0]["pid"]
                    for c in calls}
            assert pids[0] != pids[1], "the two lanes ran in one worker"
            assert pool.started == 2, "a warm verify started new workers"
            calls.clear()
        run_planned(pool, [_planned(pool, tmp_path, _judged([]), name=f"c{n}") for n in range(3)],
                    lambda i, judge: None, lanes=1)
        assert len(calls) == 1 and "threads" not in calls[0]["payload"]["jobs"][0]["payload"], (
            "one lane: one job, on the runtimes' own thread counts")


def test_a_round_with_a_compute_bound_check_runs_in_one_worker_on_the_runtimes_own_threads(tmp_path: Path) -> None:
    """Two one-thread runs of a compute-bound model side by side take as long as one after the
    other on both cores: such a round is not split (lanes.COMPUTE_BOUND_MS)."""
    from portable_models.isolation.lanes import COMPUTE_BOUND_MS

    with WorkerPool(scratch=tmp_path / "s") as pool:
        calls, _ = _trace(pool)
        planned = [_planned(pool, tmp_path, _judged([]), name=f"c{n}", run_ms=COMPUTE_BOUND_MS / 2)
                   for n in range(3)]
        run_planned(pool, planned, lambda i, judge: None, lanes=2)
        assert sorted(int(c.get("lane", -1)) for c in calls) == [0, 1], "small checks: side by side"
        calls.clear()
        done: dict[int, Judge] = {}  # both lanes' workers idle now, and still one job
        planned = [_planned(pool, tmp_path, _judged([]), name=f"c{n}", run_ms=ms)
                   for n, ms in enumerate((1.0, COMPUTE_BOUND_MS, 2.0))]
        run_planned(pool, planned, done.__setitem__, lanes=2)
        assert sorted(done) == [0, 1, 2] and [done[i]()[0]["status"] for i in range(3)] == ["pass"] * 3
        assert len(calls) == 1 and pool.started == 2, "a compute-bound round was split over two workers"
        assert all("threads" not in sub["payload"] for sub in calls[0]["payload"]["jobs"])


def test_verify_tells_the_lanes_what_each_check_took_a_case_at_export(monkeypatch: pytest.MonkeyPatch) -> None:
    import portable_models as pm
    from portable_models.isolation import lanes

    seen: list[float] = []
    real = lanes.split

    def split(pool: Any, runs: Any, n: int) -> Any:
        seen.extend(job.run_ms for _, job, _, _ in runs)
        return real(pool, runs, n)

    monkeypatch.setattr("portable_models.compare.check.split", split)
    assert pm.verify(TINY).ok
    assert seen == [load_contract(TINY).artifacts[0].timings["run_ms_p50"]] and seen[0] > 0


def test_a_second_lane_is_not_waited_for_while_only_the_first_has_a_warm_worker(tmp_path: Path) -> None:
    with WorkerPool(scratch=tmp_path / "s") as pool:
        run_planned(pool, [_planned(pool, tmp_path, _judged([]))], lambda i, judge: None, lanes=2)
        assert pool.started == 1, "one check: one worker"
        calls, _ = _trace(pool)
        done: dict[int, Judge] = {}
        run_planned(pool, [_planned(pool, tmp_path, _judged([]), name=f"c{n}") for n in range(2)],
                    done.__setitem__, lanes=2)
        assert len(calls) == 1 and pool.started == 1, "a verify waited for a second worker to start"
        assert sorted(done) == [0, 1]


def test_a_jobs2_exports_one_thread_workers_serve_a_verify_side_by_side(tmp_path: Path) -> None:
    with WorkerPool(scratch=tmp_path / "s") as pool:
        for lane in (0, 1):  # what an export with jobs=2 leaves: a worker per lane, capped to one thread
            pool.call(kind="ping", payload={}, framework="onnx", step="ping", lane=lane, threads=1)
        assert pool.side_by_side("onnx", (0, 1)) == (True, 1)
        done: dict[int, Judge] = {}
        run_planned(pool, [_planned(pool, tmp_path, _judged([]), name=f"c{n}") for n in range(2)],
                    done.__setitem__, lanes=2)
        assert sorted(done) == [0, 1] and pool.started == 2, "the verify started workers of its own"
        pool.call(kind="ping", payload={}, framework="onnx", step="ping", lane=0)  # a worker without a cap
        assert pool.side_by_side("onnx", (0, 1)) == (True, 1), "lane 1 has only the capped worker"
        pool.call(kind="ping", payload={}, framework="onnx", step="ping", lane=1)
        assert pool.side_by_side("onnx", (0, 1)) == (True, None), "the view's own cap comes first"


def test_lanes_are_balanced_by_the_last_runs_seconds_else_by_the_contracts_timings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from portable_models.isolation import lanes

    class Free:
        def side_by_side(self, framework: str, lanes: Any) -> tuple[bool, int | None]:
            return True, None

    monkeypatch.setattr(lanes, "SECONDS", {})
    monkeypatch.setattr(lanes, "LANE", {})
    jobs = [_planned(None, Path("/nowhere"), _judged([]), name=f"c{n}", cost_hint=hint).job  # type: ignore[arg-type]
            for n, hint in enumerate((0.125, 0.5, 0.25, 0.375))]
    for n, job in enumerate(jobs):
        job.artifact = Path(f"/nowhere/model-{n}.onnx")
    runs: Any = [((n, None), job, "onnxruntime", None) for n, job in enumerate(jobs)]
    runs.insert(2, ((1, ("mil", None)), jobs[1], "onnxruntime", [0]))  # a second run of check 1
    free: Any = Free()

    def split(runs: Any) -> list[tuple[int | None, list[int]]]:
        return [(None if where is None else where[0], [key[0] for key, *_ in g])
                for where, g in lanes.split(free, runs, 2)]

    assert split(runs) == [(0, [0, 1, 1]), (1, [2, 3])], "costliest first, to the freer lane"
    lanes.SECONDS[lanes.seconds_key(jobs[0], "onnxruntime", None)] = 1.0  # timed: check 0 is the costly one
    assert split(runs) == [(0, [0, 1, 1]), (1, [2, 3])], "a check moved to the other worker (its runtime imported again)"
    assert split([r for r in runs if r[0][0] in (2, 3)]) == [(1, [2, 3])], "a check moved to the other worker"
    lanes.LANE.clear()
    assert split(runs) == [(0, [0]), (1, [1, 1, 2, 3])], "timed runs weigh what they took"
    del lanes.LANE[(str(jobs[3].artifact), "c3", "onnxruntime")]  # a new check: to the freer lane
    assert split(runs) == [(0, [0]), (1, [1, 1, 2, 3])]
    lanes.LANE.clear()
    lanes.SECONDS.clear()
    lanes.LANE[(str(jobs[1].artifact), "c1", "onnxruntime")] = 1  # known: on lane 1; the others beside it
    assert split(runs) == [(0, [2, 3]), (1, [0, 1, 1])]
    assert lanes.split(free, runs, 1) == [(None, runs)]
    jobs[2].run_ms = lanes.COMPUTE_BOUND_MS  # a compute-bound check: the round stays in one group
    assert lanes.split(free, runs, 2) == [(None, runs)]
    jobs[2].run_ms = 0.0
    assert lanes.split(free, runs[2:3], 2) == [((1, None), runs[2:3])], "one check: on its lane, alone"


@pytest.mark.parametrize("asks_again", [True, False])
def test_a_run_named_then_is_made_in_the_same_worker_job(tmp_path: Path, asks_again: bool) -> None:
    ran: list[Any] = []

    def plan() -> Generator[Ask, Any, Judge]:
        ran.append((yield Ask("onnxruntime", None, then=Ask("onnxruntime", [0]))))
        if asks_again:
            ran.append((yield Ask("onnxruntime", [0])))
        return lambda: ({"status": "pass"}, {})

    calls: list[str] = []
    done: dict[int, Judge] = {}
    with WorkerPool(scratch=tmp_path / "s") as pool:
        real = pool.call

        def counted(**kwargs: Any) -> Any:
            calls.append(kwargs["kind"])
            return real(**kwargs)

        pool.call = counted  # type: ignore[method-assign]
        run_planned(pool, [_planned(pool, tmp_path, plan())], done.__setitem__)
    assert calls == ["many"], "the run asked for next was not made in the first job"
    assert list(done) == [0] and done[0]() == ({"status": "pass"}, {})
    cases = len(golden.load_cases(TINY / load_contract(TINY).golden["inputs"]))
    assert [r.cases for r in ran] == ([None, [0]] if asks_again else [None])
    assert [len(golden.unpack_outputs(r.result, r.out)) for r in ran] == [cases, 1][:len(ran)]
    assert all(r.failure is None for r in ran)


def test_meanwhile_runs_once_in_the_callers_thread_after_the_job_is_sent(tmp_path: Path) -> None:
    events: list[str] = []

    def plan() -> Generator[Ask, Any, Judge]:
        yield Ask("onnxruntime", None)
        return lambda: ({"status": "pass"}, {})

    with WorkerPool(scratch=tmp_path / "s") as pool:
        real = pool.call

        def traced(**kwargs: Any) -> Any:
            events.append("call")
            return real(**kwargs)

        pool.call = traced  # type: ignore[method-assign]
        run_planned(pool, [_planned(pool, tmp_path, plan())], lambda i, judge: events.append("done"),
                    meanwhile=lambda: events.append("meanwhile"))
        assert events == ["call", "meanwhile", "done"]
        events.clear()
        run_planned(pool, [], lambda i, judge: events.append("done"), meanwhile=lambda: events.append("meanwhile"))
        assert events == ["meanwhile"], "nothing to run: the caller's work is still done"


def test_verify_hashes_each_artifact_in_its_worker_and_the_other_files_in_the_caller(tmp_path: Path) -> None:
    import shutil

    import portable_models as pm

    bundle = tmp_path / "b"
    shutil.copytree(TINY, bundle)
    (bundle / "logs" / "onnx.log").write_text("edited\n")
    report = pm.verify(bundle)
    assert report.problems == ["changed file: logs/onnx.log (sha256 differs from the contract)"]
    assert report.contract.artifacts[0].status == "pass"
    model = bundle / "artifacts" / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    report = pm.verify(bundle)
    assert report.problems == ["changed file: artifacts/model.onnx (sha256 differs from the contract)",
                               "changed file: logs/onnx.log (sha256 differs from the contract)"]
    art = report.contract.artifacts[0]
    assert art.status == "error" and art.parity["stage"] == "integrity", "a changed artifact is not loaded"
    assert art.parity["error"]["code"] == "integrity" and "artifacts/model.onnx" in art.parity["error"]["message"]
    model.unlink()
    report = pm.verify(bundle)
    assert "missing file: artifacts/model.onnx" in report.problems
    assert report.contract.artifacts[0].parity["stage"] == "integrity"


@pytest.mark.parametrize("changed", [False, True])
def test_a_many_job_hashes_an_artifacts_files_once_unless_they_failed(tmp_path: Path, changed: bool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # the worker's loop, in this process: Core ML's MIL-reference run right after its
    # structural check loads files the first run hashed; a failed hash is made again
    import shutil

    from portable_models.contract import bundle
    from portable_models.isolation import child as _worker

    root = tmp_path / "b"
    shutil.copytree(TINY, root)
    contract = load_contract(root)
    art = contract.artifacts[0]
    assert art.file and art.io
    if changed:
        (root / art.file).write_bytes((root / art.file).read_bytes() + b"\0")
    hashed: list[int] = []
    real = bundle.check_files

    def counted(files_root: Path, entries: list[dict[str, Any]]) -> list[str]:
        hashed.append(len(entries))
        return real(files_root, entries)

    monkeypatch.setattr(bundle, "check_files", counted)
    job = CheckJob(pool=None, artifact=root / art.file, io=art.io,  # type: ignore[arg-type]
                   golden_inputs=root / contract.golden["inputs"], golden_outputs=[],
                   policy=TolerancePolicy(), precision=art.precision, log=None, work_dir=tmp_path / "w",
                   files=(root, [e for e in contract.files if e["path"].startswith(art.file)]))
    subs = [{**job.sub_job("onnxruntime", None), "id": str(n)} for n in range(2)]
    (tmp_path / "w").mkdir()
    monkeypatch.chdir(tmp_path / "w")  # the worker's loop enters the runs' folder when not in it
    answers: list[dict[str, Any]] = []
    _worker._run_job({"id": "j", "kind": "many", "payload": {"jobs": subs}}, answers.append)
    assert [a["ok"] for a in answers] == [not changed] * 2
    assert hashed == [1, 1] if changed else hashed == [1], "hashed again in one job, or a failed hash trusted"
    if changed:
        assert {a["error"]["code"] for a in answers} == {"integrity"}


def test_a_verify_hands_its_empty_scratch_folder_to_the_next_and_removes_one_with_files(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from portable_models import verify_kept

    monkeypatch.setattr(verify_kept, "_FREE_SCRATCH", [])
    first = verify_kept.scratch_folder()
    verify_kept.scratch_done(first)
    assert verify_kept.scratch_folder() == first, "an empty folder was not kept for the next verify"
    (first / "outputs-onnxruntime.bin").write_bytes(b"x")  # a run's large outputs
    verify_kept.scratch_done(first)
    assert not first.exists() and verify_kept._FREE_SCRATCH == []
    second = verify_kept.scratch_folder()
    assert second != first and second.is_dir()
    verify_kept.scratch_done(second)
    second.rmdir()  # removed by someone else meanwhile: not handed out
    third = verify_kept.scratch_folder()
    assert third.is_dir() and third != second
    verify_kept.scratch_done(third)
    verify_kept.remove_free_scratch()  # at exit
    assert not third.exists()
