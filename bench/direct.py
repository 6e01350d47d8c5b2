"""The floor for `make bench`: the same converter and runtime calls the library made for a
bundle, replayed directly in this one process (no workers, no bundle writing).

    python bench/direct.py BUNDLE  ->  prints JSON {"capture_s", "convert_s", "runtime_s", "total_s"}
    python bench/direct.py BUNDLE --runtimes  ->  {"runtimes_cold_s"}: a fresh process that
        imports each runtime and loads and runs the bundle's own artifacts on the golden
        cases (the floor of a cold `portable-models verify`; bench/run.py times the whole
        process, start to exit, as it times the CLI)
    python bench/direct.py BUNDLE --verify-warm N [--jobs J[,J...]]  ->  [{"pair_ratios",
        "verify_s", ...}, ...]: for each J in turn (fresh workers for each), a warm `pm.verify` of
        the bundle (``jobs=J``; ``default``, the default: the verify's own, two workers side
        by side on a 2-core machine) and a direct pass loading and running each of its
        artifacts once, back to back N times in this process: each pair's ratio, and the best
        of each side

In the replay each artifact is loaded and run 3 times: ``runtime_s`` is the best pass (the
verify's share of the export + verify floor), and ``total_s`` counts only the first (what the
export itself did).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from portable_models.compare.check import checking_runtime, runner_options
from portable_models.contract.model import Contract, load_contract
from portable_models.convert.base import ConvertJob
from portable_models.convert.registry import route_by_name
from portable_models.core.golden import load_cases
from portable_models.core.imports import load_impl
from portable_models.core.iomap import IoMap
from portable_models.run.base import RunnerOptions
from portable_models.run.registry import runtime_info


def capture_s() -> float:
    """torch.export of the demo model plus its eager reference on the golden cases."""
    import torch

    from portable_models.demo import build_demo_model

    start = time.perf_counter()
    model, example = build_demo_model()
    ep = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=32)},))
    with tempfile.TemporaryDirectory() as d:
        torch.export.save(ep, str(Path(d) / "model.pt2"))
    with torch.no_grad():
        for n in (2, 3, 2, 3):
            model(torch.rand(n, 3, 32, 32))
    return time.perf_counter() - start


def replay(bundle: Path) -> dict[str, float]:
    contract = load_contract(bundle)
    cases = load_cases(bundle / contract.golden["inputs"])
    convert = runtime = repeats = 0.0
    prior: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for art in contract.artifacts:
            for n, attempt in enumerate(art.attempts):
                if attempt.stage == "requires":
                    continue
                info = route_by_name(attempt.route)
                work = Path(tmp) / f"{art.key}-{n}"
                job = ConvertJob(route=info.name, source_file=bundle / contract.source["file"],
                                 out_dir=work / "out", work_dir=work / "work", inputs=contract.inputs,
                                 outputs=contract.outputs, dims=contract.dims, sample_inputs=cases[0],
                                 precision=art.precision, prior_artifacts=dict(prior),
                                 # a fixed-shape fallback the export put off is put off here too
                                 fixed_shape_fallback=(attempt.error or {}).get("code") != "dynamic_dims_refused")
                job.out_dir.mkdir(parents=True)
                job.work_dir.mkdir(parents=True)
                start = time.perf_counter()
                try:
                    result = load_impl(info.impl)(job)
                except Exception:
                    convert += time.perf_counter() - start
                    continue
                convert += time.perf_counter() - start
                if info.target == "onnx":
                    prior["onnx"] = job.out_dir / result.file
                fixed = result.meta.get("dynamic") is False
                passes = _run(info.runtime, job.out_dir / result.file, result.io, fixed, contract, cases,
                              art.precision, tries=3)
                runtime += min(passes)
                repeats += sum(passes[1:])
    return {"convert_s": convert, "runtime_s": runtime, "repeats_s": repeats}


def _run(runtime: str, path: Path, io: IoMap, fixed: bool, contract: Contract, cases: list[dict[str, Any]],
         precision: str, tries: int = 1) -> list[float]:
    """Load and run one artifact on the golden cases (those of case 0's shape when ``fixed``)
    with the runtime that checks it (Core ML off macOS: its runner, then the MIL reference),
    ``tries`` times: the seconds of each pass."""
    names = [checking_runtime(runtime)] if checking_runtime(runtime) == runtime else [runtime, checking_runtime(runtime)]
    opts = RunnerOptions(extra=runner_options(contract.inputs, contract.outputs, contract.dims, precision))
    passes = [0.0] * tries
    for name in names:
        cls = load_impl(runtime_info(name).impl)
        for n in range(tries):
            start = time.perf_counter()
            try:
                with cls(path, io, opts) as runner:
                    for case in (cases[::2] if fixed else cases):
                        runner.run(case)
            except Exception:
                pass
            passes[n] += time.perf_counter() - start
    return passes


def _pass(bundle: Path, contract: Contract, cases: list[dict[str, Any]]) -> float:
    """Load and run every kept artifact once, in the contract's order: the seconds."""
    total = 0.0
    for art in contract.artifacts:
        if art.file is None or art.io is None or art.runtime is None:
            continue
        total += _run(art.runtime, bundle / art.file, art.io, bool(art.meta.get("fixed_shape")), contract,
                      cases, art.precision)[0]
    return total


def runtimes_only(bundle: Path) -> float:
    """Import, load and run every kept artifact of the bundle, as verify does, directly:
    the whole time of the pass, imports included (the floor of a cold verify)."""
    start = time.perf_counter()
    contract = load_contract(bundle)
    _pass(bundle, contract, load_cases(bundle / contract.golden["inputs"]))
    return time.perf_counter() - start


#: pause between the two sides of a pair, and between pairs: the runtimes' thread pools
#: spin on for a while after a run (in the worker after a verify, in this process after a
#: direct pass) and would slow whatever ran right after them. Without it, the side that ran
#: second lost 20-40 % here (pairs' medians 1.38 vs 1.01 by order for the same code).
SETTLE_S = 0.1


def verify_vs_runtimes(bundle: Path, pairs: int, jobs: int | None = None) -> dict[str, Any]:
    """A warm ``pm.verify`` of the bundle (``jobs``; None: the verify's own default) and a
    direct pass over its artifacts, run back to back ``pairs`` times after two warm-up pairs,
    each pair in the other order than the one before (so that neither side always runs
    warmer), each run after a pause of ``SETTLE_S``: each pair's ratio (the two ran under the
    same machine speed), the best of each side, and whether every verify passed."""
    import portable_models as pm

    contract = load_contract(bundle)
    cases = load_cases(bundle / contract.golden["inputs"])
    verify, direct, ok = [], [], True

    def timed_verify() -> float:
        nonlocal ok
        start = time.perf_counter()
        ok = pm.verify(bundle, jobs=jobs).ok and ok
        return time.perf_counter() - start

    for n in range(pairs + 2):
        if n % 2 == 0:
            seconds = timed_verify()
            time.sleep(SETTLE_S)
            floor = _pass(bundle, contract, cases)
        else:
            floor = _pass(bundle, contract, cases)
            time.sleep(SETTLE_S)
            seconds = timed_verify()
        time.sleep(SETTLE_S)
        if n >= 2:
            verify.append(seconds)
            direct.append(floor)
    return {"jobs": jobs, "verify_s": min(verify), "runtimes_warm_s": min(direct), "verify_ok": ok,
            "pair_ratios": [v / d for v, d in zip(verify, direct, strict=True)],
            "verify_runs_s": verify, "runtimes_warm_runs_s": direct}


def verify_sets(bundle: Path, pairs: int, jobs: list[int | None]) -> list[dict[str, Any]]:
    """:func:`verify_vs_runtimes` for each of ``jobs`` in turn, each with workers of its own
    (one set's workers would be another's warm ones, on other thread counts)."""
    from portable_models.isolation.pool import shutdown_workers

    results = []
    for j in jobs:
        shutdown_workers()
        results.append(verify_vs_runtimes(bundle, pairs, j))
    shutdown_workers()
    return results


def main() -> int:
    bundle = Path(sys.argv[1])
    if "--runtimes" in sys.argv:
        print(json.dumps({"runtimes_cold_s": runtimes_only(bundle)}))
        return 0
    if "--verify-warm" in sys.argv:
        given = sys.argv[sys.argv.index("--jobs") + 1].split(",") if "--jobs" in sys.argv else ["default"]
        jobs = [None if j == "default" else int(j) for j in given]
        print(json.dumps(verify_sets(bundle, int(sys.argv[sys.argv.index("--verify-warm") + 1]), jobs)))
        return 0
    start = time.perf_counter()
    cap = capture_s()
    rest = replay(bundle)
    # the repeated load+run passes are the warm-verify floor's, not the export's
    print(json.dumps({"capture_s": cap, **rest, "total_s": time.perf_counter() - start - rest["repeats_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
