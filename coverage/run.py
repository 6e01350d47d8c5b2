"""`make coverage`: every model of the corpus (coverage/models.py) exported to all five
targets, one subprocess per model, and the matrix written to coverage/results.md.

    python coverage/run.py [--jobs N] [--timeout S] [--only NAME,..] [--fresh] [--report-only]

Each model runs in a child process of its own (``run.py --child NAME``) so that a model
that crashes the interpreter or hangs costs its own row and nothing else: the parent kills
it, and every process it started, at ``--timeout`` seconds. The child's bundle and its
converter cache live in a temporary folder the parent removes afterwards, so every run
converts for real. Results are written per model to coverage/runs/<name>.json (atomically),
and a rerun skips the models that already have one: the run resumes where it stopped.
``--fresh`` reruns everything chosen; ``--only`` always reruns the models it names.

Nothing downloads: the children run with HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from models import BY_NAME, ENTRIES

#: routes added by issue #25: a cell that only passes through one of them (or through a
#: compatibility pass, a "+" in the route name) would not have passed before it
NEW_ROUTES = frozenset({"torch-onnx-legacy", "coremltools-eager-trace", "torch-jit-eager-trace"})
TARGETS = ("onnx", "tflite", "coreml", "torchscript", "executorch")
PACKAGES = ("torch", "transformers", "keras", "onnx", "onnxruntime", "coremltools", "executorch",
            "litert-torch", "ai-edge-litert")
HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
META = RUNS / "_runs.json"
RESULTS = HERE / "results.md"
#: two models at once: this machine has 2 cores and 24 GiB; each export runs its converters
#: one at a time (``jobs=1``), so two models keep both cores busy without oversubscribing
DEFAULT_JOBS = 2
DEFAULT_TIMEOUT_S = 600.0
#: characters of an error message kept in the JSON (the first line makes the signature)
MESSAGE_CHARS = 300


# -- error signatures ----------------------------------------------------------------------
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\w.~-]*/[\w.@+-]+){2,}/?(?::\d+)?")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
_SIZE = re.compile(r"torch\.Size\(\[[^\]]*\]\)")
#: one dim of a shape: a number, a symbol (s0, u1, is96) or unknown
_DIM = r"(?:-?\d+|[A-Za-z]{1,3}\d+|None|\?)"
_SHAPE = re.compile(rf"[\[(]\s*{_DIM}(?:\s*[,x×]\s*{_DIM})*\s*,?\s*[\])]")
_NODE = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*?_\d+\b")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\b")


def signature(kind: str, message: str | None) -> str:
    """A short normalised string for one failure: ``kind`` (the route and error code, or the
    model-level stage) and the first line of the message with what varies from model to
    model taken out — paths, addresses, shapes, numbered node names (``and_1``), numbers — so
    that the same converter failure on two models groups together."""
    line = next((ln.strip() for ln in (message or "").splitlines() if ln.strip()), "")
    for pattern, stand_in in ((_PATH, "<path>"), (_ADDRESS, "<addr>"), (_SIZE, "<shape>"),
                              (_SHAPE, "<shape>"), (_NODE, "<node>"), (_NUMBER, "N")):
        line = pattern.sub(stand_in, line)
    line = re.sub(r"\s+", " ", line)
    return f"{kind}: {line[:120]}" if line else kind


# -- one model, in the child ---------------------------------------------------------------
def _error_of(err: dict[str, Any] | None) -> dict[str, Any] | None:
    """An attempt's error, shortened for the JSON."""
    if not err:
        return None
    return {"code": err.get("code"), "stage": err.get("stage"),
            "message": str(err.get("message") or "")[:MESSAGE_CHARS]}


def _max_abs(parity: dict[str, Any] | None) -> float | None:
    values = [o.get("max_abs") for o in ((parity or {}).get("outputs") or {}).values()]
    finite = [float(v) for v in values if isinstance(v, int | float)]
    return max(finite) if finite else None


def _parity_reason(parity: dict[str, Any] | None) -> str:
    """Why parity failed: the first failing output's reason, else the statistic that missed."""
    for name, out in ((parity or {}).get("outputs") or {}).items():
        if out.get("status") not in (None, "pass"):
            return str(out.get("reason") or f"output {name} over tolerance")
    return str((parity or {}).get("reason") or "parity failed")


#: how far an attempt got, to pick the failure nearest to passing
_STAGES = {"convert": 0, "load": 1, "run": 2, "compare": 3}


def _attempt_signature(att: Any, art: Any) -> str:
    if att.error:
        return signature(f"{att.route} {att.error.get('code')}", att.error.get("message"))
    reason = _parity_reason(att.parity or art.parity)  # "<output name>: what differs"
    return signature(f"{att.route} mismatch", re.sub(r"^[\w.-]+: ", "<output>: ", reason))


def _failure(art: Any) -> str:
    """The signature of a target that did not pass: that of the attempt that got furthest (a
    parity mismatch over a conversion error: the failure nearest to passing), the first of
    those on a tie; with no failed attempt (a skipped target), the target's own error."""
    failed = [a for a in art.attempts if a.status != "pass"]
    if failed:
        ranked = [(_STAGES.get((a.stage or "").split(":")[0], 0), -i) for i, a in enumerate(failed)]
        return _attempt_signature(failed[-max(ranked)[1]], art)
    own = getattr(art, "error", None)
    if isinstance(own, dict) and own.get("message"):
        return signature(f"{art.status} {own.get('code')}", own.get("message"))
    return signature(art.status, _parity_reason(art.parity))


def _attempt(att: Any) -> dict[str, Any]:
    out = {"route": att.route, "status": att.status, "stage": att.stage, "seconds": round(att.seconds, 2),
           "error": _error_of(att.error)}
    if att.status == "fail":
        out["reason"] = _parity_reason(att.parity)
    return out


def cell(art: Any) -> dict[str, Any]:
    """One model x target cell of the matrix, from the contract's artifact."""
    route = art.route_name or ""
    return {
        "status": art.status,
        "route": route.split("+", 1)[0] or None,
        "passes": route.split("+", 1)[1].split("+") if "+" in route else [],
        "max_abs": _max_abs(art.parity),
        "fixed_shape": bool(art.meta.get("fixed_shape")),
        "seconds": round(sum(a.seconds for a in art.attempts), 2),
        "attempts": [_attempt(a) for a in art.attempts],
        "signature": None if art.status == "pass" else _failure(art),
    }


def model_failure(stage: str, message: str) -> dict[str, dict[str, Any]]:
    """Every cell of a model that never reached its targets (build, capture, timeout, crash)."""
    sig = signature(stage, message)
    return {t: {"status": "error", "route": None, "passes": [], "max_abs": None, "seconds": 0.0,
                "attempts": [], "signature": sig} for t in TARGETS}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def export_one(name: str, work: Path, timeout_s: float) -> dict[str, Any]:
    """Build and export one model; a failure before the targets fills every cell.

    Any exception is a result here, not a crash: the corpus exists to record where the
    library or a converter breaks, including by a programming error."""
    import portable_models as pm

    entry = BY_NAME[name]
    record: dict[str, Any] = {"name": name, "family": entry.family, "source": entry.source,
                              "versions": versions()}
    start = time.perf_counter()
    try:
        built = entry.build()
    except Exception as exc:
        record["cells"] = model_failure("build", f"{type(exc).__name__}: {exc}")
        record["error"] = f"build: {type(exc).__name__}: {str(exc)[:MESSAGE_CHARS]}"
        return {**record, "seconds": round(time.perf_counter() - start, 2)}
    try:
        # a route that hangs is stopped at a third of the model's time, leaving the rest to
        # the other targets (converted one after another: jobs=1)
        bundle = pm.export(built.model, built.example, out=work / "bundle", targets="all",
                           diagnose=False, cache=False, jobs=1, timeout_s=max(60.0, timeout_s / 3),
                           **built.options)
    except Exception as exc:
        stage = getattr(exc, "stage", None) or "export"
        code = getattr(exc, "code", type(exc).__name__)
        record["cells"] = model_failure(f"{stage} {code}", str(getattr(exc, "message", exc)))
        record["error"] = f"{stage}: {type(exc).__name__}: {str(exc)[:MESSAGE_CHARS]}"
        return {**record, "seconds": round(time.perf_counter() - start, 2)}
    record["cells"] = {a.target: cell(a) for a in bundle.contract.artifacts if a.precision == "float32"}
    return {**record, "seconds": round(time.perf_counter() - start, 2)}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` so that a reader (or a killed run) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, path)


# -- the parent: scheduling, timeouts, resuming --------------------------------------------
@dataclass
class Running:
    name: str
    proc: subprocess.Popen[bytes]
    work: Path
    log: Path
    started: float


def _child_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "PORTABLE_MODELS_CACHE": str(work / "cache"), "TOKENIZERS_PARALLELISM": "false"})
    return env


def start(name: str, timeout_s: float) -> Running:
    work = Path(tempfile.mkdtemp(prefix=f"coverage-{name}-"))
    log = work / "child.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", name, "--timeout", str(timeout_s),
             "--work", str(work)],
            stdout=fh, stderr=subprocess.STDOUT, env=_child_env(work), start_new_session=True)
    return Running(name, proc, work, log, time.perf_counter())


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """Kill a child and everything it started: its process group, and the converter
    workers it started in sessions of their own (found before the group goes)."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def _tail(log: Path, chars: int = 2000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def finish(run: Running, timed_out: bool, timeout_s: float) -> dict[str, Any]:
    """The child's result, or a model-level failure when it was killed or died without one."""
    result = run.work / "result.json"
    seconds = round(time.perf_counter() - run.started, 2)
    entry = BY_NAME[run.name]
    base = {"name": run.name, "family": entry.family, "source": entry.source}
    if timed_out:
        record = {**base, "cells": model_failure("timeout", f"killed after {timeout_s:.0f} s"),
                  "error": f"timeout after {timeout_s:.0f} s", "seconds": seconds, "log_tail": _tail(run.log)}
    elif result.exists():
        record = {**json.loads(result.read_text()), "seconds": seconds}
    else:
        tail = _tail(run.log)
        last = next((ln for ln in reversed(tail.splitlines()) if ln.strip()), "")
        record = {**base, "cells": model_failure(f"crash exit {run.proc.returncode}", last),
                  "error": f"exit {run.proc.returncode}: {last[:MESSAGE_CHARS]}", "seconds": seconds,
                  "log_tail": tail}
    shutil.rmtree(run.work, ignore_errors=True)
    return record


def run_all(names: list[str], jobs: int, timeout_s: float) -> None:
    """Run ``names``, ``jobs`` at a time, writing each result as soon as it is known."""
    queue, running = list(names), []
    while queue or running:
        while queue and len(running) < jobs:
            running.append(start(queue.pop(0), timeout_s))
        time.sleep(1.0)
        for run in list(running):
            killed = False
            if run.proc.poll() is None:
                if time.perf_counter() - run.started <= timeout_s:
                    continue
                kill_tree(run.proc)
                killed = True
            record = finish(run, killed, timeout_s)
            write_json(RUNS / f"{run.name}.json", record)
            running.remove(run)
            print(f"  {run.name:26s} {record['seconds']:7.1f} s  {_summary(record)}", flush=True)


def _summary(record: dict[str, Any]) -> str:
    cells = record.get("cells", {})
    return " ".join(f"{t}:{'ok' if cells.get(t, {}).get('status') == 'pass' else 'x'}" for t in TARGETS)


def _record_run(started: str, wall_s: float, jobs: int, names: list[str], fresh_all: bool) -> None:
    """Append this run to coverage/runs/_runs.json (a resumed corpus took several runs)."""
    runs = [] if fresh_all or not META.exists() else json.loads(META.read_text()).get("runs", [])
    runs.append({"started": started, "wall_s": round(wall_s, 1), "jobs": jobs, "models": len(names)})
    write_json(META, {"runs": runs})


def choose(only: str | None, fresh: bool) -> list[str]:
    """The models to run: those named by ``--only`` (always rerun, extras included), else
    every default model without a result (all of them with ``--fresh``)."""
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            raise SystemExit(f"unknown model(s) {unknown}; the corpus has: {', '.join(BY_NAME)}")
        return names
    return [e.name for e in ENTRIES if not e.extra and (fresh or not (RUNS / f"{e.name}.json").exists())]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="models at once (default %(default)s)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds per model before it is killed (default %(default)s)")
    p.add_argument("--only", help="comma-separated model names (rerun even with a result)")
    p.add_argument("--fresh", action="store_true", help="rerun models that already have a result")
    p.add_argument("--report-only", action="store_true", help="only rewrite results.md from runs/")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        write_json(args.work / "result.json", export_one(args.child, args.work, args.timeout))
        return 0
    from report import write_report

    began, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M")
    if not args.report_only:
        names = choose(args.only, args.fresh)
        print(f"coverage: {len(names)} model(s), {args.jobs} at a time, {args.timeout:.0f} s each at most",
              flush=True)
        run_all(names, max(1, args.jobs), args.timeout)
        _record_run(started, time.perf_counter() - began, args.jobs, names,
                    fresh_all=args.fresh and not args.only)
    write_report(RUNS, RESULTS, TARGETS, NEW_ROUTES)
    print(f"coverage: {RESULTS.relative_to(HERE.parent)} written; took {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
