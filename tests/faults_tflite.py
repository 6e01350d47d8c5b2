"""Seeded fault for TFLite artifacts: scale a module's weight tensor in the ``.tflite`` file's
buffer, in place (the flatbuffer's bytes, nothing else recomputed).

The file's tensor names do not say which module a constant belongs to (see
:mod:`portable_models.diagnosis.tflite`), so the constant is found the way the tap names
activations: the route's conversion rebuilt with source-node locations, which label each
constant with the source nodes it was folded from. The module's weight is

1. the constant that equals the source's ``<module>.weight`` (or a GRU's ``weight_ih_l0``)
   as it is, transposed (a linear layer) or channels-last (OIHW -> OHWI), else
2. the largest constant labelled with one of the module's nodes, when exactly one is that
   large: a weight folded into another op's constant (a batch norm's scale into the
   convolution's filter before it) is scaled where it was folded.

Anything else raises ``LookupError``. litert-torch artifacts from a torch source only.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

#: how a source weight may be laid out in the file (rank -> permutations to try)
_WEIGHT_PERMS = {2: [(0, 1), (1, 0)], 4: [(0, 1, 2, 3), (0, 2, 3, 1)]}


def corrupt(artifact: Path, module: str, factor: float, bundle: Path, art: dict[str, Any]) -> None:
    from ai_edge_litert import schema_py_generated as schema

    if art.get("route_name") != "litert-torch":
        raise LookupError(f"the {art.get('route_name')} route's constants are not labelled by this corruptor")
    data = bytearray(artifact.read_bytes())
    model = schema.Model.GetRootAs(data, 0)
    graph = model.Subgraphs(0)
    weights = _source_weights(bundle, module)
    labels, nodes = _labels_in_a_child(artifact, bundle, art, module)
    constants = {}  # tensor index -> a writable view of its buffer
    for i in range(graph.TensorsLength()):
        tensor = graph.Tensors(i)
        raw = model.Buffers(tensor.Buffer()).DataAsNumpy() if tensor.Buffer() else 0
        if isinstance(raw, np.ndarray) and raw.size and tensor.Type() == schema.TensorType.FLOAT32:
            constants[i] = raw.view(np.float32).reshape(tensor.ShapeAsNumpy())
    index = _exact(constants, weights) or _folded(constants, labels, nodes, module)
    constants[index] *= np.float32(factor)  # in place, in ``data``
    artifact.write_bytes(bytes(data))


def _exact(constants: dict[int, np.ndarray], weights: list[np.ndarray]) -> int | None:
    for weight in weights:
        for index, value in constants.items():
            for perm in _WEIGHT_PERMS.get(weight.ndim, [tuple(range(weight.ndim))]):
                moved = weight.transpose(perm)
                if moved.shape == value.shape and np.array_equal(moved, value):
                    return index
    return None


def _folded(constants: dict[int, np.ndarray], labels: dict[int, list[str]], nodes: set[str],
            module: str) -> int:
    mine = {i: v for i, v in constants.items() if nodes & set(labels.get(i, []))}
    if not mine:
        raise LookupError(f"no constant of the file is labelled with {module}'s nodes {sorted(nodes)}")
    top = max(v.size for v in mine.values())
    largest = [i for i, v in mine.items() if v.size == top]
    if len(largest) != 1:
        raise LookupError(f"{len(largest)} constants of {top} elements are labelled with {module}: "
                          "which holds its weight is not known")
    return largest[0]


def _source_weights(bundle: Path, module: str) -> list[np.ndarray]:
    import torch

    contract = json.loads((bundle / "contract.json").read_text())
    program = torch.export.load(str(bundle / contract["source"]["file"]))
    state = {**program.state_dict, **dict(program.constants)}
    names = [f"{module}.weight", f"{module}.weight_ih_l0"]
    return [state[n].detach().numpy() for n in names if n in state]


def _labels_in_a_child(artifact: Path, bundle: Path, art: dict[str, Any],
                       module: str) -> tuple[dict[int, list[str]], set[str]]:
    """:func:`_constant_labels` in a child interpreter: importing the ``portable_models.diagnosis``
    package here would shadow ``portable_models.diagnosis`` the function (PEP 562's lazy name)
    for the caller, and the rebuild's memory goes with the child."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, __file__, str(artifact), str(bundle), json.dumps(art), module],
                         capture_output=True, text=True, timeout=600, check=False)
    if run.returncode != 0:
        raise LookupError(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "labelling failed")
    out = json.loads(run.stdout.strip().splitlines()[-1])
    return {int(k): v for k, v in out["labels"].items()}, set(out["nodes"])


def _constant_labels(artifact: Path, bundle: Path, art: dict[str, Any],
                     module: str) -> tuple[dict[int, list[str]], set[str]]:
    """Every constant's source nodes (the rebuilt file's labels), and ``module``'s nodes."""
    import torch

    from portable_models.diagnosis import tflite
    from portable_models.diagnosis.reference import torch_reference
    from portable_models.diagnosis.taps import ReferenceStore, TapRequest

    contract = json.loads((bundle / "contract.json").read_text())
    source = bundle / contract["source"]["file"]
    program = torch.export.load(str(source))
    user_inputs = program.graph_signature.user_inputs
    shapes = {n.name: tuple(n.meta["val"].shape) for n in program.graph.nodes if n.name in user_inputs}
    case = {name: np.zeros(shapes[p], np.float32)
            for name, p in zip(art["io"]["inputs"], user_inputs, strict=True)}
    with tempfile.TemporaryDirectory() as tmp:
        store = ReferenceStore(Path(tmp) / "reference")
        torch_reference(source, list(case.values()), store)
        req = TapRequest(artifact=artifact, io=art["io"], case=case, modules=store.refs(), work=Path(tmp),
                         payload={"route": art["route_name"], "source": str(source)})
        graph = tflite._Graph.load(artifact)
        rebuilt = tflite._rebuild(req, program, graph)
        why = graph.same_as(rebuilt)
        if why is not None:
            raise LookupError(f"the rebuilt graph is not the artifact's: {why}")
        labels = {i: [m["node"] for m in tflite._LABEL.finditer(t["name"])] for i, t in enumerate(rebuilt.tensors)}
    ref = store.modules.get(module)
    if ref is None:
        raise LookupError(f"{module} runs no node in the captured program")
    return labels, set(ref.nodes)


if __name__ == "__main__":  # the child of _labels_in_a_child
    import sys

    found, module_nodes = _constant_labels(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4])
    print(json.dumps({"labels": found, "nodes": sorted(module_nodes)}))
