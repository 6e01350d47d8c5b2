"""What a worker does for each kind of job. Runs inside the worker process only.

``convert``: one route turns the captured source into one artifact.
``run``: one runtime loads one artifact and runs it on every golden case.
Payloads and results are plain JSON; arrays travel as ``.npz`` files.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.core.golden import load_cases, pack_outputs, read_only_cases
from portable_models.core.iomap import IoMap
from portable_models.core.spec import DimSpec, TensorSpec
from portable_models.errors import ContractError, PortableModelsError

__all__ = ["convert_job", "run_job", "bench_job", "test_job", "warm_job"]


def warm_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Import what the coming jobs will need, while the caller is still capturing."""
    import importlib

    for name in payload.get("modules") or []:
        importlib.import_module(str(name))
    return {"pid": os.getpid()}


def convert_job(payload: dict[str, Any]) -> dict[str, Any]:
    from portable_models.convert.base import ConvertJob, check_requires, ensure_artifact
    from portable_models.convert.registry import route_by_name
    from portable_models.core.imports import load_impl

    info = route_by_name(payload["route"])
    check_requires(info)
    samples = load_cases(Path(payload["samples"]))[0]
    job = ConvertJob(
        route=info.name,
        source_file=Path(payload["source_file"]),
        out_dir=Path(payload["out_dir"]),
        work_dir=Path(payload["work_dir"]),
        inputs=[TensorSpec.from_dict(d) for d in payload["inputs"]],
        outputs=[TensorSpec.from_dict(d) for d in payload["outputs"]],
        dims={k: DimSpec(name=k, **v) for k, v in payload["dims"].items()},
        sample_inputs=samples,
        precision=payload.get("precision", "float32"),
        options=dict(payload.get("options") or {}),
        prior_artifacts={k: Path(v) for k, v in (payload.get("prior") or {}).items()},
        fixed_shape_fallback=bool(payload.get("fixed_shape_fallback", True)),
    )
    job.out_dir.mkdir(parents=True, exist_ok=True)
    job.work_dir.mkdir(parents=True, exist_ok=True)
    fn = load_impl(info.impl)
    start = time.perf_counter()
    result = fn(job)
    seconds = time.perf_counter() - start
    ensure_artifact(job, result)
    return {
        "file": result.file,
        "io": result.io.to_dict(),
        "steps": [s.to_dict() for s in result.steps],
        "precision": result.precision,
        "meta": result.meta,
        "convert_s": seconds,
    }


def golden_inputs(path: Path, max_bytes: int | None = None, cases: int | None = None) -> list[dict[str, np.ndarray]]:
    """The golden inputs at ``path`` (read once while the file is unchanged), each array a
    copy, so that a runtime writing into its feeds cannot change what the next job reads.
    ``max_bytes`` and ``cases``: what a bundle's contract lets them inflate to and says they hold."""
    read = read_only_cases(path, max_bytes=max_bytes)
    if cases is not None and len(read) != cases:
        raise ContractError(f"{path.name} holds {len(read)} cases, the contract says {cases}", file=str(path),
                            stage="load", fix="the bundle was edited or written by a broken tool: re-export it")
    return [{k: v.copy() for k, v in case.items()} for case in read]


def run_job(payload: dict[str, Any], checked: list[Any] | None = None) -> dict[str, Any]:
    """Load the artifact once, run every golden case (or the ``cases`` listed), write the
    outputs, time it all. ``checked``: the file lists an earlier run of the same job (kind
    ``many``) has hashed and found as the contract says: not hashed again (Core ML's MIL
    reference run right after its structural check), and this run's is added."""
    from portable_models.core.imports import load_impl
    from portable_models.run.base import RunnerOptions
    from portable_models.run.registry import runtime_info

    info = runtime_info(payload["runtime"])
    cls = load_impl(info.impl)
    files = payload.get("files")
    if files and (checked is None or files not in checked):  # the contract's, or nothing is loaded
        from portable_models.contract.bundle import check_files, raise_on_problems

        root = Path(files["root"])
        raise_on_problems(root, check_files(root, files["entries"]), stage="integrity")
        if checked is not None:
            checked.append(files)
    _check_format(payload)
    cases = golden_inputs(Path(payload["inputs"]), payload.get("inputs_max_bytes"), payload.get("golden_cases"))
    if payload.get("cases") is not None:
        cases = [cases[int(i)] for i in payload["cases"]]
    runner = cls(Path(payload["artifact"]), IoMap.from_dict(payload["io"]),
                 RunnerOptions(threads=payload.get("threads"),
                               extra=dict(payload.get("options") or {})))
    outputs: list[dict[str, np.ndarray]] = []
    run_ms: list[float] = []
    with runner:
        for case in cases:
            start = time.perf_counter()
            outputs.append(runner.run(case))
            run_ms.append((time.perf_counter() - start) * 1000)
        load_s = runner.load_s
    return {"load_s": load_s, "run_ms": run_ms, "runtime": cls.runtime_name(),
            "label": cls.label or cls.runtime_name(), **pack_outputs(outputs, Path(payload["out"]))}


def _check_format(payload: dict[str, Any]) -> None:
    """The artifact's bytes are its target's format (``payload["format"]``), before a runtime
    is given it: a contract cannot have one format loaded as another."""
    if payload.get("format"):
        from portable_models.run.formats import check_format

        check_format(str(payload["format"]), Path(payload["artifact"]))


def bench_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Latency of one artifact in its runtime: load once, warm up, then time ``runs`` calls
    on golden case 0."""
    import statistics

    from portable_models.core.imports import load_impl
    from portable_models.run.base import RunnerOptions
    from portable_models.run.registry import runtime_info

    cls = load_impl(runtime_info(payload["runtime"]).impl)
    _check_format(payload)
    case = golden_inputs(Path(payload["inputs"]), payload.get("inputs_max_bytes"), payload.get("golden_cases"))[0]
    threads = payload.get("threads")
    runner = cls(Path(payload["artifact"]), IoMap.from_dict(payload["io"]),
                 RunnerOptions(threads=threads, extra=dict(payload.get("options") or {})))
    times: list[float] = []
    with runner:
        for _ in range(int(payload.get("warmup", 3))):
            runner.run(case)
        for _ in range(int(payload.get("runs", 20))):
            start = time.perf_counter()
            runner.run(case)
            times.append((time.perf_counter() - start) * 1000)
        load_s = runner.load_s
    times.sort()
    p90 = times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]
    return {"runtime": cls.runtime_name(), "load_s": round(load_s, 4),
            "p50_ms": round(statistics.median(times), 4), "p90_ms": round(p90, 4),
            "min_ms": round(times[0], 4), "runs": len(times), "warmup": int(payload.get("warmup", 3)),
            "threads": threads or os.cpu_count()}


def test_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Misbehaviours on demand, for the isolation tests: crash, hang, eat memory, reach out."""
    import os
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
