"""The truth facts of an ExecuTorch ``.pte``, read from the file itself: nothing runs, nothing
is loaded by the runtime and no external binary (flatc) is called, so it works inside the
sandboxed worker.

A ``.pte`` is a flatbuffer ``Program`` (schema ``executorch/schema/program.fbs``) with an
extended header (``eh00``) that says where its data segments start. Weights outside any
delegate are the execution plans' constant tensors (a ``Tensor`` value with a data buffer and
no memory allocation), typed by their ``ScalarType``. A delegate's payload is opaque to the
program; the XNNPACK one (``XnnpackBackend``) is an ``XNNHeader`` (``XH00``, see
``executorch/backends/xnnpack/serialization/xnnpack_graph_serialize.py``) followed by an
``XNNGraph`` flatbuffer (``schema.fbs``) whose values carry an ``XNNDatatype``: a constant
value (``constant_buffer_idx`` > 0) is a weight of ``constant_data[idx].size`` bytes; a
non-constant ``qint8``/``quint8`` value is a statically quantised activation, a ``qdint8`` /
``qpint8`` one is quantised at run time (dynamic).

Tables are read by field slot with the ``flatbuffers`` runtime (slot *n* is vtable offset
``4 + 2n``; a union field takes two slots, its type then its value); the slot numbers below
follow the two schemas' field order, deprecated fields included.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from portable_models.errors import PortableModelsError

__all__ = ["pte_facts", "PteFormatError"]


class PteFormatError(PortableModelsError):
    """The file is not a ``.pte`` this reader understands."""

    code = "truth"
    exit_code = 1


# ExecuTorch ScalarType (schema/scalar_type.fbs) -> (name, bytes per element)
_SCALAR = {0: ("uint8", 1), 1: ("int8", 1), 2: ("int16", 2), 3: ("int32", 4), 4: ("int64", 8),
           5: ("float16", 2), 6: ("float32", 4), 7: ("float64", 8), 11: ("bool", 1), 12: ("qint8", 1),
           13: ("quint8", 1), 14: ("qint32", 4), 15: ("bfloat16", 2), 16: ("quint4x2", 1),
           17: ("quint2x4", 1), 22: ("bits16", 2), 27: ("uint16", 2), 28: ("uint32", 4), 29: ("uint64", 8)}
# XNNDatatype (backends/xnnpack/serialization/schema.fbs) -> name
_XNN = {0: "invalid", 1: "fp32", 2: "fp16", 3: "qint8", 4: "quint8", 5: "qint32", 6: "qcint8", 7: "qcint32",
        8: "qcint4", 9: "qdint8", 10: "qbint4", 11: "qpint8", 12: "int32", 13: "pfp32", 14: "bf16"}
# XNodeUnion members, in schema order (union type = position + 1)
_XNODES = ("XNNAdd", "XNNFullyConnected", "XNNSoftmax", "XNNSigmoid", "XNNStaticTranspose", "XNNClamp",
           "XNNConv2d", "XNNDiv", "XNNStaticResizeBilinear2D", "XNNStaticConstantPad", "XNNAvgPooling2d",
           "XNNMinimum", "XNNDepthwiseConv2d", "XNNMaxPooling2d", "XNNMultiply", "XNNSubtract", "XNNFloor",
           "XNNConvert", "XNNGlobalAvgPooling2d", "XNNStaticReshape", "XNNArgMaxPooling2d", "XNNSquareRoot",
           "XNNCeiling", "XNNHardswish", "XNNLeakyReLU", "XNNMaximum", "XNNNegate", "XNNSquare", "XNNELU",
           "XNNAbs", "XNNPReLU", "XNNConcatenate2", "XNNConcatenate3", "XNNConcatenate4", "XNNStaticSlice",
           "XNNScaledDotProductAttention", "XNNBatchMatrixMultiply", "XNNConcatenate5", "XNNConvTranspose2d",
           "XNNReciprocalSquareRoot", "XNNLog", "XNNGelu", "XNNTanh", "XNNExp", "XNNSin", "XNNCopy",
           "XNNCos")
_INT8 = {"uint8", "int8", "qint8", "quint8", "qcint8"}  # 8-bit integer storage, program or delegate
_STATIC_ACT = {"qint8", "quint8"}  # a non-constant XNNPACK value of these types: a static int8 activation
_DYNAMIC_ACT = {"qdint8", "qpint8"}  # ... of these: quantised at run time
_XNNPACK = "XnnpackBackend"


def pte_facts(path: Path) -> dict[str, Any]:
    """What a ``.pte`` holds: constant (weight) bytes by dtype — program tensors by their scalar
    type, XNNPACK constants by their XNNDatatype (``qcint8``/``qint8``: int8 weights) — the share
    stored as 8-bit integers, the int8 activations (non-constant ``qint8`` XNNPACK values, or int8
    tensors made by the program's own kernels), the values quantised at run time (``qdint8`` /
    ``qpint8``), the delegates by backend, the XNNPACK nodes (``quant_ops``: its conversions
    between float and quantised values) and the input/output dtypes."""
    data = Path(path).read_bytes()
    program = _root(data, b"ET12", "ExecuTorch program")
    base = _segment_base(data)
    by_dtype: Counter[str] = Counter()
    values: Counter[str] = Counter()  # non-constant delegate values by XNNDatatype
    delegates: Counter[str] = Counter()
    ops: Counter[str] = Counter()  # XNNPACK nodes by kind
    program_acts, io = 0, {}
    for plan in _tables(program, 1):
        evalues = [_evalue_tensor(v) for v in _tables(plan, 2)]
        for tensor in evalues:
            if tensor is None:
                continue
            name, size = _SCALAR.get(_u8(tensor, 0), ("unknown", 1))
            if _u32(tensor, 5) and not _field(tensor, 6):  # a data buffer, no planned memory: constant
                by_dtype[name] += _numel(tensor) * size
            elif name in _INT8:
                program_acts += 1
        for which, slot in (("in", 3), ("out", 4)):
            for k, idx in enumerate(_ints(plan, slot, 4)):
                tensor = evalues[idx] if 0 <= idx < len(evalues) else None
                io[f"{which}{k}"] = _SCALAR.get(_u8(tensor, 0), ("unknown", 1))[0] if tensor else "non-tensor"
        for delegate in _tables(plan, 7):
            backend = _string(delegate, 0)
            delegates[backend] += 1
            if backend == _XNNPACK:
                _xnnpack(_payload(data, program, base, delegate), by_dtype, values, ops)
    total = sum(by_dtype.values())
    int8 = sum(n for d, n in by_dtype.items() if d in _INT8)
    return {"format": "pte", "weight_bytes": total, "weight_bytes_by_dtype": dict(by_dtype),
            "int8_share": round(int8 / total, 4) if total else 0.0,
            "delegates": dict(delegates), "delegate_values_by_dtype": dict(values), "ops": dict(ops),
            "quant_ops": {k: n for k, n in ops.items() if k == "XNNConvert"},
            "quantized_activations": program_acts + sum(values[d] for d in _STATIC_ACT),
            "dynamic_ops": sum(values[d] for d in _DYNAMIC_ACT), "io_dtypes": io, "bytes": len(data)}


# -- the XNNPACK payload ---------------------------------------------------------------
def _xnnpack(payload: bytes, by_dtype: Counter[str], values: Counter[str], ops: Counter[str]) -> None:
    """Add one XNNPACK payload's constant bytes (by XNNDatatype), non-constant values and nodes."""
    if payload[4:8] == b"XH00":  # XNNHeader: where the flatbuffer lies in the payload
        start = int.from_bytes(payload[10:14], "little")
        graph = _root(payload[start:start + int.from_bytes(payload[14:18], "little")], b"XN01", "XNNPACK graph")
    else:  # an older payload: the flatbuffer alone
        graph = _root(payload, b"XN01", "XNNPACK graph")
    for node in _tables(graph, 1):
        kind = _u8(node, 0)
        ops[_XNODES[kind - 1] if 0 < kind <= len(_XNODES) else f"node{kind}"] += 1
    sizes = [_u64(c, 1) for c in _tables(graph, 8)]  # constant_data: ConstantDataOffset.size
    seen: set[int] = set()
    for value in _tables(graph, 2):
        kind, inner = _union(value, 0)
        if kind == 2 and inner is not None:  # XNNQuantizedTensorValue: its scales, its tensor_value
            _scales(inner, sizes, seen, by_dtype)
            inner = _table(inner, 0)
        if kind not in (1, 2) or inner is None:
            continue
        dtype = _XNN.get(_i16(inner, 0), "unknown")
        idx = _u32(inner, 3)
        if idx == 0:
            values[dtype] += 1
        elif idx not in seen:
            seen.add(idx)
            by_dtype[dtype] += sizes[idx] if idx < len(sizes) and sizes[idx] else _dims_bytes(inner, dtype)


def _scales(quantized: Any, sizes: list[int], seen: set[int], by_dtype: Counter[str]) -> None:
    """A per-channel quantised value's scales are constants too: in a constant buffer
    (``scale_buffer_idx``; float32, bfloat16 for blockwise) or inline float32 (``scale``)."""
    kind, params = _union(quantized, 1)
    if params is None or kind not in (1, 4):  # PerChannelQuant, PerChannelGroupQuant
        return
    idx = _u32(params, 2 if kind == 1 else 4)
    if idx and idx < len(sizes) and idx not in seen:
        seen.add(idx)
        by_dtype["fp32" if kind == 1 else "bf16"] += sizes[idx]
    elif not idx:
        by_dtype["fp32"] += 4 * len(_ints(params, 0, 4))


def _dims_bytes(tensor: Any, dtype: str) -> int:
    """Bytes of a constant from its dims, where the constant table gives no size."""
    n = 1
    for d in _ints(tensor, 2, 4, signed=False):
        n *= d
    return n * {"fp32": 4, "fp16": 2, "bf16": 2, "qint32": 4, "qcint32": 4, "int32": 4}.get(dtype, 1)


def _payload(data: bytes, program: Any, base: int, delegate: Any) -> bytes:
    """The bytes a delegate was compiled to: inline in the program, or in a data segment."""
    ref = _table(delegate, 1)
    if ref is None:
        raise PteFormatError("a delegate has no processed payload", stage="truth")
    location, index = _u8(ref, 0), _u32(ref, 1)
    if location == 0:  # INLINE: Program.backend_delegate_data[index].data
        inline = _tables(program, 3)
        if index >= len(inline):
            raise PteFormatError(f"inline delegate data {index} is missing", stage="truth")
        return _bytes(inline[index], 0)
    segments = _tables(program, 4)
    if index >= len(segments):
        raise PteFormatError(f"delegate data segment {index} is missing", stage="truth")
    offset = base + _u64(segments[index], 0)
    return data[offset:offset + _u64(segments[index], 1)]


def _segment_base(data: bytes) -> int:
    """Where the data segments start: the extended header after the flatbuffer's identifier."""
    if data[8:12] != b"eh00":
        return 0
    return int.from_bytes(data[24:32], "little")  # magic, length, program size, base


def _evalue_tensor(evalue: Any) -> Any:
    kind, tensor = _union(evalue, 0)
    return tensor if kind == 5 else None  # KernelTypes.Tensor


def _numel(tensor: Any) -> int:
    n = 1
    for d in _ints(tensor, 2, 4):
        n *= max(d, 0)
    return n


# -- flatbuffer tables by slot ------------------------------------------------------------
def _root(buf: bytes, identifier: bytes, what: str) -> Any:
    import flatbuffers
    from flatbuffers import encode, packer

    if len(buf) < 8 or buf[4:8] != identifier:
        raise PteFormatError(f"not an {what}: identifier {bytes(buf[4:8])!r}, expected {identifier!r}",
                             stage="truth")
    return flatbuffers.table.Table(bytearray(buf), encode.Get(packer.uoffset, buf, 0))


def _offset(table: Any, slot: int) -> int:
    return int(table.Offset(4 + 2 * slot))


def _scalar(table: Any, slot: int, flags: Any) -> int:
    o = _offset(table, slot)
    return int(table.Get(flags, table.Pos + o)) if o else 0


def _u8(t: Any, slot: int) -> int:
    from flatbuffers.number_types import Uint8Flags

    return _scalar(t, slot, Uint8Flags)


def _i16(t: Any, slot: int) -> int:
    from flatbuffers.number_types import Int16Flags

    return _scalar(t, slot, Int16Flags)


def _u32(t: Any, slot: int) -> int:
    from flatbuffers.number_types import Uint32Flags

    return _scalar(t, slot, Uint32Flags)


def _u64(t: Any, slot: int) -> int:
    from flatbuffers.number_types import Uint64Flags

    return _scalar(t, slot, Uint64Flags)


def _field(table: Any, slot: int) -> bool:
    return _offset(table, slot) != 0


def _table(table: Any, slot: int) -> Any:
    import flatbuffers

    o = _offset(table, slot)
    return flatbuffers.table.Table(table.Bytes, table.Indirect(table.Pos + o)) if o else None


def _union(table: Any, slot: int) -> tuple[int, Any]:
    """A union field: (its type, from slot ``slot``; its table, from ``slot + 1``)."""
    import flatbuffers

    kind = _u8(table, slot)
    o = _offset(table, slot + 1)
    if not kind or not o:
        return kind, None
    inner = flatbuffers.table.Table(bytearray(), 0)
    table.Union(inner, o)
    return kind, inner


def _tables(table: Any, slot: int) -> list[Any]:
    import flatbuffers

    o = _offset(table, slot)
    if not o:
        return []
    start = table.Vector(o)
    return [flatbuffers.table.Table(table.Bytes, table.Indirect(start + 4 * i)) for i in range(table.VectorLen(o))]


def _ints(table: Any, slot: int, width: int, *, signed: bool = True) -> list[int]:
    o = _offset(table, slot)
    if not o:
        return []
    start, n = table.Vector(o), table.VectorLen(o)
    return [int.from_bytes(table.Bytes[start + width * i:start + width * (i + 1)], "little", signed=signed)
            for i in range(n)]


def _bytes(table: Any, slot: int) -> bytes:
    o = _offset(table, slot)
    if not o:
        return b""
    start = table.Vector(o)
    return bytes(table.Bytes[start:start + table.VectorLen(o)])


def _string(table: Any, slot: int) -> str:
    o = _offset(table, slot)
    return table.String(table.Pos + o).decode() if o else ""
