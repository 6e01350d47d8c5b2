"""The truth check of a quantised variant: it must really be what its label says, read from
the artifact in its own format before any number is compared. A variant whose contents do
not match fails at stage ``truth``, naming what was found. Run by the route that made it and
again by ``verify``, in the worker, before the artifact is loaded."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from portable_models.errors import PortableModelsError

__all__ = ["TruthError", "check_truth", "facts_of", "onnx_facts", "tflite_facts"]

#: the least share of weight bytes a variant must hold as 8-bit integers to be called int8
MIN_INT8_SHARE = 0.5


class TruthError(PortableModelsError):
    """A quantised variant is not what its label says."""

    code = "truth"
    exit_code = 1


def onnx_facts(path: Path) -> dict[str, Any]:
    """What an ONNX file holds: weight bytes by dtype, the share stored as 8-bit integers,
    its quantisation ops, whether activations are quantised (a QuantizeLinear that does not
    read a weight), and its input/output dtypes."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    by_dtype: Counter[str] = Counter()
    for init in graph.initializer:
        dtype = onnx.TensorProto.DataType.Name(init.data_type).lower()
        by_dtype[dtype] += len(init.raw_data) or _element_bytes(init)
    total = sum(by_dtype.values())
    ops = Counter(node.op_type for node in graph.node)
    quant_ops = {op: n for op, n in ops.items()
                 if op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                           "ConvInteger", "QLinearConv", "QLinearMatMul")}
    activations = sum(1 for node in graph.node if node.op_type == "QuantizeLinear" and node.input[0] not in weights)
    io = {v.name: onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()
          for v in [*graph.input, *graph.output] if v.name not in weights}
    dynamic = sum(n for op, n in quant_ops.items() if op in ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"))
    return {"format": "onnx", "weight_bytes": total, "weight_bytes_by_dtype": dict(by_dtype),
            "int8_share": round((by_dtype["int8"] + by_dtype["uint8"]) / total, 4) if total else 0.0,
            "quant_ops": quant_ops, "quantized_activations": activations, "dynamic_ops": dynamic, "io_dtypes": io,
            "bytes": path.stat().st_size}


def tflite_facts(path: Path) -> dict[str, Any]:
    """What a .tflite file holds, read through LiteRT's own interpreter (its tensor and op
    listings, before anything runs): constant tensor bytes by dtype (a tensor no op makes and
    no input feeds), the share stored as 8-bit integers, the ops, how many op outputs are int8
    activations (static quantisation), how many ops take a float activation with an int8 weight
    and answer in float (dynamic-range "hybrid" ops), and the input/output dtypes."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    listing = getattr(it, "_get_ops_details", None)
    ops = listing() if listing is not None else []
    tensors = {d["index"]: d for d in it.get_tensor_details()}
    produced = {o for op in ops for o in op["outputs"] if o >= 0}
    fed = {d["index"] for d in it.get_input_details()}
    dtype = {i: np.dtype(d["dtype"]) for i, d in tensors.items()}
    constant = {i for i in tensors if i not in produced and i not in fed and tensors[i]["shape"].size}
    by_dtype: Counter[str] = Counter()
    for i in constant:
        by_dtype[str(dtype[i])] += int(np.prod(tensors[i]["shape"])) * dtype[i].itemsize
    total = sum(by_dtype.values())
    int8 = (np.dtype(np.int8), np.dtype(np.uint8))
    activations = sum(1 for op in ops for o in op["outputs"] if o >= 0 and dtype[o] in int8)
    hybrid = sum(1 for op in ops
                 if any(i in constant and dtype[i] in int8 for i in op["inputs"] if i >= 0)
                 and any(i not in constant and dtype[i] == np.float32 for i in op["inputs"] if i >= 0)
                 and all(dtype[o] == np.float32 for o in op["outputs"] if o >= 0))
    io = {d["name"]: str(np.dtype(d["dtype"])) for d in [*it.get_input_details(), *it.get_output_details()]}
    return {"format": "tflite", "weight_bytes": total, "weight_bytes_by_dtype": dict(by_dtype),
            "int8_share": round((by_dtype["int8"] + by_dtype["uint8"]) / total, 4) if total else 0.0,
            "ops": dict(Counter(op["op_name"] for op in ops)), "quantized_activations": activations,
            "dynamic_ops": hybrid, "io_dtypes": io, "bytes": path.stat().st_size}


#: artifact suffix -> the function that reads its truth facts (``module:function``); each
#: returns at least ``int8_share``, ``quantized_activations``, ``dynamic_ops`` and ``bytes``
FACTS = {".onnx": "portable_models.run.truth:onnx_facts", ".tflite": "portable_models.run.truth:tflite_facts",
         ".pte": "portable_models.run.truth_pte:pte_facts",
         ".mlpackage": "portable_models.run.truth_coreml:coreml_facts"}


def facts_of(path: Path) -> dict[str, Any]:
    """The truth facts of an artifact, by its format."""
    import importlib.util

    from portable_models.core.imports import load_impl

    reader = FACTS.get(path.suffix)
    if reader is None or importlib.util.find_spec(reader.partition(":")[0]) is None:
        raise TruthError(f"no truth check for a {path.suffix} file", stage="truth",
                         fix="this target carries no quantised variant yet")
    return dict(load_impl(reader)(path))


def _element_bytes(init: Any) -> int:
    """Bytes of an initializer stored in typed fields rather than raw_data."""
    for field_name, size in (("float_data", 4), ("int32_data", 4), ("int64_data", 8), ("double_data", 8)):
        values = getattr(init, field_name)
        if len(values):
            return len(values) * size
    return 0


def check_truth(precision: str, facts: dict[str, Any], fp32_bytes: int | None = None) -> None:
    """Raise :class:`TruthError` unless ``facts`` (:func:`facts_of`) show a ``precision``
    variant: most weight bytes 8-bit; activations quantised at run time for ``int8-dynamic``,
    calibrated int8 activations for ``int8``, float activations for ``int8-weight``; smaller
    than its fp32 twin."""
    detail = (f"quantisation ops {facts['quant_ops'] or 'none'}, " if facts.get("format") == "onnx" and "quant_ops" in facts
              else "")
    found = (f"{facts['int8_share']:.0%} of weight bytes int8, {detail}{facts.get('dynamic_ops', 0)} dynamic-range "
             f"ops, {facts['quantized_activations']} int8 activations")
    problems = []
    if facts["int8_share"] < MIN_INT8_SHARE:
        problems.append(f"less than {MIN_INT8_SHARE:.0%} of its weight bytes are int8")
    if precision == "int8-dynamic" and not facts.get("dynamic_ops"):
        problems.append("it quantises no activation at run time (no dynamic-range op)")
    if precision == "int8" and facts["quantized_activations"] == 0:
        problems.append("its activations are not quantised (no int8 activation): static int8 needs calibrated "
                        "activation ranges")
    if precision == "int8-weight" and (facts["quantized_activations"] or facts.get("dynamic_ops")):
        problems.append("it quantises activations too: int8-weight keeps them float")
    if fp32_bytes and facts["bytes"] >= 0.9 * fp32_bytes:
        problems.append(f"it is {facts['bytes']} bytes, not smaller than its fp32 twin's {fp32_bytes}")
    if problems:
        raise TruthError(f"the {precision} variant is not {precision}: {'; '.join(problems)} (found: {found})",
                         stage="truth", fix="the quantiser did not do what was asked: check its log, or report it")
