"""The ``diagnose`` job, run in a worker (confined like a verify's): the captured program run
node by node on one golden case (the reference activations, keyed by the source module that
made each), the artifact run in its runtime with its intermediate values exposed, and the
two compared module by module, in execution order. Activations stay in the worker; only the
per-module records come back.

Supported here: ONNX (intermediate values exposed as graph outputs, mapped back to source
modules through the exporter's ``pkg.torch.onnx.name_scopes`` node metadata). Other targets
are reported as not localisable yet, with the reason.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.core.arrays import to_numpy

__all__ = ["diagnose_job", "first_divergent", "module_records"]

#: a frame of a torch.fx node's stack trace
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)')


def diagnose_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Per module of the source, in execution order: the reference's and the artifact's
    output compared (``records``), and the spans the artifact holds as one unit."""
    from portable_models.run.job import golden_inputs

    case = golden_inputs(Path(payload["inputs"]), payload.get("inputs_max_bytes"),
                         payload.get("golden_cases"))[int(payload["case"])]
    reference = _reference(Path(payload["source"]), [case[name] for name in payload["input_names"]])
    if payload["target"] != "onnx":
        raise NotImplementedError(f"no per-module taps for {payload['target']} yet")
    got = _onnx_taps(Path(payload["artifact"]), {b["name"]: case[k] for k, b in payload["io"]["inputs"].items()})
    return {"records": module_records(reference, got)}


def _source_location(trace: str) -> str | None:
    """The innermost frame of ``trace`` that is not torch's own: the user's line."""
    frames = [m for m in _FRAME.finditer(trace or "") if "/torch/" not in m.group("file")]
    if not frames:
        return None
    last = frames[-1]
    return f"{last.group('file')}:{last.group('line')}"


def _reference(source: Path, args: list[np.ndarray]) -> list[dict[str, Any]]:
    """Every call_function node of the captured program, run on ``args``: its module path,
    op, source location and output (the last node of a module is the module's output)."""
    import torch

    program = torch.export.load(str(source))
    module = program.module()
    recorded: list[dict[str, Any]] = []

    class Tap(torch.fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            out = super().run_node(n)
            if n.op == "call_function" and isinstance(out, torch.Tensor) and out.dtype.is_floating_point:
                stack = list((n.meta.get("nn_module_stack") or {}).values())
                recorded.append({"node": n.name, "module": stack[-1][0] if stack else "",
                                 "op": str(n.target), "where": _source_location(n.meta.get("stack_trace") or ""),
                                 "value": to_numpy(out).astype(np.float64)})
            return out

    with torch.no_grad():
        Tap(module).run(*[torch.from_numpy(np.ascontiguousarray(a)) for a in args])
    return recorded


def _onnx_taps(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The output of the last node of each source module in the ONNX graph, by module path
    (from the exporter's ``pkg.torch.onnx.name_scopes``), read by onnxruntime."""
    import onnx
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    typed = {v.name: v for v in [*model.graph.value_info, *model.graph.output]}
    last: dict[str, str] = {}
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        if scopes is None or not node.output:
            continue
        names = [s.strip(" '\"") for s in scopes.strip("[]").split(",")]
        if len(names) >= 2 and node.output[0] in typed:
            last[names[-2]] = node.output[0]
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(typed[v] for v in dict.fromkeys(last.values()) if v not in present)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = list(dict.fromkeys(last.values()))
    values = dict(zip(wanted, session.run(wanted, feeds), strict=True))
    return {module: np.asarray(values[value], dtype=np.float64) for module, value in last.items()}


def module_records(reference: list[dict[str, Any]], got: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One record per source module, in the order its output was made: the artifact's
    value of that module's output against the reference's (or the span it was held in)."""
    outputs: dict[str, dict[str, Any]] = {}
    for rec in reference:  # the last tensor a module makes is its output
        outputs.pop(rec["module"], None)
        outputs[rec["module"]] = rec
    records = []
    for module, rec in outputs.items():
        entry = {"module": module or "(top level)", "op": rec["op"], "where": rec["where"],
                 "shape": list(rec["value"].shape)}
        value = got.get(module)
        if value is None:
            entry["status"] = "fused (not in the artifact)"  # held in one node with a later module
        elif value.shape != rec["value"].shape:
            entry["status"] = "not comparable"
            entry["artifact_shape"] = list(value.shape)
        else:
            entry.update(_metrics(rec["value"], value))
        records.append(entry)
    return records


def _metrics(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    diff = np.abs(got - ref)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    noise = float(np.sum(diff ** 2))
    signal = float(np.sum(ref ** 2))
    norm = float(np.linalg.norm(ref) * np.linalg.norm(got))
    return {"status": "compared", "max_abs": float(np.max(diff)) if diff.size else 0.0,
            "ref_max": scale,
            "cosine": float(np.dot(ref.ravel(), got.ravel()) / norm) if norm else (1.0 if scale == 0 else 0.0),
            "sqnr_db": None if noise == 0 or signal == 0 else 10 * float(np.log10(signal / noise))}


def first_divergent(records: list[dict[str, Any]], atol: float, rtol: float) -> dict[str, Any] | None:
    """The first module, in execution order, whose output is off by more than the output
    tolerance scaled to that tensor (``atol`` in proportion to its magnitude against the
    final output's, plus ``rtol`` of its magnitude); every module before it agrees, so its
    error is its own, not inherited from its input."""
    compared = [r for r in records if r.get("status") == "compared"]
    if not compared:
        return None
    final = max(compared[-1]["ref_max"], 1e-30)
    for rec in compared:
        rec["bound"] = atol * max(rec["ref_max"] / final, 1.0) + rtol * rec["ref_max"]
    return next((rec for rec in compared if rec["max_abs"] > rec["bound"]), None)
