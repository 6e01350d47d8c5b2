"""The worker process: runs converter and runtime jobs, isolated from the caller.

Started by :mod:`portable_models.isolation.pool` as ``python -m portable_models.isolation.child FD``.
It reads one JSON job per line on stdin and answers one JSON line per job on file
descriptor ``FD`` (a job of kind ``many`` first answers each of the jobs it holds, in
order, as ``{"id", "partial": {"index", "ok", …}}`` lines). Everything a converter
prints (fd 1 and 2) goes to the job's log file. The network is closed to everything
but loopback; ``HOME``, ``TMPDIR`` and the working directory are private scratch
folders set by the parent.

The worker is reused for many jobs of one framework (importing torch or TensorFlow
once), and killed and replaced by the parent after a crash, a timeout or a memory kill.
A job of kind ``clone`` forks it, imports and all, into another worker that reads its jobs
from, and answers on, two FIFOs the parent made (:meth:`~portable_models.isolation.process.Worker.clone`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from portable_models.core.settings import confine_spec
from portable_models.errors import NetworkRequiredError, PortableModelsError, UnverifiedError
from portable_models.isolation.process import open_fifo

_CURRENT_STEP = {"name": "worker"}


def _is_local(host: object) -> bool:
    if not isinstance(host, str):
        return False
    if host in ("localhost", "") or host.startswith("/"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(host: object, port: object = "") -> None:
    raise NetworkRequiredError(
        f"network required: {_CURRENT_STEP['name']} tried to reach {host}:{port}, "
        "but conversions run offline",
        stage=_CURRENT_STEP["name"],
        fix="this converter step needs a download; provide the data locally or use another route",
    )


def install_network_guard() -> None:
    """Close the network to everything but loopback and unix sockets."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def _host_port(address: Any) -> tuple[Any, Any]:
        if isinstance(address, tuple) and address:
            return address[0], address[1] if len(address) > 1 else ""
        return address, ""

    def connect(self: socket.socket, address: Any) -> None:
        host, port = _host_port(address)
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(host):
            _refuse(host, port)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        host, port = _host_port(address)
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(host):
            _refuse(host, port)
        return real_connect_ex(self, address)

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not _is_local(host if not isinstance(host, bytes) else host.decode()):
            _refuse(host, port)
        return real_getaddrinfo(host, port, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]
    socket.getaddrinfo = getaddrinfo


#: descriptors of the worker's own log (what fds 1 and 2 were when it started): what a job
#: prints goes to the job's log, and anything printed between jobs (a runtime's thread, an
#: import) to the worker's, never to the log of a job that has ended (which may be a file
#: of a bundle by then).
_OWN_OUTPUT: list[int] = []


def _keep_own_output() -> None:
    for fd in _OWN_OUTPUT:
        os.close(fd)
    _OWN_OUTPUT[:] = [os.dup(1), os.dup(2)]


def _back_to_own_output() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, own in zip((1, 2), _OWN_OUTPUT, strict=False):
        os.dup2(own, fd)


def _redirect_output(log_path: str) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _run_job(job: dict[str, Any], emit: Callable[[dict[str, Any]], None],
             checked: list[Any] | None = None) -> dict[str, Any]:
    """``checked``: what the runs of one job of kind ``many`` have hashed (see ``jobs.run_job``)."""
    from portable_models.isolation import jobs

    if job["kind"] == "many":  # each of its jobs answered as it ends, in order
        subs = list(job["payload"]["jobs"])
        if any(sub.get("kind") == "many" for sub in subs):
            raise ValueError("a job of kind 'many' cannot hold another")
        hashed: list[Any] = []
        for n, sub in enumerate(subs):
            answer = _answer({**sub, "id": f"{job['id']}/{n}"}, emit, hashed)
            emit({"index": n, **{k: v for k, v in answer.items() if k != "id"}})
        return {"jobs": len(subs)}

    run = jobs.handler(job["kind"], job["payload"])
    if job["kind"] == "run":
        return run(job["payload"], checked)
    return run(job["payload"])


def _same_file(path: str, other: str) -> bool:
    """Whether ``path`` is the file or folder ``other`` is."""
    try:
        return os.path.samefile(path, other)
    except OSError:
        return False


def _answer(job: dict[str, Any], emit: Callable[[dict[str, Any]], None],
            checked: list[Any] | None = None) -> dict[str, Any]:
    _CURRENT_STEP["name"] = str(job.get("step") or job["kind"])
    work = job.get("work_dir")
    if work and not _same_file(work, "."):  # a verify's runs share one folder
        Path(work).mkdir(parents=True, exist_ok=True)
        os.chdir(work)
        tempfile.tempdir = work
    if job.get("log"):
        _redirect_output(job["log"])
        print(f"--- portable_models job {job['id']}: {_CURRENT_STEP['name']} ---", flush=True)
    start = time.perf_counter()
    try:
        result = _run_job(job, emit, checked)
        answer: dict[str, Any] = {"id": job["id"], "ok": True, "result": result}
    except PortableModelsError as exc:
        if isinstance(exc, UnverifiedError):  # an outcome (Core ML off macOS), not a fault
            print(f"unverified: {exc.message}", flush=True)
        else:
            traceback.print_exc()
        answer = {"id": job["id"], "ok": False, "error": exc.to_dict()}
    except BaseException as exc:  # a converter's own failure: report it, stay alive
        traceback.print_exc()
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        answer = {
            "id": job["id"],
            "ok": False,
            "error": {"code": "exception", "message": f"{type(exc).__name__}: {exc}",
                      "stage": _CURRENT_STEP["name"], "file": None, "fix": None},
        }
    answer["seconds"] = time.perf_counter() - start
    sys.stdout.flush()
    sys.stderr.flush()
    return answer


def _reap_clone(pid: int, status_file: str) -> None:
    """Wait for a clone of this worker to end (on a thread of its own) and write down how."""
    _, status = os.waitpid(pid, 0)
    Path(status_file + ".tmp").write_text(str(os.waitstatus_to_exitcode(status)))
    os.replace(status_file + ".tmp", status_file)


def _clone(payload: dict[str, Any]) -> tuple[int, Any, Any]:
    """Fork this worker, imports and all. In the parent: ``(pid, None, None)``. In the
    clone: ``(0, jobs, answers)``, its own streams (FIFOs the caller made), after it has
    become a worker of its own: a new session, its own scratch folder, environment and
    log. The parent reaps it and writes its exit status to ``payload["status"]``; a
    thread of the parent waits for it (a signal handler would not run while the parent
    waits for its next job, and would interrupt converters' system calls)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        threading.Thread(target=_reap_clone, args=(pid, str(payload["status"])), name="clone-reaper",
                         daemon=True).start()
        return pid, None, None
    try:
        os.setsid()
        _die_with(os.getppid())  # the watchdog thread does not survive the fork
        os.environ.clear()
        os.environ.update(payload["env"])
        os.chdir(payload["scratch"])
        tempfile.tempdir = None
        _redirect_output(str(payload["log"]))
        _keep_own_output()
        deadline = time.monotonic() + float(payload.get("timeout_s", 30.0))
        jobs = open_fifo(payload["jobs"], os.O_RDONLY, deadline)
        answers = open_fifo(payload["answers"], os.O_WRONLY, deadline)
        return 0, os.fdopen(jobs, "r"), os.fdopen(answers, "w", buffering=1)
    except BaseException:
        traceback.print_exc()
        os._exit(70)


#: seconds between two looks of the watchdog at the worker's parent.
WATCH_S = 0.5


def _die_with(parent: int) -> None:
    """End this worker and everything it started (its process group) once ``parent`` is
    gone: a caller killed with SIGKILL cannot stop its workers, and one mid-job would run
    on until the job ended. A thread polling the parent, not a parent-death signal: Linux
    sends that when the *thread* that started the worker ends, and the caller starts
    workers from short-lived threads (warm-ups, lanes)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_S)
        try:
            os.killpg(os.getpgid(0), 9)
        finally:
            os._exit(137)

    threading.Thread(target=watch, name="portable-models-watchdog", daemon=True).start()


def _confine() -> None:
    """Put this worker in the sandbox its caller asked for (:data:`CONFINE_ENV`), before it
    imports anything or starts a thread (Landlock confines the calling thread and those it
    starts after): reads of the Python installation and the bundle, writes to its scratch
    folder (its working directory, HOME and TMPDIR) and the caller's, no network."""
    raw = confine_spec()
    if not raw:
        return
    from portable_models.isolation import sandbox

    spec = json.loads(raw)
    sandbox.confine(read=[*sandbox.default_read_paths(), *spec["read"]],
                    write=[os.getcwd(), *spec["write"], *sandbox.default_write_paths()],
                    execute=sandbox.default_execute_paths())


def main(argv: list[str]) -> int:
    _confine()
    _die_with(os.getppid())
    install_network_guard()
    _keep_own_output()
    inp, out = os.fdopen(0, "r"), os.fdopen(int(argv[1]), "w", buffering=1)
    out.write(json.dumps({"ready": os.getpid()}) + "\n")
    while line := inp.readline():
        if not line.strip():
            continue
        job = json.loads(line)
        if job["kind"] == "clone":
            pid, jobs, answers = _clone(job["payload"])
            if not pid:  # this is the clone: the parent's pipes are not its own
                inp.close()
                out.close()
                inp, out = jobs, answers
                out.write(json.dumps({"ready": os.getpid()}) + "\n")
                continue
            out.write(json.dumps({"id": job["id"], "ok": True, "result": {"pid": pid}, "seconds": 0.0}) + "\n")
            continue

        def emit(partial: dict[str, Any], job_id: Any = job["id"], out: Any = out) -> None:
            out.write(json.dumps({"id": job_id, "partial": partial}, allow_nan=False, default=str) + "\n")

        answer = _answer(job, emit)
        _back_to_own_output()  # before the caller hears that the job is done
        out.write(json.dumps(answer, allow_nan=False, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
