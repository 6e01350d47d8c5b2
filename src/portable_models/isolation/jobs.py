"""What a worker does for each kind of job, as a table of dotted paths: the worker imports a
kind's handler when the first job of that kind comes, and this module imports none of the
stages it dispatches to (isolation stays below capture, convert and run).

``convert``: one route turns the captured source into one artifact (:mod:`convert.job`).
``run``: one runtime loads one artifact and runs it on the golden cases (:mod:`run.job`).
``bench``: one runtime times one artifact (:mod:`run.job`).
``warm``: import what the coming jobs will need. ``ping``: the worker's pid.
``call``: the function ``payload["impl"]`` names (``module:function``), importable from
``payload["import_path"]`` where given: the caller's own job kinds (the tests' misbehaviours).
Payloads and results are plain JSON; arrays travel as ``.npz`` files.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from portable_models.core.imports import load_impl

__all__ = ["HANDLERS", "handler", "warm_job"]

#: job kind -> ``module:function`` taking the payload (and, for ``run``, what was hashed)
HANDLERS = {
    "convert": "portable_models.convert.job:convert_job",
    "run": "portable_models.run.job:run_job",
    "bench": "portable_models.run.job:bench_job",
    "warm": "portable_models.isolation.jobs:warm_job",
    "ping": "portable_models.isolation.jobs:ping_job",
    "diagnose": "portable_models.diagnosis.job:diagnose_job",
}


def warm_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Import what the coming jobs will need, while the caller is still capturing."""
    for name in payload.get("modules") or []:
        importlib.import_module(str(name))
    return {"pid": os.getpid()}


def ping_job(payload: dict[str, Any]) -> dict[str, Any]:
    return {"pid": os.getpid()}


def handler(kind: str, payload: dict[str, Any]) -> Callable[..., dict[str, Any]]:
    """The function that runs a job of ``kind`` (ValueError: no such kind)."""
    if kind == "call":
        path = payload.get("import_path")
        if path and path not in sys.path:
            sys.path.insert(0, str(path))
        return load_impl(str(payload["impl"]))  # type: ignore[no-any-return]
    dotted = HANDLERS.get(kind)
    if dotted is None:
        raise ValueError(f"unknown job kind {kind!r}")
    return load_impl(dotted)  # type: ignore[no-any-return]
