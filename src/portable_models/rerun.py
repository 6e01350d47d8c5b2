"""verify: re-run every artifact of a bundle from the bundle alone, as untrusted input, and
judge it again (see SECURITY.md). Public as :func:`portable_models.verify`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
from portable_models.contract.bundle import check_file
from portable_models.contract.model import Artifact, Contract, load_contract
from portable_models.contract.reports.table import render_table
from portable_models.contract.trust import admit, refusal
from portable_models.core import golden
from portable_models.core.paths import bundle_path, user_path
from portable_models.core.targets import TARGET_INFO
from portable_models.core.tolerance import TolerancePolicy
from portable_models.errors import ContractError, UsageError
from portable_models.isolation.pool import Pool, WorkerLimits, shared_pool
from portable_models.isolation.sandbox import confine_or_why
from portable_models.run.base import COMPUTE_UNITS
from portable_models.verify_kept import helper, scratch_done, scratch_folder, scratch_root

__all__ = ["VerifyReport", "verify"]


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
    confine, unconfined = confine_or_why(root, scratch_root())  # the same for every verify: warm workers stay
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
                   task=task, real_cases=golden.eval_case_indices(contract.golden.get("eval"), int(contract.golden["cases"])),
                   **_truth(art, contract))
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
