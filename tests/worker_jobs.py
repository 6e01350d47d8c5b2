"""Job handlers for the tests only (misbehaviours on demand): run in a worker through a job of
kind ``call`` (``payload["impl"] = "worker_jobs:test_job"``, ``payload["import_path"]`` this folder)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.errors import PortableModelsError

__all__ = ["CALL", "test_job"]

#: what a ``call`` job needs to find :func:`test_job` in a worker
CALL = {"impl": "worker_jobs:test_job", "import_path": str(Path(__file__).resolve().parent)}


def test_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Misbehaviours on demand, for the isolation tests: crash, hang, eat memory, reach out."""
    import signal
    import socket

    action = payload.get("action")
    if action == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif action == "abort":
        os.abort()
    elif action == "hang":
        time.sleep(3600)
    elif action == "memory":
        hog = []
        while True:
            hog.append(np.ones(64 * 2**20 // 8))
    elif action == "network":
        socket.create_connection(("203.0.113.1", 443), timeout=5)
    elif action == "raise":
        raise PortableModelsError("asked to fail", stage="test")
    elif action == "coremltools":
        import sys

        from portable_models.core.coremltools_import import import_coremltools

        ct = import_coremltools(tensorflow=bool(payload.get("tensorflow")))
        return {"pid": os.getpid(), "tf_frontend": bool(ct._deps._HAS_TF_2),
                "loaded": sorted(m for m in ("tensorflow", "sklearn", "transformers") if m in sys.modules)}
    elif action == "loaded":
        import sys

        return {"pid": os.getpid(), "session": os.getsid(0),
                "loaded": [m for m in payload.get("modules") or [] if m in sys.modules]}
    elif action == "read":  # what a (sandboxed) worker can read
        return {"read": len(Path(payload["path"]).read_bytes())}
    elif action == "write":  # ... and write
        Path(payload["path"]).write_text("x")
    elif action == "env":  # ... and what it knows of its caller
        return {"keys": sorted(os.environ), "pythonpath": os.environ.get("PYTHONPATH", "")}
    elif action == "print":  # as a converter or a runtime's thread would
        print(payload.get("text"), flush=True)
    elif action == "cwd":
        Path("written-by-worker.txt").write_text("x")
        Path(os.path.expanduser("~/written-by-worker.txt")).write_text("x")
        return {"cwd": os.getcwd(), "home": os.path.expanduser("~")}
    return {"pid": os.getpid()}
