"""Run a capture step in a forked child of the caller, so that its memory is not the caller's.

A model lives in the caller's memory and cannot be sent to a worker in general (its
class may be defined in the training script). A forked child shares that memory
copy-on-write, runs the step (``torch.export`` costs the caller ~100 MB of tracing
machinery otherwise), sends back a picklable result and exits. A crash in the step
fails the export with a clear error instead of killing the caller.

Used only where forking is safe: Linux, and no CUDA context in the caller (CUDA does
not survive a fork). ``PORTABLE_MODELS_CAPTURE=inprocess`` turns it off.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from portable_models.core.settings import CAPTURE_ENV, capture_inprocess
from portable_models.errors import CaptureError, PortableModelsError, error_from_dict

__all__ = ["CAPTURE_ENV", "fork_unavailable", "run_forked"]

T = TypeVar("T")


def fork_unavailable() -> str | None:
    """Why the capture runs in the caller's process, or None when it can be forked."""
    if capture_inprocess():
        return f"{CAPTURE_ENV}=inprocess"
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return f"no safe fork on {sys.platform}"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "the caller holds a CUDA context, which a fork cannot share"
    return None


def run_forked(fn: Callable[..., T], *args: Any, stage: str) -> T:
    """``fn(*args)`` in a forked child; its result or its error, raised here. The child dies
    with the caller (a caller killed with SIGKILL leaves no capture running)."""
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_fd)
        _die_with_parent(parent)
        _child(fn, args, write_fd, stage)
    os.close(write_fd)
    chunks = []
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            while chunk := pipe.read(1 << 20):
                chunks.append(chunk)
        _, status = os.waitpid(pid, 0)
    except BaseException:  # Ctrl-C / SIGTERM in the caller: the child goes too
        _kill(pid)
        raise
    data = b"".join(chunks)
    if not data:
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        how = f"crashed ({signal.Signals(sig).name})" if sig else f"exited with code {os.waitstatus_to_exitcode(status)}"
        raise CaptureError(f"the capture {how} before answering", stage=stage,
                           fix=f"run with {CAPTURE_ENV}=inprocess to see the failure in your own process")
    kind, value = pickle.loads(data)  # written by our own child, just now
    if kind == "ok":
        return value  # type: ignore[no-any-return]
    if kind == "error":
        raise error_from_dict(value)
    raise CaptureError(value, stage=stage)


def _child(fn: Callable[..., Any], args: tuple[Any, ...], write_fd: int, stage: str) -> None:
    code = 0
    try:
        # fresh stream objects: a thread of the parent may have held the old ones' locks
        sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
        sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(1)  # the parent's thread pool did not survive the fork
        try:
            payload: tuple[str, Any] = ("ok", fn(*args))
        except PortableModelsError as exc:
            payload = ("error", exc.to_dict())
        except BaseException as exc:
            traceback.print_exc()
            payload = ("exception", f"{type(exc).__name__}: {exc}")
        try:
            data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            data = pickle.dumps(("exception", f"the capture's result cannot be sent back: {exc}"))
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(data)
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _die_with_parent(parent: int) -> None:
    """SIGKILL this child when the thread that forked it ends: that thread waits for the
    child's answer, so it ends only with the caller (Linux; elsewhere nothing)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the caller died before the request took effect
        os._exit(137)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
