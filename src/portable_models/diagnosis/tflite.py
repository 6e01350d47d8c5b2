"""TFLite tap: the LiteRT interpreter keeps every tensor (``experimental_preserve_all_tensors``),
and each op's output is mapped back to the source node that made it.

Where the names come from, per route:

* ``litert-torch`` — the file's tensor names are MLIR locations built from each fx node's
  ``nn_module_stack``; the route exports a wrapper around the captured program's flat graph,
  so every name is the wrapper's class and says nothing about the source module. The tap
  converts the captured program again, the route's way (same wrapper, same shapes, same
  precision), with litert-torch's location hook made to write, per lowered node, the name and
  op of the source node it came from (``from_node``); the rebuilt file must have the
  artifact's graph op for op and tensor for tensor, and its names are then read onto the
  artifact's tensors by index. Channels-last values are read back through (0, 3, 1, 2).
  A graph output's name is the signature's: it is the program's output node at that place.
* ``onnx2tf`` and Keras sources (TF converter) — tensor names are read as they are: a
  ``/``- or ``;``-separated part that is a source node's or module's name names it; a
  tensor whose shape is not the reference's is matched only through the known
  NHWC<->NCHW permutations (one that fits, or none).

An op's output is the value of the last (in the source's order) of the nodes it names; a
module's output is read from the last tensor (in op order) naming the module's last node, and
only if that node is the last it names (the transposes and pads the lowering puts *before* a
node's op carry its name but hold its input). Modules none names are left out (the job reports
them as fused into a later module); when the graph cannot be mapped at all, every module is
reported ``Held`` with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.diagnosis.taps import (
    Held,
    ModuleRef,
    NodeRef,
    Tapped,
    TapRequest,
    TapStream,
    scoped_names,
)

__all__ = ["taps"]

#: a label the relabelling hook writes into a location: ``pm{node|target}``
_LABEL = re.compile(r"pm\{(?P<node>[^|{}]*)\|(?P<target>[^|{}]*)\}")
#: logical <- physical permutations a tensor of unknown layout is tried in (rank -> perms):
#: litert-torch makes only 4-d NHWC; onnx2tf also channels-last 3-d and 5-d
_LAYOUT_PERMS: dict[str, dict[int, list[tuple[int, ...]]]] = {"litert-torch": {4: [(0, 3, 1, 2)]},
                 "onnx2tf": {3: [(0, 2, 1)], 4: [(0, 3, 1, 2)], 5: [(0, 4, 1, 2, 3)]}}


class _Unmapped(Exception):
    """The artifact's tensors cannot be mapped back to source nodes (the reason)."""


def taps(req: TapRequest) -> TapStream:
    graph = _Graph.load(req.artifact)
    try:
        if req.payload.get("route") == "litert-torch":
            labels = _litert_torch_labels(req, graph)
        else:
            labels = _name_labels(req, graph)
    except _Unmapped as exc:
        yield Held(tuple(ref.module for ref in req.modules), str(exc))
        return
    values = _run(req, graph)
    perms = _LAYOUT_PERMS.get(req.payload.get("route") or "", _LAYOUT_PERMS["onnx2tf"])
    yield from _module_values(req.modules, graph, labels, values, perms, req.nodes)


class _Graph:
    """The artifact's primary subgraph: tensor details, ops in execution order, signature."""

    def __init__(self, tensors: list[dict[str, Any]], ops: list[dict[str, Any]],
                 signature: dict[str, Any]) -> None:
        self.tensors, self.ops, self.signature = tensors, ops, signature

    @classmethod
    def load(cls, path: Path) -> _Graph:
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=str(path))
        sigs = interp._get_full_signature_list()  # name -> {"inputs"/"outputs": name -> index}
        if len(sigs) != 1:
            raise _Unmapped(f"{path.name} has signatures {sorted(sigs)}; the tap reads one")
        return cls(interp.get_tensor_details(), interp._get_ops_details(), next(iter(sigs.values())))

    def produced(self) -> list[int]:
        """Every op output's tensor index, in op order (a tensor made twice counts last)."""
        return [int(t) for op in self.ops for t in op["outputs"] if t >= 0]

    def same_as(self, other: _Graph) -> str | None:
        """Why ``other`` is not this graph op for op and tensor for tensor (None: it is)."""
        if len(self.ops) != len(other.ops) or len(self.tensors) != len(other.tensors):
            return (f"{len(other.ops)} ops and {len(other.tensors)} tensors against the artifact's "
                    f"{len(self.ops)} and {len(self.tensors)}")
        for mine, theirs in zip(self.ops, other.ops, strict=True):
            if (mine["op_name"] != theirs["op_name"] or list(mine["inputs"]) != list(theirs["inputs"])
                    or list(mine["outputs"]) != list(theirs["outputs"])):
                return f"op {mine['index']} is {mine['op_name']} here, {theirs['op_name']} rebuilt"
        for mine, theirs in zip(self.tensors, other.tensors, strict=True):
            if list(mine["shape"]) != list(theirs["shape"]):
                return f"tensor {mine['index']} has shape {list(mine['shape'])}, {list(theirs['shape'])} rebuilt"
        return None


# -- labels: tensor index -> the source nodes its op was made from ------------------
Labels = dict[int, list[str]]


def _litert_torch_labels(req: TapRequest, graph: _Graph) -> Labels:
    """Rebuild the artifact with source-node locations and read them off by tensor index."""
    import torch

    program = torch.export.load(str(req.payload["source"]))
    rebuilt = _rebuild(req, program, graph)
    why = graph.same_as(rebuilt)
    if why is not None:
        raise _Unmapped(f"the rebuilt graph is not the artifact's ({why}): its tensors cannot be named")
    ops = {node: ref.ops[i] for ref in req.modules for i, node in enumerate(ref.nodes)}
    labels: Labels = {}
    for index in rebuilt.produced():
        found = [m for m in _LABEL.finditer(rebuilt.tensors[index]["name"])]
        nodes = [m["node"] for m in found if m["node"] in ops and ops[m["node"]] == m["target"]]
        if nodes and len(nodes) == len(found) and "pm-" not in rebuilt.tensors[index]["name"]:
            labels[index] = nodes  # any part not a known source node (a layout transpose): unnamed
    outputs = [a.name for a in _flat_output_nodes(program)]
    for name, index in graph.signature.get("outputs", {}).items():
        position = list(req.io.get("outputs", {})).index(name) if name in req.io.get("outputs", {}) else None
        if position is not None and position < len(outputs) and outputs[position] in ops:
            labels[int(index)] = [outputs[position]]
    return labels


def _flat_output_nodes(program: Any) -> list[Any]:
    out = next(n for n in program.graph.nodes if n.op == "output")
    import torch.utils._pytree as pytree

    return [a for a in pytree.tree_leaves(out.args) if hasattr(a, "op")]


def _rebuild(req: TapRequest, program: Any, graph: _Graph) -> _Graph:
    """The route's conversion again, with each location naming its source node."""
    from unittest import mock

    import litert_torch
    import torch
    from litert_torch.backend import debuginfo

    from portable_models.convert.tflite import _named_module

    phys_in = [b["name"] for b in req.io["inputs"].values()]
    module = _named_module(program.module(), phys_in, list(req.io["outputs"]))
    feeds = req.feeds()
    kwargs = {n: torch.from_numpy(np.ascontiguousarray(_as_signature_dtype(feeds[n], graph, n))) for n in phys_in}
    fp16 = any(t["dtype"] == np.float16 for t in graph.tensors)
    quant = None
    if fp16:
        from litert_torch.generative.quantize import quant_recipes

        quant = quant_recipes.full_fp16_recipe()
    try:
        with mock.patch.object(debuginfo, "build_mlir_debuginfo", _location):
            model = litert_torch.convert(module, sample_kwargs=kwargs, quant_config=quant)
        path = req.work / "relabelled.tflite"
        req.work.mkdir(parents=True, exist_ok=True)
        model.export(str(path))
    except Exception as exc:  # any converter failure: the names cannot be had, say why
        raise _Unmapped(f"rebuilding the artifact with source names failed: {type(exc).__name__}: "
                        f"{str(exc).strip()[:200]}") from exc
    return _Graph.load(path)


def _location(node: Any) -> str:
    """The MLIR location name litert-torch gives a lowered node: the source node it came from
    (the first of its ``from_node`` history) and that node's op."""
    history = node.meta.get("from_node") or []
    if not history or not hasattr(history[0], "name"):
        return "pm-unknown;"
    while history[0].from_node:
        history = history[0].from_node
    return f"pm{{{history[0].name}|{history[0].target}}};"


def _name_labels(req: TapRequest, graph: _Graph) -> Labels:
    """Labels from the file's own tensor names (onnx2tf, the TF converter): a part of the
    name that is a source node's name, else a module's, names it (its layout unknown)."""
    node_module = req.node_modules()
    last = {ref.module: ref.last_node for ref in req.modules}
    labels: Labels = {}
    for index in graph.produced():
        parts = [p for p in re.split(r"[/;:]", graph.tensors[index]["name"]) if p]
        nodes = scoped_names(parts, node_module) or [last[m] for m in scoped_names(parts, last)]
        if nodes:  # a fused op ("relu/Relu;conv/convolution") names all it holds: the last in order is its value
            labels[index] = nodes
    if not labels:
        raise _Unmapped(f"no tensor name of {req.artifact.name} ({req.payload.get('route')} route) "
                        "names a source node or module")
    return labels


# -- running and matching ---------------------------------------------------------------
def _as_signature_dtype(arr: np.ndarray, graph: _Graph, name: str) -> np.ndarray:
    index = graph.signature.get("inputs", {}).get(name)
    if index is None:
        return arr
    dtype = np.dtype(graph.tensors[int(index)]["dtype"])
    return arr if arr.dtype == dtype else arr.astype(dtype)


def _run(req: TapRequest, graph: _Graph) -> dict[int, np.ndarray]:
    """Every op output of the artifact on the golden case, by tensor index."""
    import warnings

    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "preserve_all_tensors is for debugging": it is
        interp = Interpreter(model_path=str(req.artifact), experimental_preserve_all_tensors=True)
    runner = interp.get_signature_runner(next(iter(interp.get_signature_list())))
    feeds = req.feeds()
    runner(**{n: _as_signature_dtype(a, graph, n) for n, a in feeds.items()})
    out: dict[int, np.ndarray] = {}
    for index in graph.produced():
        try:
            out[index] = np.array(interp.get_tensor(index))
        except ValueError:  # a tensor the runtime did not keep (e.g. inside a delegate)
            continue
    return out


def _module_values(refs: list[ModuleRef], graph: _Graph, labels: Labels, values: dict[int, np.ndarray],
                   perms: dict[int, list[tuple[int, ...]]], nodes: list[NodeRef] | None = None) -> Iterator[Tapped]:
    """Per op output: the value of the last (in the source's order) of the nodes its tensor
    names — an op's output is its last node's value — when that node ends a module, or when the
    op holds the end of a module fused with later nodes (a convolution, its batch norm and the
    relu after them are one op: its value is the relu's, shown as that node). A tensor naming a
    node before a later tensor does (a transpose or pad the lowering puts *before* the node's
    op, on its input) is never taken for its output."""
    if nodes is None:  # the module order, node by node
        nodes = [NodeRef(n, ref.module, ref.ops[i], tuple(ref.shape)) for ref in refs for i, n in enumerate(ref.nodes)]
    order = {node.name: i for i, node in enumerate(nodes)}
    shapes = {node.name: node.shape for node in nodes}
    module_of = {node.name: node.module for node in nodes}
    ends = {ref.last_node for ref in refs}
    made: dict[str, int] = {}  # node -> the last tensor that names it
    for index in graph.produced():
        if index in values:
            for node in labels.get(index, []):
                made[node] = index
    for node in sorted(made, key=lambda n: order.get(n, -1)):
        found = made[node]
        named = [n for n in labels[found] if n in order]
        if not named or max(named, key=lambda n: order[n]) != node or not (ends & set(named)):
            continue
        value = _in_layout(values[found], tuple(shapes[node]), perms.get(values[found].ndim, []))
        if value is not None:
            yield Tapped(module_of[node], value, node=node)


def _in_layout(value: np.ndarray, shape: tuple[int, ...],
               perms: list[tuple[int, ...]]) -> np.ndarray | None:
    """``value`` in the reference's layout: as it is, or through the one known channels-last
    permutation that gives ``shape``. None when neither fits, or both do (a 1x8x8x8 tensor's
    layout cannot be told from its shape: not guessed)."""
    same = value.shape == shape or (value.size == int(np.prod(shape)) and value.squeeze().shape
                                    == tuple(d for d in shape if d != 1))
    fits = [p for p in perms if tuple(value.shape[i] for i in p) == shape]
    if len(fits) + same != 1:
        return None
    return value if same else np.ascontiguousarray(value.transpose(fits[0]))
