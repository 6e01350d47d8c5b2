"""One worker process: the environment it starts with, its start, reading its answers while
policing its time and memory, and killing it with its children. The pool that reuses these
processes is :mod:`portable_models.isolation.pool`."""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portable_models.core.settings import CACHE_ENV, CAPTURE_ENV, CONFINE_ENV, IDLE_ENV, SANDBOX_ENV
from portable_models.errors import WorkerCrashed, WorkerError, WorkerOutOfMemory, WorkerTimeout
from portable_models.isolation.sandbox import Confinement

__all__ = ["WorkerLimits", "FRAMEWORK_ENV", "worker_kind", "offline_env", "environment_key",
           "Worker", "open_fifo"]


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


#: the worker's working directory (its writable scratch folder) is not put on its sys.path:
#: a file written there cannot shadow a module it imports later (Python 3.11+).
_SAFE_PATH = ("-P",) if sys.version_info >= (3, 11) else ()

#: what a confined worker keeps of the caller's environment (nothing else: no tokens, no
#: SSH_AUTH_SOCK, no PYTHONPATH; a worker that loads an untrusted bundle needs none of it).
_CONFINED_KEEP = ("PATH", "LANG", "LANGUAGE", "TZ", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_CONFINED_KEEP_PREFIXES = ("LC_", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "TF_")


def offline_env(scratch: Path, framework: str = "none", threads: int | None = None,
                confined: bool = False) -> dict[str, str]:
    """The worker's environment: the caller's, offline, with HOME and TMPDIR in scratch.
    ``threads``: cap the numeric libraries' thread pools (workers running side by side).
    ``confined``: a worker that loads a bundle's artifacts keeps only the locale, ``PATH``
    and the numeric libraries' settings of the caller's environment."""
    env = dict(os.environ)
    if confined:
        env = {k: v for k, v in env.items() if k in _CONFINED_KEEP or k.startswith(_CONFINED_KEEP_PREFIXES)}
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
    src = str(Path(__file__).resolve().parents[2])  # the folder holding the package
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


#: variables only the caller reads: changing them does not make a worker stale.
_CALLER_ONLY_ENV = frozenset({CAPTURE_ENV, CACHE_ENV, IDLE_ENV, SANDBOX_ENV})


def environment_key() -> int:
    """Workers see the caller's environment as it was when they started; one started
    under another environment is not reused."""
    return hash(frozenset((k, v) for k, v in os.environ.items() if k not in _CALLER_ONLY_ENV))


def _stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first); None: gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _group_rss_mb(pid: int, clones: Sequence[int] = ()) -> float:
    """Resident memory of a process and its descendants, in MiB (Linux /proc; 0 elsewhere).
    ``clones``: its children that are workers of their own (:meth:`Worker.clone`), policed
    on their own, and not counted here (nor their descendants)."""
    proc = Path("/proc")
    if not proc.exists():
        return 0.0
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(entry.name)
        try:
            ppid, pages = int(stat[1]), int(stat[21])  # type: ignore[index]
        except (TypeError, IndexError, ValueError):
            continue
        if int(entry.name) in clones:
            continue
        children.setdefault(ppid, []).append(int(entry.name))
        rss[int(entry.name)] = pages
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Cloned:
    """What :class:`Worker` needs of a ``Popen``, for a worker this process did not start:
    a clone, forked by another worker, which reaps it and writes its exit status to
    ``status_file``."""

    def __init__(self, pid: int, stdin: Any, status_file: Path) -> None:
        self.pid = pid
        self.stdin = stdin
        self.status_file = status_file

    def poll(self) -> int | None:
        """None while it runs; then its exit status (-1 until its parent has written it)."""
        status = self._status()
        if status is not None:
            return status
        stat = _stat(self.pid)
        return None if stat is not None and stat[0] not in "ZX" else -1

    def _status(self) -> int | None:
        try:
            return int(self.status_file.read_text())
        except (OSError, ValueError):
            return None

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit status once it has ended, as its parent wrote it down (a thread of the
        parent waits for it). None: it ended but no status came within a second (its
        parent is gone). TimeoutExpired: still running after ``timeout`` seconds."""
        start = time.monotonic()
        while (status := self._status()) is None:
            if self.poll() is not None:
                if time.monotonic() > start + 1.0:
                    return None
            elif timeout is not None and time.monotonic() > start + timeout:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
            time.sleep(0.005)
        return status


class Worker:
    """One worker process and the pipe it answers on."""

    def __init__(self, framework: str, scratch: Path, log: Path, lane: int = 0,
                 threads: int | None = None, confine: Confinement | None = None) -> None:
        self.framework = framework
        self.lane = lane
        self.threads = threads
        #: the sandbox the worker put itself in before importing anything (None: none)
        self.confine = confine
        #: the caller's environment the worker was started with (see :func:`environment_key`).
        self.env_key = environment_key()
        self.jobs_done = 0
        self.idle_since = time.monotonic()
        read_fd, write_fd = os.pipe()
        scratch.mkdir(parents=True, exist_ok=True)
        env = offline_env(scratch, framework, threads, confined=confine is not None)
        if confine is not None:
            env[CONFINE_ENV] = confine.to_env()
        with open(log, "ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, *_SAFE_PATH, "-m", "portable_models.isolation.child", str(write_fd)],
                stdin=subprocess.PIPE, stdout=log_file, stderr=log_file,
                pass_fds=(write_fd,), start_new_session=True, cwd=scratch, env=env,
            )
        os.close(write_fd)
        self._fd = read_fd
        self._buffer = b""
        #: pids of the workers forked from this one (its children, not part of its memory)
        self.clones: list[int] = []

    def clone(self, scratch: Path, log: Path, lane: int, limits: WorkerLimits) -> Worker:
        """A new worker forked from this idle one, for ``lane``: it starts with everything
        this one imported (no second torch import), in a session, scratch folder, log and
        environment of its own, and talks to the caller over two FIFOs made for it. Linux
        only; this worker is the clone's parent and reaps it. Raises :class:`WorkerError`
        (this worker is killed if the failure was its own)."""
        scratch.mkdir(parents=True, exist_ok=True)
        fifos = Path(tempfile.mkdtemp(prefix="fifo-", dir=scratch))
        jobs, answers, status = fifos / "jobs", fifos / "answers", scratch / "exit-status"
        timeout_s, pid = 30.0, 0
        try:
            os.mkfifo(jobs, 0o600)
            os.mkfifo(answers, 0o600)
            self.send({"id": f"clone-{time.monotonic_ns()}", "kind": "clone", "step": "worker clone",
                       "log": None, "work_dir": None, "payload": {
                           "jobs": str(jobs), "answers": str(answers), "scratch": str(scratch),
                           "log": str(log), "status": str(status), "timeout_s": timeout_s,
                           "env": offline_env(scratch, self.framework, self.threads)}})
            answer = self.read_line(timeout_s, limits, "worker clone")
            if not answer.get("ok"):
                raise WorkerError(f"the worker could not be cloned: {answer.get('error')}", stage="worker clone")
            pid = int(answer["result"]["pid"])
            self.clones.append(pid)
            proc = _Cloned(pid, None, status)
            # the clone opens its ends (reader first) once it has set itself up
            proc.stdin = os.fdopen(open_fifo(jobs, os.O_WRONLY, time.monotonic() + timeout_s,
                                             lambda: proc.poll() is None), "wb")
            twin = object.__new__(Worker)
            twin.framework, twin.lane, twin.threads, twin.env_key = self.framework, lane, self.threads, self.env_key
            twin.confine = self.confine
            twin.jobs_done, twin.idle_since, twin.clones = 0, time.monotonic(), []
            twin.proc = proc  # type: ignore[assignment]
            twin._fd, twin._buffer = open_fifo(answers, os.O_RDONLY, 0.0), b""
            twin.read_line(timeout_s, limits, "worker start")  # both its ends are open: the FIFOs can go
            return twin
        except OSError as exc:
            if pid:
                _kill_group(pid)
            raise WorkerError(f"the worker's clone did not start: {exc}", stage="worker clone") from exc
        finally:
            shutil.rmtree(fifos, ignore_errors=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def cloned(self) -> bool:
        """Forked from another worker (:meth:`clone`), which reaps it: stop it first."""
        return isinstance(self.proc, _Cloned)

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
            if limits.memory_mb and _group_rss_mb(self.proc.pid, self.clones) > limits.memory_mb:
                self.kill()
                raise WorkerOutOfMemory(f"killed: memory limit {limits.memory_mb} MiB", stage=what,
                                        fix="raise the limit with --memory-limit / memory_mb=")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return dict(json.loads(line))

    def _raise_dead(self, what: str) -> None:
        code = self.proc.wait()
        self.kill()
        if code is None:  # a clone whose parent did not say how it ended
            raise WorkerCrashed("worker ended (its exit status is not known)", stage=what)
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            raise WorkerCrashed(f"crashed ({name})", stage=what)
        raise WorkerCrashed(f"worker exited with code {code}", stage=what)

    def kill(self) -> None:
        _kill_group(self.proc.pid)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._fd = -1


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def open_fifo(path: str | Path, flags: int, deadline: float, other_side: Callable[[], bool] = lambda: True) -> int:
    """A blocking descriptor for one end of a FIFO, opened without blocking for ever: a
    writer waits for the reader to be there (OSError after ``deadline`` or once
    ``other_side()`` says the process that should open it is gone); a reader never waits.
    The caller and a worker's clone each open a reader, then a writer."""
    while True:
        try:
            fd = os.open(path, flags | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline or not other_side():
                raise
            time.sleep(0.002)
            continue
        os.set_blocking(fd, True)
        return fd
