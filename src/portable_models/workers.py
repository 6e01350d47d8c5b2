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
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portable_models.errors import (
    PortableModelsError,
    WorkerCrashed,
    WorkerError,
    WorkerOutOfMemory,
    WorkerTimeout,
    WorkerUnfit,
    error_from_dict,
)

__all__ = ["WorkerLimits", "WorkerPool", "LimitedPool", "Pool", "JobFailed", "offline_env", "shared_pool",
           "shutdown_workers"]

#: seconds an idle worker of the shared pool lives on (it holds torch, TensorFlow …).
IDLE_ENV = "PORTABLE_MODELS_WORKER_IDLE_S"
DEFAULT_IDLE_S = 120.0
#: a worker is replaced after this many jobs, so that state converters leave behind
#: (caches, registered ops, TensorFlow graphs) cannot grow without bound.
MAX_JOBS_PER_WORKER = 200

#: environment that keeps well-behaved libraries from reaching the network at all.
_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "KAGGLE_OFFLINE": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "TQDM_DISABLE": "1",
    "NO_COLOR": "1",
}


@dataclass(frozen=True, kw_only=True)
class WorkerLimits:
    """Per-job limits. ``memory_mb`` caps the resident memory of a worker's whole
    process group (None: no cap)."""

    timeout_s: float = 600.0
    memory_mb: int | None = 8192


class JobFailed(Exception):
    """A job ended without a result: ``error`` is the typed error, ``seconds`` how long it ran."""

    def __init__(self, error: PortableModelsError, seconds: float) -> None:
        super().__init__(str(error))
        self.error = error
        self.seconds = seconds


#: per-kind additions to the worker's environment. Keras's backend is fixed per process,
#: so a Keras model reloaded as a torch.nn.Module needs a worker of its own; every other
#: job shares the main worker, which imports torch, TensorFlow or coremltools once.
FRAMEWORK_ENV = {
    "keras-torch": {"KERAS_BACKEND": "torch"},
    "main": {"KERAS_BACKEND": "tensorflow"},
}


def worker_kind(framework: str) -> str:
    """Which worker a job of ``framework`` runs in."""
    return "keras-torch" if framework == "keras-torch" else "main"


#: thread-pool sizes of the numeric libraries the converters use (torch, TensorFlow, BLAS).
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def offline_env(scratch: Path, framework: str = "none", threads: int | None = None) -> dict[str, str]:
    """The worker's environment: the caller's, offline, with HOME and TMPDIR in scratch.
    ``threads``: cap the numeric libraries' thread pools (workers running side by side)."""
    env = dict(os.environ)
    env.update(_OFFLINE_ENV)
    env.update(FRAMEWORK_ENV.get(framework, {}))
    if threads:
        env.update(dict.fromkeys(_THREAD_ENV, str(threads)))
    home = scratch / "home"
    tmp = scratch / "tmp"
    home.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    env.update({"HOME": str(home), "TMPDIR": str(tmp), "XDG_CACHE_HOME": str(home / ".cache"),
                "KERAS_HOME": str(home / ".keras")})
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


#: variables only the caller reads: changing them does not make a worker stale.
_CALLER_ONLY_ENV = frozenset({"PORTABLE_MODELS_CAPTURE", "PORTABLE_MODELS_CACHE", IDLE_ENV})


def _environment_key() -> int:
    """Workers see the caller's environment as it was when they started; one started
    under another environment is not reused."""
    return hash(frozenset((k, v) for k, v in os.environ.items() if k not in _CALLER_ONLY_ENV))


def _group_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants, in MiB (Linux /proc; 0 elsewhere)."""
    proc = Path("/proc")
    if not proc.exists():
        return 0.0
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            ppid, pages = int(stat[1]), int(stat[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
        rss[int(entry.name)] = pages
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Worker:
    """One worker process and the pipe it answers on."""

    def __init__(self, framework: str, scratch: Path, log: Path, lane: int = 0,
                 threads: int | None = None) -> None:
        self.framework = framework
        self.lane = lane
        self.threads = threads
        #: the caller's environment the worker was started with (see :func:`_environment_key`).
        self.env_key = _environment_key()
        self.jobs_done = 0
        self.idle_since = time.monotonic()
        read_fd, write_fd = os.pipe()
        scratch.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "portable_models._worker", str(write_fd)],
                stdin=subprocess.PIPE, stdout=log_file, stderr=log_file,
                pass_fds=(write_fd,), start_new_session=True, cwd=scratch,
                env=offline_env(scratch, framework, threads),
            )
        os.close(write_fd)
        self._fd = read_fd
        self._buffer = b""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, job: Mapping[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()

    def read_line(self, timeout_s: float, limits: WorkerLimits, what: str) -> dict[str, Any]:
        """Wait for one answer line, policing time and memory."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            now = time.monotonic()
            if now > deadline:
                self.kill()
                raise WorkerTimeout(f"timeout after {timeout_s:g} s", stage=what,
                                    fix="raise the limit with --timeout / timeout= if the model is large")
            ready, _, _ = select.select([self._fd], [], [], min(0.5, deadline - now))
            if ready:
                chunk = os.read(self._fd, 1 << 16)
                if chunk:
                    self._buffer += chunk
                    continue
            if not self.alive() or (ready and not chunk):
                self._raise_dead(what)
            if limits.memory_mb and _group_rss_mb(self.proc.pid) > limits.memory_mb:
                self.kill()
                raise WorkerOutOfMemory(f"killed: memory limit {limits.memory_mb} MiB", stage=what,
                                        fix="raise the limit with --memory-limit / memory_mb=")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return dict(json.loads(line))

    def _raise_dead(self, what: str) -> None:
        code = self.proc.wait()
        self.kill()
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            raise WorkerCrashed(f"crashed ({name})", stage=what)
        raise WorkerCrashed(f"worker exited with code {code}", stage=what)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._fd = -1


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
    _idle: list[_Worker] = field(default_factory=list)
    _busy: list[_Worker] = field(default_factory=list)
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
                           lane: int = 0, threads: int | None = None, after: int | None = None) -> None:
        """A worker of this kind and lane importing ``modules`` on a background thread;
        jobs for that worker wait for it instead of starting another. ``after``: start
        once lane ``after``'s warm-up (if one is under way) has ended."""
        key = (worker_kind(framework), lane, threads)
        with self._lock:
            if key in self._warming or self.closed:
                return
            done = self._warming[key] = threading.Event()
            before = None if after is None else self._warming.get((key[0], after, threads))

        def warm() -> None:
            try:
                if before is not None:
                    before.wait(120.0)
                self.call(kind="warm", payload={"modules": modules}, framework=framework,
                          step="warm-up", limits=limits, lane=lane, threads=threads, _warming=True)
            except JobFailed:
                pass  # replaced when a job needs it
            finally:
                with self._lock:
                    self._warming.pop(key, None)
                done.set()

        threading.Thread(target=warm, name="portable-models-warm", daemon=True).start()

    def _acquire(self, framework: str, limits: WorkerLimits, lane: int = 0,
                 threads: int | None = None, warming: bool = False, fresh: bool = False) -> _Worker:
        """An idle worker of this kind, or a new one (always a new one when ``fresh``)."""
        framework = worker_kind(framework)
        if not warming:
            with self._lock:
                pending = self._warming.get((framework, lane, threads))
            if pending is not None:  # its worker is importing: wait rather than start another
                pending.wait(120.0)
        env_key = _environment_key()
        with self._lock:
            if self.closed:
                raise WorkerError("the worker pool is shut down", stage="worker start")
            stale = [w for w in self._idle if w.env_key != env_key]
            self._idle = [w for w in self._idle if w.env_key == env_key]
            found = None if fresh else next(
                (w for w in self._idle if (w.framework, w.lane, w.threads) == (framework, lane, threads)), None)
            if found is not None:
                self._idle.remove(found)
                self._busy.append(found)
            else:
                self._count += 1
                n = self._count
        for w in stale:  # started under another environment (PYTHONPATH, extra routes …)
            w.kill()
        if found is not None:
            return found
        wdir = self.scratch / f"worker-{n}"
        worker = _Worker(framework, wdir, self.scratch / f"worker-{n}.log", lane, threads)
        with self._lock:
            self._busy.append(worker)
            self.started += 1
        worker.read_line(120.0, limits, "worker start")
        self._start_reaper()
        return worker

    def _release(self, worker: _Worker, healthy: bool) -> None:
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
             _warming: bool = False, _fresh: bool = False) -> tuple[dict[str, Any], float]:
        """Run one job; return ``(result, seconds)`` or raise :class:`JobFailed`.
        ``limits`` overrides the pool's for this job (memory cap, default timeout).
        ``lane``: jobs of one lane share their workers, so that conversions running side
        by side (``jobs=2``) keep their own warm workers; ``threads`` caps the worker's
        numeric thread pools. A job of kind ``many`` answers each of its jobs as it ends,
        to ``on_partial``; the timeout then applies to each of them. A job the worker says
        it is unfit for (:class:`WorkerUnfit`) runs once more in a fresh worker, and the unfit
        one is stopped."""
        limits = limits or self.limits
        start = time.monotonic()
        try:
            worker = self._acquire(framework, limits, lane, threads, _warming, _fresh)
        except WorkerError as exc:
            raise JobFailed(exc, time.monotonic() - start) from exc
        healthy = False
        try:
            job_id = f"{os.getpid()}-{time.monotonic_ns()}"
            worker.send({"id": job_id, "kind": kind, "payload": dict(payload), "step": step,
                         "log": str(log) if log else None,
                         "work_dir": str(work_dir) if work_dir else None})
            answer = worker.read_line(timeout_s or limits.timeout_s, limits, step)
            while "partial" in answer:
                if on_partial is not None:
                    on_partial(dict(answer["partial"]))
                answer = worker.read_line(timeout_s or limits.timeout_s, limits, step)
            healthy = (answer.get("error") or {}).get("code") != WorkerUnfit.code
        except WorkerError as exc:
            raise JobFailed(exc, time.monotonic() - start) from exc
        finally:
            self._release(worker, healthy)
        seconds = float(answer.get("seconds", time.monotonic() - start))
        if not answer.get("ok"):
            if not healthy and not _fresh:
                return self.call(kind=kind, payload=payload, framework=framework, step=step, log=log,
                                 work_dir=work_dir, timeout_s=timeout_s, limits=limits, lane=lane,
                                 threads=threads, on_partial=on_partial, _fresh=True)
            raise JobFailed(error_from_dict(answer.get("error") or {}), seconds)
        return dict(answer.get("result") or {}), seconds

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
        for w in old:
            w.kill()
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
        for w in workers:
            w.kill()
        if self.owns_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


@dataclass(frozen=True)
class LimitedPool:
    """A view of a pool that applies its own limits (and lane, and thread cap) to every
    call: export and verify share one pool, each with the limits it was given."""

    pool: WorkerPool
    limits: WorkerLimits
    lane: int = 0
    threads: int | None = None

    def call(self, **kwargs: Any) -> tuple[dict[str, Any], float]:
        kwargs.setdefault("limits", self.limits)
        kwargs.setdefault("lane", self.lane)
        kwargs.setdefault("threads", self.threads)
        return self.pool.call(**kwargs)

    def prewarm(self, framework: str, modules: list[str], lanes: int | Sequence[int] = 1,
                threads: int | None = None, one_by_one: bool = False) -> None:
        """Start a worker per lane (``lanes``: how many, from lane 0, or which) importing
        ``modules`` in the background, while the caller captures the model. Nothing waits for
        it unless a job needs that lane's worker (a fully cached export never does).
        ``one_by_one``: each lane's worker starts importing when the previous lane's is done
        (two processes importing torch at once each take about twice as long)."""
        for lane in range(lanes) if isinstance(lanes, int) else lanes:
            view = self.lane_view(lane, threads)
            self.pool.warm_in_background(framework, modules, view.limits, view.lane, view.threads,
                                         after=lane - 1 if one_by_one and lane > 0 else None)

    def lane_view(self, lane: int, threads: int | None) -> LimitedPool:
        """The same pool and limits, on its own lane of workers."""
        return dataclasses.replace(self, lane=lane, threads=threads)


#: what the pipeline calls jobs through: a pool, or a pool seen with its own limits.
Pool = WorkerPool | LimitedPool

_SHARED: WorkerPool | None = None
_SHARED_LOCK = threading.Lock()


def _idle_seconds() -> float:
    raw = os.environ.get(IDLE_ENV, "").strip()
    if not raw:
        return DEFAULT_IDLE_S
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_IDLE_S
    return max(value, 0.0)


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
