"""``portable-models bench DIR``: latency per runtime, from the bundle alone.

Each artifact is loaded once in a worker, warmed up, then timed over ``runs`` calls on
golden case 0 (warm-up excluded). Core ML off macOS is not timed: the MIL reference
executor that checks it there says nothing about Apple's runtime (``n/a off macOS``). Results — load time, p50/p90/min, runs, threads — go into
each artifact's ``timings["bench"]`` in the contract and into the reports, rewritten
atomically with the contract's file list.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from portable_models.compare.check import CheckJob, checking_runtime, runner_options
from portable_models.contract.bundle import (
    check_files,
    list_files,
    raise_on_problems,
    writing,
)
from portable_models.contract.model import Contract, load_contract
from portable_models.contract.reports import write_reports
from portable_models.contract.trust import admit, refusal
from portable_models.core.paths import bundle_path, user_path
from portable_models.core.targets import TARGET_INFO
from portable_models.core.tolerance import TolerancePolicy
from portable_models.errors import UsageError
from portable_models.isolation.pool import JobFailed, Pool, WorkerLimits, shared_pool
from portable_models.isolation.sandbox import confine_or_why
from portable_models.run.registry import runtime_info

__all__ = ["bench"]


def bench(bundle: str | Path, *, runs: int = 20, warmup: int = 3, threads: int | None = None,
          targets: list[str] | None = None, write: bool = True, timeout_s: float = 600.0,
          trust_bundle: bool = False) -> Contract:
    """Time every kept artifact of ``bundle`` in its runtime; return the updated contract.
    The bundle is untrusted input, as for :func:`portable_models.verify`: the same checks
    before an artifact is loaded, the same sandbox, the same ``trust_bundle``."""
    root = user_path(bundle)
    contract = load_contract(root)
    admission = admit(root, contract)
    raise_on_problems(root, check_files(root, contract.files) + admission.problems)
    missing = sorted(set(targets or ()) - {a.target for a in contract.artifacts} - {a.key for a in contract.artifacts})
    if missing:
        raise UsageError(f"not in the bundle: {', '.join(missing)}", file=str(root / "contract.json"),
                         fix=f"choose among {', '.join(a.key for a in contract.artifacts)}")
    scan, entries = admission.scan, admission.entries
    scratch = Path(tempfile.mkdtemp(prefix="portable-models-bench-"))
    confine, unconfined = confine_or_why(root, scratch)
    try:
        pool = shared_pool(WorkerLimits(timeout_s=timeout_s)).confined(confine)
        for art in contract.artifacts:
            if targets and art.target not in targets and art.key not in targets:
                continue
            if art.file is None:
                continue  # nothing kept: nothing to time
            refused = refusal(root, art, entries, scan, unconfined=unconfined, trusted=trust_bundle)
            runtime = TARGET_INFO[art.target].runtime if refused is None else None
            if refused is not None:
                art.timings["bench"] = {"runtime": refused.record(art)["runtime"], "error": refused.reason}
            elif checking_runtime(str(runtime)) != runtime:  # Core ML off macOS
                art.timings.pop("bench", None)  # a reference executor's time is no Core ML latency
            else:
                art.timings["bench"] = _one(pool, root, contract, art, runs, warmup, threads, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if write:
        _rewrite(root, contract)
    return contract


def _one(pool: Pool, root: Path, contract: Contract, art: Any, runs: int, warmup: int,
         threads: int | None, scratch: Path) -> dict[str, Any]:
    info = TARGET_INFO[art.target]
    runtime = info.runtime
    job = CheckJob(pool=pool, artifact=root / art.file, io=art.io,
                   golden_inputs=bundle_path(root, contract.golden["inputs"], what="golden inputs"),
                   golden_outputs=[], policy=TolerancePolicy(), precision=art.precision, log=None, work_dir=scratch,
                   options=runner_options(contract.inputs, contract.outputs, contract.dims, art.precision),
                   file_format=info.file_format, inputs_max_bytes=contract.golden_max_bytes("inputs"),
                   golden_cases=contract.golden["cases"])
    payload = job.payload(runtime, runs=runs, warmup=warmup, threads=threads)
    try:
        result, _ = pool.call(kind="bench", payload=payload, framework=runtime_info(runtime).framework,
                              step=f"bench:{runtime}", log=scratch / f"{art.key}.log",
                              work_dir=scratch / art.key)
    except JobFailed as failed:
        return {"runtime": runtime, "error": failed.error.message}
    return result


def _rewrite(root: Path, contract: Contract) -> None:
    """New reports, new file list, then the contract, all or nothing: the reports are written
    into a folder of their own and the new contract built and validated from them before
    anything of the bundle changes; then each file is renamed into place (a rename replaces a
    link instead of writing through it; a linked ``reports/`` is refused by
    :func:`portable_models.core.paths.bundle_path`), the contract last."""
    with writing("the bench results", root):
        reports = bundle_path(root, "reports", what="reports folder")
        staged = Path(tempfile.mkdtemp(prefix=".bench-reports-", dir=root))
        try:
            write_reports(contract, staged)
            fresh = {f"reports/{e['path']}": e for e in list_files(staged)}
            # the other files as the contract lists them (checked when bench began): a bench never
            # seals a file it did not check, nor lists one the contract did not
            kept = [e for e in contract.files if e["path"] not in fresh]
            contract.files = sorted([*kept, *({**e, "path": p} for p, e in fresh.items())],
                                    key=lambda e: tuple(e["path"].split("/")))
            text = contract.to_json()  # validated before anything is replaced
            tmp = root / f".contract.json.{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            reports.mkdir(exist_ok=True)
            for f in sorted(staged.iterdir()):
                os.replace(f, reports / f.name)
            os.replace(tmp, root / "contract.json")
        finally:
            shutil.rmtree(staged, ignore_errors=True)
            Path(root / f".contract.json.{os.getpid()}").unlink(missing_ok=True)
