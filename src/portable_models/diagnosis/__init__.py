"""Diagnose: where an artifact first diverges from its source, named by source module.

``portable-models diagnose BUNDLE`` / :func:`diagnose` runs the captured program node by node
on one golden case (the reference activations, keyed by the module that made each: its
``nn_module_stack``) and the artifact in its runtime with its intermediate values exposed, and
compares them module by module in execution order. The answer per artifact is the first module
whose output is off by more than the output tolerance scaled to that tensor (every module
before it agrees, so the error is its own), with its source line. The bundle is untrusted input
here as in ``verify``: the work runs in a confined worker, after the same checks.

Each target has a tap (:mod:`.taps`): ONNX (intermediate values as graph outputs, mapped by
the exporter's name scopes or tf2onnx's layer names), TFLite (LiteRT's preserved tensors),
Core ML (the MIL reference executor, op by op), ExecuTorch (ETDump intermediate outputs;
an XNNPACK delegate call is one unit) and TorchScript (the frozen graph's values by source
range). A Keras source is localised per layer. What a runtime cannot show is reported as
fused or held in one unit, never guessed. ``export``/``convert`` run it by themselves on an
artifact that fails parity (:func:`diagnose_staged`).

The package is ``diagnosis`` and the function ``diagnose``: a subpackage named like a
function of the package above it would replace that function on first import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DiagnoseReport", "diagnose", "diagnose_staged", "summary"]


@dataclass
class DiagnoseReport:
    """Per artifact: its module records and the first divergent module (None: all agree)."""

    path: Path
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def diverged(self) -> bool:
        return any(r.get("first") for r in self.results)

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        """As JSON; ``relative_to``: the bundle's own folder (the report is kept in it)."""
        return {"bundle": "." if relative_to is not None else str(self.path), "diverged": self.diverged,
                "artifacts": self.results}

    def table(self) -> str:
        from portable_models.compare.parity import format_float as f
        from portable_models.core.text import escape

        lines = []
        for res in self.results:
            head = f"[{escape(res['key'])}] "
            if res.get("error"):
                lines.append(head + f"not localised: {escape(res['error'])}")
                continue
            first = res.get("first")
            lines.append(head + (f"first diverges at {_span_text(first)} ({escape(first['op'])})"
                                 + (f", {escape(first['where'])}" if first.get("where") else "")
                                 if first else "every module agrees within tolerance")
                         + f" (case {res['case']})")
            lines.append(f"  {'module':<28} {'op':<28} {'max abs':>10} {'bound':>10} {'cosine':>9} {'sqnr dB':>8}")
            for rec in res["records"]:
                mark = " <- first" if first and (rec["module"], rec.get("node")) == (first["module"], first.get("node")) else ""
                if rec.get("status") != "compared":
                    lines.append(f"  {escape(rec['module'])[:28]:<28} {escape(rec['op'])[:28]:<28} "
                                 f"{escape(rec['status'])}")
                    continue
                bound = rec.get("bound")
                shown = (f(bound) if not isinstance(bound, dict) else  # a variant's budget: its floors
                         f"cos≥{f(bound.get('cosine_min'))}" if bound.get("sqnr_min") is None else
                         f"{f(bound.get('sqnr_min'))} dB")
                lines.append(f"  {escape(rec['module'])[:28]:<28} {escape(rec['op'])[:28]:<28} "
                             f"{f(rec['max_abs']):>10} {shown:>10} {f(rec['cosine']):>9} "
                             f"{f(rec['sqnr_db']):>8}{mark}")
        return "\n".join(lines) + "\n"


def summary(data: dict[str, Any]) -> str:
    """One line per diagnosed artifact (from :meth:`DiagnoseReport.to_dict`): where it first
    diverges, or why it could not be localised."""
    from portable_models.core.text import escape

    lines = []
    for res in data.get("artifacts", []):
        first = res.get("first")
        if res.get("error"):
            text = f"not localised: {escape(res['error'])}"
        elif first:
            text = f"first diverges at {_span_text(first)}" + (f", {escape(first['where'])}" if first.get("where") else "")
        else:
            text = "every module agrees within tolerance on this case (the error is in the last step, or only on other cases)"
        lines.append(f"diagnose [{escape(res['key'])}]: {text}")
    return "\n".join(lines) + ("\n  per module: reports/diagnose.json, plot in reports/report.html\n" if lines else "")


def _span_text(first: dict[str, Any]) -> str:
    """The first divergent module, or the span it closes when modules before it are fused
    into it or held with it in one unit."""
    from portable_models.core.text import escape

    span = list(first.get("span") or [first["module"]])
    if len(span) <= 1:
        return escape(first["module"])
    return f"one of {escape(', '.join(span))} (run as one op here: not seen apart)"


def diagnose(bundle: str | Path, *, targets: Sequence[str] | None = None, case: int = 0,
             timeout_s: float = 600.0, trust_bundle: bool = False) -> DiagnoseReport:
    """Localise, per artifact of ``bundle`` (or of ``targets``), the first source module whose
    output differs in that artifact, on golden case ``case``."""
    import shutil
    import tempfile

    from portable_models.contract.bundle import raise_on_problems
    from portable_models.contract.model import load_contract
    from portable_models.contract.trust import admit, refusal
    from portable_models.core.paths import user_path
    from portable_models.errors import UsageError
    from portable_models.isolation.pool import WorkerLimits, shared_pool
    from portable_models.isolation.sandbox import confine_or_why

    root = user_path(bundle)
    contract = load_contract(root)
    if not 0 <= case < int(contract.golden["cases"]):
        raise UsageError(f"case {case}: the bundle has {contract.golden['cases']} golden cases",
                         fix=f"use --case 0..{int(contract.golden['cases']) - 1}")
    admission = admit(root, contract)
    raise_on_problems(root, admission.problems)
    chosen = [a for a in contract.artifacts if not targets or a.target in targets or a.key in targets]
    scratch = Path(tempfile.mkdtemp(prefix="portable-models-diagnose-"))
    confine, unconfined = confine_or_why(root, scratch)
    pool = shared_pool(WorkerLimits(timeout_s=timeout_s)).confined(confine)
    report = DiagnoseReport(path=root)
    try:
        for art in chosen:
            refused = refusal(root, art, admission.entries, admission.scan, unconfined=unconfined,
                              trusted=trust_bundle)
            report.results.append(_one(pool, root, contract, art, case, scratch, refused))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def diagnose_staged(pool: Any, root: Path, contract: Any, artifacts: Sequence[Any], case: int = 0) -> DiagnoseReport:
    """:func:`diagnose` for ``export``: the bundle being written at ``root`` (the user's own
    model, just converted; no admission), its failing ``artifacts`` only, in ``pool``."""
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="portable-models-diagnose-"))
    report = DiagnoseReport(path=root)
    try:
        for art in artifacts:
            report.results.append(_one(pool, root, contract, art, case, scratch, None))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def _one(pool: Any, root: Path, contract: Any, art: Any, case: int, scratch: Path, refused: Any) -> dict[str, Any]:
    from portable_models.core.paths import bundle_path
    from portable_models.core.tolerance import TolerancePolicy
    from portable_models.diagnosis.job import first_divergent
    from portable_models.isolation.pool import JobFailed

    out: dict[str, Any] = {"key": art.key, "target": art.target, "route": art.route_name, "case": case, "records": []}
    why = _not_localisable(contract, art) if refused is None else refused.reason
    if why is not None:
        out["error"] = why
        return out
    framework = contract.source.get("framework")
    payload = {"target": art.target, "route": art.route_name, "artifact": str(root / art.file), "io": art.io.to_dict(),
               "framework": framework, "work": str(scratch / art.key),
               "source": str(bundle_path(root, contract.source["file"], what="source file")),
               "inputs": str(bundle_path(root, contract.golden["inputs"], what="golden inputs")),
               "input_names": [s.name for s in contract.inputs], "case": case,
               "inputs_spec": [s.to_dict() for s in contract.inputs], "dims": {k: v.to_dict() for k, v in contract.dims.items()},
               "inputs_max_bytes": contract.golden_max_bytes("inputs"), "golden_cases": contract.golden["cases"]}
    try:
        result, _ = pool.call(kind="diagnose", payload=payload, framework="torch", step=f"diagnose:{art.key}",
                              log=scratch / f"{art.key}.log", work_dir=scratch / art.key)
    except JobFailed as failed:
        out["error"] = failed.error.message
        return out
    tol = TolerancePolicy.from_dict(contract.tolerance).resolve(contract.outputs[0].name, art.precision)
    out["records"] = result["records"]
    if not any(rec.get("status") == "compared" for rec in out["records"]):  # agreement needs a comparison
        reasons = sorted({rec["status"] for rec in out["records"]})
        out["error"] = ("no source module's value could be read from this artifact "
                        f"({'; '.join(reasons)[:300] or 'no module recorded'})")
        return out
    out["first"] = first_divergent(out["records"], tol)
    return out


def _not_localisable(contract: Any, art: Any) -> str | None:
    """Why ``art`` cannot be localised here, or None."""
    import importlib.util

    from portable_models.diagnosis.job import TAPS

    framework = contract.source.get("framework")
    if framework not in ("torch", "keras"):
        return f"the reference activations need a torch or Keras source (this one is {framework})"
    if art.file is None:
        return "no artifact file (the target was not built)"
    if framework == "keras" and art.target not in ("onnx", "tflite"):
        return (f"a Keras source is localised per layer in its ONNX and TFLite artifacts; this {art.target} "
                f"artifact ({art.route_name}) names no Keras layer to tie its values to")
    tap = TAPS.get(art.target)
    if tap is None or importlib.util.find_spec(tap.partition(":")[0]) is None:
        return f"no per-module taps for {art.target} yet"
    return None
