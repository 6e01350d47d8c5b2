"""Reference activations: the source run node by node on one golden case, each output
written to a :class:`~.taps.ReferenceStore` under the source module that made it.

* torch — the captured program (``source/model.pt2``) under a ``torch.fx.Interpreter``;
  a node's module is the innermost entry of its ``nn_module_stack``, its source line the
  innermost frame of its stack trace that is not torch's own;
* Keras — every layer's output, by layer name, from a functional model over the loaded
  model's layers (Keras has no finer grain than its layers).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.core.arrays import to_numpy
from portable_models.diagnosis.taps import ReferenceStore

__all__ = ["keras_reference", "source_location", "torch_reference"]

#: a frame of a torch.fx node's stack trace
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)')


def source_location(trace: str) -> str | None:
    """The innermost frame of ``trace`` that is not torch's own: the user's line."""
    frames = [m for m in _FRAME.finditer(trace or "") if "/torch/" not in m.group("file")]
    if not frames:
        return None
    last = frames[-1]
    return f"{last.group('file')}:{last.group('line')}"


def torch_reference(source: Path, args: list[np.ndarray], store: ReferenceStore) -> None:
    """Every floating call_function node of the captured program, run on ``args``."""
    import torch

    program = torch.export.load(str(source))
    module = program.module()

    class Tap(torch.fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            out = super().run_node(n)
            if n.op == "call_function" and isinstance(out, torch.Tensor) and out.dtype.is_floating_point:
                stack = list((n.meta.get("nn_module_stack") or {}).values())
                store.record(stack[-1][0] if stack else "", n.name, str(n.target),
                             source_location(n.meta.get("stack_trace") or ""), to_numpy(out))
            return out

    with torch.no_grad():
        Tap(module).run(*[torch.from_numpy(np.ascontiguousarray(a)) for a in args])


def keras_reference(source: Path, args: list[np.ndarray], store: ReferenceStore) -> None:
    """Every layer's (floating) output of the Keras model at ``source``, by layer name."""
    import keras

    model = keras.saving.load_model(str(source), compile=False, safe_mode=True)
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    outputs = [layer.output for layer in layers]
    probe = keras.Model(model.inputs, outputs)
    values = probe(args if len(args) > 1 else args[0], training=False)
    values = values if isinstance(values, (list, tuple)) else [values]
    for layer, value in zip(layers, values, strict=True):
        array = np.asarray(keras.ops.convert_to_numpy(value)) if not isinstance(value, np.ndarray) else value
        if np.issubdtype(array.dtype, np.floating):
            store.record(layer.name, layer.name, type(layer).__name__, None, array)
