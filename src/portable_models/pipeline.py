"""One target, end to end: try its routes in order — convert, run, compare — and keep
the first artifact that passes parity. Every attempt is recorded, so a user sees
"litert-torch failed at convert: …; onnx2tf passed". Also the artifact check that
``verify`` shares: run an artifact in a worker and compare it with the golden outputs.
"""

from __future__ import annotations

import functools
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portable_models.bundle import path_bytes, sha256_path
from portable_models.contract import Artifact, Attempt
from portable_models.errors import PortableModelsError, UnverifiedError, error_from_dict
from portable_models.golden import Cases, load_cases, load_scratch
from portable_models.iomap import IoMap
from portable_models.parity import OutputParity, TolerancePolicy, compare_outputs, verdict
from portable_models.runtimes import RUNTIMES, runtime_info
from portable_models.spec import DimSpec, TensorSpec
from portable_models.targets import routes_for
from portable_models.targets.base import RouteInfo, check_requires
from portable_models.workers import JobFailed, Pool, worker_kind

__all__ = ["TargetContext", "build_target", "check_artifact", "plan_artifact", "run_planned",
           "PlannedRun", "checking_runtime", "Progress",
           "runner_options", "error_histogram", "fixed_shape_cases"]

#: progress callback: (target key, state, detail)
Progress = Callable[[str, str, str], None]


def _no_progress(key: str, state: str, detail: str) -> None:
    return None


@dataclass(kw_only=True)
class TargetContext:
    """What every target of one export shares."""

    pool: Pool
    root: Path
    source_framework: str
    source_file: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: dict[str, DimSpec]
    golden_inputs: Path
    golden_outputs: Cases
    policy: TolerancePolicy
    options: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None
    prior: dict[str, Path] = field(default_factory=dict)
    progress: Progress = _no_progress
    cache: bool = True
    _inputs_digest: str = ""

    def runner_options(self, precision: str) -> dict[str, Any]:
        return runner_options(self.inputs, self.outputs, self.dims, precision)

    def cache_key(self, route: RouteInfo, precision: str) -> str:
        """Everything an attempt's outcome depends on (see :mod:`portable_models.cache`)."""
        from portable_models import cache

        if not self._inputs_digest:
            golden_out = self.golden_inputs.parent / "outputs.npz"
            self._inputs_digest = "|".join(cache.content_digest(p) for p in
                                           (self.source_file, self.golden_inputs, golden_out))
        runtime = runtime_info(route.runtime)
        parts = {"inputs": self._inputs_digest, "route": route.name, "impl": route.impl,
                 "precision": precision, "options": self.options, "tolerance": self.policy.to_dict(),
                 "specs": self.runner_options(precision), "runtime": checking_runtime(route.runtime),
                 "prior": {k: cache.content_digest(v) for k, v in sorted(self.prior.items())}}
        return cache.attempt_key(parts=parts, packages=route.requires + runtime.requires)


def runner_options(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                   dims: dict[str, DimSpec], precision: str) -> dict[str, Any]:
    """What a runner may check an artifact against: the contract's specs."""
    return {"inputs": [s.to_dict() for s in inputs], "outputs": [s.to_dict() for s in outputs],
            "dims": {k: v.to_dict() for k, v in dims.items()}, "precision": precision}


def checking_runtime(runtime: str) -> str:
    """The runtime that checks an artifact here: Core ML off macOS goes to the MIL
    reference executor when it is installed."""
    if runtime == "coreml" and sys.platform != "darwin" and "mil-reference" in RUNTIMES:
        return "mil-reference"
    return runtime


def _error_dict(exc: PortableModelsError) -> dict[str, Any]:
    return {k: v for k, v in exc.to_dict().items() if v}


def fixed_shape_cases(golden_inputs: Path) -> list[int]:
    """The golden cases a fixed-shape artifact can take: those shaped like case 0 (the
    sample it was converted with)."""
    cases = load_cases(golden_inputs)
    first = {k: v.shape for k, v in cases[0].items()}
    return [i for i, c in enumerate(cases) if {k: v.shape for k, v in c.items()} == first]


#: compares a finished run with the golden outputs: (parity record, timings).
Judge = Callable[[], tuple[dict[str, Any], dict[str, Any]]]


def check_artifact(pool: Pool, *, artifact: Path, runtime: str, io: IoMap, golden_inputs: Path,
                   golden_outputs: Cases, policy: TolerancePolicy, precision: str, log: Path,
                   work_dir: Path, timeout_s: float | None = None,
                   output_names: Sequence[str] | None = None,
                   cases: Sequence[int] | None = None,
                   options: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``artifact`` on the golden cases (all, or the ``cases`` a fixed-shape artifact
    accepts) in a worker and compare. Returns the parity record and the timings.
    Load/run failures become an ``error`` record, not an exception. Core ML off macOS is
    checked structurally by its own runner first, then numerically by the MIL reference."""
    return plan_artifact(pool, artifact=artifact, runtime=runtime, io=io, golden_inputs=golden_inputs,
                         golden_outputs=golden_outputs, policy=policy, precision=precision, log=log,
                         work_dir=work_dir, timeout_s=timeout_s, output_names=output_names, cases=cases,
                         options=options).alone()()


#: one artifact's check as the runs it asks for, one at a time: it yields (runtime, cases),
#: is sent what that run gave, and returns the comparison still to be made.
Plan = Generator[tuple[str, Sequence[int] | None], "_Ran", Judge]


@dataclass
class PlannedRun:
    """An artifact's check, not yet started: driven alone (:meth:`alone`, one worker job per
    run, as ``export`` checks each new artifact) or with others in one worker job per round
    (:func:`run_planned`, as ``verify`` checks a bundle)."""

    job: _RunJob
    plan: Plan

    def alone(self) -> Judge:
        """Make the runs one by one; the comparison still to be made in the caller."""
        try:
            request = next(self.plan)
            while True:
                request = self.plan.send(self.job.run(*request))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


def plan_artifact(pool: Pool, *, artifact: Path, runtime: str, io: IoMap, golden_inputs: Path,
                  golden_outputs: Cases, policy: TolerancePolicy, precision: str, log: Path,
                  work_dir: Path, timeout_s: float | None = None,
                  output_names: Sequence[str] | None = None,
                  cases: Sequence[int] | None = None,
                  options: dict[str, Any] | None = None) -> PlannedRun:
    """The check of :func:`check_artifact`, to be driven alone or with others."""
    job = _RunJob(pool=pool, artifact=artifact, io=io, golden_inputs=golden_inputs,
                  golden_outputs=golden_outputs, policy=policy, precision=precision, log=log,
                  work_dir=work_dir, timeout_s=timeout_s, output_names=output_names,
                  options=options or {})
    return PlannedRun(job=job, plan=_plan(runtime, cases))


def _plan(runtime: str, cases: Sequence[int] | None) -> Plan:
    """Which runs check an artifact of ``runtime``. Core ML off macOS: its own runner checks
    the package structurally on one case, then the MIL reference executor numerically."""
    checker = checking_runtime(runtime)
    if runtime == "coreml" and sys.platform == "darwin" and "mil-reference" in RUNTIMES:
        real = yield "coreml", cases
        ref = yield "mil-reference", cases
        return _coreml_on_macos(real, ref)
    if checker == runtime:
        ran = yield runtime, cases
        return ran.judge
    first = yield runtime, [0]
    if first.failure is None or first.failure["status"] != "unverified":
        return lambda: (first.judge()[0], {})
    structural = list(first.failure.get("checked") or [])
    checked = yield checker, cases

    def judge() -> tuple[dict[str, Any], dict[str, Any]]:
        record, timings = checked.judge()
        record["structural"] = structural
        if record["status"] == "unverified":
            record["checked"] = structural + list(record.get("checked") or [])
        return record, timings

    return judge


def _coreml_on_macos(real: _Ran, ref: _Ran) -> Judge:
    """On macOS: the real Core ML runtime gives the verdict; the MIL reference executor runs
    too, and a disagreement between them (either failing) fails the artifact."""

    def judge() -> tuple[dict[str, Any], dict[str, Any]]:
        record, timings = real.judge()
        reference, _ = ref.judge()
        record["reference"] = {k: v for k, v in reference.items() if k != "outputs"}
        if record["status"] == "pass" and reference["status"] == "fail":
            record["status"] = "fail"
            record["reason"] = f"MIL reference: {reference.get('reason')}"
        return record, timings

    return judge


def run_planned(pool: Pool, planned: Sequence[PlannedRun], done: Callable[[int, Judge], None],
                timeout_s: float | None = None) -> None:
    """Drive many artifacts' checks with one worker job per round and worker kind (a verify
    runs a whole bundle in one round trip instead of one per artifact). ``done(i, judge)`` is
    called as soon as check ``i`` has made its last run, so that its comparison can start
    while the worker runs the next. A run that kills its worker (crash, timeout, memory)
    fails that run alone; the runs after it go to a new worker."""
    asked: dict[int, tuple[str, Sequence[int] | None]] = {}

    def advance(i: int, ran: _Ran | None) -> None:
        try:
            asked[i] = next(planned[i].plan) if ran is None else planned[i].plan.send(ran)
        except StopIteration as stop:
            done(i, stop.value)

    for i in range(len(planned)):
        advance(i, None)
    while asked:
        this_round, asked = sorted(asked.items()), {}
        kinds = {worker_kind(runtime_info(rt).framework) for _, (rt, _) in this_round}
        for kind in sorted(kinds):
            runs = [(i, rt, c) for i, (rt, c) in this_round if worker_kind(runtime_info(rt).framework) == kind]
            _run_many(pool, [(planned[i].job, rt, c) for i, rt, c in runs],
                      functools.partial(_advance_nth, advance, [i for i, _, _ in runs]), timeout_s)


def _run_many(pool: Pool, runs: list[tuple[_RunJob, str, Sequence[int] | None]],
              got: Callable[[int, _Ran], None], timeout_s: float | None) -> None:
    """One worker job running ``runs`` in order; ``got(n, ran)`` as each one finishes."""
    first = 0
    while first < len(runs):
        first += _run_batch(pool, runs[first:], functools.partial(_shifted, got, first), timeout_s)


def _shifted(got: Callable[[int, _Ran], None], offset: int, n: int, ran: _Ran) -> None:
    got(offset + n, ran)


def _advance_nth(advance: Callable[[int, _Ran], None], indices: list[int], n: int, ran: _Ran) -> None:
    advance(indices[n], ran)


def _run_batch(pool: Pool, batch: list[tuple[_RunJob, str, Sequence[int] | None]],
               got: Callable[[int, _Ran], None], timeout_s: float | None) -> int:
    """Run ``batch`` in one worker job; how many of its runs are settled (all of them, or
    those up to the one that took its worker down, which fails alone)."""
    answered = 0

    def partial(item: dict[str, Any]) -> None:
        nonlocal answered
        n = int(item["index"])
        job, runtime, cases = batch[n]
        answered = n + 1
        if item.get("ok"):
            got(n, job.ran(runtime, cases, dict(item.get("result") or {})))
        else:
            got(n, job.failed(runtime, cases, error_from_dict(item.get("error") or {})))

    try:
        pool.call(kind="many", payload={"jobs": [job.sub_job(rt, c) for job, rt, c in batch]},
                  framework=runtime_info(batch[0][1]).framework,
                  step=f"run:{'+'.join(rt for _, rt, _ in batch)}", timeout_s=timeout_s, on_partial=partial)
    except JobFailed as failed:  # the run in flight (crash, timeout, memory) fails alone
        if answered == len(batch):
            return answered
        job, runtime, cases = batch[answered]
        failed.error.stage = f"run:{runtime}"
        got(answered, job.failed(runtime, cases, failed.error))
        return answered + 1
    assert answered == len(batch), "a finished 'many' job answers every run"
    return answered


@dataclass(kw_only=True)
class _Ran:
    """One worker run: its failure record, or what the comparison needs."""

    job: _RunJob
    runtime: str
    cases: Sequence[int] | None
    failure: dict[str, Any] | None = None
    result: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None

    def judge(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.failure is not None or self.out is None:
            return dict(self.failure or {}), {}
        golden_outputs = self.job.golden_outputs
        if self.cases is not None:
            golden_outputs = [golden_outputs[i] for i in self.cases]
        record, timings = self.job.compare(self.result, load_scratch(self.out), golden_outputs, self.cases)
        record["checker"] = self.runtime
        return record, timings


@dataclass(kw_only=True)
class _RunJob:
    pool: Pool
    artifact: Path
    io: IoMap
    golden_inputs: Path
    golden_outputs: Cases
    policy: TolerancePolicy
    precision: str
    log: Path
    work_dir: Path
    timeout_s: float | None
    output_names: Sequence[str] | None
    options: dict[str, Any]

    def sub_job(self, runtime: str, cases: Sequence[int] | None) -> dict[str, Any]:
        """The worker job that runs the artifact with ``runtime`` on ``cases`` (None: all)."""
        payload = {"runtime": runtime, "artifact": str(self.artifact), "io": self.io.to_dict(),
                   "inputs": str(self.golden_inputs), "cases": None if cases is None else list(cases),
                   "out": str(self._out(runtime)), "options": self.options}
        return {"kind": "run", "payload": payload, "step": f"run:{runtime}", "log": str(self.log),
                "work_dir": str(self.work_dir)}

    def _out(self, runtime: str) -> Path:
        return self.work_dir / f"outputs-{runtime}.bin"  # the worker makes the folder

    def run(self, runtime: str, cases: Sequence[int] | None) -> _Ran:
        sub = self.sub_job(runtime, cases)
        try:
            result, _ = self.pool.call(kind="run", payload=sub["payload"], framework=runtime_info(runtime).framework,
                                       step=sub["step"], log=self.log, work_dir=self.work_dir,
                                       timeout_s=self.timeout_s)
        except JobFailed as failed:
            return self.failed(runtime, cases, failed.error)
        return self.ran(runtime, cases, result)

    def ran(self, runtime: str, cases: Sequence[int] | None, result: dict[str, Any]) -> _Ran:
        return _Ran(job=self, runtime=runtime, cases=cases, result=result, out=self._out(runtime))

    def failed(self, runtime: str, cases: Sequence[int] | None, error: PortableModelsError) -> _Ran:
        status = "unverified" if isinstance(error, UnverifiedError) else "error"
        record: dict[str, Any] = {"status": status, "runtime": runtime, "checker": runtime,
                                  "stage": error.stage or f"run:{runtime}", "error": _error_dict(error)}
        if isinstance(error, UnverifiedError):
            record["checked"] = error.checked
        return _Ran(job=self, runtime=runtime, cases=cases, failure=record)

    def compare(self, result: dict[str, Any], actual: Cases, golden_outputs: Cases,
                cases: Sequence[int] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        results = compare_outputs(golden_outputs, actual, precision=self.precision, policy=self.policy,
                                  output_names=self.output_names)
        record = {"status": verdict(results), "runtime": result["runtime"], "checked_by": result["label"],
                  "outputs": {r.name: r.to_dict() for r in results}}
        for name, res in record["outputs"].items():
            hist = error_histogram(golden_outputs, actual, name)
            if hist is not None:
                res["abs_error_hist"] = hist
        worst = _worst(results)
        if worst is not None and worst.status != "pass":
            record["reason"] = f"{worst.name}: {worst.reason}"
        if cases is not None:
            record["cases_checked"] = list(cases)
        runs = result.get("run_ms") or [0.0]
        timings = {"load_s": round(float(result["load_s"]), 4),
                   "run_ms_p50": round(statistics.median(runs), 3)}
        return record, timings


#: decades of |artifact - reference| that the error histogram counts (plus exact zeros).
HIST_DECADES = tuple(range(-12, 3))


def error_histogram(reference: Cases, actual: Cases, name: str) -> dict[str, Any] | None:
    """Counts of absolute errors per decade (1e-12 … 1e2) for one float output, for the
    plots of the HTML report. None when shapes or dtypes make it meaningless."""
    import numpy as np

    diffs = []
    for ref, got in zip(reference, actual, strict=False):
        g, a = ref.get(name), got.get(name)
        if g is None or a is None or g.shape != a.shape or g.dtype.kind != "f" or a.dtype.kind not in "fc":
            return None
        d = np.abs(a.astype(np.float64) - g.astype(np.float64)).ravel()
        diffs.append(d[np.isfinite(d)])
    if not diffs:
        return None
    d = np.concatenate(diffs)
    zeros = int((d == 0).sum())
    logs = np.log10(d[d > 0]) if (d > 0).any() else np.zeros(0)
    edges = [float(e) for e in HIST_DECADES]
    counts, _ = np.histogram(np.clip(logs, edges[0], edges[-1]), bins=[*edges, edges[-1] + 1])
    return {"decades": edges, "counts": [int(c) for c in counts], "zeros": zeros}


def _worst(results: Sequence[OutputParity]) -> OutputParity | None:
    failing = [r for r in results if r.status != "pass"]
    return failing[0] if failing else (results[0] if results else None)


def _attempt(ctx: TargetContext, route: RouteInfo, precision: str,
             attempt_dir: Path) -> tuple[Attempt, Artifact | None]:
    """Convert with one route and check the result. Never raises for a converter's failure."""
    key = route.target if precision == "float32" else f"{route.target}-{precision}"
    log = ctx.root / "logs" / f"{key}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        check_requires(route)
    except PortableModelsError as exc:
        return Attempt(route=route.name, status="skipped", stage="requires", error=_error_dict(exc)), None
    out_dir = attempt_dir / "out"
    cache_key = ctx.cache_key(route, precision) if ctx.cache else None
    if cache_key is not None:
        hit = _from_cache(cache_key, out_dir)
        if hit is not None:
            return hit
    ctx.progress(key, "converting", route.name)
    payload = {"route": route.name, "source_file": str(ctx.source_file), "out_dir": str(out_dir),
               "work_dir": str(attempt_dir / "work"), "inputs": [s.to_dict() for s in ctx.inputs],
               "outputs": [s.to_dict() for s in ctx.outputs],
               "dims": {k: v.to_dict() for k, v in ctx.dims.items()}, "samples": str(ctx.golden_inputs),
               "precision": precision, "options": ctx.options,
               "prior": {k: str(v) for k, v in _private_copies(ctx.prior, attempt_dir / "prior").items()}}
    try:
        conv, _ = ctx.pool.call(kind="convert", payload=payload, framework=route.framework,
                                step=f"convert:{route.target} ({route.name})", log=log,
                                work_dir=attempt_dir / "work", timeout_s=ctx.timeout_s)
    except JobFailed as failed:
        attempt = Attempt(route=route.name, status="error", stage="convert",
                          error=_error_dict(failed.error), seconds=time.monotonic() - start)
        if cache_key is not None:
            from portable_models import cache

            cache.store(cache_key, {"attempt": attempt.to_dict(), "artifact": None,
                                    "error": attempt.error}, None)
        return attempt, None
    io = IoMap.from_dict(conv["io"])
    meta = dict(conv.get("meta") or {})
    cases = None
    if meta.get("dynamic") is False and ctx.dims:
        cases = fixed_shape_cases(ctx.golden_inputs)
        meta["fixed_shape"] = True
        meta["cases_checked"] = cases
    ctx.progress(key, "running", route.name)
    parity, timings = check_artifact(
        ctx.pool, artifact=out_dir / conv["file"], runtime=route.runtime, io=io,
        golden_inputs=ctx.golden_inputs, golden_outputs=ctx.golden_outputs, policy=ctx.policy,
        precision=precision, log=log, work_dir=attempt_dir / "run", timeout_s=ctx.timeout_s,
        cases=cases, options=ctx.runner_options(precision))
    attempt = Attempt(route=route.name, status=parity["status"], seconds=time.monotonic() - start,
                      stage=parity.get("stage") or ("compare" if parity["status"] == "fail" else None),
                      error=parity.get("error"),
                      parity={k: v for k, v in parity.items() if k not in ("outputs", "error")})
    art = Artifact(target=route.target, status=parity["status"], precision=conv["precision"],
                   route_name=route.name, file=f"artifacts/{conv['file']}", runtime=route.runtime,
                   route=conv["steps"], io=io, parity=parity,
                   timings={"convert_s": round(float(conv["convert_s"]), 3), **timings},
                   meta=meta)
    if cache_key is not None:
        from portable_models import cache

        cache.store(cache_key, {"attempt": attempt.to_dict(), "artifact": art.to_dict(), "file": conv["file"]},
                    out_dir)
    art.meta["_staged"] = str(out_dir / conv["file"])
    return attempt, art


def _private_copies(prior: dict[str, Path], folder: Path) -> dict[str, Path]:
    """Routes get copies of other targets' artifacts: a converter that rewrites its input
    (onnx2tf does) must never change an artifact already hashed into the bundle."""
    copies: dict[str, Path] = {}
    for key, path in prior.items():
        dest = folder / key / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, dest, dirs_exist_ok=True)
        else:
            shutil.copyfile(path, dest)
        copies[key] = dest
    return copies


def _from_cache(key: str, out_dir: Path) -> tuple[Attempt, Artifact | None] | None:
    from portable_models import cache

    hit = cache.load(key, out_dir)
    if hit is None:
        return None
    attempt = Attempt.from_dict(hit["attempt"])
    art = Artifact.from_dict(hit["artifact"]) if hit.get("artifact") else None
    if art is not None:
        if not (out_dir / hit["file"]).exists():
            return None
        art.meta["_staged"] = str(out_dir / hit["file"])
        art.meta["cache"] = "hit"
    return attempt, art


def _rank(status: str) -> int:
    return {"pass": 0, "unverified": 1, "fail": 2, "error": 3, "skipped": 4}.get(status, 5)


def _art_rank(art: Artifact) -> tuple[int, bool]:
    """Full passes beat passes of a fixed-shape artifact (which ignores dynamic dims)."""
    return _rank(art.status), bool(art.meta.get("fixed_shape"))


def build_target(ctx: TargetContext, target: str, precision: str = "float32",
                 force_route: str | None = None) -> Artifact:
    """Try the target's routes in order; keep the first that passes (or, failing that, the
    best unverified one). Failed artifacts are not kept; their attempts are recorded."""
    key = target if precision == "float32" else f"{target}-{precision}"
    routes = routes_for(target, ctx.source_framework)
    if force_route:
        routes = [r for r in routes if r.name == force_route]
    attempts: list[Attempt] = []
    best: Artifact | None = None
    for n, route in enumerate(routes):
        attempt, art = _attempt(ctx, route, precision, ctx.root / ".attempts" / f"{key}-{n}-{route.name}")
        attempts.append(attempt)
        if art is not None and (best is None or _art_rank(art) < _art_rank(best)):
            best = art
        if attempt.status == "pass" and not (art and art.meta.get("fixed_shape")):
            break
        rest = routes[n + 1:]
        if attempt.status == "unverified" and all(checking_runtime(r.runtime) == r.runtime == route.runtime
                                                 for r in rest):
            break  # no runtime here can run this target: another route cannot do better
    if best is None or best.status not in ("pass", "unverified"):
        status = min((a.status for a in attempts), key=_rank, default="skipped")
        parity = dict(best.parity) if best else {}
        if not routes:
            parity = {"status": "skipped", "error": {
                "code": "no_route", "message": f"no route reaches {target} from a {ctx.source_framework} source"
                + (f" named {force_route!r}" if force_route else "")}}
        failed = Artifact(target=target, status=status, precision=precision, attempts=attempts,
                          parity=parity)
        ctx.progress(key, status, attempts[-1].route if attempts else "no route")
        return failed
    _keep(ctx, best, key)
    best.attempts = attempts
    ctx.progress(key, best.status, best.route_name or "")
    return best


def _keep(ctx: TargetContext, art: Artifact, key: str) -> None:
    """Move the winning artifact (and any external data files beside it) into artifacts/."""
    staged = Path(art.meta.pop("_staged"))
    dest = ctx.root / "artifacts" / staged.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    extra = art.meta.get("external_data") or []
    for name in [staged.name, *([extra] if isinstance(extra, str) else extra)]:
        source, target = staged.parent / name, dest.parent / name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), target)
    art.file = dest.relative_to(ctx.root).as_posix()
    art.sha256 = sha256_path(dest)
    art.bytes = path_bytes(dest)
    if art.target == "onnx" and art.precision == "float32":
        ctx.prior["onnx"] = dest
