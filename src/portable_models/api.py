"""export / verify / load_contract: the flow of DESIGN.md, nothing else.

capture -> convert (one isolated job per route) -> run (one runtime per artifact)
-> compare -> contract + reports.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.capture import Captured, CaptureOptions, framework_of
from portable_models.compare.accuracy import ACCURACY_DROP_MAX, TaskCheck, accuracy
from portable_models.compare.check import (
    CheckJob,
    Judge,
    PlannedRun,
    checking_runtime,
    plan_artifact,
    run_planned,
    runner_options,
)
from portable_models.contract.bundle import Staging, check_file, list_files, writing
from portable_models.contract.model import Artifact, Contract, load_contract
from portable_models.contract.reports import write_reports
from portable_models.contract.reports.table import render_table
from portable_models.contract.trust import admit, refusal
from portable_models.convert.build import Progress, TargetContext, build_target
from portable_models.convert.registry import routes_for
from portable_models.core import golden
from portable_models.core.hashing import sha256_path
from portable_models.core.paths import bundle_path, user_path
from portable_models.core.targets import TARGET_INFO, TARGETS
from portable_models.core.tolerance import TolerancePolicy
from portable_models.errors import ContractError, UsageError
from portable_models.isolation.pool import LimitedPool, Pool, WorkerLimits, shared_pool
from portable_models.isolation.sandbox import confinement, sandbox_reason
from portable_models.run.base import COMPUTE_UNITS
from portable_models.verify_kept import helper, scratch_done, scratch_folder, scratch_root

__all__ = ["ExportOptions", "Bundle", "VerifyReport", "export", "verify", "load_contract"]

_PRECISIONS = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
               "int8-dynamic": "int8-dynamic", "int8": "int8"}
#: the order variants are built and reported in (float32, the reference twin, first)
_VARIANTS = ["float32", "float16", "int8-dynamic", "int8"]


@dataclass(kw_only=True)
class ExportOptions(CaptureOptions):
    """Everything :func:`export` can be told, besides the model and its example inputs: what
    the capture is told (:class:`~portable_models.capture.CaptureOptions`: names, dynamic dims,
    input ranges, layouts, samples, cases, seed, trust_model, cache) and the rest below."""

    targets: str | Sequence[str] = "all"
    #: inputs that calibrate the ``int8`` variants' activation ranges (real data, a few dozen
    #: cases of the example's shape); required for ``int8``, unused otherwise.
    calibration: Sequence[Mapping[str, np.ndarray]] | None = None
    #: one class index per row of each ``samples`` case (real, labelled data): every artifact's
    #: accuracy on them is judged next to the source model's, a drop over
    #: ``accuracy_drop_max`` points fails it. ``label_output``: the output with the class
    #: scores (default: the first).
    labels: Sequence[Any] | None = None
    label_output: str | None = None
    accuracy_drop_max: float = ACCURACY_DROP_MAX
    tolerance: TolerancePolicy | Mapping[str, Mapping[str, float | None]] | None = None
    precision: str | Sequence[str] = "fp32"
    routes: Mapping[str, str] = field(default_factory=dict)
    overwrite: bool = False
    timeout_s: float = 600.0
    memory_mb: int | None = 8192
    jobs: int = 1
    name: str | None = None
    progress: Progress | None = None
    #: how the source file was loaded ("safe" or "trusted"); set by export_file.
    source_trust: str = "safe"


def _targets(value: str | Sequence[str]) -> list[str]:
    wanted = list(TARGETS) if value == "all" else [value] if isinstance(value, str) else list(value)
    unknown = [t for t in wanted if t not in TARGETS]
    if unknown or not wanted:
        raise UsageError(f"unknown target(s) {unknown or wanted}", fix=f"use 'all' or some of {', '.join(TARGETS)}")
    return [t for t in TARGETS if t in wanted]


def _precisions(value: str | Sequence[str]) -> list[str]:
    names = [value] if isinstance(value, str) else list(value)
    out = []
    for n in names:
        if n not in _PRECISIONS:
            raise UsageError(f"unknown precision {n!r}", fix="use fp32, fp16, int8-dynamic or int8")
        out.append(_PRECISIONS[n])
    return sorted(set(out) | {"float32"}, key=_VARIANTS.index)


def _policy(value: TolerancePolicy | Mapping[str, Mapping[str, float | None]] | None) -> TolerancePolicy:
    if isinstance(value, TolerancePolicy):
        return value
    return TolerancePolicy(per_output={k: dict(v) for k, v in (value or {}).items()})


@dataclass
class Bundle:
    """A written bundle: its folder and its contract."""

    path: Path
    contract: Contract

    @property
    def ok(self) -> bool:
        """Every requested target converted and passed parity."""
        return self.passed()

    def passed(self, allow_unverified: Sequence[str] = ()) -> bool:
        """Like :attr:`ok`, letting the named targets through while ``unverified``."""
        return bool(self.contract.artifacts) and all(
            a.status == "pass" or (a.status == "unverified" and a.target in allow_unverified)
            for a in self.contract.artifacts)

    def report(self) -> str:
        return render_table(self.contract)


@dataclass
class VerifyReport:
    """What :func:`verify` found: per artifact a fresh parity record, plus bundle problems."""

    path: Path
    contract: Contract
    problems: list[str] = field(default_factory=list)
    allow_unverified: tuple[str, ...] = ()
    #: how many artifacts ran in their runtime in this verify
    ran: int = 0
    #: what is worth knowing but fails nothing (files the contract does not list)
    notes: list[str] = field(default_factory=list)
    #: the OS sandbox the artifacts ran in (None: none)
    sandbox: str | None = None

    @property
    def ok(self) -> bool:
        """Every chosen artifact ran now and passed (``unverified``/``skipped`` only for the
        allowed targets), and the bundle has no problem."""
        if self.problems or not self.contract.artifacts:
            return False
        return all(a.status == "pass" or (a.status in ("unverified", "skipped") and a.target in self.allow_unverified)
                   for a in self.contract.artifacts)

    def summary(self) -> str:
        """One line: how many artifacts ran, and where."""
        where = f"in the {self.sandbox} sandbox" if self.sandbox else "without an OS sandbox"
        return f"ran {self.ran} of {len(self.contract.artifacts)} artifacts in their runtimes, {where}"

    @property
    def results(self) -> list[Artifact]:
        return self.contract.artifacts

    def table(self) -> str:
        return render_table(self.contract, problems=self.problems)

    def __str__(self) -> str:
        return self.table()


def _capture(model: Any, example_inputs: Any, opts: ExportOptions, source_dir: Path) -> Captured:
    framework = framework_of(model)
    copts = CaptureOptions(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(CaptureOptions)})
    if framework == "torch":
        from portable_models.capture.torch import capture_torch

        return capture_torch(model, example_inputs, copts, source_dir)
    if framework == "keras":
        from portable_models.capture.keras import capture_keras

        return capture_keras(model, example_inputs, copts, source_dir)
    if framework == "onnx":
        from portable_models.capture.onnx import capture_onnx

        return capture_onnx(model, example_inputs, copts, source_dir)
    raise UsageError(f"cannot export a {type(model).__module__}.{type(model).__name__}",
                     fix="pass a torch.nn.Module or a Keras 3 model")


def export(model: Any, example_inputs: Any, *, out: str | Path, options: ExportOptions | None = None,
           **overrides: Any) -> Bundle:
    """Capture ``model``, convert it to every requested target, run each artifact in its
    real runtime, compare with the source, and write the bundle at ``out``."""
    fields = {f.name for f in dataclasses.fields(ExportOptions)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UsageError(f"export() got unknown option(s) {unknown}", fix=f"options are {sorted(fields)}")
    opts = dataclasses.replace(options or ExportOptions(), **overrides)
    targets, precisions, policy = _targets(opts.targets), _precisions(opts.precision), _policy(opts.tolerance)
    if "int8" in precisions and not opts.calibration:
        raise UsageError("precision int8 (static, calibrated) needs calibration data",
                         fix="pass calibration=[{input: array}, …] (--calibration FILE.npz) with a few dozen "
                             "real inputs, or ask for int8-dynamic, which needs none")
    if opts.jobs < 1:
        raise UsageError(f"jobs={opts.jobs}", fix="use jobs >= 1")
    dest = user_path(out)
    with Staging(dest, overwrite=opts.overwrite) as st:
        pool = shared_pool(WorkerLimits(timeout_s=opts.timeout_s, memory_mb=opts.memory_mb))
        warm = _WARM_MODULES.get(framework_of(model))
        clones = _cloned_lanes(opts.jobs)
        early = 1 if clones else _early_lanes(opts.jobs)
        if warm:  # the workers import torch and its export machinery while the model is captured
            pool.prewarm("torch", warm, lanes=early, threads=_lane_threads(opts.jobs), clones=clones)
        with writing("the source and golden data", st.path):
            captured = _capture(model, example_inputs, opts, st.path / "source")
            golden.save_cases(st.path / "golden" / "inputs.npz", captured.golden_inputs)
            golden.save_cases(st.path / "golden" / "outputs.npz", captured.golden_outputs)
        if warm and early + len(clones) < opts.jobs:  # the lanes that did not fit beside the capture
            pool.prewarm("torch", warm, lanes=range(early, opts.jobs), threads=_lane_threads(opts.jobs),
                         one_by_one=True)
        with writing("the labels", st.path):
            task = _task(opts, captured, st.path)
        artifacts = _convert_all(pool, captured, st.path, opts, targets, precisions, policy, task)
        with writing("the bundle", st.path):
            shutil.rmtree(st.path / ".attempts", ignore_errors=True)
            contract = _contract(captured, st.path, opts, policy, artifacts, name=opts.name or dest.name, task=task)
            _check_artifact_hashes(st.path, artifacts)
            write_reports(contract, st.path / "reports")
            contract.files = list_files(st.path)
            st.write_text("contract.json", contract.to_json())
            st.commit()
    return Bundle(path=dest, contract=contract)


def _check_artifact_hashes(root: Path, artifacts: list[Artifact]) -> None:
    """Every kept artifact is still the file that was checked (a programming error otherwise)."""
    for art in artifacts:
        if art.file is not None and art.sha256 is not None:
            now = sha256_path(root / art.file)
            assert now == art.sha256, f"{art.file} changed after it was checked"


def lanes(targets: list[str], n: int) -> list[list[int]]:
    """Split the jobs (their targets, in order) into at most ``n`` lanes: targets of one
    family stay together (onnx before tflite, which reuses the ONNX artifact) unless that
    leaves a lane idle; groups go to the least-loaded lane, largest first. Indices keep
    their order within a lane."""
    groups: list[list[int]] = []
    for family in dict.fromkeys(info.family for info in TARGET_INFO.values() if info.family):
        idx = [i for i, t in enumerate(targets) if TARGET_INFO[t].family == family]
        if idx:
            groups.append(idx)
    groups += [[i] for i, t in enumerate(targets) if not TARGET_INFO[t].family]
    if len(groups) < n:  # too few families to fill the lanes: every job on its own
        groups = [[i] for i in range(len(targets))]
    cost = lambda g: sum(TARGET_INFO[targets[i]].cost for i in g)  # noqa: E731
    plan: list[list[int]] = [[] for _ in range(min(n, len(groups)))]
    load = [0.0] * len(plan)
    for g in sorted(groups, key=cost, reverse=True):
        k = load.index(min(load))
        plan[k] += g
        load[k] += cost(g)
    return [sorted(p) for p in plan if p]


#: what a worker imports ahead of its first job, per source framework.
_WARM_MODULES = {"torch": ["torch", "torch.export", "torch._dynamo"]}


def _early_lanes(jobs: int) -> int:
    """How many lanes warm their worker during the capture: those that leave the capture a
    core of its own. Every lane waits for the capture, and lane 0 holds the costliest targets
    (see :func:`lanes`): on two cores a second worker importing torch beside the capture and
    lane 0's worker slows both, so it starts when the capture is done and lane 0's worker is
    ready (measured here: lane 0's warm-up took 7.2 s with lane 1's beside it, 3.9 s alone)."""
    return max(1, min(jobs, (os.cpu_count() or 1) - 1))


def _cloned_lanes(jobs: int) -> range:
    """The lanes whose workers are forked from lane 0's once it has imported torch, instead
    of each importing it again (~3.7 s of CPU per lane here): on Linux, where a process that
    has imported torch (and not yet run it) forks safely; lane 0 alone warms up then."""
    return range(1, jobs) if sys.platform.startswith("linux") and hasattr(os, "fork") else range(0)


def _lane_threads(jobs: int) -> int | None:
    """Thread-pool size per lane: the cores split between the lanes (None: one lane)."""
    return max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None


def _convert_all(pool: LimitedPool, captured: Captured, root: Path, opts: ExportOptions, targets: list[str],
                 precisions: list[str], policy: TolerancePolicy, task: TaskCheck | None = None) -> list[Artifact]:
    scratch = Path(tempfile.mkdtemp(prefix="portable-models-"))
    try:
        ctx = TargetContext(pool=pool, root=root, source_framework=captured.framework,
                            source_file=captured.source_file, inputs=captured.inputs,
                            outputs=captured.outputs, dims=captured.dims,
                            golden_inputs=root / "golden" / "inputs.npz",
                            golden_outputs=captured.golden_outputs, policy=policy,
                            timeout_s=opts.timeout_s, cache=opts.cache,
                            options={"trust_model": opts.trust_model,
                                     "keras_custom_modules": captured.meta.get("custom_modules") or [],
                                     **_calibration(opts, captured, root)},
                            task=task)
        if opts.progress:
            ctx.progress = opts.progress
        if opts.targets == "all":  # "all" means every target this source has a route to
            targets = [t for t in targets if routes_for(t, captured.framework)]
        jobs = [(t, p) for p in precisions for t in targets if p in TARGET_INFO[t].precisions]
        for t, p in jobs:
            ctx.progress(t if p == "float32" else f"{t}-{p}", "waiting", "")

        def one(lane_ctx: TargetContext, job: tuple[str, str]) -> Artifact:
            return build_target(lane_ctx, job[0], job[1], opts.routes.get(job[0]))

        if opts.jobs == 1 or len(jobs) == 1:
            return [one(ctx, j) for j in jobs]
        # jobs > 1: each lane runs its targets in order, in workers of its own, with the
        # numeric libraries' thread pools split between the lanes (they share the cores)
        threads = _lane_threads(opts.jobs)
        results: list[Artifact | None] = [None] * len(jobs)

        def run_lane(lane: int, indices: list[int]) -> None:
            lane_ctx = dataclasses.replace(ctx, pool=pool.lane_view(lane, threads))
            for i in indices:
                results[i] = one(lane_ctx, jobs[i])

        plan = lanes([t for t, _ in jobs], opts.jobs)
        with ThreadPoolExecutor(max_workers=len(plan)) as ex:
            list(ex.map(run_lane, range(len(plan)), plan))
        return [r for r in results if r is not None]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _calibration(opts: ExportOptions, captured: Captured, root: Path) -> dict[str, Any]:
    """The calibration cases, written where the routes can read them (the staging folder's
    attempts, never kept in the bundle) and known by content hash and count."""
    if not opts.calibration:
        return {}
    from portable_models.core.arrays import to_numpy

    names = [s.name for s in captured.inputs]
    cases = []
    for i, case in enumerate(opts.calibration):
        missing = [n for n in names if n not in case]
        if missing:
            raise UsageError(f"calibration case {i} lacks input(s) {missing}", fix=f"give every case {names}")
        cases.append({n: np.ascontiguousarray(to_numpy(case[n])) for n in names})
    path = root / ".attempts" / "calibration.npz"
    golden.save_cases(path, cases)
    return {"calibration": {"file": str(path), "sha256": golden.cases_digest(cases), "cases": len(cases)}}


def _task(opts: ExportOptions, captured: Captured, root: Path) -> TaskCheck | None:
    """The labels of the real samples, checked against them and written into the bundle
    (``golden/labels.npz``) so that ``verify`` judges every artifact's accuracy again."""
    if opts.labels is None:
        return None
    if captured.meta.get("samples") != "user":
        raise UsageError("labels= needs samples=: the labels name the classes of the real sample inputs",
                         fix="pass samples=[{input: array}, …] with one labels entry per sample")
    cases = captured.golden_outputs
    output = opts.label_output or captured.outputs[0].name
    if output not in cases[0]:
        raise UsageError(f"label_output {output!r} is not an output", fix=f"use one of {list(cases[0])}")
    labels = tuple(np.asarray(lab, dtype=np.int64).reshape(-1) for lab in opts.labels)
    rows = [int(np.prod(case[output].shape[:-1])) for case in cases]
    if len(labels) != len(cases) or [a.size for a in labels] != rows:
        raise UsageError(f"labels give {[a.size for a in labels]} rows for the {rows} rows of the samples",
                         fix="give one class index per row of each sample case, in order")
    golden.save_cases(root / "golden" / "labels.npz", [{"labels": a} for a in labels])
    return TaskCheck(labels=labels, output=output, source_accuracy=accuracy(cases, labels, output),
                     drop_max=opts.accuracy_drop_max)


def _contract(captured: Captured, root: Path, opts: ExportOptions, policy: TolerancePolicy,
              artifacts: list[Artifact], *, name: str, task: TaskCheck | None = None) -> Contract:
    src = captured.source_file
    return Contract(
        name=name,
        source={"framework": captured.framework, "version": captured.version,
                "file": src.relative_to(root).as_posix(), "sha256": sha256_path(src),
                "trust": "trusted" if opts.trust_model else opts.source_trust,
                **({"capture_cache": captured.meta["capture_cache"]} if "capture_cache" in captured.meta else {})},
        inputs=captured.inputs, outputs=captured.outputs, dims=captured.dims,
        golden={"inputs": "golden/inputs.npz", "outputs": "golden/outputs.npz",
                "cases": len(captured.golden_inputs), "seed": opts.seed,
                "samples": captured.meta.get("samples", "example+random"),
                **({"constant_outputs": constant} if (constant := captured.meta.get("constant_outputs")) else {}),
                **({"labels": "golden/labels.npz", "task": task.to_contract()} if task is not None else {})},
        tolerance=policy.to_dict(), artifacts=artifacts,
        options={"targets": _targets(opts.targets), "precision": _precisions(opts.precision),
                 "routes": dict(opts.routes)},
    )


def verify(bundle: str | Path, *, targets: Sequence[str] | None = None,
           allow_unverified: Sequence[str] = (), timeout_s: float = 600.0,
           memory_mb: int | None = 8192, compute_units: str = "CPU_ONLY",
           jobs: int | None = None, trust_bundle: bool = False) -> VerifyReport:
    """Re-run every artifact of a bundle from the bundle alone and compare with its golden
    outputs. The bundle is untrusted input (SECURITY.md): every artifact runs in a worker
    confined by the OS sandbox where there is one (reads of the bundle and the Python
    installation, writes to scratch, no network); the runtime follows the target; an
    artifact's files are checked (inside the bundle, listed, hashed, its own sha256) before
    it is loaded, and a changed, missing or unlisted one fails it; a ``pass`` only ever comes
    from a run made now. TorchScript, whose loading runs code, is ``skipped`` where there is
    no sandbox, unless ``trust_bundle``. ``allow_unverified``: targets that may be
    ``unverified`` or ``skipped`` and still let ``ok`` be true. ``compute_units`` is what the
    real Core ML runtime runs on (macOS only). ``jobs``: how many artifacts run at once,
    each in a worker of its own on one thread (None: 2 on a machine with 2 cores or more)."""
    if compute_units not in COMPUTE_UNITS:
        raise UsageError(f"unknown compute units {compute_units!r}", fix=f"use one of {', '.join(COMPUTE_UNITS)}")
    if jobs is not None and jobs < 1:
        raise UsageError(f"jobs={jobs}", fix="use jobs >= 1 (or leave it out: 2 where there are 2 cores)")
    lanes = min(2, jobs or (os.cpu_count() or 1))
    root = user_path(bundle)
    contract = load_contract(root)
    policy = TolerancePolicy.from_dict(contract.tolerance)
    golden_in, golden_out = _golden(root, contract)
    task = _bundle_task(root, contract, golden_out)
    chosen = [a for a in contract.artifacts if not targets or a.target in targets or a.key in targets]
    missing = sorted(set(targets or ()) - {a.target for a in chosen} - {a.key for a in chosen})
    admission = admit(root, contract)
    scan, entries = admission.scan, admission.entries
    scratch = scratch_folder()
    confine = confinement(root, scratch_root())  # the same for every verify: warm workers stay
    unconfined = None if confine is not None else sandbox_reason() or "the sandbox is off"
    # the worker runs every artifact in one job, each right after hashing its files; this
    # thread hashes the bundle's other files meanwhile, and the helper thread compares each
    # artifact's outputs while the worker runs the next
    helper_thread = helper()
    judged: dict[int, Future[tuple[dict[str, Any], dict[str, Any]]]] = {}
    try:
        pool = shared_pool(WorkerLimits(timeout_s=timeout_s, memory_mb=memory_mb)).confined(confine)
        runs: list[tuple[Artifact, PlannedRun, list[dict[str, Any]]]] = []
        for art in chosen:
            refused = refusal(root, art, entries, scan, unconfined=unconfined, trusted=trust_bundle)
            if refused is not None:
                art.status, art.parity = refused.status, refused.record(art)
                continue
            owned = [e for e in contract.files if _owns(art, e["path"])]
            runs.append((art, _rerun(pool, root, art, owned, golden_in, golden_out, policy, scratch, timeout_s,
                                     contract, {"compute_units": compute_units}, task), owned))
        in_worker = {e["path"] for _, _, owned in runs for e in owned}
        found: dict[str, str | None] = {}

        def check_others() -> None:
            found.update((e["path"], check_file(root, e)) for e in contract.files if e["path"] not in in_worker)

        def judge_later(i: int, judge: Judge) -> None:
            if len(judged) == len(runs) - 1:  # the last: nothing left to overlap it with
                judged[i] = Future()
                try:
                    judged[i].set_result(judge())
                except Exception as exc:  # raised where the helper's would be: below
                    judged[i].set_exception(exc)
            else:
                judged[i] = helper_thread.submit(judge)

        run_planned(pool, [p for _, p, _ in runs], judge_later, timeout_s, meanwhile=check_others, lanes=lanes)
        for i, (art, _, owned) in enumerate(runs):
            parity, timings = judged[i].result()
            art.status = parity["status"]
            art.parity = parity
            art.timings = {**art.timings, **{f"verify_{k}": v for k, v in timings.items()}}
            if parity["status"] == "error":  # its files may not have been hashed by the worker
                found.update((e["path"], check_file(root, e)) for e in owned)
        problems = [p for e in contract.files if (p := found.get(e["path"]))]
    finally:
        for future in judged.values():  # after an error: what has not started need not
            future.cancel()
        helper_thread.submit(scratch_done, scratch)  # beside the caller's next step
    problems += [f"not in the bundle: requested target {t}" for t in missing]
    problems += admission.problems
    contract.artifacts = chosen
    return VerifyReport(path=root, contract=contract, problems=problems,
                        allow_unverified=tuple(allow_unverified), ran=len(runs), notes=admission.notes,
                        sandbox=None if confine is None else "Landlock")


def _bundle_task(root: Path, contract: Contract, golden_out: golden.Cases) -> TaskCheck | None:
    """The labels a bundle keeps for its real samples (``golden.labels``), read under bounds
    and checked against the golden outputs; the source's accuracy is measured again from them."""
    if not contract.golden.get("labels"):
        return None
    path = bundle_path(root, contract.golden["labels"], what="labels")
    labels = golden.read_only_cases(path, max_bytes=contract.golden_max_bytes("outputs"))
    spec = contract.golden.get("task") or {}
    output = spec.get("output")
    bad = (len(labels) != len(golden_out) or output not in golden_out[0]
           or any(set(case) != {"labels"} or case["labels"].dtype.kind not in "iu" for case in labels))
    if bad:
        raise ContractError(f"{contract.golden['labels']} does not label the golden outputs' {output!r}",
                            file=str(path), stage="load", fix="the bundle was edited: re-export it")
    arrays = tuple(np.asarray(case["labels"]).reshape(-1) for case in labels)
    try:
        source = accuracy(golden_out, arrays, str(output))
    except ValueError as exc:  # rows that do not line up
        raise ContractError(f"{contract.golden['labels']}: {exc}", file=str(path), stage="load",
                            fix="the bundle was edited: re-export it") from exc
    return TaskCheck(labels=arrays, output=str(output), source_accuracy=source,
                     drop_max=float(spec.get("drop_max_points", ACCURACY_DROP_MAX)))


def _golden(root: Path, contract: Contract) -> tuple[Path, golden.Cases]:
    """The golden inputs' path and the golden outputs of a bundle, both confined to it; the
    outputs read under a bound derived from the shapes and cases the contract declares."""
    golden_in = bundle_path(root, contract.golden["inputs"], what="golden inputs")
    golden_out = bundle_path(root, contract.golden["outputs"], what="golden outputs")
    cases = golden.read_only_cases(golden_out, max_bytes=contract.golden_max_bytes("outputs"))
    if len(cases) != contract.golden["cases"]:
        raise ContractError(f"{contract.golden['outputs']} holds {len(cases)} cases, the contract says "
                            f"{contract.golden['cases']}", file=str(golden_out), stage="load",
                            fix="the bundle was edited or written by a broken tool: re-export it")
    return golden_in, cases


def _owns(art: Artifact, path: str) -> bool:
    """Whether a bundle file is the artifact's (its file, a package's members, its side files
    such as ONNX external data)."""
    return art.file is not None and path.startswith(art.file)


def _rerun(pool: Pool, root: Path, art: Artifact, owned: list[dict[str, Any]], golden_in: Path,
           golden_out: golden.Cases, policy: TolerancePolicy, scratch: Path, timeout_s: float,
           contract: Contract, extra: dict[str, Any], task: TaskCheck | None = None) -> PlannedRun:
    """The check of one kept artifact, to run again (the worker hashes its files, ``owned``,
    first: a changed or missing one fails it at stage ``integrity``). The checks share one scratch folder; what the runs print
    goes to the worker's own log, which outlives the verify's scratch folder."""
    assert art.file is not None and art.io is not None  # trust.refusal made sure
    info = TARGET_INFO[art.target]  # the runtime follows the target, never the contract
    job = CheckJob(pool=pool, artifact=root / art.file, io=art.io, golden_inputs=golden_in,
                   golden_outputs=golden_out, policy=policy, precision=art.precision, log=None,
                   work_dir=scratch, timeout_s=timeout_s,
                   options={**runner_options(contract.inputs, contract.outputs, contract.dims, art.precision),
                            **extra},
                   files=(root, owned), name=art.key, cost_hint=_expected_s(art, len(golden_out)),
                   run_ms=_run_ms(art), file_format=info.file_format,
                   inputs_max_bytes=contract.golden_max_bytes("inputs"), golden_cases=contract.golden["cases"],
                   task=task, **_truth(art, contract))
    return plan_artifact(job, info.runtime, art.meta.get("cases_checked") if art.meta.get("fixed_shape") else None)


def _truth(art: Artifact, contract: Contract) -> dict[str, Any]:
    """What the worker checks a quantised variant's contents against before it runs it."""
    if not art.precision.startswith("int8"):
        return {}
    twin = next((a for a in contract.artifacts if a.target == art.target and a.precision == "float32"), None)
    return {"truth": art.precision, "fp32_bytes": twin.bytes if twin is not None else None}


def _run_ms(art: Artifact) -> float:
    """Milliseconds one case's run took when ``art`` was checked at export (0: not recorded)."""
    try:
        return max(0.0, float((art.timings or {}).get("run_ms_p50") or 0.0))
    except (TypeError, ValueError):  # a hand-edited contract: not known
        return 0.0


def _expected_s(art: Artifact, cases: int) -> float:
    """Seconds the check of ``art`` is expected to take, from the run time its export recorded
    (how a verify spreads new checks over its workers). Not the recorded load time: the
    export's first load in a worker also imported the runtime, which a warm verify does not."""
    one = _run_ms(art) * cases / 1000
    runs = 1 if art.runtime is None or checking_runtime(art.runtime) == art.runtime else 2
    return one * runs
