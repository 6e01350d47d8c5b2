"""ONNX tap: every node's output whose exporter metadata names its source module is made a
graph output, and the last such value of each module is read back from onnxruntime.

torch.onnx (dynamo) writes ``pkg.torch.onnx.name_scopes`` on each node: the module path
from the top, one entry per level, ending with the node's own name. tf2onnx and Keras's
exporter name nodes ``<model>/<layer>/<op>``; the layer is read from the node name. Values
inside a tf2onnx graph may be channels-first where the Keras layer's are channels-last; the
comparison undoes that (:func:`~.job.module_records`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from portable_models.diagnosis.taps import Tapped, TapRequest, TapStream, scoped_names

__all__ = ["taps"]



def taps(req: TapRequest) -> TapStream:
    import onnx
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(onnx.load(str(req.artifact)))
    typed = {v.name: v for v in [*model.graph.value_info, *model.graph.output]}
    known = {ref.module for ref in req.modules}
    last: dict[str, str] = {}
    for node in model.graph.node:
        module = _module_of(node, known)
        if module is not None and node.output and node.output[0] in typed:
            last[module] = node.output[0]
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(typed[v] for v in dict.fromkeys(last.values()) if v not in present)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = list(dict.fromkeys(last.values()))
    values = dict(zip(wanted, session.run(wanted, req.feeds()), strict=True))
    for module, value in last.items():
        yield Tapped(module, np.asarray(values[value]))


def _module_of(node: Any, known: set[str]) -> str | None:
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    if scopes is not None:
        names = [s.strip(" '\"") for s in scopes.strip("[]").split(",")]
        return names[-2] if len(names) >= 2 and names[-2] in known else None
    parts = node.name.split("/")  # tf2onnx / keras: <model>/<layer>/.../<op>
    found = scoped_names(parts[1:-1], known) if len(parts) >= 3 else []
    return found[0] if found else None
