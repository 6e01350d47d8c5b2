"""Core ML tap: the ``.mlpackage``'s ML program run op by op by the project's MIL reference
executor (numpy, :mod:`portable_models.run.mil`), each op's outputs compared as soon as the
op has run (:meth:`~portable_models.run.mil.executor.MilExecutor.stream`).

It always uses the MIL executor, on macOS too: Core ML's runtime predicts only the model's
outputs and cannot expose intermediate values. So a module found here is where the
*program* (its weights, layouts, graph passes) diverges, not Apple's kernels.

MIL values are mapped to source modules by name. coremltools names each MIL var after the
source graph value it converts (an op lowered to several MIL ops gives its own name to the
last; the model's outputs are renamed to the output names, matched here by position):

* ``coremltools-export`` (torch.export frontend): vars are named after the fx nodes of the
  program the route converted, ``run_decompositions`` of the captured one; the tap rebuilds
  that program with the route's own function and reads each node's module from its
  ``nn_module_stack``;
* ``coremltools-trace`` (TorchScript frontend): vars are named after TorchScript value debug
  names (``%18`` -> ``var_18``). The tap re-traces the route's module and prepares its graph
  with coremltools' own ``_expand_and_optimize_ir``, as the converter does, and maps each
  TorchScript node to its fx node by its source range
  (:func:`portable_models.diagnosis.torchscript.fx_node_of`).

A float16 program's vars carry a ``_cast_fp16`` suffix, dropped here; values are compared in
float32. A fused op (a convolution with its batch norm) is named after the last node it
replaces, so the first module of the pair is reported fused.
"""

from __future__ import annotations

import operator
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from portable_models.diagnosis.taps import Tapped, TapRequest, TapStream

__all__ = ["mil_name", "taps", "var_modules"]

_NOT_NAME = re.compile(r"[^A-Za-z0-9_]")
_FP16 = "_cast_fp16"


def taps(req: TapRequest) -> TapStream:
    from portable_models.core.coremltools_import import import_coremltools
    from portable_models.run.mil import load_executor

    import_coremltools()
    executor = load_executor(req.artifact)
    wanted = var_modules(req, executor.loaded)
    shapes = {ref.module: int(np.prod(ref.shape)) for ref in req.modules}  # a name that lies is not compared
    for op, values in executor.stream(req.feeds()):
        for var, value in zip(op.outputs, values, strict=False):
            module = wanted.get(var.name)
            if module is not None and np.size(value) == shapes.get(module):
                yield Tapped(module, np.asarray(value, dtype=np.float32))


def var_modules(req: TapRequest, loaded: Any) -> dict[str, str]:
    """MIL var name -> the source module whose output it holds (top-level vars only)."""
    from portable_models.diagnosis.torchscript import module_outputs

    function = loaded.function
    names = {_plain(op_out.name): op_out.name for op in function.operations for op_out in op.outputs}
    outputs: dict[str, str] | None = None  # the decomposed program's own last nodes
    if str(req.payload.get("route", "")).endswith("coremltools-trace"):
        fx_graph, node_names = _traced_names(req)
        outputs = {ref.module: ref.last_node for ref in req.modules}  # the reference's node names
    else:
        fx_graph, node_names = _exported_names(req)
    values = {node: names[var] for node, var in node_names.items() if var in names}
    ends = [n for n in fx_graph.nodes if n.op == "output"]
    if ends:  # the program's outputs carry the model's output names, in order
        results = ends[0].args[0]
        results = results if isinstance(results, (list, tuple)) else [results]
        for node, var in zip(results, function.outputs, strict=False):
            if hasattr(node, "name"):
                values.setdefault(node.name, var.name)
    return module_outputs(fx_graph, values, outputs)


def mil_name(name: str) -> str:
    """A source value's name as coremltools writes it in MIL (``input.1`` -> ``input_1``,
    ``18`` -> ``var_18``)."""
    name = _NOT_NAME.sub("_", name)
    return f"var_{name}" if name[:1].isdigit() else name


def _plain(name: str) -> str:
    return name[: -len(_FP16)] if name.endswith(_FP16) else name


def _route_job(req: TapRequest) -> Any:
    """The few fields of a ConvertJob the route's program helpers read."""
    return SimpleNamespace(source_file=Path(req.payload["source"]), route=str(req.payload.get("route", "")),
                           options={})


def _exported_names(req: TapRequest) -> tuple[Any, dict[str, str]]:
    """The program the torch.export frontend converted, and fx node -> MIL var name."""
    from portable_models.convert.coreml import _decomposed_program

    program, _ = _decomposed_program(_route_job(req), always=True)
    graph = program.graph
    names = {n.name: mil_name(n.name) for n in graph.nodes if n.op == "call_function"}
    for n in graph.nodes:  # getitem(x, 0) of a multi-output op: coremltools names that value x
        if n.op == "call_function" and n.target is operator.getitem and n.args[1] == 0:
            names[n.name] = mil_name(n.args[0].name)
    return graph, names


def _traced_names(req: TapRequest) -> tuple[Any, dict[str, str]]:
    """The module the TorchScript frontend converted (re-traced as the route did), and fx
    node -> MIL var name through the prepared TorchScript graph's debug names."""
    import torch
    from coremltools.converters.mil.frontend.torch.torchscript_utils import _expand_and_optimize_ir

    from portable_models.convert.coreml import _decomposed_program, _traceable_module
    from portable_models.diagnosis.torchscript import graph_values

    program, _ = _decomposed_program(_route_job(req), always=False)
    module, _ = _traceable_module(program.module())
    args = tuple(torch.from_numpy(np.ascontiguousarray(req.case[name])) for name in req.payload["input_names"])
    with torch.no_grad():
        traced = torch.jit.trace(module, args, check_trace=False, strict=False)
    graph = _expand_and_optimize_ir(traced)[0]
    nodes = list(graph.nodes())
    at = graph_values(graph, module.code.splitlines(), module.graph)
    return module.graph, {fx: mil_name(nodes[i].outputsAt(k).debugName()) for fx, (i, k) in at.items()}
