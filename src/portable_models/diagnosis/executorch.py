"""ExecuTorch tap: the .pte run by the ExecuTorch runtime with its event tracer on (ETDump
with a debug buffer: every instruction's output tensors logged as it runs), each logged value
mapped back to the source module through the program's debug handles.

How an instruction is tied to a module, exactly:

* ``to_edge`` gives every node of the edge program a *debug handle* (the nodes a source op
  was decomposed into share one), and the node keeps its ``nn_module_stack``;
* the emitter records, per instruction of the execution plan, the handles it ran
  (``debug_handle_map``; for a delegate call, the handles of every node inside it).

The .pte holds neither (only operator names and value indices), so the tap takes both from an
ETRecord saved next to the artifact (``model.etrecord``, or ``etrecord.bin``) when there is one;
otherwise it lowers the source program again by the artifact's route (lowering is
deterministic) and accepts the result only if its execution plan -- every instruction, operator,
value and delegate, all but the constant bytes -- equals the artifact's, so that the map is the
artifact's own and not a guess. A delegate call (XNNPACK) is one unit: the modules inside it
are :class:`~.taps.Held`, and a delegate output that is the last node of its module is tapped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.diagnosis.taps import Held, Tapped, TapRequest, TapStream

__all__ = ["ETRECORD_NAMES", "ProgramMap", "Step", "program_map", "taps"]

#: where the tap looks for an ETRecord, next to the artifact
ETRECORD_NAMES = ("model.etrecord", "etrecord.bin")
METHOD = "forward"
@dataclass
class Step:
    """One instruction of the plan: the modules whose nodes it runs (in node order) and, for
    a delegate call, the module of each of its outputs when that output is the module's
    last node inside it (None otherwise)."""

    index: int
    delegate: str | None = None
    modules: list[str] = field(default_factory=list)
    outputs: list[str | None] = field(default_factory=list)


@dataclass
class ProgramMap:
    steps: list[Step]
    how: str  # "etrecord <path>" or "re-lowered by <route>, execution plan identical"

    def last_steps(self) -> dict[str, Step]:
        """Module -> the last step that runs one of its nodes."""
        return {m: step for step in self.steps for m in step.modules}


def taps(req: TapRequest) -> TapStream:
    pmap = program_map(req.artifact, Path(req.payload["source"]), str(req.payload.get("route") or ""),
                       req.payload)
    events = _run_traced(req)
    last = pmap.last_steps()
    for step in pmap.steps:
        values = events.get(step.index, [])
        if step.delegate is not None:
            yield Held(tuple(dict.fromkeys(step.modules)),
                       f"{step.delegate} delegate call (instruction {step.index}) runs "
                       f"{', '.join(dict.fromkeys(m or '(top level)' for m in step.modules))} as one unit")
            outs = values[len(values) - len(step.outputs):] if len(values) >= len(step.outputs) else []
            for module, value in zip(step.outputs, outs, strict=False):
                if module is not None and last.get(module) is step and value is not None and _floating(value):
                    yield Tapped(module, _as_ref(req, module, value))
        elif len(step.modules) == 1 and last.get(step.modules[0]) is step and values and values[0] is not None \
                and _floating(values[0]):
            yield Tapped(step.modules[0], _as_ref(req, step.modules[0], values[0]))


def _floating(value: np.ndarray | None) -> bool:
    return value is not None and np.issubdtype(value.dtype, np.floating)


def _as_ref(req: TapRequest, module: str, value: np.ndarray) -> np.ndarray:
    """The value in the reference's shape: ops after a module's last instruction are views
    the memory planner turned into aliases (no instruction), so the elements are in order."""
    shape = next((ref.shape for ref in req.modules if ref.module == module), None)
    if shape is not None and value.size == int(np.prod(shape)):
        return value.reshape(shape)
    return value


# -- the map from instructions to modules ---------------------------------------------------
def program_map(artifact: Path, source: Path, route: str, contract: dict[str, Any] | None = None) -> ProgramMap:
    """Per instruction of the artifact's ``forward``, the source modules it runs."""
    record = next((artifact.parent / n for n in ETRECORD_NAMES if (artifact.parent / n).is_file()), None)
    if record is not None:
        from executorch.devtools.etrecord import parse_etrecord

        et = parse_etrecord(str(record))
        edge = et.edge_dialect_program
        edge = edge[METHOD] if isinstance(edge, dict) else edge
        handles = (et._debug_handle_map or {})[METHOD]
        return ProgramMap(_steps(edge.graph_module, handles, _plan_of(artifact.read_bytes())),
                          f"etrecord {record.name}")
    return _relowered(artifact, source, route, contract or {})


def _relowered(artifact: Path, source: Path, route: str, contract: dict[str, Any]) -> ProgramMap:
    """The map from a lowering of the source done again the route's way: the dims' bounds
    pinned to the contract's as the route pins them (memory planning reads them), then the
    route's lowering; trusted only if its execution plan is the artifact's."""
    import torch
    from executorch.exir import to_edge, to_edge_transform_and_lower

    from portable_models.convert.executorch import _declared_bounds, _pin_bounds
    from portable_models.errors import RuntimeRunError

    ep = torch.export.load(str(source))
    job = _pinning_job(route, source, artifact.parent, contract)
    bounds = _declared_bounds(job, ep)
    _pin_bounds(job, ep, bounds)
    if route == "executorch-xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        with _no_xnnpack_blob():
            edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    elif route == "executorch-portable":
        edge = to_edge(ep)
    else:
        raise RuntimeRunError(f"no ETRecord next to {artifact.name} and route {route!r} is not one the "
                              "tap can lower again", stage="diagnose:executorch")
    _pin_bounds(job, edge.exported_program(), bounds)
    graph = edge.exported_program().graph_module
    steps_of = _Snapshot(graph)  # handles and modules before to_executorch renumbers them
    program = edge.to_executorch()
    mine = next(p for p in program.executorch_program.execution_plan if p.name == METHOD)
    theirs = _plan_of(artifact.read_bytes())
    if (differ := _difference(_canonical(mine), _canonical(theirs))) is not None:
        raise RuntimeRunError(
            f"{artifact.name}: lowering the source again by {route} gives another execution plan "
            f"({differ}), so its instructions cannot be tied to source modules without the "
            "ETRecord of its conversion", stage="diagnose:executorch",
            fix=f"save the ETRecord of the conversion next to the artifact as {ETRECORD_NAMES[0]}")
    return ProgramMap(steps_of.steps(program.debug_handle_map[METHOD], theirs),
                      f"re-lowered by {route}, execution plan identical")


def _pinning_job(route: str, source: Path, folder: Path, contract: dict[str, Any]) -> Any:
    """What the route's bound pinning reads of a convert job: the inputs and the named dims."""
    from portable_models.convert.base import ConvertJob
    from portable_models.core.spec import DimSpec, TensorSpec

    return ConvertJob(route=route, source_file=source, out_dir=folder, work_dir=folder,
                      inputs=[TensorSpec.from_dict(d) for d in contract.get("inputs_spec") or []], outputs=[],
                      dims={k: DimSpec(name=k, **v) for k, v in (contract.get("dims") or {}).items()},
                      sample_inputs={})


@contextlib.contextmanager
def _no_xnnpack_blob() -> Iterator[None]:
    """XNNPACK's preprocess with its graph blob left empty: writing the blob runs ``flatc``,
    which a confined worker may not, and the map needs only the plan around the blob (the
    comparison leaves delegate blobs out)."""
    from executorch.backends.xnnpack import xnnpack_preprocess

    before = xnnpack_preprocess.serialize_xnnpack_binary
    xnnpack_preprocess.serialize_xnnpack_binary = lambda *args, **kwargs: b""
    try:
        yield
    finally:
        xnnpack_preprocess.serialize_xnnpack_binary = before


def _steps(graph: Any, handles: dict[Any, Any], plan: Any) -> list[Step]:
    return _Snapshot(graph).steps(handles, plan)


class _Snapshot:
    """Handle -> module for every node of an edge program (delegated ones included), and each
    delegate call's handles and output modules, in call order."""

    def __init__(self, graph: Any) -> None:
        self.module: dict[int, str] = {}
        self.delegates: list[tuple[set[int], list[str | None]]] = []
        for node in graph.graph.nodes:
            self._note(node)
            if node.op == "call_function" and "call_delegate" in str(node.target):
                lowered = getattr(graph, node.args[0].target)
                self.delegates.append(self._delegate(lowered.original_module.graph_module))

    def _note(self, node: Any) -> str | None:
        handle = node.meta.get("debug_handle")
        if node.op != "call_function" or not isinstance(handle, int) or node.target is operator.getitem:
            return None  # a getitem is its producer's (and carries no module stack)
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        self.module[handle] = stack[-1][0] if stack else ""
        return self.module[handle]

    def _delegate(self, inner: Any) -> tuple[set[int], list[str | None]]:
        last: dict[str, Any] = {}
        for node in inner.graph.nodes:
            module = self._note(node)
            if module is not None:
                last[module] = node
        output = next(n for n in inner.graph.nodes if n.op == "output")
        outs = output.args[0] if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
        modules = [self.module.get(n.meta.get("debug_handle")) if hasattr(n, "meta") else None for n in outs]
        exact = [m if m is not None and last.get(m) is n else None for m, n in zip(modules, outs, strict=True)]
        handles = {n.meta["debug_handle"] for n in inner.graph.nodes
                   if n.op == "call_function" and isinstance(n.meta.get("debug_handle"), int)}
        return handles, exact

    def steps(self, handle_map: dict[Any, Any], plan: Any) -> list[Step]:
        from portable_models.errors import RuntimeRunError

        steps: list[Step] = []
        calls = iter(self.delegates)
        for index, instruction in enumerate(plan.chains[0].instructions):
            args = instruction.instr_args
            got = handle_map.get(index, handle_map.get(str(index)))
            handles = [] if got is None else (got if isinstance(got, list) else [got])
            modules = [self.module[h] for h in handles if h in self.module]
            if type(args).__name__ == "DelegateCall":
                inside, outputs = next(calls, (set(), []))
                if set(handles) - inside:
                    raise RuntimeRunError(f"delegate call at instruction {index} runs handles {handles}, "
                                          f"not those of the lowered module in its place", stage="diagnose:executorch")
                backend = _text(plan.delegates[args.delegate_index].id).removesuffix("Backend")
                steps.append(Step(index, backend, modules, outputs))
            else:
                steps.append(Step(index, None, list(dict.fromkeys(modules))))
        return steps


def _plan_of(data: bytes) -> Any:
    """The ``forward`` plan of a .pte, read with ExecuTorch's own deserialiser."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(data).program
    found = next((p for p in program.execution_plan if p.name == METHOD), None)
    if found is None:
        raise LookupError(f"the program has no method {METHOD!r}")
    return found


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value


def _canonical(obj: Any) -> Any:
    """A plan as plain data, the same for the emitter's dataclasses and the flatbuffer's
    object API: keys without case or underscores, union tags dropped, empty lists as None,
    and what a changed constant may touch blanked (which constant buffer a tensor reads,
    0 = none and 1 = some; where a delegate's blob lies)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (bytes, bytearray)):
        return _text(obj)
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, (list, tuple)):
        return [_canonical(x) for x in obj] or None
    names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else list(vars(obj))
    out = {n.replace("_", "").lower(): _canonical(getattr(obj, n)) for n in names}
    for key in [k for k in out if k.endswith("type") and k[:-4] in out]:
        del out[key]
    out.pop("processed", None)
    if isinstance(out.get("databufferidx"), int):
        out["databufferidx"] = min(out["databufferidx"], 1)
    return out


def _difference(a: Any, b: Any, path: str = "plan") -> str | None:
    """Where two canonical plans differ (only keys both sides have), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a.keys() & b.keys():
            if (found := _difference(a[key], b[key], f"{path}.{key}")) is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} against {len(b)} entries"
        return next((d for i, (x, y) in enumerate(zip(a, b, strict=True)) if (d := _difference(x, y, f"{path}[{i}]"))), None)
    return None if a == b else f"{path}: {a!r} against {b!r}"


# -- the traced run -------------------------------------------------------------------------
def _run_traced(req: TapRequest) -> dict[int, list[np.ndarray | None]]:
    """Instruction index -> the tensors its debug events logged, in order."""
    import torch
    from executorch.extension.pybindings import portable_lib

    from portable_models.core.iomap import IoMap
    from portable_models.errors import RuntimeRunError

    feeds = req.feeds()
    args = [torch.from_numpy(np.ascontiguousarray(feeds[b.name]).copy()) for b in IoMap.from_dict(req.io).inputs.values()]
    module = portable_lib._load_for_executorch(str(req.artifact), enable_etdump=True,
                                               debug_buffer_size=_debug_bytes(req.artifact))
    try:
        module.run_method(METHOD, args)
    except RuntimeError as exc:
        raise RuntimeRunError(f"executorch {req.artifact.name} with the event tracer: {exc}",
                              stage="diagnose:executorch") from exc
    req.work.mkdir(parents=True, exist_ok=True)
    dump, buffer = req.work / "run.etdump", req.work / "run.debug"
    module.write_etdump_result_to_file(str(dump), str(buffer))
    data = buffer.read_bytes()
    logged: dict[int, list[np.ndarray | None]] = {}
    for chain, instruction, delegated, tensor in _debug_events(dump.read_bytes()):
        if chain == 0 and not delegated:
            logged.setdefault(instruction, []).append(None if tensor is None else _tensor(*tensor, data))
    return logged


def _debug_events(dump: bytes) -> Iterator[tuple[int, int, bool, tuple[int, list[int], int] | None]]:
    """(chain, instruction, logged inside a delegate, (scalar type, sizes, offset) or None)
    for every debug event of a size-prefixed ETDump, read with the ``flatbuffers`` package:
    ExecuTorch's own reader converts through ``flatc``, which a confined worker may not run.
    Field slots follow ``devtools/etdump/etdump_schema_flatcc.fbs``."""
    import flatbuffers
    from flatbuffers.table import Table

    def table(tab: Table, slot: int) -> Table | None:
        off = tab.Offset(4 + 2 * slot)
        return Table(tab.Bytes, tab.Indirect(off + tab.Pos)) if off else None

    def vector(tab: Table, slot: int) -> list[Table]:
        off = tab.Offset(4 + 2 * slot)
        if not off:
            return []
        start = tab.Vector(off)
        return [Table(tab.Bytes, tab.Indirect(start + 4 * i)) for i in range(tab.VectorLen(off))]

    def scalar(tab: Table, slot: int, kind: Any, default: int) -> int:
        off = tab.Offset(4 + 2 * slot)
        return int(tab.Get(kind, off + tab.Pos)) if off else default

    buf = bytearray(dump[4:])  # the size prefix
    root = Table(buf, flatbuffers.encode.Get(flatbuffers.packer.uoffset, buf, 0))
    n = flatbuffers.number_types
    for run in vector(root, 1):  # ETDump.run_data
        for event in vector(run, 3):  # RunData.events
            debug = table(event, 2)  # Event.debug_event
            if debug is None:
                continue
            entry = table(debug, 2)  # DebugEvent.debug_entry
            tensor = table(entry, 1) if entry is not None else None  # Value.tensor
            found = None
            if tensor is not None:
                off = tensor.Offset(6)  # Tensor.sizes
                sizes = [int(tensor.Get(n.Int64Flags, tensor.Vector(off) + 8 * i))
                         for i in range(tensor.VectorLen(off))] if off else []
                found = (scalar(tensor, 0, n.Int8Flags, 0), sizes, scalar(tensor, 3, n.Int64Flags, -1))
            yield (scalar(debug, 0, n.Uint64Flags, 0), scalar(debug, 1, n.Int32Flags, -1),
                   scalar(debug, 3, n.Int32Flags, -1) != -1, found)


#: ExecuTorch ScalarType codes -> numpy dtype
_CODES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32",
          7: "float64", 11: "bool"}


def _tensor(code: int, sizes: list[int], offset: int, data: bytes) -> np.ndarray | None:
    if offset < 0 or code not in _CODES:
        return None
    dtype = np.dtype(_CODES[code])
    count = int(np.prod(sizes)) if sizes else 1
    raw = data[offset: offset + count * dtype.itemsize]
    return np.frombuffer(raw, dtype=dtype).reshape(sizes).copy() if len(raw) == count * dtype.itemsize else None


def _debug_bytes(artifact: Path) -> int:
    """Room for every tensor of the plan twice (a delegate logs its inputs and outputs),
    each padded to 64 bytes, plus 1 MiB."""
    total = 0
    for value in _plan_of(artifact.read_bytes()).values or []:
        val = value.val
        if type(val).__name__ == "Tensor":
            total += int(np.prod(val.sizes if val.sizes is not None else [1])) * 8 + 64
    return 2 * total + (1 << 20)
