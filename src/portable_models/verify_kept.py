"""What one verify leaves for the next in this process: the helper thread that compares an
artifact's outputs while the worker runs the next, and scratch folders the runs left empty
(the worker stays in its folder instead of entering a new one). Both are kept because a warm
verify of the demo takes ~0.1 s, and starting a thread (~1 ms) or making and removing a
folder would be a visible part of it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["helper", "scratch_done", "scratch_folder", "scratch_root"]

_HELPER: ThreadPoolExecutor | None = None
_HELPER_LOCK = threading.Lock()


def helper() -> ThreadPoolExecutor:
    """The verify's helper thread, kept from one verify to the next (starting a thread takes
    ~1 ms here; a warm verify of the demo takes ~0.1 s). Not a daemon: what it was given
    (a scratch folder's removal) is done before the interpreter exits."""
    global _HELPER
    with _HELPER_LOCK:
        if _HELPER is None:
            _HELPER = ThreadPoolExecutor(1, thread_name_prefix="portable-models-verify")
        return _HELPER


#: verify scratch folders left empty by the verify that had them, for the next one: the worker
#: stays in its folder instead of entering a new one, and the caller makes and removes none
_FREE_SCRATCH: list[Path] = []
_SCRATCH_KEPT = 4


#: the one folder every verify scratch folder of this process is made in: what a verify's
#: sandboxed workers may write, the same for every verify, so that they stay warm (a
#: sandbox naming each verify's own folder would need new workers for every verify)
_ROOT: list[Path] = []


def scratch_root() -> Path:
    """The folder the verify scratch folders of this process are made in (made on first use,
    removed at exit)."""
    with _HELPER_LOCK:
        if not _ROOT or not _ROOT[0].is_dir():
            _ROOT[:] = [Path(tempfile.mkdtemp(prefix="portable-models-verify-"))]
        return _ROOT[0]


def scratch_folder() -> Path:
    """A verify's own scratch folder: a free one, else a new one."""
    with _HELPER_LOCK:
        while _FREE_SCRATCH:
            folder = _FREE_SCRATCH.pop()
            if folder.is_dir():
                return folder
    return Path(tempfile.mkdtemp(prefix="run-", dir=scratch_root()))


def scratch_done(folder: Path) -> None:
    """Keep ``folder`` for the next verify if the runs left nothing in it, else remove it."""
    try:
        empty = not any(os.scandir(folder))
    except OSError:
        return
    with _HELPER_LOCK:
        if empty and len(_FREE_SCRATCH) < _SCRATCH_KEPT:
            _FREE_SCRATCH.append(folder)
            return
    shutil.rmtree(folder, ignore_errors=True)


@atexit.register
def remove_free_scratch() -> None:
    with _HELPER_LOCK:
        folders, _FREE_SCRATCH[:] = list(_FREE_SCRATCH), []
    for folder in folders + _ROOT:
        shutil.rmtree(folder, ignore_errors=True)
