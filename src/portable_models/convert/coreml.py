"""Core ML routes from a captured torch program: ``coremltools.convert`` to an ML program.

Three routes, tried in this order by the route table:

* ``coremltools-export`` (:func:`convert_from_export`): the ExportedProgram itself
  (``source/model.pt2`` after ``run_decompositions({})``) through coremltools'
  torch.export frontend.
* ``coremltools-trace`` (:func:`convert_from_trace`): ``torch.jit.trace`` of the
  program's module through coremltools' TorchScript frontend. It reaches models the
  torch.export frontend cannot (``lstm`` …). The module is rewritten first so that the
  trace keeps dynamic sizes, and the trace is probed at other sizes (see the function).
* ``coremltools-eager-trace`` (:func:`convert_from_eager_trace`): the eager model's own
  ``torch.jit.trace``, made at capture, through the TorchScript frontend, where tracing
  the program fails.

Both routes first decompose the few ops neither frontend converts but torch can
decompose into ops they do (``new_ones``, ``diff``: see ``_COMPAT_OPS``); every other op
is kept as captured.

Both write ``model.mlpackage`` (``convert_to="mlprogram"``) with:

* ``compute_precision`` FLOAT32 unless the job asks for float16 (coremltools' own
  default is FLOAT16, which silently costs accuracy);
* inputs and outputs named after the logical names (sanitised to ``[A-Za-z_][A-Za-z0-9_]*``
  where Core ML needs it; the io map records the physical name) and typed float32 /
  int32 even in float16 programs, so the io contract does not change with precision;
* dynamic dims as bounded ``ct.RangeDim(min, max, default=sample size)``;
* ``minimum_deployment_target`` iOS16 / macOS13 unless ``job.options
  ["minimum_deployment_target"]`` names another; when the converter says an op needs a
  newer target, the route retries once with that target and records it.

Core ML has no int64 tensors: an int64 logical input is an int32 physical input. The
result's ``meta["physical_dtypes"]`` records every physical dtype and
``meta["casts"]`` says how to feed them (the Core ML runner casts for you).
The logical specs, dims and precision are also written into the package's user-defined
metadata (key ``portable_models``), so the runner can check a package on its own.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from typing import Any

from portable_models.convert.base import ConvertJob, ConvertResult, Step
from portable_models.convert.torch_program import load_eager_trace, load_program
from portable_models.core.coremltools_import import import_coremltools
from portable_models.core.imports import package_version
from portable_models.core.iomap import Binding, IoMap
from portable_models.core.spec import TensorSpec
from portable_models.errors import ConversionError

__all__ = [
    "ARTIFACT",
    "DEFAULT_TARGET",
    "METADATA_KEY",
    "convert_from_eager_trace",
    "convert_from_export",
    "convert_from_trace",
    "physical_name",
    "read_back",
]

ARTIFACT = "model.mlpackage"


def artifact_name(precision: str) -> str:
    """``model.mlpackage``, or ``model_fp16.mlpackage`` beside it for a float16 twin."""
    return ARTIFACT if precision == "float32" else "model_fp16.mlpackage"
DEFAULT_TARGET = "iOS16"
#: user-defined metadata key holding the logical specs, dims, precision and io map.
METADATA_KEY = "portable_models"
_PRECISIONS = {"float32": "FLOAT32", "float16": "FLOAT16"}
_NEEDS_TARGET = re.compile(r"minimum_deployment_target to (?:at least )?coremltools\.target\.(\w+)")
_NOT_NAME = re.compile(r"[^A-Za-z0-9_]")
#: aten ops that neither coremltools frontend converts (coremltools 9.0) and that have
#: a stock decomposition into ops it does convert.
_COMPAT_OPS = ("new_ones", "diff")


# -- public routes ----------------------------------------------------------------
def convert_from_export(job: ConvertJob) -> ConvertResult:
    """coremltools' torch.export frontend on the decomposed ExportedProgram."""
    _check_precision(job)
    ep, decomposed = _decomposed_program(job, always=True)
    steps = [Step(step="torch.export.run_decompositions", version=package_version("torch"),
                  detail={"decomposed": decomposed})]
    return _convert(job, ep, frontend="TorchExport", steps=steps)


def convert_from_trace(job: ConvertJob) -> ConvertResult:
    """coremltools' TorchScript frontend on ``torch.jit.trace`` of the program's module.

    ``torch.jit.trace(ep.module())`` as is bakes every dynamic size into constants: the
    module calls ``aten`` overloads, which drop the tracer's size tracking, and its input
    guards run as Python. :func:`_traceable_module` rewrites the graph first (sizes via
    ``Tensor.size``, size-consuming ops via their Python-level functions, guards
    dropped); :func:`_probe_trace` then checks the traced module's output *shapes* at a
    second size of every dynamic dim against the output specs (shapes only: parity is
    the compare engine's job)."""
    import torch

    _check_precision(job)
    program, decomposed = _decomposed_program(job, always=False)
    args = tuple(torch.from_numpy(job.sample_inputs[s.name].copy()) for s in job.inputs)
    try:
        module, rebound = _traceable_module(program.module())
        with torch.no_grad():
            traced = torch.jit.trace(module, args, check_trace=False, strict=False)
    except Exception as exc:
        raise ConversionError(f"tracing the program failed: {type(exc).__name__}: {exc}",
                              file=str(job.source_file), stage="convert:coreml") from exc
    probed = _probe_trace(job, traced)
    steps = [Step(step="torch.jit.trace", version=package_version("torch"),
                  detail={"source": "ExportedProgram.module()", "decomposed": decomposed,
                          "rebound_ops": rebound, "probed_sizes": probed})]
    return _convert(job, traced.eval(), frontend="TorchScript", steps=steps)


def convert_from_eager_trace(job: ConvertJob) -> ConvertResult:
    """coremltools' TorchScript frontend on the *eager* model's trace, made at capture.

    Tracing the captured program's module can fail where the eager model traces (an
    internal assert of TorchScript's alias analysis on exported graphs of attention
    masks), and the TorchScript frontend knows ops the torch.export frontend refuses.
    The trace is probed at other sizes of the dynamic dims like the other trace's."""
    from portable_models.convert.coreml_ops import register

    _check_precision(job)
    traced = load_eager_trace(job)
    probed = _probe_trace(job, traced)
    steps = [Step(step="torch.jit.trace", version=package_version("torch"),
                  detail={"source": "the eager model, at capture", "probed_sizes": probed,
                          "registered_translations": register()})]
    return _convert(job, traced, frontend="TorchScript", steps=steps)


def physical_name(logical: str) -> str:
    """The Core ML feature name for a logical name (ML programs need ``[A-Za-z_]\\w*``)."""
    name = _NOT_NAME.sub("_", logical)
    return name if re.match(r"[A-Za-z_]", name) else f"_{name}"


# -- making the program's module traceable with dynamic sizes --------------------
def _traceable_module(gm: Any) -> tuple[Any, list[str]]:
    """Rewrite ``ep.module()`` so that ``torch.jit.trace`` records sizes, not constants.

    Returns the module and the names of the ops rebound to Python-level functions."""
    import torch

    graph = gm.graph
    sym: set[Any] = set()
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.sym_size.int:
            with graph.inserting_before(node):
                size = graph.call_method("size", node.args)
            node.replace_all_uses_with(size)
            graph.erase_node(node)
            sym.add(size)
        elif (node.op == "call_module" and node.target == "_guards_fn") or (
                node.op == "call_function" and node.target in _assert_ops(torch)):
            graph.erase_node(node)
    rebound: list[str] = []
    for node in graph.nodes:
        if node.op != "call_function" or not any(a in sym for a in node.all_input_nodes):
            continue
        if not isinstance(node.target, torch._ops.OpOverload):
            sym.add(node)  # Python arithmetic on sizes: traced as tensor arithmetic
            continue
        name = node.target._opname
        python_fn = _slice if name == "slice" else (
            getattr(torch, name, None) or getattr(torch.Tensor, name, None))
        if python_fn is not None:
            node.target = python_fn
            rebound.append(name)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm, rebound


def _assert_ops(torch: Any) -> tuple[Any, ...]:
    """Runtime assertions of the program: they would run as Python (and be baked)."""
    aten = torch.ops.aten
    names = ("_assert_scalar", "sym_constrain_range_for_size", "_assert_tensor_metadata")
    return tuple(getattr(aten, n).default for n in names if hasattr(aten, n))


def _slice(x: Any, dim: int = 0, start: Any = None, end: Any = None, step: int = 1) -> Any:
    """``aten.slice`` through Python indexing, which the tracer records with dynamic
    bounds."""
    index = (slice(None),) * (dim % x.dim()) + (slice(start, end, step),)
    return x[index]


def _probe_trace(job: ConvertJob, traced: Any) -> dict[str, int]:
    """Run the traced module once with every dynamic dim at another size and check
    that the output shapes follow the output specs. Returns the sizes probed."""
    import numpy as np
    import torch

    sizes = _probe_sizes(job)
    if sizes is None:
        return {}
    args = []
    for s in job.inputs:
        sample = job.sample_inputs[s.name]
        shape = tuple(sizes[d] if isinstance(d, str) else sample.shape[i]
                      for i, d in enumerate(s.shape))
        args.append(torch.from_numpy(np.resize(sample, shape).astype(sample.dtype)))
    try:
        with torch.no_grad():
            got = traced(*args)
    except Exception as exc:
        raise ConversionError(f"the trace does not run at sizes {sizes}: {exc}",
                              stage="convert:coreml") from exc
    flat = list(got) if isinstance(got, (tuple, list)) else [got]
    want = [tuple(sizes.get(d, -1) if isinstance(d, str) else d for d in s.shape)
            for s in job.outputs]
    have = [tuple(t.shape) for t in flat]
    if len(have) != len(want) or any(
            len(h) != len(w) or any(b not in (-1, a) for a, b in zip(h, w, strict=True))
            for h, w in zip(have, want, strict=False)):
        raise ConversionError(
            f"the trace baked a dynamic size: at sizes {sizes} it gives output shapes "
            f"{have}, the output specs say {want}", stage="convert:coreml",
            fix="use the coremltools-export route, or capture with static shapes")
    return sizes


def _probe_sizes(job: ConvertJob) -> dict[str, int] | None:
    """Every dynamic dim at a size other than the sample's where its bounds allow;
    ``None`` when no dim can move."""
    seen: dict[str, int] = {}
    for s in job.inputs:
        sample = job.sample_inputs[s.name]
        for axis, dim in s.dynamic_axes.items():
            seen.setdefault(dim, int(sample.shape[axis]))
    out: dict[str, int] = {}
    for dim, size in seen.items():
        bounds = job.dims.get(dim)
        lo, hi = (bounds.min, bounds.max) if bounds else (1, 64)
        out[dim] = size + 1 if size + 1 <= hi else max(lo, size - 1)
    return out if out != seen else None


# -- the shared conversion --------------------------------------------------------
def _check_precision(job: ConvertJob) -> None:
    if job.precision not in _PRECISIONS:
        raise ConversionError(
            f"Core ML routes make float32 or float16 programs, not {job.precision!r}",
            stage="convert:coreml", fix="ask for precision 'float32' or 'float16'")


def _decomposed_program(job: ConvertJob, *, always: bool) -> tuple[Any, list[str]]:
    """The captured program, decomposed only where coremltools lacks the op.

    ``run_decompositions`` with a table keeps every op not in it; the table holds the
    stock decompositions of the :data:`_COMPAT_OPS` the program uses (ops neither
    coremltools frontend converts, e.g. ``new_ones`` in BERT, ``diff`` in GPT-2).
    The torch.export frontend needs the ATen dialect, so ``always`` runs it even with an
    empty table; the trace route skips it when the table is empty (the inference-IR
    ``_native_batch_norm_legit_no_training`` it brings breaks the TorchScript frontend:
    "Cannot add const"). Returns the program and the ops decomposed."""
    import torch

    ep = load_program(job)
    stock = torch.export.default_decompositions()
    wanted = [getattr(torch.ops.aten, n).default for n in _COMPAT_OPS
              if hasattr(torch.ops.aten, n)]
    used = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    table = {op: stock[op] for op in wanted if op in stock and op in used}
    dropped = _drop_aliases(ep)
    if not table and not always:
        return ep, dropped
    try:
        return ep.run_decompositions(table), sorted(str(op) for op in table) + dropped
    except Exception as exc:
        raise ConversionError(f"run_decompositions failed: {type(exc).__name__}: {exc}",
                              file=str(job.source_file), stage="convert:coreml") from exc


def _drop_aliases(ep: Any) -> list[str]:
    """``aten.alias`` (a view that changes nothing, e.g. from a full-range slice) has no
    converter in either coremltools frontend: replace each by its input."""
    import torch

    graph = ep.graph_module.graph
    aliases = [n for n in graph.nodes if n.op == "call_function" and n.target in (
        torch.ops.aten.alias.default, getattr(torch.ops.aten, "alias_copy", torch.ops.aten.alias).default)]
    for node in aliases:
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
    if aliases:
        ep.graph_module.recompile()
        return [f"aten.alias x{len(aliases)} (removed)"]
    return []


def _convert(job: ConvertJob, model: Any, *, frontend: str, steps: list[Step]) -> ConvertResult:
    ct = import_coremltools()  # without TensorFlow & co.; nothing earlier in a route imports it

    names = _physical_names(job)
    start = time.perf_counter()
    mlmodel, target, fixed_note = _convert_dims(job, model, names, frontend)
    convert_s = time.perf_counter() - start
    _check_output_names(mlmodel, job, names)
    dtypes = _physical_dtypes(mlmodel)
    io = read_back(job, IoMap(inputs={s.name: Binding(name=names[s.name], layout=s.layout) for s in job.inputs},
                              outputs={s.name: Binding(name=names[s.name], layout=s.layout) for s in job.outputs}),
                   dtypes)
    fixed = {s.name: list(job.sample_inputs[s.name].shape) for s in job.inputs} if fixed_note else None
    _embed_metadata(mlmodel, job, io, fixed)
    out = job.out_dir / artifact_name(job.precision)
    if out.exists():
        shutil.rmtree(out)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    mlmodel.save(str(out))
    steps.append(Step(step="coremltools.convert", version=package_version("coremltools"), detail={
        "frontend": frontend, "convert_to": "mlprogram",
        "compute_precision": _PRECISIONS[job.precision],
        "minimum_deployment_target": target}))
    meta = {
        "frontend": frontend, "convert_to": "mlprogram",
        "compute_precision": _PRECISIONS[job.precision],
        "minimum_deployment_target": target,
        "deployment_targets": _aliases(ct, target),
        "specification_version": int(mlmodel.get_spec().specificationVersion),
        "torch_version": package_version("torch"),
        "coremltools_version": package_version("coremltools"),
        "physical_dtypes": dtypes, "casts": _casts(job, dtypes),
        "convert_s": round(convert_s, 3),
    }
    if fixed:
        meta.update({"dynamic": False, "dynamic_note": fixed_note, "input_shapes": fixed})
    return ConvertResult(file=artifact_name(job.precision), io=io, steps=steps, precision=job.precision, meta=meta)


def _convert_dims(job: ConvertJob, model: Any, names: dict[str, str], frontend: str) -> tuple[Any, str, str]:
    """Convert keeping the dynamic dims; where the TorchScript frontend cannot (a size of a
    dynamic dim reaches a constant: "cannot have symbolic values", e.g. a group norm or a
    window mask built from the batch size), at the sample's sizes — when the job allows a
    fixed-shape fallback, else refuse so that later routes are tried first. Returns the
    model, the deployment target and, for a fixed-shape conversion, why."""
    try:
        mlmodel, target = _convert_with_target(job, model, names, frontend)
        return mlmodel, target, ""
    except ConversionError as exc:
        if frontend != "TorchScript" or not job.dims or "symbolic values" not in exc.message:
            raise
        note = job.fixed_shapes_instead("coremltools", exc.message, exc)
    mlmodel, target = _convert_with_target(job, model, names, frontend, fixed=True)
    return mlmodel, target, note


def _convert_with_target(job: ConvertJob, model: Any, names: dict[str, str],
                         frontend: str, fixed: bool = False) -> tuple[Any, str]:
    """Convert with the asked (or default) deployment target; if the converter says an
    op needs a newer one, retry once with it."""
    import coremltools as ct

    target = str(job.options.get("minimum_deployment_target") or DEFAULT_TARGET)
    if target not in ct.target.__members__:
        raise ConversionError(f"unknown Core ML deployment target {target!r}",
                              stage="convert:coreml", fix="use a name such as iOS16 or macOS13")
    for attempt in range(2):
        try:
            return _ct_convert(job, model, names, getattr(ct.target, target), fixed), target
        except Exception as exc:
            needed = _NEEDS_TARGET.search(str(exc))
            if attempt == 0 and needed and needed.group(1) in ct.target.__members__:
                target = needed.group(1)
                continue
            raise ConversionError(
                f"coremltools ({frontend} frontend) failed: {type(exc).__name__}: {exc}",
                file=str(job.source_file), stage="convert:coreml") from exc
    raise AssertionError("unreachable")


def _ct_convert(job: ConvertJob, model: Any, names: dict[str, str], target: Any, fixed: bool = False) -> Any:
    import coremltools as ct

    precision = getattr(ct.precision, _PRECISIONS[job.precision])
    return ct.convert(
        model,
        inputs=[_input_type(ct, job, s, names[s.name], fixed) for s in job.inputs],
        outputs=[ct.TensorType(name=names[s.name], dtype=_ct_dtype(s.dtype))
                 for s in job.outputs],
        convert_to="mlprogram",
        compute_precision=precision,
        minimum_deployment_target=target,
        skip_model_load=True,
    )


def _input_type(ct: Any, job: ConvertJob, spec: TensorSpec, name: str, fixed: bool = False) -> Any:
    """The input's type: its dynamic dims as bounded ranges, or (``fixed``) the sample's sizes."""
    sample = job.sample_inputs.get(spec.name)
    shape: list[Any] = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            shape.append(dim)
            continue
        if fixed and sample is not None:
            shape.append(int(sample.shape[axis]))
            continue
        bounds = job.dims.get(dim)
        lo, hi = (bounds.min, bounds.max) if bounds else (1, 64)
        default = int(sample.shape[axis]) if sample is not None else lo
        shape.append(ct.RangeDim(lower_bound=lo, upper_bound=hi,
                                 default=min(max(default, lo), hi)))
    return ct.TensorType(name=name, shape=tuple(shape), dtype=_ct_dtype(spec.dtype))


def _ct_dtype(dtype: str) -> Any:
    """Core ML feature dtype for a logical dtype: fp32 / fp16 / int32 (no int64, no
    fp64). ``None`` (let the converter decide) for bool."""
    import numpy as np

    if dtype == "float16":
        return np.float16
    if dtype.startswith("float") or dtype == "bfloat16":
        return np.float32
    if dtype.startswith(("int", "uint")):
        return np.int32
    return None


def _physical_names(job: ConvertJob) -> dict[str, str]:
    logical = [s.name for s in [*job.inputs, *job.outputs]]
    physical = [physical_name(n) for n in logical]
    if len(set(physical)) != len(physical):
        raise ConversionError(
            f"logical names {logical} collide once made Core ML names {physical}",
            stage="convert:coreml", fix="give every input and output its own name, made of "
                                        "letters, digits and '_'")
    return dict(zip(logical, physical, strict=True))


def _check_output_names(mlmodel: Any, job: ConvertJob, names: dict[str, str]) -> None:
    """coremltools applies the asked output names; check that it did."""
    got = [o.name for o in mlmodel.get_spec().description.output]
    want = [names[s.name] for s in job.outputs]
    if got != want:
        raise ConversionError(f"Core ML outputs are {got}, expected {want}",
                              stage="convert:coreml")


def _physical_dtypes(mlmodel: Any) -> dict[str, dict[str, str]]:
    from coremltools.proto import FeatureTypes_pb2

    names = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name
    desc = mlmodel.get_spec().description
    return {
        "inputs": {f.name: names(f.type.multiArrayType.dataType) for f in desc.input},
        "outputs": {f.name: names(f.type.multiArrayType.dataType) for f in desc.output},
    }


def read_back(job: ConvertJob, io: IoMap, dtypes: dict[str, dict[str, str]]) -> IoMap:
    """``io`` with every boolean output that Core ML returns as numbers (it has no boolean
    arrays) marked to be read back as booleans."""
    outputs = dict(io.outputs)
    for s in job.outputs:
        binding = outputs[s.name]
        if s.dtype == "bool" and dtypes["outputs"].get(binding.name, "BOOL") != "BOOL":
            outputs[s.name] = dataclasses.replace(binding, reads_as="bool")
    return IoMap(inputs=io.inputs, outputs=outputs)


def _casts(job: ConvertJob, dtypes: dict[str, dict[str, str]]) -> dict[str, str]:
    """How each logical tensor whose dtype Core ML lacks is fed or read back."""
    numpy_of = {"FLOAT32": "float32", "FLOAT16": "float16", "INT32": "int32", "DOUBLE": "float64"}
    out: dict[str, str] = {}
    for kind, specs in (("inputs", job.inputs), ("outputs", job.outputs)):
        for s in specs:
            phys = numpy_of.get(dtypes[kind].get(physical_name(s.name), ""), "unknown")
            if phys != s.dtype:
                verb = "cast to" if kind == "inputs" else "comes back as"
                out[s.name] = f"{s.dtype} {verb} {phys}" + (
                    " (values must fit in int32)" if s.dtype == "int64" and kind == "inputs"
                    else "")
    return out


def _embed_metadata(mlmodel: Any, job: ConvertJob, io: IoMap,
                    input_shapes: dict[str, list[int]] | None = None) -> None:
    """The logical specs, dims, precision and io map, and for a fixed-shape package the input
    shapes it was converted at (its dynamic dims are checked at those sizes)."""
    record = {
        "inputs": [s.to_dict() for s in job.inputs],
        "outputs": [s.to_dict() for s in job.outputs],
        "dims": {k: d.to_dict() for k, d in job.dims.items()},
        "precision": job.precision,
        "io": io.to_dict(),
        **({"input_shapes": input_shapes} if input_shapes else {}),
    }
    mlmodel.user_defined_metadata[METADATA_KEY] = json.dumps(record, sort_keys=True)


def _aliases(ct: Any, target: str) -> list[str]:
    value = getattr(ct.target, target).value
    return [k for k, v in ct.target.__members__.items()
            if v.value == value and k.startswith(("iOS", "macOS"))]

