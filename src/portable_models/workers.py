"""Isolated, offline, time- and memory-limited jobs in reusable worker processes.

Every conversion and every artifact run happens in a worker process, never in the
caller's: a converter that segfaults, hangs or eats memory fails its own target only.
Workers are reused per framework (torch and TensorFlow are imported once per worker,
not once per job) and replaced after a crash, a timeout or a memory kill. Each worker
is the leader of its own process group, so killing it kills its children too.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portable_models.errors import (
    PortableModelsError,
    WorkerCrashed,
    WorkerError,
    WorkerOutOfMemory,
    WorkerTimeout,
    error_from_dict,
)

__all__ = ["WorkerLimits", "WorkerPool", "JobFailed", "offline_env"]

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


def offline_env(scratch: Path, framework: str = "none") -> dict[str, str]:
    """The worker's environment: the caller's, offline, with HOME and TMPDIR in scratch."""
    env = dict(os.environ)
    env.update(_OFFLINE_ENV)
    env.update(FRAMEWORK_ENV.get(framework, {}))
    home = scratch / "home"
    tmp = scratch / "tmp"
    home.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    env.update({"HOME": str(home), "TMPDIR": str(tmp), "XDG_CACHE_HOME": str(home / ".cache"),
                "KERAS_HOME": str(home / ".keras")})
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


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

    def __init__(self, framework: str, scratch: Path, log: Path) -> None:
        self.framework = framework
        self.jobs_done = 0
        read_fd, write_fd = os.pipe()
        scratch.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "portable_models._worker", str(write_fd)],
                stdin=subprocess.PIPE, stdout=log_file, stderr=log_file,
                pass_fds=(write_fd,), start_new_session=True, cwd=scratch,
                env=offline_env(scratch, framework),
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
    """Reusable workers keyed by framework. Thread-safe: each worker serves one job at a time."""

    scratch: Path
    limits: WorkerLimits = field(default_factory=WorkerLimits)
    _idle: list[_Worker] = field(default_factory=list)
    _busy: list[_Worker] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _count: int = 0
    started: int = 0

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _acquire(self, framework: str) -> _Worker:
        framework = worker_kind(framework)
        with self._lock:
            for w in self._idle:
                if w.framework == framework:
                    self._idle.remove(w)
                    self._busy.append(w)
                    return w
            self._count += 1
            n = self._count
        wdir = self.scratch / f"worker-{n}"
        worker = _Worker(framework, wdir, self.scratch / f"worker-{n}.log")
        with self._lock:
            self._busy.append(worker)
            self.started += 1
        worker.read_line(120.0, self.limits, "worker start")
        return worker

    def _release(self, worker: _Worker, healthy: bool) -> None:
        with self._lock:
            if worker in self._busy:
                self._busy.remove(worker)
            if healthy and worker.alive():
                self._idle.append(worker)
            else:
                worker.kill()

    def call(self, *, kind: str, payload: Mapping[str, Any], framework: str, step: str,
             log: Path | None = None, work_dir: Path | None = None,
             timeout_s: float | None = None) -> tuple[dict[str, Any], float]:
        """Run one job; return ``(result, seconds)`` or raise :class:`JobFailed`."""
        start = time.monotonic()
        worker = self._acquire(framework)
        healthy = False
        try:
            job_id = f"{os.getpid()}-{time.monotonic_ns()}"
            worker.send({"id": job_id, "kind": kind, "payload": dict(payload), "step": step,
                         "log": str(log) if log else None,
                         "work_dir": str(work_dir) if work_dir else None})
            answer = worker.read_line(timeout_s or self.limits.timeout_s, self.limits, step)
            healthy = True
        except WorkerError as exc:
            raise JobFailed(exc, time.monotonic() - start) from exc
        finally:
            self._release(worker, healthy)
        seconds = float(answer.get("seconds", time.monotonic() - start))
        if not answer.get("ok"):
            raise JobFailed(error_from_dict(answer.get("error") or {}), seconds)
        return dict(answer.get("result") or {}), seconds

    def close(self) -> None:
        with self._lock:
            workers = self._idle + self._busy
            self._idle, self._busy = [], []
        for w in workers:
            w.kill()
