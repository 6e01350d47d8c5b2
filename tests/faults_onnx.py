"""Seeded fault for ONNX artifacts: scale a module's weight initializer (by the exporter's
parameter name, ``<module>.weight``) and rewrite the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def corrupt(artifact: Path, module: str, factor: float, bundle: Path, art: dict[str, Any]) -> None:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(artifact))
    names = [f"{module}.weight", f"{module}.weight_ih_l0"]
    found = [init for init in model.graph.initializer if init.name in names]
    if not found:
        raise LookupError(f"no initializer named {names} in {artifact.name}: "
                          f"{[i.name for i in model.graph.initializer][:20]}")
    init = found[0]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    onnx.save(model, str(artifact))
