"""Isolated, offline, time- and memory-limited jobs in reusable worker processes.

Every conversion and every artifact run happens in a worker process, never in the
caller's: a converter that segfaults, hangs or eats memory fails its own target only.
Workers are reused per framework (torch and TensorFlow are imported once per worker,
not once per job) and replaced after a crash, a timeout or a memory kill. Each worker
is the leader of its own process group, so killing it kills its children too.

One pool serves the whole process (:func:`shared_pool`): an ``export`` followed by a
``verify`` or a ``bench`` in the same script reuses the warm workers instead of
importing torch, TensorFlow and coremltools again. Idle workers are stopped after
``PORTABLE_MODELS_WORKER_IDLE_S`` seconds (default 120), at interpreter exit, or by
:func:`shutdown_workers`.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portable_models.core.settings import worker_idle_s
from portable_models.errors import PortableModelsError, WorkerError, WorkerUnfit, error_from_dict
from portable_models.isolation.process import (
    Worker,
    WorkerLimits,
    environment_key,
    offline_env,
    worker_kind,
)
from portable_models.isolation.sandbox import Confinement

__all__ = ["WorkerLimits", "WorkerPool", "LimitedPool", "Pool", "JobFailed", "offline_env", "shared_pool",
           "shutdown_workers"]

#: a worker is replaced after this many jobs, so that state converters leave behind
#: (caches, registered ops, TensorFlow graphs) cannot grow without bound.
MAX_JOBS_PER_WORKER = 200


class JobFailed(Exception):
    """A job ended without a result: ``error`` is the typed error, ``seconds`` how long it ran."""

    def __init__(self, error: PortableModelsError, seconds: float) -> None:
        super().__init__(str(error))
        self.error = error
        self.seconds = seconds


@dataclass(frozen=True, kw_only=True)
class _Where:
    """Which worker a job runs on, and under which limits."""

    framework: str
    limits: WorkerLimits
    lane: int = 0
    threads: int | None = None
    timeout_s: float | None = None
    warming: bool = False
    #: a new worker, not an idle one.
    fresh: bool = False
    #: the sandbox the worker must be in (None: not confined).
    confine: Confinement | None = None


def _unfit(answer: Mapping[str, Any]) -> bool:
    """The worker said what an earlier job left in it keeps it from running this one."""
    return (answer.get("error") or {}).get("code") == WorkerUnfit.code


@dataclass(kw_only=True)
class WorkerPool:
    """Reusable workers keyed by framework. Thread-safe: each worker serves one job at a
    time; a job that finds no idle worker of its kind starts one (so ``jobs=2`` runs two).
    ``idle_s``: stop workers idle that long (None: keep them until :meth:`close`)."""

    scratch: Path
    limits: WorkerLimits = field(default_factory=WorkerLimits)
    idle_s: float | None = None
    #: remove ``scratch`` on close (the shared pool owns its folder).
    owns_scratch: bool = False
    _idle: list[Worker] = field(default_factory=list)
    _busy: list[Worker] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _count: int = 0
    _reaper: threading.Thread | None = None
    _warming: dict[tuple[str, int, int | None], threading.Event] = field(default_factory=dict)
    _closed: threading.Event = field(default_factory=threading.Event)
    started: int = 0

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def warm_in_background(self, framework: str, modules: list[str], limits: WorkerLimits,
                           lane: int = 0, threads: int | None = None, after: int | None = None,
                           clones: Sequence[int] = ()) -> None:
        """A worker of this kind and lane importing ``modules`` on a background thread;
        jobs for that worker wait for it instead of starting another. ``after``: start
        once lane ``after``'s warm-up (if one is under way) has ended. ``clones``: lanes
        whose workers are then forked from this one (:meth:`Worker.clone`), imports and all,
        instead of importing ``modules`` again; their jobs wait for that too."""
        kind = worker_kind(framework)
        with self._lock:
            if (kind, lane, threads) in self._warming or self.closed:
                return
            keys = [key for key in [(kind, k, threads) for k in (lane, *clones)] if key not in self._warming]
            events = [threading.Event() for _ in keys]
            self._warming.update(zip(keys, events, strict=True))
            before = None if after is None else self._warming.get((kind, after, threads))

        def warm() -> None:
            try:
                if before is not None:
                    before.wait(120.0)
                self.call(kind="warm", payload={"modules": modules}, framework=framework,
                          step="warm-up", limits=limits, lane=lane, threads=threads, _warming=True)
                for into in clones:  # before the lane's own jobs can take the warm worker
                    self._clone(kind, lane, into, threads, limits)
            except JobFailed:
                pass  # replaced when a job needs it
            finally:
                with self._lock:
                    for key in keys:
                        self._warming.pop(key, None)
                for done in events:
                    done.set()

        threading.Thread(target=warm, name="portable-models-warm", daemon=True).start()

    def _clone(self, kind: str, lane: int, into: int, threads: int | None, limits: WorkerLimits) -> None:
        """Fork lane ``lane``'s idle worker into an idle worker of lane ``into`` (nothing
        when there is none to fork or it fails: that lane's first job starts its own)."""
        with self._lock:
            source = next((w for w in self._idle if (w.framework, w.lane, w.threads) == (kind, lane, threads)
                           and w.env_key == environment_key() and w.confine is None), None)
            if source is None or self.closed:
                return
            self._idle.remove(source)
            self._busy.append(source)
            self._count += 1
            n = self._count
        try:
            twin = source.clone(self.scratch / f"worker-{n}", self.scratch / f"worker-{n}.log", into, limits)
        except WorkerError:
            return
        finally:
            self._release(source, source.alive())
        with self._lock:
            closed = self.closed
            if not closed:
                self._idle.append(twin)
                self.started += 1
        if closed:
            twin.kill()
        self._start_reaper()

    def _acquire(self, framework: str, limits: WorkerLimits, lane: int = 0,
                 threads: int | None = None, warming: bool = False, fresh: bool = False,
                 confine: Confinement | None = None) -> Worker:
        """An idle worker of this kind, or a new one (always a new one when ``fresh``). A
        worker confined for one bundle serves that bundle only; idle ones confined for another
        are stopped when a new confined one starts (each holds its runtimes' imports)."""
        framework = worker_kind(framework)
        if not warming:
            with self._lock:
                pending = self._warming.get((framework, lane, threads))
            if pending is not None:  # its worker is importing: wait rather than start another
                pending.wait(120.0)
        env_key = environment_key()
        with self._lock:
            if self.closed:
                raise WorkerError("the worker pool is shut down", stage="worker start")
            stale = [w for w in self._idle if w.env_key != env_key
                     or (confine is not None and w.confine not in (None, confine))]
            self._idle = [w for w in self._idle if w not in stale]
            found = None if fresh else next(
                (w for w in _of_kind(self._idle, framework, env_key, confine)
                 if (w.lane, w.threads) == (lane, threads)), None)
            if found is not None:
                self._idle.remove(found)
                self._busy.append(found)
            else:
                self._count += 1
                n = self._count
        _stop(stale)  # started under another environment (PYTHONPATH, extra routes …)
        if found is not None:
            return found
        wdir = self.scratch / f"worker-{n}"
        worker = Worker(framework, wdir, self.scratch / f"worker-{n}.log", lane, threads, confine)
        with self._lock:
            self._busy.append(worker)
            self.started += 1
        worker.read_line(120.0, limits, "worker start")
        self._start_reaper()
        return worker

    def _release(self, worker: Worker, healthy: bool) -> None:
        with self._lock:
            if worker in self._busy:
                self._busy.remove(worker)
            worker.jobs_done += 1
            keep = healthy and worker.alive() and not self.closed and worker.jobs_done < MAX_JOBS_PER_WORKER
            if keep:
                worker.idle_since = time.monotonic()
                self._idle.append(worker)
        if not keep:
            worker.kill()

    def call(self, *, kind: str, payload: Mapping[str, Any], framework: str, step: str,
             log: Path | None = None, work_dir: Path | None = None,
             timeout_s: float | None = None, limits: WorkerLimits | None = None,
             lane: int = 0, threads: int | None = None,
             on_partial: Callable[[dict[str, Any]], None] | None = None,
             on_sent: Callable[[], None] | None = None,
             confine: Confinement | None = None,
             _warming: bool = False) -> tuple[dict[str, Any], float]:
        """Run one job; return ``(result, seconds)`` or raise :class:`JobFailed`.
        ``limits`` overrides the pool's for this job (memory cap, default timeout).
        ``lane``: jobs of one lane share their workers, so that conversions running side
        by side (``jobs=2``) keep their own warm workers; ``threads`` caps the worker's
        numeric thread pools. A job of kind ``many`` answers each of its jobs as it ends,
        to ``on_partial``; the timeout then applies to each of them. A job the worker says
        it is unfit for (:class:`WorkerUnfit`) runs once more in a fresh worker, and the unfit
        one is stopped. ``on_sent``: called in this thread once the worker has the job, before
        waiting for its answer (the caller's own work, overlapped with the worker's; what it
        raises abandons the job, and the worker is stopped)."""
        job = {"kind": kind, "payload": dict(payload), "step": step, "log": str(log) if log else None,
               "work_dir": str(work_dir) if work_dir else None}
        where = _Where(framework=framework, limits=limits or self.limits, lane=lane, threads=threads,
                       timeout_s=timeout_s, warming=_warming, confine=confine)
        answer, seconds = self._answer(job, where, on_partial, on_sent)
        if _unfit(answer):  # what an earlier job left in that worker: once more, in a new one
            answer, seconds = self._answer(job, dataclasses.replace(where, fresh=True), on_partial)
        if not answer.get("ok"):
            raise JobFailed(error_from_dict(answer.get("error") or {}), seconds)
        return dict(answer.get("result") or {}), seconds

    def _answer(self, job: dict[str, Any], where: _Where,
                on_partial: Callable[[dict[str, Any]], None] | None,
                on_sent: Callable[[], None] | None = None) -> tuple[dict[str, Any], float]:
        """Run ``job`` on one worker: its final answer and seconds (JobFailed: the worker died,
        timed out or hit the memory limit)."""
        limits, step = where.limits, str(job["step"])
        start = time.monotonic()
        try:
            worker = self._acquire(where.framework, limits, where.lane, where.threads, where.warming, where.fresh,
                                   where.confine)
        except WorkerError as exc:
            raise JobFailed(exc, time.monotonic() - start) from exc
        healthy = False
        try:
            worker.send({"id": f"{os.getpid()}-{time.monotonic_ns()}", **job})
            if on_sent is not None:
                on_sent()
            answer = worker.read_line(where.timeout_s or limits.timeout_s, limits, step)
            while "partial" in answer:
                if on_partial is not None:
                    on_partial(dict(answer["partial"]))
                answer = worker.read_line(where.timeout_s or limits.timeout_s, limits, step)
            healthy = not _unfit(answer)
        except WorkerError as exc:
            raise JobFailed(exc, time.monotonic() - start) from exc
        finally:
            self._release(worker, healthy)
        return answer, float(answer.get("seconds", time.monotonic() - start))

    def side_by_side(self, framework: str, lanes: Sequence[int], threads: int | None = None,
                     confine: Confinement | None = None) -> tuple[bool, int | None]:
        """Whether jobs of ``framework`` on ``lanes`` can all start now without one of them
        waiting for a worker to import its libraries while the others run, and the thread cap
        of the workers to run them on: every lane has an idle worker with cap ``threads``, or
        with one cap (a ``jobs=2`` export's lanes, capped to one thread each), or the pool has
        no worker of the kind at all (they all start now, with cap ``threads``, and import
        side by side)."""
        kind = worker_kind(framework)
        env_key = environment_key()
        with self._lock:
            if self.closed:
                return False, threads
            if not _of_kind(self._idle + self._busy, kind, env_key, confine):
                return confine is not None or not any(key[0] == kind for key in self._warming), threads
            idle = {(w.lane, w.threads) for w in _of_kind(self._idle, kind, env_key, confine)}
        caps = [threads, *sorted({cap for _, cap in idle if cap != threads}, key=lambda cap: cap or 0)]
        for cap in caps:
            if all((lane, cap) in idle for lane in lanes):
                return True, cap
        return False, threads

    def with_limits(self, limits: WorkerLimits) -> LimitedPool:
        """This pool, with ``limits`` applied to every call made through the view."""
        return LimitedPool(self, limits)

    def idle_workers(self) -> int:
        with self._lock:
            return len(self._idle)

    def reap(self, now: float | None = None) -> int:
        """Stop workers idle longer than ``idle_s``; returns how many were stopped."""
        if self.idle_s is None:
            return 0
        now = time.monotonic() if now is None else now
        with self._lock:
            old = [w for w in self._idle if now - w.idle_since >= self.idle_s]
            self._idle = [w for w in self._idle if w not in old]
        _stop(old)
        return len(old)

    def _start_reaper(self) -> None:
        if self.idle_s is None or self._reaper is not None:
            return
        interval = max(0.5, min(10.0, self.idle_s / 4))

        def loop() -> None:
            while not self._closed.wait(interval):
                self.reap()

        with self._lock:
            if self._reaper is None:
                self._reaper = threading.Thread(target=loop, name="portable-models-reaper", daemon=True)
                self._reaper.start()

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            workers = self._idle + self._busy
            self._idle, self._busy = [], []
        _stop(workers)
        if self.owns_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _stop(workers: list[Worker]) -> None:
    """Kill ``workers``, clones before the workers they were forked from (which reap them)."""
    for w in sorted(workers, key=lambda w: not w.cloned):
        w.kill()


@dataclass(frozen=True)
class LimitedPool:
    """A view of a pool that applies its own limits (and lane, and thread cap) to every
    call: export and verify share one pool, each with the limits it was given."""

    pool: WorkerPool
    limits: WorkerLimits
    lane: int = 0
    threads: int | None = None
    #: the sandbox every call's worker is in (None: not confined)
    confine: Confinement | None = None

    def call(self, **kwargs: Any) -> tuple[dict[str, Any], float]:
        kwargs.setdefault("limits", self.limits)
        kwargs.setdefault("lane", self.lane)
        kwargs.setdefault("threads", self.threads)
        kwargs.setdefault("confine", self.confine)
        return self.pool.call(**kwargs)

    def side_by_side(self, framework: str, lanes: Sequence[int]) -> tuple[bool, int | None]:
        """:meth:`WorkerPool.side_by_side`, with this view's thread cap and sandbox."""
        return self.pool.side_by_side(framework, lanes, self.threads, self.confine)

    def confined(self, confine: Confinement | None) -> LimitedPool:
        """The same pool and limits, every call in a worker confined by ``confine``."""
        return dataclasses.replace(self, confine=confine)

    def prewarm(self, framework: str, modules: list[str], lanes: int | Sequence[int] = 1,
                threads: int | None = None, one_by_one: bool = False, clones: Sequence[int] = ()) -> None:
        """Start a worker per lane (``lanes``: how many, from lane 0, or which) importing
        ``modules`` in the background, while the caller captures the model. Nothing waits for
        it unless a job needs that lane's worker (a fully cached export never does).
        ``one_by_one``: each lane's worker starts importing when the previous lane's is done
        (two processes importing torch at once each take about twice as long). ``clones``:
        lanes whose workers are forked from the first lane's once it is warm (Linux)."""
        for n, lane in enumerate(range(lanes) if isinstance(lanes, int) else lanes):
            view = self.lane_view(lane, threads)
            self.pool.warm_in_background(framework, modules, view.limits, view.lane, view.threads,
                                         after=lane - 1 if one_by_one and lane > 0 else None,
                                         clones=() if n else clones)

    def lane_view(self, lane: int, threads: int | None) -> LimitedPool:
        """The same pool and limits, on its own lane of workers."""
        return dataclasses.replace(self, lane=lane, threads=threads)


def _of_kind(workers: Sequence[Worker], kind: str, env_key: int,
             confine: Confinement | None = None) -> list[Worker]:
    """The workers of this kind started under this environment (:func:`environment_key`)
    and in this sandbox."""
    return [w for w in workers if w.framework == kind and w.env_key == env_key and w.confine == confine]


#: what the pipeline calls jobs through: a pool, or a pool seen with its own limits.
Pool = WorkerPool | LimitedPool

_SHARED: WorkerPool | None = None
_SHARED_LOCK = threading.Lock()


def _idle_seconds() -> float:
    return worker_idle_s()


def shared_pool(limits: WorkerLimits | None = None) -> LimitedPool:
    """The process-wide pool (started on first use), seen with ``limits``."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None or _SHARED.closed:
            scratch = Path(tempfile.mkdtemp(prefix="portable-models-workers-"))
            _SHARED = WorkerPool(scratch=scratch, idle_s=_idle_seconds(), owns_scratch=True)
        return _SHARED.with_limits(limits or WorkerLimits())


def shutdown_workers() -> None:
    """Stop the shared pool's workers now (they are started again when needed)."""
    global _SHARED
    with _SHARED_LOCK:
        pool, _SHARED = _SHARED, None
    if pool is not None:
        pool.close()


atexit.register(shutdown_workers)  # a no-op when no shared pool was started
