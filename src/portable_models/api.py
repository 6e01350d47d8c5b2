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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.capture import Captured, CaptureOptions, framework_of
from portable_models.compare.accuracy import ACCURACY_DROP_MAX, TaskCheck, accuracy
from portable_models.contract.bundle import Staging, list_files, writing
from portable_models.contract.model import Artifact, Contract, load_contract
from portable_models.contract.reports import write_reports
from portable_models.contract.reports.table import render_table
from portable_models.convert.build import Progress, TargetContext, build_target
from portable_models.convert.registry import routes_for
from portable_models.core import golden
from portable_models.core.hashing import sha256_path
from portable_models.core.paths import user_path
from portable_models.core.targets import TARGET_INFO, TARGETS
from portable_models.core.tolerance import TolerancePolicy
from portable_models.errors import UsageError
from portable_models.isolation.pool import LimitedPool, WorkerLimits, shared_pool
from portable_models.rerun import VerifyReport, verify  # verify's home; part of this surface

__all__ = ["ExportOptions", "Bundle", "VerifyReport", "export", "verify", "load_contract"]

_PRECISIONS = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
               "int8-weight": "int8-weight", "int8-dynamic": "int8-dynamic", "int8": "int8"}
#: the order variants are built and reported in (float32, the reference twin, first)
_VARIANTS = ["float32", "float16", "int8-weight", "int8-dynamic", "int8"]


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
    #: one class index per row of each ``eval_samples`` case (the held-out real data)
    eval_labels: Sequence[Any] | None = None
    label_output: str | None = None
    accuracy_drop_max: float = ACCURACY_DROP_MAX
    tolerance: TolerancePolicy | Mapping[str, Mapping[str, float | None]] | None = None
    precision: str | Sequence[str] = "fp32"
    routes: Mapping[str, str] = field(default_factory=dict)
    #: after an artifact fails parity, name the first source module whose output drifts in
    #: it (``reports/diagnose.json``, the HTML report); costs nothing when every artifact passes.
    diagnose: bool = True
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
            raise UsageError(f"unknown precision {n!r}", fix="use fp32, fp16, int8-weight, int8-dynamic or int8")
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
    #: where each artifact that failed parity first diverges (``reports/diagnose.json``)
    diagnosis: dict[str, Any] | None = None

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
        text = render_table(self.contract)
        if self.diagnosis:
            from portable_models.diagnosis import summary

            text += "\n" + summary(self.diagnosis)
        return text


def _capture(model: Any, example_inputs: Any, opts: ExportOptions, source_dir: Path) -> Captured:
    framework = framework_of(model)
    copts = CaptureOptions(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(CaptureOptions)})
    if framework == "torch":
        from portable_models.capture.torch import capture_torch

        return capture_torch(model, example_inputs, copts, source_dir, scratch=source_dir.parent / ".attempts")
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
            missed = {a.key: a.meta.pop("_diagnosable") for a in artifacts if "_diagnosable" in a.meta}
            contract = _contract(captured, st.path, opts, policy, artifacts, name=opts.name or dest.name, task=task)
            diagnosis = _diagnose_failures(pool, st.path, contract, missed, opts)
            shutil.rmtree(st.path / ".attempts", ignore_errors=True)
            _check_artifact_hashes(st.path, artifacts)
            write_reports(contract, st.path / "reports", diagnosis=diagnosis)
            contract.files = list_files(st.path)
            st.write_text("contract.json", contract.to_json())
            st.commit()
    return Bundle(path=dest, contract=contract, diagnosis=diagnosis)


def _diagnose_failures(pool: Any, root: Path, contract: Contract, missed: dict[str, dict[str, Any]],
                       opts: ExportOptions) -> dict[str, Any] | None:
    """Where each target that failed parity first diverges, in its closest miss (the failed
    artifact, still in ``.attempts``); None when none failed or when asked not to."""
    if not opts.diagnose or not missed:
        return None
    from portable_models.core.iomap import IoMap
    from portable_models.diagnosis import diagnose_staged

    stand_ins = [dataclasses.replace(a, file=Path(missed[a.key]["file"]).relative_to(root).as_posix(),
                                     route_name=missed[a.key]["route"],
                                     io=IoMap.from_dict(missed[a.key]["io"]) if missed[a.key]["io"] else None)
                 for a in contract.artifacts if a.key in missed]
    return diagnose_staged(pool, root, contract, stand_ins).to_dict(relative_to=root)


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
                                     **({"eager_trace": captured.meta["eager_trace"]}
                                        if captured.meta.get("eager_trace") else {}),
                                     **_calibration(opts, captured, root)},
                            task=task, real_cases=golden.eval_case_indices(captured.meta.get("eval"),
                                                                          len(captured.golden_inputs)))
        if opts.progress:
            ctx.progress = opts.progress
        if opts.targets == "all":  # "all" means every target this source has a route to
            targets = [t for t in targets if routes_for(t, captured.framework)]
        jobs = [(t, p) for p in precisions for t in targets if _carries(t, p, captured.framework)]
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


def _not_built(captured: Captured, opts: ExportOptions) -> dict[str, Any]:
    """The requested (target, precision) pairs no target here carries, with the reason."""
    from portable_models.core.targets import not_built_reason

    targets = _targets(opts.targets)
    if opts.targets == "all":
        targets = [t for t in targets if routes_for(t, captured.framework)]
    missing = [{"target": t, "precision": p, "reason": not_built_reason(t, p, captured.framework)}
               for p in _precisions(opts.precision) for t in targets if not _carries(t, p, captured.framework)]
    return {"not_built": missing} if missing else {}


def _carries(target: str, precision: str, framework: str) -> bool:
    """``target`` is built at ``precision`` from a ``framework`` source: the target carries the
    variant and a route makes it from this source (float32 is always attempted)."""
    return precision == "float32" or (precision in TARGET_INFO[target].precisions
                                      and bool(routes_for(target, framework, precision)))


def _task(opts: ExportOptions, captured: Captured, root: Path) -> TaskCheck | None:
    """The labels of the real samples (``labels=`` for ``samples=``, ``eval_labels=`` for
    ``eval_samples=``; the other golden cases get none), checked against them and written into
    the bundle (``golden/labels.npz``) so that ``verify`` judges every artifact's accuracy again."""
    if opts.labels is None and opts.eval_labels is None:
        return None
    if opts.labels is not None and opts.eval_labels is not None:
        raise UsageError("labels= and eval_labels= both given",
                         fix="label one real set: the samples (labels=) or the held-out eval samples (eval_labels=)")
    cases = captured.golden_outputs
    given: Sequence[Any]
    if opts.labels is not None:
        if captured.meta.get("samples") != "user":
            raise UsageError("labels= needs samples=: the labels name the classes of the real sample inputs",
                             fix="pass samples=[{input: array}, …] with one labels entry per sample")
        first, given = 0, opts.labels
    else:
        if not captured.meta.get("eval"):
            raise UsageError("eval_labels= needs eval_samples=: the labels name the classes of the held-out inputs",
                             fix="pass eval_samples=[{input: array}, …] with one eval_labels entry per eval sample")
        first, given = int(captured.meta["eval"]["first"]), opts.eval_labels or ()
    labelled = cases[first:first + len(given)] if opts.eval_labels is None else cases[first:]
    output = opts.label_output or captured.outputs[0].name
    if output not in cases[0]:
        raise UsageError(f"label_output {output!r} is not an output", fix=f"use one of {list(cases[0])}")
    arrays = tuple(np.asarray(lab, dtype=np.int64).reshape(-1) for lab in given)
    rows = [int(np.prod(case[output].shape[:-1])) for case in labelled]
    if len(arrays) != len(labelled) or [a.size for a in arrays] != rows:
        raise UsageError(f"labels give {[a.size for a in arrays]} rows for the {rows} rows of the "
                         f"{'samples' if opts.eval_labels is None else 'eval samples'}",
                         fix="give one class index per row of each sample case, in order")
    none = np.zeros(0, dtype=np.int64)  # a case without labels (random, or not the labelled set)
    labels = tuple([none] * first + list(arrays) + [none] * (len(cases) - first - len(arrays)))
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
                **({"eval": captured.meta["eval"]} if captured.meta.get("eval") else {}),
                **({"labels": "golden/labels.npz", "task": task.to_contract()} if task is not None else {})},
        tolerance=policy.to_dict(), artifacts=artifacts,
        options={"targets": _targets(opts.targets), "precision": _precisions(opts.precision),
                 "routes": dict(opts.routes), **_not_built(captured, opts)},
    )


