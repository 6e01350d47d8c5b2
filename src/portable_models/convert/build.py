"""One target, end to end: try its routes in order — convert, run, compare — and keep
the first artifact that passes parity. Every attempt is recorded, so a user sees
"litert-torch failed at convert: …; onnx2tf passed". Running and comparing an artifact is
:mod:`portable_models.compare.check`, which ``verify`` shares.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portable_models.compare.accuracy import TaskCheck
from portable_models.compare.check import (
    CheckJob,
    check_artifact,
    checking_runtime,
    error_dict,
    runner_options,
)
from portable_models.contract.model import Artifact, Attempt
from portable_models.convert import compat
from portable_models.convert.base import RouteInfo, check_requires
from portable_models.convert.registry import routes_for
from portable_models.core import golden
from portable_models.core.golden import Cases
from portable_models.core.hashing import path_bytes, sha256_path
from portable_models.core.iomap import IoMap
from portable_models.core.spec import DimSpec, TensorSpec
from portable_models.core.targets import TARGET_INFO
from portable_models.core.tolerance import TolerancePolicy
from portable_models.errors import DynamicDimsRefused, PortableModelsError, RuntimeRunError
from portable_models.isolation.pool import JobFailed, Pool
from portable_models.run import runtime_info

__all__ = ["TargetContext", "build_target", "Progress"]

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
    #: labels for the golden cases: each artifact's accuracy is judged too
    task: TaskCheck | None = None
    timeout_s: float | None = None
    prior: dict[str, Path] = field(default_factory=dict)
    #: the golden cases that are held-out real data (judged apart from the random ones)
    real_cases: tuple[int, ...] = ()
    #: the io map of each artifact in ``prior``
    prior_io: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: Progress = _no_progress
    cache: bool = True
    _inputs_digest: str = ""

    def runner_options(self, precision: str) -> dict[str, Any]:
        return runner_options(self.inputs, self.outputs, self.dims, precision)

    def cache_key(self, route: RouteInfo, precision: str, fixed_fallback: bool = True,
                  options: dict[str, Any] | None = None) -> str:
        """Everything an attempt's outcome depends on (see :mod:`portable_models.core.cache`)."""
        from portable_models.core import cache

        if not self._inputs_digest:
            golden_out = self.golden_inputs.parent / "outputs.npz"
            self._inputs_digest = "|".join(cache.content_digest(p) for p in
                                           (self.source_file, self.golden_inputs, golden_out))
        runtime = runtime_info(route.runtime)
        parts = {"inputs": self._inputs_digest, "route": route.name, "impl": route.impl,
                 "precision": precision, "options": _keyed(options if options is not None else self.options),
                 "tolerance": self.policy.to_dict(),
                 "specs": self.runner_options(precision), "runtime": checking_runtime(route.runtime),
                 "prior": {k: cache.content_digest(v) for k, v in sorted(self.prior.items())},
                 **({} if self.task is None else {"task": {**self.task.to_contract(), "labels": golden.cases_digest(
                     [{"labels": a} for a in self.task.labels])}}),
                 **({} if fixed_fallback else {"fixed_shape_fallback": False})}
        return cache.attempt_key(parts=parts, packages=route.requires + runtime.requires)


def _keyed(options: dict[str, Any]) -> dict[str, Any]:
    """Options as the cache keys them: the calibration data by its content, not its path;
    the eager model's trace by whether there is one (it is made from the same model as the
    captured program, whose content the key holds)."""
    keyed = dict(options)
    if calibration := options.get("calibration"):
        keyed["calibration"] = {k: v for k, v in calibration.items() if k != "file"}
    if trace := options.get("eager_trace"):
        keyed["eager_trace"] = "traced" if trace.get("file") else trace
    return keyed


def _attempt(ctx: TargetContext, route: RouteInfo, precision: str, attempt_dir: Path,
             fixed_fallback: bool = True, passes: tuple[str, ...] = ()) -> tuple[Attempt, Artifact | None]:
    """Convert with one route and check the result. Never raises for a converter's failure.
    ``fixed_fallback``: False asks a route that would fall back to fixed shapes to refuse.
    ``passes``: compatibility passes applied to the program first (:mod:`.compat`); the
    attempt is then recorded as ``route+pass``."""
    key = route.target if precision == "float32" else f"{route.target}-{precision}"
    label = "+".join([route.name, *passes])
    options = {**ctx.options, "compat_passes": list(passes)} if passes else ctx.options
    if ctx.prior_io:  # how to feed each twin handed over (a variant made from it is fed the same way)
        options = {**options, "prior_io": dict(ctx.prior_io)}
    log = ctx.root / "logs" / f"{key}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        check_requires(route)
    except PortableModelsError as exc:
        return Attempt(route=label, status="skipped", stage="requires", error=error_dict(exc)), None
    out_dir = attempt_dir / "out"
    cache_key = ctx.cache_key(route, precision, fixed_fallback, options) if ctx.cache else None
    if cache_key is not None:
        hit = _from_cache(cache_key, out_dir)
        if hit is not None:
            return hit
    ctx.progress(key, "converting", label)
    payload = {"route": route.name, "source_file": str(ctx.source_file), "out_dir": str(out_dir),
               "work_dir": str(attempt_dir / "work"), "inputs": [s.to_dict() for s in ctx.inputs],
               "outputs": [s.to_dict() for s in ctx.outputs],
               "dims": {k: v.to_dict() for k, v in ctx.dims.items()}, "samples": str(ctx.golden_inputs),
               "precision": precision, "options": options,
               "prior": {k: str(v) for k, v in _private_copies(ctx.prior, attempt_dir / "prior").items()},
               "fixed_shape_fallback": fixed_fallback}
    try:
        conv, _ = ctx.pool.call(kind="convert", payload=payload, framework=route.framework,
                                step=f"convert:{route.target} ({label})", log=log,
                                work_dir=attempt_dir / "work", timeout_s=ctx.timeout_s)
    except JobFailed as failed:
        attempt = Attempt(route=label, status="error", stage="truth" if failed.error.stage == "truth" else "convert",
                          error=error_dict(failed.error), seconds=time.monotonic() - start)
        if cache_key is not None:
            from portable_models.core import cache

            cache.store(cache_key, {"attempt": attempt.to_dict(), "artifact": None,
                                    "error": attempt.error}, None)
        return attempt, None
    io = IoMap.from_dict(conv["io"])
    meta = dict(conv.get("meta") or {})
    cases = _fixed_shape_cases(ctx, meta)
    if cases == []:  # checked on nothing, it would pass by default
        error = RuntimeRunError(f"the fixed-shape artifact takes inputs of shapes {meta.get('input_shapes')}; "
                                "no golden case has them", stage="run", fix="export with more golden cases")
        return Attempt(route=label, status="error", stage="run", error=error_dict(error),
                       seconds=time.monotonic() - start), None
    if cases is not None:
        meta["fixed_shape"] = True
        meta["cases_checked"] = cases
    ctx.progress(key, "running", label)
    job = CheckJob(pool=ctx.pool, artifact=out_dir / conv["file"], io=io, golden_inputs=ctx.golden_inputs,
                   golden_outputs=ctx.golden_outputs, policy=ctx.policy, precision=precision, log=log,
                   work_dir=attempt_dir / "run", timeout_s=ctx.timeout_s, options=ctx.runner_options(precision),
                   task=ctx.task, real_cases=ctx.real_cases)
    parity, timings = check_artifact(job, route.runtime, cases)
    attempt = Attempt(route=label, status=parity["status"], seconds=time.monotonic() - start,
                      stage=parity.get("stage") or ("compare" if parity["status"] == "fail" else None),
                      error=parity.get("error"),
                      parity={k: v for k, v in parity.items() if k not in ("outputs", "error")})
    art = Artifact(target=route.target, status=parity["status"], precision=conv["precision"],
                   route_name=label, file=f"artifacts/{conv['file']}", runtime=route.runtime,
                   route=conv["steps"], io=io, parity=parity,
                   timings={"convert_s": round(float(conv["convert_s"]), 3), **timings},
                   meta=meta)
    if cache_key is not None:
        from portable_models.core import cache

        cache.store(cache_key, {"attempt": attempt.to_dict(), "artifact": art.to_dict(), "file": conv["file"]},
                    out_dir)
    art.meta["_staged"] = str(out_dir / conv["file"])
    return attempt, art


def _fixed_shape_cases(ctx: TargetContext, meta: dict[str, Any]) -> list[int] | None:
    """The golden cases a fixed-shape artifact (``meta["dynamic"] is False``) is checked on:
    those of its input shapes, as its route reports them (``meta["input_shapes"]``; else
    case 0's, the sample it was converted with). None (all cases, and the artifact is not
    recorded as fixed-shape) when it is not fixed, or when nothing is dynamic and every case
    fits."""
    if meta.get("dynamic") is not False:
        return None
    cases = golden.load_cases(ctx.golden_inputs)
    fits = golden.cases_of_shape(cases, meta.get("input_shapes"))
    return fits if ctx.dims or len(fits) < len(cases) else None


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
    from portable_models.core import cache

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
    best unverified one). Failed artifacts are not kept; their attempts are recorded.
    A route that would fall back to fixed shapes when its converter refuses the dynamic
    dims does so only after the later routes: one of them may keep the dims (and the
    fixed-shape conversion, seconds of work, is then not needed)."""
    key = target if precision == "float32" else f"{target}-{precision}"
    routes = routes_for(target, ctx.source_framework, precision)
    if force_route:
        routes = [r for r in routes if r.name == force_route]
    tries = _Tries(ctx=ctx, key=key, precision=precision)
    deferred = tries.in_order(routes)
    if deferred:  # no route kept the dims: the fixed-shape conversions put off, in route order
        tries.fixed_shapes(deferred)
    return tries.outcome(target, routes, force_route)


def _settled(attempt: Attempt, art: Artifact | None, route: RouteInfo, rest: list[RouteInfo]) -> bool:
    """A route passed with the dims kept, or nothing here can run this target's artifacts
    (an ``unverified`` that no later route could turn into a ``pass``)."""
    if attempt.status == "pass" and not (art and art.meta.get("fixed_shape")):
        return True
    return attempt.status == "unverified" and all(
        checking_runtime(r.runtime) == r.runtime == route.runtime for r in rest)


@dataclass
class _Tries:
    """The attempts at one target, in order, and the best artifact they made so far."""

    ctx: TargetContext
    key: str
    precision: str
    attempts: list[Attempt] = field(default_factory=list)
    best: Artifact | None = None

    def one(self, n: int, route: RouteInfo, *, suffix: str = "", fixed_fallback: bool = True,
            passes: tuple[str, ...] = ()) -> tuple[Attempt, Artifact | None]:
        """Attempt ``route`` (the ``n``-th), record it, and keep its artifact if it is the best
        yet. A conversion that fails with an error a compatibility pass addresses is attempted
        once more with the pass (:mod:`.compat`); if that fails with an error naming passes not
        yet applied, again with them added (at most once per pass: the set only grows)."""
        attempt, art = _attempt(self.ctx, route, self.precision,
                                self.ctx.root / ".attempts" / f"{self.key}-{n}-{route.name}{suffix}",
                                fixed_fallback=fixed_fallback, passes=passes)
        self.attempts.append(attempt)
        if art is not None and (self.best is None or _art_rank(art) < _art_rank(self.best)):
            self.best = art
        if attempt.status == "error" and attempt.stage == "convert":
            named = compat.passes_for(route.name, str((attempt.error or {}).get("message", "")))
            wanted = tuple(p for p in named if p not in passes)
            if wanted:
                return self.one(n, route, suffix=suffix + "+" + "+".join(wanted), fixed_fallback=fixed_fallback,
                                passes=passes + wanted)
        return attempt, art

    def in_order(self, routes: list[RouteInfo]) -> list[tuple[int, RouteInfo]]:
        """Try ``routes`` in order until one settles the target. Returns the routes whose
        fixed-shape fallback was put off, when none settled it (else an empty list)."""
        deferred: list[tuple[int, RouteInfo]] = []
        for n, route in enumerate(routes):
            defer = route.fixed_fallback and bool(self.ctx.dims) and n + 1 < len(routes)
            attempt, art = self.one(n, route, fixed_fallback=not defer)
            if (attempt.error or {}).get("code") == DynamicDimsRefused.code:
                deferred.append((n, route))
            elif _settled(attempt, art, route, routes[n + 1:]):
                return []
        return deferred

    def fixed_shapes(self, deferred: list[tuple[int, RouteInfo]]) -> None:
        for n, route in deferred:
            if self.one(n, route, suffix="-fixed")[0].status == "pass":
                return

    def outcome(self, target: str, routes: list[RouteInfo], force_route: str | None) -> Artifact:
        """The kept artifact (moved into the bundle), or the failed target with its attempts."""
        best, ctx = self.best, self.ctx
        if best is None or best.status not in ("pass", "unverified"):
            status = min((a.status for a in self.attempts), key=_rank, default="skipped")
            parity = dict(best.parity) if best else {}
            if not routes:
                parity = {"status": "skipped", "error": {
                    "code": "no_route", "message": (
                        f"no route reaches {target} from a {ctx.source_framework} source" if self.precision == "float32"
                        else f"no route makes a {self.precision} {target} from a {ctx.source_framework} source")
                    + (f" named {force_route!r}" if force_route else "")}}
            ctx.progress(self.key, status, self.attempts[-1].route if self.attempts else "no route")
            failed = Artifact(target=target, status=status, precision=self.precision, attempts=self.attempts,
                              parity=parity)
            if best is not None and best.status == "fail" and best.meta.get("_staged"):
                # the closest miss, still in .attempts: what export diagnoses (never kept)
                failed.meta["_diagnosable"] = {"file": best.meta["_staged"], "route": best.route_name,
                                               "io": best.io.to_dict() if best.io else None}
            return failed
        _keep(ctx, best, self.key)
        best.attempts = self.attempts
        ctx.progress(self.key, best.status, best.route_name or "")
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
    if art.precision == "float32" and any(art.target in t.consumes for t in TARGET_INFO.values()):
        ctx.prior[art.target] = dest  # a later target converts from it
        if art.io is not None:
            ctx.prior_io[art.target] = art.io.to_dict()
