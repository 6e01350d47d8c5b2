"""The truth facts of a Core ML ``.mlpackage`` (:data:`portable_models.run.truth.FACTS`), read
from its MIL program and weight blob with the MIL reference executor's loader, without
predicting anything (Core ML predicts only on macOS).

Weights are the program's constants: every ``const`` of a float dtype, and every non-scalar
``const`` a constexpr op reads (the stored int8 data of a quantised weight, its scales and zero
points). Integer constants that no constexpr op reads are op parameters (strides, pads,
shapes), not weights. Activations count as quantised when a ``quantize`` op reads a run-time
value (what ``linear_quantize_activations`` inserts); Core ML has no dynamic-range ops.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.errors import UnverifiedError

__all__ = ["coreml_facts"]

#: bits per element of the sub-byte MIL dtypes (numpy stores them one per byte)
_SUB_BYTE_BITS = {"int4": 4, "uint4": 4, "uint1": 1, "uint2": 2, "uint3": 3, "uint6": 6}
_EIGHT_BIT = ("int8", "uint8")


def coreml_facts(path: Path) -> dict[str, Any]:
    """What an ``.mlpackage`` holds: weight bytes by MIL dtype, the share stored as 8-bit
    integers, its constexpr (compressed-weight) and quantisation ops, how many activations
    are quantised, its input/output dtypes and the package's size."""
    from coremltools.converters.mil.mil import types

    from portable_models.core.coremltools_import import import_coremltools
    from portable_models.core.hashing import path_bytes
    from portable_models.run.mil.executor import iter_ops
    from portable_models.run.mil.loader import load_mlpackage
    from portable_models.run.truth import TruthError

    import_coremltools()
    try:
        loaded = load_mlpackage(path)
    except UnverifiedError as exc:
        raise TruthError(f"no truth check for {path.name}: {exc}", stage="truth",
                         fix="quantised Core ML variants are ML programs") from exc
    ops = list(iter_ops(loaded.function))
    by_dtype: Counter[str] = Counter()
    for op in ops:
        if op.op_type != "const":
            continue
        var = op.outputs[0]
        dtype = types.builtin_to_string(var.dtype) if types.is_tensor(var.sym_type) or types.is_scalar(
            var.sym_type) else ""
        read_by_constexpr = any(child.op_type.startswith("constexpr_") for child in var.child_ops)
        if var.rank > 0 if read_by_constexpr else dtype.startswith(("fp", "bf")):
            by_dtype[dtype] += _bytes(var.val, dtype)
    total = sum(by_dtype.values())
    counted = Counter(op.op_type for op in ops)
    activations = sum(1 for op in ops if op.op_type == "quantize"
                      and getattr(op.inputs.get("input"), "val", 0) is None)
    io = {d.name: str(d.dtype) for d in [*loaded.inputs.values(), *loaded.outputs.values()]}
    return {"format": "mlpackage", "weight_bytes": total, "weight_bytes_by_dtype": dict(by_dtype),
            "int8_share": round(sum(by_dtype[d] for d in _EIGHT_BIT) / total, 4) if total else 0.0,
            "constexpr_ops": {k: n for k, n in counted.items() if k.startswith("constexpr_")},
            "quant_ops": {k: n for k, n in counted.items() if k in ("quantize", "dequantize")},
            "quantized_activations": activations, "dynamic_ops": 0, "io_dtypes": io, "bytes": path_bytes(path)}


def _bytes(value: Any, dtype: str) -> int:
    """Stored bytes of a constant of MIL dtype ``dtype``."""
    arr = np.asarray(value)
    if dtype in _SUB_BYTE_BITS:
        return -(-arr.size * _SUB_BYTE_BITS[dtype] // 8)
    return int(arr.nbytes)
