"""Running a round of checks in worker jobs: the runs of one kind of worker in one job, or
spread over two workers (lanes 0 and 1 of the pool) that run side by side, one thread each.
:func:`portable_models.compare.check.run_planned` drives the checks; this module only places and
runs their runs and hands each one's result back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from portable_models.errors import PortableModelsError, error_from_dict
from portable_models.isolation.pool import JobFailed, Pool
from portable_models.run.registry import runtime_info

__all__ = ["Lane", "Runs", "RunJob", "run_many", "side_by_side", "split"]


class RunJob(Protocol):
    """One artifact's check, as far as running it goes (:class:`portable_models.compare.check._RunJob`)."""

    artifact: Path
    name: str
    #: seconds the check's runs are expected to take (how :func:`split` balances lanes)
    cost_hint: float
    #: milliseconds one case's run took at export (0: not known)
    run_ms: float

    def sub_job(self, runtime: str, cases: Sequence[int] | None, threads: int | None = None) -> dict[str, Any]: ...

    def ran(self, runtime: str, cases: Sequence[int] | None, result: dict[str, Any]) -> Any: ...

    def failed(self, runtime: str, cases: Sequence[int] | None, error: PortableModelsError) -> Any: ...


#: runs for :func:`run_many`: (key, job, runtime, cases).
Runs = list[tuple[Any, "RunJob", str, Sequence[int] | None]]
#: where runs go: (the pool's lane, the thread cap of its workers), or None: the pool view's.
Lane = tuple[int, int | None] | None

#: seconds the worker took for a run, by (artifact, runtime, cases): how :func:`split`
#: weighs a check already timed (the contract's timings before that).
SECONDS: dict[tuple[str, str, tuple[int, ...] | None], float] = {}
SECONDS_MAX = 4096
#: the lane each check went to, by (artifact, check name, first runtime): where :func:`split`
#: keeps it.
LANE: dict[tuple[str, str, str], int] = {}
#: a check whose one case took this long or more at export (ms) is compute-bound: its runtime
#: spreads a run over both cores, and two such runs side by side, one thread each, take as
#: long as one after the other on two (measured: a CNN of ~2 G multiply-adds a run, onnx and
#: torchscript at 24 and 47 ms a case, verified in 1.15-1.18x its runtimes' time side by side
#: against 1.07-1.08x in one worker). A round with one runs in one worker on the runtimes' own
#: thread counts. The demo's checks take 0.5-5 ms a case: their time is the runtimes' fixed
#: costs and Core ML's single-threaded reference, which gain from running side by side.
COMPUTE_BOUND_MS = 10.0


def seconds_key(job: RunJob, runtime: str, cases: Sequence[int] | None) -> tuple[str, str, tuple[int, ...] | None]:
    return str(job.artifact), runtime, None if cases is None else tuple(cases)


def split(pool: Pool, runs: Runs, lanes: int) -> list[tuple[Lane, Runs]]:
    """``runs`` (one kind of worker) as one group on the pool view's lane and workers (None),
    or spread over lanes 0 and 1 (two groups that run side by side, or one on its lane): when
    ``lanes`` > 1, no check is compute-bound (:data:`COMPUTE_BOUND_MS`), and both lanes'
    workers are idle (or none of the kind has started yet: they start now, importing side by
    side; see :meth:`WorkerPool.side_by_side`, which also says which workers: a lane is
    (lane, thread cap of its workers)). Every run of a check stays in one group (Core ML's
    MIL-reference run needs no second hash of the package). A check stays on the lane it ran
    on before (moving it would import its runtime into the other worker: seconds); a new one
    goes, costliest first, to the lane with less to do, by the worker's seconds for the same
    runs last time, else by the contract's timings. Each group keeps the runs' order."""
    checks = sorted({key[0] for key, *_ in runs})
    framework = runtime_info(runs[0][2]).framework
    if lanes < 2 or any(job.run_ms >= COMPUTE_BOUND_MS for _, job, _, _ in runs):
        return [(None, runs)]
    ready, cap = pool.side_by_side(framework, (0, 1))
    if not ready:
        return [(None, runs)]
    timed: dict[int, list[float | None]] = {i: [] for i in checks}
    hint: dict[int, float] = {}
    first: dict[int, tuple[str, str, str]] = {}
    for (i, _), job, runtime, cases in runs:
        timed[i].append(SECONDS.get(seconds_key(job, runtime, cases)))
        hint[i] = job.cost_hint
        first.setdefault(i, (str(job.artifact), job.name, runtime))
    cost = {i: hint[i] if None in timed[i] else sum(t for t in timed[i] if t is not None) for i in checks}
    lane_of = {i: LANE[first[i]] for i in checks if first[i] in LANE}
    load = [(0.0, 0), (0.0, 0)]  # (seconds, checks): nothing known spreads them by count
    for i, lane in lane_of.items():
        load[lane] = (load[lane][0] + cost[i], load[lane][1] + 1)
    for i in sorted((i for i in checks if i not in lane_of), key=lambda i: (-cost[i], i)):
        lane = 0 if load[0] <= load[1] else 1
        lane_of[i] = lane
        load[lane] = (load[lane][0] + cost[i], load[lane][1] + 1)
    if len(LANE) >= SECONDS_MAX:
        LANE.clear()
    LANE.update((first[i], lane_of[i]) for i in checks)
    groups = [((lane, cap), [r for r in runs if lane_of[r[0][0]] == lane]) for lane in (0, 1)]
    return [(where, g) for where, g in groups if g]


def side_by_side(pool: Pool, groups: list[tuple[Lane, Runs]], got: Callable[[Any, Any], None],
                  timeout_s: float | None, on_sent: Callable[[], None] | None) -> None:
    """Each group on its lane at once (the first in this thread, the others on threads of
    their own), every run on one thread of its runtime: two runtimes that each took both
    cores would only slow each other down. The other lanes' threads are daemons, and not
    waited for when this thread's lane raised (Ctrl-C): they end when their workers are
    stopped, at the latest when the process exits."""
    failed: list[BaseException] = []

    def lane(lane: Lane, runs: Runs) -> None:
        try:
            run_many(pool, runs, got, timeout_s, lane=lane, threads=1)
        except BaseException as exc:  # raised in the caller's thread, below
            failed.append(exc)

    others = [threading.Thread(target=lane, args=group, name="portable-models-lane", daemon=True)
              for group in groups[1:]]
    for other in others:
        other.start()
    run_many(pool, groups[0][1], got, timeout_s, on_sent, lane=groups[0][0], threads=1)
    for other in others:
        other.join()
    if failed:
        raise failed[0]


def run_many(pool: Pool, runs: Runs, got: Callable[[Any, Any], None], timeout_s: float | None,
              on_sent: Callable[[], None] | None = None, lane: Lane = None,
              threads: int | None = None) -> None:
    """``runs`` in one worker job (and a new one after a run that took its worker down);
    ``got(key, ran)`` as each one ends. ``lane``: which workers (:data:`Lane`);
    ``threads``: the runtimes' thread count for these runs (None: their own)."""
    while runs:
        runs = runs[run_batch(pool, runs, got, timeout_s, on_sent, lane, threads):]


def run_batch(pool: Pool, batch: Runs, got: Callable[[Any, Any], None], timeout_s: float | None,
               on_sent: Callable[[], None] | None = None, lane: Lane = None,
               threads: int | None = None) -> int:
    """Run ``batch`` in one worker job; how many of its runs are settled (all of them, or
    those up to the one that took its worker down, which fails alone)."""
    answered = 0

    def partial(item: dict[str, Any]) -> None:
        nonlocal answered
        n = int(item["index"])
        key, job, runtime, cases = batch[n]
        answered = n + 1
        if len(SECONDS) >= SECONDS_MAX:
            SECONDS.clear()
        SECONDS[seconds_key(job, runtime, cases)] = float(item.get("seconds") or 0.0)
        if item.get("ok"):
            got(key, job.ran(runtime, cases, dict(item.get("result") or {})))
        else:
            got(key, job.failed(runtime, cases, error_from_dict(item.get("error") or {})))

    where: dict[str, Any] = {} if lane is None else {"lane": lane[0], "threads": lane[1]}
    try:
        pool.call(kind="many", payload={"jobs": [job.sub_job(rt, c, threads) for _, job, rt, c in batch]},
                  framework=runtime_info(batch[0][2]).framework,
                  step=f"run:{'+'.join(rt for _, _, rt, _ in batch)}", timeout_s=timeout_s, on_partial=partial,
                  on_sent=on_sent, **where)
    except JobFailed as failed:  # the run in flight (crash, timeout, memory) fails alone
        if answered == len(batch):
            return answered
        key, job, runtime, cases = batch[answered]
        failed.error.stage = f"run:{runtime}"
        got(key, job.failed(runtime, cases, failed.error))
        return answered + 1
    assert answered == len(batch), "a finished 'many' job answers every run"
    return answered
