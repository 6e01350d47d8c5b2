"""The ``run`` and ``bench`` jobs: one runtime loads one artifact and runs it on the golden
cases, or times it. Run inside a worker only (:mod:`portable_models.isolation.jobs` names
them by dotted path); arrays travel back as files."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.core.golden import pack_outputs, read_only_cases
from portable_models.core.iomap import IoMap
from portable_models.errors import ContractError

__all__ = ["bench_job", "golden_inputs", "run_job"]


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
    _check_truth(payload)
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


def _check_truth(payload: dict[str, Any]) -> None:
    """A quantised variant is what its label says (``payload["truth"]``: its precision),
    read from its bytes before it is loaded (:mod:`portable_models.run.truth`)."""
    if payload.get("truth"):
        from portable_models.run.truth import check_truth, facts_of

        check_truth(str(payload["truth"]), facts_of(Path(payload["artifact"])), payload.get("fp32_bytes"))
