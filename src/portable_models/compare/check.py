"""Check an artifact: run it in its real runtime, in a worker, on the golden cases, and
compare its outputs with the golden ones. ``export`` checks each new artifact this way
(:func:`check_artifact`, one worker job per run); ``verify`` checks a whole bundle with one
worker job per round (:func:`plan_artifact` and :func:`run_planned`).
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portable_models.compare.accuracy import TaskCheck
from portable_models.compare.parity import OutputParity, compare_outputs, verdict
from portable_models.core.golden import Cases, unpack_outputs
from portable_models.core.iomap import IoMap
from portable_models.core.spec import DimSpec, TensorSpec
from portable_models.core.targets import checker_for
from portable_models.core.tolerance import TolerancePolicy
from portable_models.errors import PortableModelsError, UnverifiedError
from portable_models.isolation.lanes import Runs, run_many, side_by_side, split
from portable_models.isolation.pool import JobFailed, Pool
from portable_models.isolation.process import worker_kind
from portable_models.run.registry import RUNTIMES, runtime_info

__all__ = ["Ask", "Judge", "PlannedRun", "CheckJob", "check_artifact", "checking_runtime", "error_histogram", "error_dict",
           "plan_artifact", "run_planned", "runner_options"]


def runner_options(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                   dims: dict[str, DimSpec], precision: str) -> dict[str, Any]:
    """What a runner may check an artifact against: the contract's specs."""
    return {"inputs": [s.to_dict() for s in inputs], "outputs": [s.to_dict() for s in outputs],
            "dims": {k: v.to_dict() for k, v in dims.items()}, "precision": precision}


def checking_runtime(runtime: str) -> str:
    """The runtime that checks an artifact here: Core ML off macOS goes to the MIL
    reference executor when it is installed."""
    checker = checker_for(runtime)
    return checker if checker is not None and checker in RUNTIMES else runtime


#: the most characters of an error message a contract records (a converter's message can be
#: megabytes; the contract's schema caps a message).
MESSAGE_MAX = 64 * 1024


#: terminal colour sequences (SGR) in a converter's message: noise in a report
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def error_dict(exc: PortableModelsError) -> dict[str, Any]:
    """A typed error as a record, without its empty fields, its message cut at :data:`MESSAGE_MAX`."""
    record = {k: v for k, v in exc.to_dict().items() if v}
    message = record.get("message")
    if isinstance(message, str):  # converters colour their messages (torch.onnx: "step 2/3" in cyan)
        message = record["message"] = _COLOUR.sub("", message)
    if isinstance(message, str) and len(message) > MESSAGE_MAX:
        record["message"] = message[:MESSAGE_MAX] + f" … ({len(message) - MESSAGE_MAX} more characters)"
    return record


#: compares a finished run with the golden outputs: (parity record, timings).
Judge = Callable[[], tuple[dict[str, Any], dict[str, Any]]]


def check_artifact(job: CheckJob, runtime: str,
                   cases: Sequence[int] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``job``'s artifact with ``runtime`` on the golden cases (all, or the ``cases`` a
    fixed-shape artifact accepts) in a worker and compare. Returns the parity record and the
    timings. Load/run failures become an ``error`` record, not an exception. Core ML off
    macOS is checked structurally by its own runner first, then numerically by the MIL
    reference."""
    return plan_artifact(job, runtime, cases).alone()()


@dataclass(frozen=True)
class Ask:
    """A run an artifact's check asks for: ``runtime`` on ``cases`` (None: all of them).
    ``then``: the run it will ask for next unless this one settles the verdict, which a
    batched driver makes in the same worker job, ahead of the ask (:func:`run_planned`)."""

    runtime: str
    cases: Sequence[int] | None = None
    then: Ask | None = None

    def key(self) -> tuple[str, tuple[int, ...] | None]:
        return self.runtime, None if self.cases is None else tuple(self.cases)


#: one artifact's check as the runs it asks for, one at a time: it yields an :class:`Ask`,
#: is sent what that run gave, and returns the comparison still to be made.
Plan = Generator[Ask, "_Ran", Judge]


@dataclass
class PlannedRun:
    """An artifact's check, not yet started: driven alone (:meth:`alone`, one worker job per
    run, as ``export`` checks each new artifact) or with others in one worker job per round
    (:func:`run_planned`, as ``verify`` checks a bundle)."""

    job: CheckJob
    plan: Plan

    def alone(self) -> Judge:
        """Make the runs one by one; the comparison still to be made in the caller."""
        try:
            ask = next(self.plan)
            while True:
                ask = self.plan.send(self.job.run(ask.runtime, ask.cases))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


def plan_artifact(job: CheckJob, runtime: str, cases: Sequence[int] | None = None) -> PlannedRun:
    """The check of :func:`check_artifact`, to be driven alone or with others."""
    return PlannedRun(job=job, plan=_plan(runtime, cases))


def _plan(runtime: str, cases: Sequence[int] | None) -> Plan:
    """Which runs check an artifact of ``runtime``. Core ML off macOS: its own runner checks
    the package structurally on one case, then the MIL reference executor numerically."""
    checker = checking_runtime(runtime)
    if runtime == "coreml" and sys.platform == "darwin" and "mil-reference" in RUNTIMES:
        real = yield Ask("coreml", cases)
        ref = yield Ask("mil-reference", cases)
        return _coreml_on_macos(real, ref)
    if checker == runtime:
        ran = yield Ask(runtime, cases)
        return ran.judge
    first = yield Ask(runtime, [0], then=Ask(checker, cases))  # the checker's run: almost always next
    if first.failure is None or first.failure["status"] != "unverified":
        return lambda: (first.judge()[0], {})
    structural = list(first.failure.get("checked") or [])
    checked = yield Ask(checker, cases)

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
                timeout_s: float | None = None, meanwhile: Callable[[], None] | None = None,
                lanes: int = 1) -> None:
    """Drive many artifacts' checks with one worker job per round and worker kind (a verify
    runs a whole bundle in one round trip instead of one per artifact; an ask's ``then`` run
    goes in the same job, so Core ML's MIL-reference check needs no second round).
    ``done(i, judge)`` is called as soon as check ``i`` has made its last run, so that its
    comparison can start while the worker runs the next. A run that kills its worker (crash,
    timeout, memory) fails that run alone; the runs after it go to a new worker.
    ``meanwhile``: the caller's own work, done in this thread once, as soon as the worker
    has the first job (or now, when no run is needed). ``lanes`` > 1: a round's checks may
    be split between two workers of the kind that run side by side (:func:`lanes.split`); ``done``
    is then called from either thread, never from both at once."""
    rounds = _Rounds(planned=planned, done=done, pending=[meanwhile] if meanwhile is not None else [])
    for i in range(len(planned)):
        rounds.advance(i, None)
    while rounds.asked:
        for _, runs in sorted(rounds.next_round().items()):  # by worker kind
            groups = split(pool, runs, lanes)
            if len(groups) == 1:  # on its lane, on the runtimes' own thread counts
                run_many(pool, groups[0][1], rounds.got, timeout_s, rounds.on_sent, lane=groups[0][0])
            else:
                side_by_side(pool, groups, rounds.got, timeout_s, rounds.on_sent)
        rounds.ahead.clear()  # made ahead but not asked for: the check settled without them
    rounds.on_sent()


@dataclass(kw_only=True)
class _Rounds:
    """The state of :func:`run_planned`: what each check asks for next, the runs made
    ahead of their ask (an ask's ``then``), and the caller's own work still to do."""

    planned: Sequence[PlannedRun]
    done: Callable[[int, Judge], None]
    #: the caller's work, done once the worker has the first job (:meth:`on_sent`)
    pending: list[Callable[[], None]]
    #: the run each unsettled check asks for next, by check
    asked: dict[int, Ask] = field(default_factory=dict)
    #: runs made ahead of their ask, by (check, ask key): None while in flight
    ahead: dict[tuple[int, Any], _Ran | None] = field(default_factory=dict)
    #: runs asked for while in flight ahead
    waiting: set[tuple[int, Any]] = field(default_factory=set)
    #: got() and done() may be called from two lanes' threads
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_round(self) -> dict[str, Runs]:
        """This round's runs by worker kind: each ask, and its ``then`` made ahead."""
        by_kind: dict[str, Runs] = {}
        for i, ask in sorted(self.asked.items()):
            for run, key in ((ask, None), (ask.then, None if ask.then is None else ask.then.key())):
                if run is None:
                    continue
                if key is not None:
                    self.ahead[(i, key)] = None
                kind = worker_kind(runtime_info(run.runtime).framework)
                by_kind.setdefault(kind, []).append(((i, key), self.planned[i].job, run.runtime, run.cases))
        self.asked = {}
        return by_kind

    def on_sent(self) -> None:
        if self.pending and _YIELD is not None:
            # the worker was just woken by the job: let it have this CPU before the caller's
            # own work (else it waits for another one to come free: ~0.5 ms on a 2-vCPU VM)
            _YIELD()
        while self.pending:
            self.pending.pop()()

    def advance(self, i: int, ran: _Ran | None) -> None:
        """Hand check ``i`` what its last run gave; note what it asks for next (using a run
        made ahead where there is one), or pass its comparison to ``done``."""
        plan = self.planned[i].plan
        try:
            ask = next(plan) if ran is None else plan.send(ran)
            while (i, ask.key()) in self.ahead:
                made = self.ahead[(i, ask.key())]
                if made is None:
                    self.waiting.add((i, ask.key()))
                    return
                del self.ahead[(i, ask.key())]
                ask = plan.send(made)
            self.asked[i] = ask
        except StopIteration as stop:
            self.done(i, stop.value)

    def got(self, key: tuple[int, Any], ran: _Ran) -> None:
        """A run has ended: ``key`` is (check, the ask key of a run made ahead, or None)."""
        with self.lock:
            i, early = key
            if early is None:
                self.advance(i, ran)
            elif (i, early) in self.waiting:
                self.waiting.discard((i, early))
                del self.ahead[(i, early)]
                self.advance(i, ran)
            else:
                self.ahead[(i, early)] = ran


_YIELD = getattr(os, "sched_yield", None)

@dataclass(kw_only=True)
class _Ran:
    """One worker run: its failure record, or what the comparison needs."""

    job: CheckJob
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
            if any(not 0 <= i < len(golden_outputs) for i in self.cases):
                return {"status": "error", "runtime": self.runtime, "checker": self.runtime, "stage": "compare",
                        "error": {"code": "bad_contract", "message": f"cases {list(self.cases)} are not all among "
                                  f"the {len(golden_outputs)} golden cases", "stage": "compare"}}, {}
            golden_outputs = [golden_outputs[i] for i in self.cases]
        record, timings = self.job.compare(self.result, unpack_outputs(self.result, self.out), golden_outputs, self.cases)
        record["checker"] = self.runtime
        return record, timings


@dataclass(kw_only=True)
class CheckJob:
    """Everything about one artifact's check but the runtime and cases it is run with:
    where the artifact and the golden data are, how its outputs are compared, and where
    its runs go. ``files``: the bundle folder and the contract's entries for the artifact's
    files, which the worker hashes right before each run (a changed or missing one fails the
    run, unloaded). ``name`` tells the check's files in ``work_dir`` from other checks' there.
    ``log``: where the runs' output goes (None: the worker's own log)."""

    pool: Pool
    artifact: Path
    io: IoMap
    golden_inputs: Path
    golden_outputs: Cases
    policy: TolerancePolicy
    precision: str
    log: Path | None
    work_dir: Path
    timeout_s: float | None = None
    output_names: Sequence[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    files: tuple[Path, Sequence[dict[str, Any]]] | None = None
    name: str = ""
    #: seconds the check's runs are expected to take (how :func:`lanes.split` balances lanes)
    cost_hint: float = 0.0
    #: milliseconds one case's run took at export (0: not known; how :func:`lanes.split` tells a
    #: compute-bound check)
    run_ms: float = 0.0
    #: the format the worker checks the artifact's bytes against before loading it
    file_format: str | None = None
    #: the most bytes the golden inputs may inflate to, and how many cases they hold (a
    #: bundle's, as its contract says; None: the general ceiling, not checked)
    inputs_max_bytes: int | None = None
    golden_cases: int | None = None
    #: a quantised variant's precision, checked against its contents before it runs, and its
    #: fp32 twin's size (None: not a variant)
    truth: str | None = None
    fp32_bytes: int | None = None
    #: labels for the golden cases: the artifact's accuracy is judged too (None: no labels)
    task: TaskCheck | None = None
    #: the golden cases that are held-out real data (``eval_samples``), the rest being random
    #: or the example: both are judged apart, and a quantised variant's verdict is the real one
    real_cases: tuple[int, ...] = ()

    def payload(self, runtime: str, **extra: Any) -> dict[str, Any]:
        """What a ``run`` or ``bench`` job of the artifact with ``runtime`` is given."""
        payload: dict[str, Any] = {"runtime": runtime, "artifact": str(self.artifact), "io": self.io.to_dict(),
                                   "inputs": str(self.golden_inputs), "options": self.options, **extra}
        if self.files is not None:
            payload["files"] = {"root": str(self.files[0]), "entries": list(self.files[1])}
        for key, value in (("format", self.file_format), ("inputs_max_bytes", self.inputs_max_bytes),
                           ("golden_cases", self.golden_cases), ("truth", self.truth), ("fp32_bytes", self.fp32_bytes)):
            if value is not None:
                payload[key] = value
        return payload

    def sub_job(self, runtime: str, cases: Sequence[int] | None, threads: int | None = None) -> dict[str, Any]:
        """The worker job that runs the artifact with ``runtime`` on ``cases`` (None: all),
        on ``threads`` threads (None: the runtime's own count)."""
        payload = self.payload(runtime, cases=None if cases is None else list(cases), out=str(self._out(runtime)),
                               **({} if threads is None else {"threads": threads}))
        return {"kind": "run", "payload": payload, "step": f"run:{runtime}", "log": None if self.log is None else str(self.log),
                "work_dir": str(self.work_dir)}

    def _out(self, runtime: str) -> Path:
        prefix = f"{self.name}-" if self.name else ""
        return self.work_dir / f"{prefix}outputs-{runtime}.bin"  # the worker makes the folder

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
                                  "stage": error.stage or f"run:{runtime}", "error": error_dict(error)}
        if isinstance(error, UnverifiedError):
            record["checked"] = error.checked
        return _Ran(job=self, runtime=runtime, cases=cases, failure=record)

    def _real_and_random(self, golden_outputs: Cases, actual: Cases,
                         cases: Sequence[int] | None) -> dict[str, Any] | None:
        """The comparison on the real (eval) cases and on the others apart, when this run
        has both (None otherwise)."""
        ran = list(range(len(golden_outputs))) if cases is None else list(cases)
        real = [k for k, i in enumerate(ran) if i in self.real_cases]
        other = [k for k in range(len(ran)) if k not in real]
        if not real or not other:
            return None
        part = {name: compare_outputs([golden_outputs[k] for k in idx], [actual[k] for k in idx],
                                      precision=self.precision, policy=self.policy, output_names=self.output_names)
                for name, idx in (("real", real), ("random", other))}
        return {**part, "counts": (len(real), len(other))}

    def compare(self, result: dict[str, Any], actual: Cases, golden_outputs: Cases,
                cases: Sequence[int] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        results = compare_outputs(golden_outputs, actual, precision=self.precision, policy=self.policy,
                                  output_names=self.output_names)
        split = self._real_and_random(golden_outputs, actual, cases)
        if split is not None and self.precision.startswith("int8"):  # real data rules a quantised variant
            results = split["real"]
        record = {"status": verdict(results), "runtime": result["runtime"], "checked_by": result["label"],
                  "outputs": {r.name: r.to_dict() for r in results}}
        if split is not None:
            record["real_vs_random"] = {
                "real": verdict(split["real"]), "random": verdict(split["random"]),
                "real_cases": split["counts"][0], "random_cases": split["counts"][1],
                "rules": "real" if self.precision.startswith("int8") else "all"}
        for name, res in record["outputs"].items():
            hist = error_histogram(golden_outputs, actual, name)
            if hist is not None:
                res["abs_error_hist"] = hist
        worst = _worst(results)
        if worst is not None and worst.status != "pass":
            record["reason"] = f"{worst.name}: {worst.reason}"
        if self.task is not None:
            record["accuracy"] = acc = self.task.judge(actual, cases)
            if acc["status"] == "fail" and record["status"] == "pass":
                record["status"] = "fail"
                record["reason"] = (f"accuracy {acc['artifact']:.4f} against the source's {acc['source']:.4f} on "
                                    f"{acc['rows']} labelled rows: a drop of {acc['drop_points']:.2f} points, over "
                                    f"the budget of {acc['drop_max_points']}")
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
        diffs.append((a.astype(np.float64) - g.astype(np.float64)).ravel())
    if not diffs:
        return None
    d = np.abs(np.concatenate(diffs))
    d = d[np.isfinite(d)]
    zeros = int(d.size - np.count_nonzero(d))
    edges = [float(e) for e in HIST_DECADES]
    # decade e counts [1e(e), 1e(e+1)); below 1e-12 counts in the first, 1e2 and above in the last
    decade = np.floor(np.clip(np.log10(d[d > 0]), edges[0], edges[-1]))
    counts = np.bincount((decade - edges[0]).astype(np.intp), minlength=len(edges))
    return {"decades": edges, "counts": [int(c) for c in counts], "zeros": zeros}


def _worst(results: Sequence[OutputParity]) -> OutputParity | None:
    failing = [r for r in results if r.status != "pass"]
    return failing[0] if failing else (results[0] if results else None)
