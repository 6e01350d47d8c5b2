"""Seeded fault for ONNX artifacts: scale a module's weight initializer and rewrite the file.
The weight is the initializer named ``<module>.weight`` (or a GRU/LSTM's ``weight_ih_l0``), else
the largest initializer a node of that module consumes (the exporter may transpose a
Linear's weight into a constant of its own name for MatMul)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _module(node: Any) -> str | None:
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    names = [s.strip(" '\"") for s in (scopes or "").strip("[]").split(",")]
    return names[-2] if len(names) >= 2 else None


def corrupt(artifact: Path, module: str, factor: float, bundle: Path, art: dict[str, Any]) -> None:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(artifact))
    inits = {init.name: init for init in model.graph.initializer}
    named = [inits[n] for n in (f"{module}.weight", f"{module}.weight_ih_l0") if n in inits]
    consumed = sorted({i for node in model.graph.node if _module(node) == module for i in node.input if i in inits},
                      key=lambda n: -int(np.prod(inits[n].dims)))
    found = named or [inits[n] for n in consumed]
    if not found:
        raise LookupError(f"no initializer of {module} in {artifact.name}")
    init = found[0]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    onnx.save(model, str(artifact))
