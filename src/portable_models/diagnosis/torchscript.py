"""TorchScript tap: the loaded ``torch.jit`` module's graph, with the last value of each
source module made an extra output, run once by TorchScript's own interpreter.

A ScriptModule from the ``torch-jit-trace`` route has no submodules to hook: the route
traces ``ExportedProgram.module()`` flattened into one ``GraphModule`` (every call inlined)
and freezes it (weights become constants; a batch norm after a convolution is folded into
it). What survives is each graph node's source range: the Python stack at trace time, saved
in the file's debug info, whose innermost ``<eval_with_key>.N(L): forward`` frame is line
``L`` of the flat module's generated code. The tap regenerates that module from the
bundle's captured program (the route's own :func:`~portable_models.convert.torchscript.
_flat_module`), reads line ``L`` (``name = torch.ops.aten...``: one fx node per line, named
as in the reference) and so knows, for each graph value, the fx node that made it.

:func:`module_outputs` turns "fx node -> the artifact's handle of its value" into "handle ->
module whose output it is", for this tap and the Core ML one: a value is carried onto the
node's only user when that user vanished from the artifact (folded into it, or an identity
removed), since that user's consumers read this value; a module whose output node has no
value is left out (fused, and named in a span).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from portable_models.diagnosis.taps import Tapped, TapRequest, TapStream

__all__ = ["fx_node_of", "module_last_nodes", "module_outputs", "taps"]

#: the innermost frame of a traced fx GraphModule in a TorchScript node's source range
_FX_FRAME = re.compile(r"<eval_with_key>\.\d+\((\d+)\): forward")
#: a line of fx's generated code: ``name = <call>`` (one node per line)
_ASSIGN = re.compile(r"^\s*([A-Za-z_]\w*)\s*=")
#: ops ``torch.jit.freeze`` folds into the node before them or removes as identities
_FOLDED = {"batch_norm", "_native_batch_norm_legit_no_training", "dropout", "clone", "contiguous",
           "alias", "detach"}


def taps(req: TapRequest) -> TapStream:
    import torch

    from portable_models.convert.torchscript import _flat_module

    module = torch.jit.load(str(req.artifact), map_location="cpu").eval()
    flat = _flat_module(torch.export.load(str(req.payload["source"])))
    graph = module.forward.graph
    values = graph_values(graph, flat.code.splitlines(), flat.graph)
    handles = module_outputs(flat.graph, values, {ref.module: ref.last_node for ref in req.modules},
                             carry=True)
    if not handles:
        return
    wanted = list(handles.items())
    feeds = req.feeds()
    args = [torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in req.payload["input_names"]]
    with torch.no_grad():
        outs = _with_outputs(graph, [at for at, _ in wanted])(module._c, *args)
    for (_, name), value in zip(wanted, outs, strict=True):
        yield Tapped(name, value.detach().numpy())


def graph_values(graph: Any, lines: list[str], fx_graph: Any) -> dict[str, tuple[int, int]]:
    """fx node name -> the last TorchScript tensor value made on its line of ``lines``
    (the generated code of the traced fx module), as (node index, output index) in
    ``graph``; a node that makes a tuple gives its ``i``-th tensor to its ``getitem(_, i)``
    users."""
    fx_nodes = {n.name: n for n in fx_graph.nodes}
    values: dict[str, tuple[int, int]] = {}
    for at, node in enumerate(graph.nodes()):
        name = fx_node_of(node.sourceRange(), lines)
        outs = [k for k, o in enumerate(node.outputs()) if o.type().kind() == "TensorType"]
        if name is None or not outs or name not in fx_nodes:
            continue
        if node.outputsSize() > 1:
            for user in fx_nodes[name].users:
                index = user.args[1] if len(user.args) > 1 else None
                if user.op == "call_function" and isinstance(index, int) and index < node.outputsSize():
                    values[user.name] = (at, index)
        values[name] = (at, outs[-1])
    return values


def fx_node_of(source_range: str, lines: list[str]) -> str | None:
    """The fx node whose line of generated code ``lines`` the innermost fx frame of a
    TorchScript node's ``source_range`` points at, or None."""
    frame = _FX_FRAME.search(source_range or "")
    if frame is None:
        return None
    index = int(frame.group(1)) - 1
    assigned = _ASSIGN.match(lines[index]) if 0 <= index < len(lines) else None
    return assigned.group(1) if assigned else None


def module_last_nodes(fx_graph: Any) -> dict[str, str]:
    """Module -> its output: the last floating tensor call_function node it made, in graph
    order (the reference's choice, made from the same node metadata)."""
    import torch

    last: dict[str, str] = {}
    for node in fx_graph.nodes:
        val = node.meta.get("val")
        if node.op != "call_function" or not isinstance(val, torch.Tensor) or not val.dtype.is_floating_point:
            continue
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        last[stack[-1][0] if stack else ""] = node.name
    return last


def module_outputs(fx_graph: Any, values: dict[str, Any], outputs: dict[str, str] | None = None, *,
                   carry: bool = False) -> dict[Any, str]:
    """``values`` (fx node name -> the artifact's handle of that node's value) as handle ->
    module, for every module whose output node (``outputs``: module -> node; by default
    :func:`module_last_nodes`) has a value.

    With ``carry`` (TorchScript's freezing folds a batch norm into the convolution before
    it and drops identities), a value moves onto its node's only user while that user is
    such an op with no value of its own, takes the node as its first argument and is used
    itself: its consumers read this value. Core ML's fusions name the fused op after the
    last node instead, so no carrying is needed there (a carried value would be wrong)."""
    nodes = {n.name: n for n in fx_graph.nodes}
    at: dict[str, Any] = {}
    for name, handle in values.items():
        node = nodes.get(name)
        if node is None:
            continue
        while carry and len(node.users) == 1:
            (user,) = node.users
            if (user.name in values or user.op != "call_function" or not user.users or not user.args
                    or user.args[0] is not node or _op_name(user.target) not in _FOLDED):
                break
            node = user
        at[node.name] = handle
    outputs = module_last_nodes(fx_graph) if outputs is None else outputs
    return {at[last]: module for module, last in outputs.items() if last in at}


def _op_name(target: Any) -> str:
    return str(getattr(target, "__name__", target)).split(".")[0]


def _with_outputs(graph: Any, wanted: list[tuple[int, int]]) -> Any:
    """A function over a copy of ``graph`` that returns the values at ``(node index, output
    index)`` instead of the graph's outputs (called with the module as its first argument)."""
    import torch

    copy = graph.copy()
    nodes = list(copy.nodes())
    picked = [nodes[i].outputsAt(k) for i, k in wanted]
    while len(list(copy.outputs())):
        copy.eraseOutput(0)
    pack = copy.create("prim::TupleConstruct", picked)
    pack.output().setType(torch._C.TupleType([v.type() for v in picked]))
    pack.insertBefore(copy.return_node())
    copy.registerOutput(pack.output())
    return torch._C._create_function_from_graph("diagnose_taps", copy)
