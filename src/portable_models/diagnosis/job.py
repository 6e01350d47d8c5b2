"""The ``diagnose`` job, run in a worker (confined like a verify's): the source run node by
node on one golden case (the reference activations, keyed by the source module that made
each, streamed to disk), the artifact run in its runtime by its target's tap with its
intermediate values exposed, and the two compared module by module as the tap yields them.
Activations stay in the worker; only the per-module records come back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from portable_models.diagnosis.taps import Held, ReferenceStore, Tapped, TapRequest

__all__ = ["TAPS", "diagnose_job", "first_divergent", "metrics", "module_records"]

#: target -> its tap (``module:function``), imported in the worker only
TAPS = {
    "onnx": "portable_models.diagnosis.onnx:taps",
    "tflite": "portable_models.diagnosis.tflite:taps",
    "coreml": "portable_models.diagnosis.coreml:taps",
    "executorch": "portable_models.diagnosis.executorch:taps",
    "torchscript": "portable_models.diagnosis.torchscript:taps",
}


def diagnose_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Per module of the source, in execution order: the reference's and the artifact's
    output compared (``records``), and the spans the artifact holds as one unit."""
    from portable_models.core.imports import load_impl
    from portable_models.diagnosis.reference import keras_reference, torch_reference
    from portable_models.run.job import golden_inputs

    case = golden_inputs(Path(payload["inputs"]), payload.get("inputs_max_bytes"),
                         payload.get("golden_cases"))[int(payload["case"])]
    work = Path(payload.get("work") or ".").resolve()
    store = ReferenceStore(work / "reference")
    args = [case[name] for name in payload["input_names"]]
    if payload.get("framework") == "keras":
        keras_reference(Path(payload["source"]), args, store)
    else:
        torch_reference(Path(payload["source"]), args, store)
    tap = load_impl(TAPS[payload["target"]])
    request = TapRequest(artifact=Path(payload["artifact"]), io=payload["io"], case=case,
                         modules=store.refs(), work=work, payload=payload, nodes=list(store.nodes))
    return {"records": module_records(store, tap(request))}


def module_records(store: ReferenceStore, stream: Any) -> list[dict[str, Any]]:
    """The records in execution order: one per source module (its output: its last node), and
    one per other node a tap showed (an op fused across modules answers with a later node's
    value). Each compares the artifact's value, as the tap yields it, with the reference's; a
    module not shown is held in a unit (why) or fused into a later op."""
    refs = {ref.module: ref for ref in store.refs()}
    node_module = store.node_modules()
    shapes = {n.name: n.shape for n in store.nodes}
    compared: dict[str, dict[str, Any]] = {}  # node -> its comparison
    held: dict[str, str] = {}
    for item in stream:
        if isinstance(item, Held):
            for module in item.modules:
                held.setdefault(module, item.why)
        elif isinstance(item, Tapped):
            name = item.node if item.node in node_module else (
                refs[item.module].last_node if item.node is None and item.module in refs else None)
            if name is not None:
                compared[name] = _compare(shapes[name], store.node_value(name), item.value)
    last = {ref.last_node: ref for ref in refs.values()}
    records = []
    for node in store.nodes:
        if node.name not in compared and node.name not in last:
            continue
        ref = refs[node.module]
        entry: dict[str, Any] = {"module": node.module or "(top level)", "op": node.op,
                                 "where": node.where or ref.where, "shape": list(node.shape)}
        if node.name not in last:
            entry["node"] = node.name  # a node inside its module, shown on its own
        if node.name in compared:
            entry.update(compared[node.name])
        elif node.module in held:
            entry["status"] = f"held in one unit: {held[node.module]}"
        else:
            entry["status"] = "fused (not in the artifact)"  # held in one node with a later module
        records.append(entry)
    return records


def _compare(shape: tuple[int, ...], expected: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    got = _aligned(np.asarray(got), tuple(shape))
    if got.shape != tuple(shape):
        return {"status": "not comparable", "artifact_shape": list(got.shape)}
    return metrics(np.asarray(expected, dtype=np.float64), got.astype(np.float64))


#: channels-last <-> channels-first, per rank: the only layout changes a runtime makes inside
#: a graph that a comparison undoes by itself (a tap undoes any other)
_LAYOUTS = {3: ((0, 2, 1),), 4: ((0, 3, 1, 2), (0, 2, 3, 1)), 5: ((0, 4, 1, 2, 3), (0, 2, 3, 4, 1))}


def _aligned(got: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``got`` in the reference's ``shape``: as is when it has it; else with unit dims dropped
    or added, or channels moved (first <-> last), when exactly that gives the shape."""
    if got.shape == shape:
        return got
    if got.size == int(np.prod(shape)) and tuple(d for d in got.shape if d != 1) == tuple(d for d in shape if d != 1):
        return got.reshape(shape)
    fits = [perm for perm in _LAYOUTS.get(got.ndim, ()) if tuple(got.shape[i] for i in perm) == shape]
    return np.transpose(got, fits[0]) if len(fits) == 1 else got


def metrics(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """Max abs error, cosine and SQNR of ``got`` against ``ref``, and ``ref``'s magnitude
    (JSON-safe: where either holds NaN or Inf, the count of such elements instead)."""
    bad = int(np.sum(~np.isfinite(got))) + int(np.sum(~np.isfinite(ref)))
    if bad:
        return {"status": "compared", "nonfinite": bad, "max_abs": None, "cosine": None, "sqnr_db": None,
                "ref_max": float(np.max(np.abs(ref[np.isfinite(ref)]), initial=0.0))}
    diff = np.abs(got - ref)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    noise = float(np.sum(diff ** 2))
    signal = float(np.sum(ref ** 2))
    norm = float(np.linalg.norm(ref) * np.linalg.norm(got))
    return {"status": "compared", "max_abs": float(np.max(diff)) if diff.size else 0.0,
            "ref_max": scale,
            "cosine": float(np.dot(ref.ravel(), got.ravel()) / norm) if norm else (1.0 if scale == 0 else 0.0),
            "sqnr_db": None if noise == 0 or signal == 0 else 10 * float(np.log10(signal / noise))}


def first_divergent(records: list[dict[str, Any]], tol: Any) -> dict[str, Any] | None:
    """The first module, in execution order, whose output is off by more than the artifact's
    tolerance ``tol`` (:class:`~portable_models.core.tolerance.Tolerance`) scaled to that tensor:
    an element bound (``atol`` in proportion to its magnitude against the final output's, plus
    ``rtol`` of its magnitude), or for a quantised variant's budget (no element bound) its cosine
    and SQNR floors; every module before it agrees, so its error is its own, not inherited from
    its input. Its ``span`` lists the modules since the last one compared (fused into it, or held
    in one unit with it): the error is in one of them, and the report names them all rather than
    pretend to know which."""
    compared = [r for r in records if r.get("status") == "compared"]
    if not compared:
        return None
    budget = tol.atol is None or tol.rtol is None
    final = max(compared[-1]["ref_max"], 1e-30)
    for rec in compared:
        if budget:
            rec["bound"] = {"cosine_min": tol.cosine_min, "sqnr_min": tol.sqnr_min}
        else:
            rec["bound"] = tol.atol * max(rec["ref_max"] / final, 1.0) + tol.rtol * rec["ref_max"]
    span: list[str] = []
    for rec in records:
        if rec.get("status") != "compared":
            span.append(rec["module"])
            continue
        if rec.get("nonfinite") or _over(rec, budget):
            first = dict(rec)
            first["span"] = list(dict.fromkeys([*span, rec["module"]]))
            return first
        span = []
    return None


def _over(rec: dict[str, Any], budget: bool) -> bool:
    if not budget:
        return bool(rec["max_abs"] > rec["bound"])
    floors = rec["bound"]
    low_cosine = floors["cosine_min"] is not None and rec["cosine"] is not None and rec["cosine"] < floors["cosine_min"]
    low_sqnr = floors["sqnr_min"] is not None and rec["sqnr_db"] is not None and rec["sqnr_db"] < floors["sqnr_min"]
    return low_cosine or low_sqnr
