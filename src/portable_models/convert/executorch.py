"""ExecuTorch routes: the captured ``torch.export`` program to a ``model.pte``.

Two routes, in order of preference:

* ``executorch-xnnpack`` — ``to_edge_transform_and_lower`` with the XNNPACK
  partitioner, then ``to_executorch``. Fast on CPU; some programs convert and then
  fail inside the delegate at run time (the pipeline falls back to the next route).
* ``executorch-portable`` — ``to_edge(...).to_executorch()``: portable kernels only,
  no delegate. Slower, but it runs nearly every program that converts.

Named dynamic dims are bounded: ExecuTorch plans memory for each dim's upper bound,
so the .pte accepts every size up to it. Lowering can silently narrow those bounds
(torch's fake convolution guards on the example batch size while choosing a conv
backend, which turns ``batch in [1, 64]`` into ``batch in [2, 15]``); the route pins
the declared bounds back before memory planning and checks the planned capacity in
the written file against the declared maxima.

The program is fed positionally: physical names are the logical names, and the
order is the io map's input order (``meta["positional_inputs"]``).

The int8 variants, ``executorch-xnnpack-pt2e``: PT2E on the captured program's module with
ExecuTorch's ``XNNPACKQuantizer`` (symmetric, per-channel int8 weights; ``int8``: activation
ranges observed on the calibration data; ``int8-dynamic``: activations quantised at run time),
re-exported with the program's dynamic dims (fixed shapes, ``meta["dynamic"] = False``, where
the export refuses them), lowered to XNNPACK like the float32 route. Float io. Known gap of
the quantizer: in dynamic mode it leaves a conv that feeds a single ``relu`` in float (its
conv+relu pattern is static-only), so a conv-relu network is mostly float and fails its
int8-dynamic truth check (:mod:`portable_models.run.truth_pte` reads what the .pte holds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from portable_models.convert.base import ConvertJob, ConvertResult, Step
from portable_models.convert.torch_program import load_program
from portable_models.core.imports import package_version
from portable_models.core.iomap import IoMap
from portable_models.core.torch_io import sample_args
from portable_models.errors import ConversionError, DynamicDimsRefused, MissingDependencyError

__all__ = ["convert_xnnpack", "convert_portable", "convert_xnnpack_quantized", "ARTIFACT", "METHOD"]

ARTIFACT = "model.pte"
METHOD = "forward"
#: the quantised variants' file names, by precision
QUANTIZED_ARTIFACTS = {"int8-dynamic": "model_int8_dynamic.pte", "int8": "model_int8.pte"}


def convert_xnnpack(job: ConvertJob) -> ConvertResult:
    """``to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])``."""
    return _convert(job, backend="xnnpack")


def convert_portable(job: ConvertJob) -> ConvertResult:
    """``to_edge(ep).to_executorch()``: portable kernels, no delegate."""
    return _convert(job, backend="portable")


# -- the route ------------------------------------------------------------------------
def _convert(job: ConvertJob, *, backend: str) -> ConvertResult:
    if job.precision != "float32":
        raise ConversionError(
            f"route {job.route!r} keeps the program's own dtypes; precision "
            f"{job.precision!r} is not offered", stage="convert:executorch",
            fix="ask for precision float32 for the executorch target")
    torch = _require("torch")
    _require("executorch.exir")
    ep = _load_program(job)
    _check_signature(job, ep)
    bounds = _declared_bounds(job, ep)
    _pin_bounds(job, ep, bounds)  # an unbounded dim gets its DimSpec max
    edge = _lower(job, ep, backend)
    pinned = _pin_bounds(job, edge.exported_program(), bounds)  # undo narrowing
    path = job.out_dir / ARTIFACT
    job.out_dir.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_to_executorch(job, edge).buffer)
    meta: dict[str, Any] = {"backend": backend, "method": METHOD, "positional_inputs": job.input_names}
    try:
        meta["planned_dims"] = _check_written(job, path, bounds)
    except _PlannedBelowMax as short:
        note = job.fixed_shapes_instead("ExecuTorch's memory planning", short.message, short)
        edge = _lower(job, _at_sample_sizes(job, ep), backend)
        path.write_bytes(_to_executorch(job, edge).buffer)
        _check_written(job, path, {})
        meta.update({"dynamic": False, "dynamic_note": note,
                     "input_shapes": {s.name: list(job.sample_inputs[s.name].shape) for s in job.inputs}})
    meta.update(_delegation(edge))
    if pinned:
        meta["bounds_restored"] = pinned
    return ConvertResult(file=ARTIFACT, io=IoMap.identity(job.input_names, job.output_names),
                         steps=_steps(backend, str(torch.__version__)), precision="float32",
                         meta=meta)


def _steps(backend: str, torch_version: str) -> list[Step]:
    et = package_version("executorch")
    if backend == "xnnpack":
        lower = Step(step="executorch.exir.to_edge_transform_and_lower", version=et,
                     detail={"partitioner": "XnnpackPartitioner"})
    else:
        lower = Step(step="executorch.exir.to_edge", version=et, detail={"kernels": "portable"})
    return [
        Step(step="torch.export.load", version=package_version("torch") or torch_version),
        lower,
        Step(step="executorch.exir.to_executorch", version=et, detail={"method": METHOD}),
    ]


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"the executorch routes need {module}: {exc}", stage="convert:executorch",
            fix="pip install 'portable-models[executorch]'") from exc


def _load_program(job: ConvertJob) -> Any:
    return load_program(job)


def _check_signature(job: ConvertJob, ep: Any) -> None:
    sig = ep.graph_signature
    n_in, n_out = len(sig.user_inputs), len(sig.user_outputs)
    if n_in != len(job.inputs) or n_out != len(job.outputs):
        raise ConversionError(
            f"the program takes {n_in} inputs and returns {n_out} outputs, the job names "
            f"{len(job.inputs)} inputs {job.input_names} and {len(job.outputs)} outputs "
            f"{job.output_names}", file=str(job.source_file), stage="convert:executorch")


def _lower(job: ConvertJob, ep: Any, backend: str) -> Any:
    from executorch.exir import to_edge, to_edge_transform_and_lower

    try:
        if backend == "xnnpack":
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
                XnnpackPartitioner,
            )

            return to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
        return to_edge(ep)
    except Exception as exc:
        step = "to_edge_transform_and_lower (XNNPACK)" if backend == "xnnpack" else "to_edge"
        raise ConversionError(f"executorch {step} failed: {type(exc).__name__}: {exc}",
                              stage="convert:executorch") from exc


def _to_executorch(job: ConvertJob, edge: Any) -> Any:
    try:
        return edge.to_executorch()
    except Exception as exc:
        raise ConversionError(f"executorch to_executorch failed: {type(exc).__name__}: {exc}",
                              stage="convert:executorch") from exc


# -- the int8 variants --------------------------------------------------------------------
def convert_xnnpack_quantized(job: ConvertJob) -> ConvertResult:
    """PT2E with ``XNNPACKQuantizer`` (int8: calibrated static; int8-dynamic), then
    ``to_edge_transform_and_lower`` with the XNNPACK partitioner and ``to_executorch``."""
    if job.precision not in QUANTIZED_ARTIFACTS:
        raise ConversionError(f"route {job.route!r} makes int8-dynamic or int8, not {job.precision!r}",
                              stage="convert:executorch", fix="the float32 twin comes from executorch-xnnpack")
    _require("executorch.exir")
    _require("torchao.quantization.pt2e.quantize_pt2e")
    ep = _load_program(job)
    _check_signature(job, ep)
    dynamic = job.precision == "int8-dynamic"
    quantized, rows = _quantize(job, ep, dynamic)
    qep, note = _reexport(job, quantized, _declared_bounds(job, ep))
    bounds = _declared_bounds(job, qep)
    _pin_bounds(job, qep, bounds)
    edge = _lower(job, qep, "xnnpack")
    pinned = _pin_bounds(job, edge.exported_program(), bounds)
    program = _to_executorch(job, edge)
    path = job.out_dir / QUANTIZED_ARTIFACTS[job.precision]
    job.out_dir.mkdir(parents=True, exist_ok=True)
    path.write_bytes(program.buffer)
    meta: dict[str, Any] = {"backend": "xnnpack", "method": METHOD, "positional_inputs": job.input_names,
                            "dynamic": note is None, "weights": "int8",
                            "planned_dims": _check_written(job, path, bounds), **_delegation(edge)}
    if note is not None:
        meta["dynamic_note"] = note
    if pinned:
        meta["bounds_restored"] = pinned
    if not dynamic:
        calibration = job.options["calibration"]
        meta["calibration"] = {"sha256": calibration["sha256"], "cases": calibration["cases"], "rows": rows}
    steps = _steps("xnnpack", package_version("torch") or "")
    steps.insert(1, Step(step="torchao prepare_pt2e/convert_pt2e", version=package_version("torchao"),
                         detail={"quantizer": "executorch XNNPACKQuantizer", "symmetric": True,
                                 "per_channel": True, "is_dynamic": dynamic, "calibration_rows": rows,
                                 "executorch": package_version("executorch")}))
    steps.insert(2, Step(step="torch.export.export", version=package_version("torch") or "",
                         detail={"dynamic_shapes": note is None}))
    return ConvertResult(file=path.name, io=IoMap.identity(job.input_names, job.output_names), steps=steps,
                         precision=job.precision, meta=meta)


def _quantize(job: ConvertJob, ep: Any, dynamic: bool) -> tuple[Any, int]:
    """prepare_pt2e → (int8: run the calibration data through it) → convert_pt2e; the rows seen."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from portable_models.convert.torch_program import (
        calibration_batches,  # the calibration cases, batched
    )

    sample = {n: torch.from_numpy(np.ascontiguousarray(job.sample_inputs[n])) for n in job.input_names}
    feeds = [sample] if dynamic else list(calibration_batches(job, job.input_names, sample))
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    try:
        prepared = prepare_pt2e(ep.module(), XNNPACKQuantizer().set_global(config))
        with torch.no_grad():
            for feed in feeds:
                prepared(*[feed[n] for n in job.input_names])
            return convert_pt2e(prepared), 0 if dynamic else sum(len(f[job.input_names[0]]) for f in feeds)
    except Exception as exc:
        raise ConversionError(f"PT2E quantisation (XNNPACKQuantizer) failed: {type(exc).__name__}: {exc}"[:600],
                              file=str(job.source_file), stage="convert:executorch") from exc


def _reexport(job: ConvertJob, module: Any, bounds: dict[str, tuple[int, int]]) -> tuple[Any, str | None]:
    """``torch.export`` of the quantised module with the program's dynamic dims (declared
    bounds); fixed at the sample's shape where the export refuses them (the note says why)."""
    import torch

    args = tuple(torch.from_numpy(np.ascontiguousarray(job.sample_inputs[n])) for n in job.input_names)
    dims = {d: torch.export.Dim(d, min=lo, max=hi) for d, (lo, hi) in bounds.items()}
    shapes = tuple({a: dims[d] for a, d in spec.dynamic_axes.items() if d in dims} or None for spec in job.inputs)
    note = None
    if any(shapes):
        try:
            return torch.export.export(module, args, dynamic_shapes=shapes), None
        except Exception as exc:
            if not job.fixed_shape_fallback:
                raise DynamicDimsRefused(
                    f"torch.export of the quantised module refused the dynamic dims ({type(exc).__name__}: {exc})"[:400],
                    stage="convert:executorch", fix="a fixed-shape conversion is tried if no route keeps them") from exc
            note = f"dynamic dims refused, fixed shape used: {type(exc).__name__}: {exc}"[:400]
    try:
        return torch.export.export(module, args), note
    except Exception as exc:
        raise ConversionError(f"torch.export of the quantised module failed: {type(exc).__name__}: {exc}"[:600],
                              file=str(job.source_file), stage="convert:executorch") from exc


# -- dynamic dims -----------------------------------------------------------------------
def _input_symbols(job: ConvertJob, ep: Any) -> list[tuple[str, Any]]:
    """(dim name, SymInt) for every named axis of every user input of ``ep``."""
    import torch

    by_name = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    found: list[tuple[str, Any]] = []
    for spec, ph_name in zip(job.inputs, ep.graph_signature.user_inputs, strict=False):
        val = by_name[ph_name].meta.get("val") if ph_name in by_name else None
        if not isinstance(val, torch.Tensor):
            continue
        for axis, dim in spec.dynamic_axes.items():
            if axis < val.dim() and isinstance(val.shape[axis], torch.SymInt):
                found.append((dim, val.shape[axis]))
    return found


def _declared_bounds(job: ConvertJob, ep: Any) -> dict[str, tuple[int, int]]:
    """Dim name -> (min, max) as the program declares it; a DimSpec's max stands in
    for an unbounded upper end."""
    bounds: dict[str, tuple[int, int]] = {}
    for dim, sym in _input_symbols(job, ep):
        expr = sym.node.expr
        vr = ep.range_constraints.get(expr)
        spec = job.dims.get(dim)
        lo = _as_int(vr.lower if vr is not None else None)
        hi = _as_int(vr.upper if vr is not None else None)
        lo = lo if lo is not None else (spec.min if spec else 1)
        hi = hi if hi is not None else (spec.max if spec else None)
        if hi is not None:
            bounds[dim] = (lo, hi)
    return bounds


def _as_int(value: Any) -> int | None:
    """A finite integer bound as int; None for infinity (``int_oo``) or nothing."""
    if isinstance(value, int) or getattr(value, "is_Integer", False):
        out = int(value)
        return out if abs(out) < 2**62 else None
    return None


def _pin_bounds(job: ConvertJob, ep: Any, bounds: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Set each named dim's upper bound in the program's shape env back to its declared
    max, and undo a raised lower bound; return what had drifted
    (dim -> {"found": [lo, hi], "declared": [lo, hi]}).

    Only the range changes: memory planning reads the upper bound. The lower bound
    keeps torch's 0/1 specialisation (2) where the env has it."""
    from torch.utils._sympy.value_ranges import ValueRanges

    drifted: dict[str, Any] = {}
    for dim, sym in _input_symbols(job, ep):
        expr, env = sym.node.expr, sym.node.shape_env
        if dim not in bounds or env is None or expr not in env.var_to_range:
            continue
        lo, hi = bounds[dim]
        now = env.var_to_range[expr]
        now_lo, now_hi = _as_int(now.lower), _as_int(now.upper)
        floor = max(lo, 2)
        if now_hi == hi and now_lo is not None and now_lo <= floor:
            continue
        drifted[dim] = {"found": [now_lo, now_hi], "declared": [lo, hi]}
        new_lo = min(now_lo, floor) if now_lo is not None else lo
        env.var_to_range[expr] = ValueRanges(new_lo, hi)
    return drifted


# -- ensures ---------------------------------------------------------------------------
class _PlannedBelowMax(ConversionError):
    """The lowering planned a dynamic dim's memory below its declared max (a recurrent
    layer's decomposition sizes its state from the sample)."""


def _at_sample_sizes(job: ConvertJob, ep: Any) -> Any:
    """The program re-exported at the sample's sizes: a fixed-shape program to lower where the
    lowering cannot keep a dim dynamic."""
    torch = _require("torch")
    try:
        return torch.export.export(ep.module(), sample_args(job.inputs, job.sample_inputs), strict=False)
    except Exception as exc:
        raise ConversionError(f"re-exporting at the sample's sizes failed: {type(exc).__name__}: {exc}",
                              stage="convert:executorch") from exc


def _check_written(job: ConvertJob, path: Path,
                   bounds: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Load the .pte with the runtime; check its method's inputs/outputs and that
    every named dim has memory planned up to its declared max."""
    from executorch.runtime import Runtime

    try:
        meta = Runtime.get().load_program(path).metadata(METHOD)
    except Exception as exc:
        raise ConversionError(f"the written {path.name} does not load: {exc}",
                              file=str(path), stage="convert:executorch") from exc
    if meta.num_inputs() != len(job.inputs) or meta.num_outputs() != len(job.outputs):
        raise ConversionError(
            f"{path.name} method {METHOD!r} takes {meta.num_inputs()} inputs and returns "
            f"{meta.num_outputs()} outputs; expected {len(job.inputs)} and {len(job.outputs)}",
            file=str(path), stage="convert:executorch")
    planned: dict[str, int] = {}
    for i, spec in enumerate(job.inputs):
        sizes = list(meta.input_tensor_meta(i).sizes())
        for axis, dim in spec.dynamic_axes.items():
            if axis >= len(sizes) or dim not in bounds:
                continue
            planned[dim] = min(planned.get(dim, sizes[axis]), sizes[axis])
            if sizes[axis] < bounds[dim][1]:
                raise _PlannedBelowMax(
                    f"{path.name}: memory planned for {dim!r}={sizes[axis]} on input "
                    f"{spec.name!r}, below its declared max {bounds[dim][1]}",
                    file=str(path), stage="convert:executorch",
                    fix="use the executorch-portable route, or a lower max for the dim")
    return planned


def _delegation(edge: Any) -> dict[str, Any]:
    """How much went to a delegate (cheap; empty when the helper is missing)."""
    try:
        from executorch.devtools.backend_debug import get_delegation_info
    except ImportError:
        return {}
    try:
        info = get_delegation_info(edge.exported_program().graph_module)
    except (RuntimeError, ValueError, KeyError) as exc:
        return {"delegation_info_error": str(exc)}
    return {
        "delegated_partitions": int(info.num_delegated_subgraphs),
        "delegated_nodes": int(info.num_delegated_nodes),
        "non_delegated_nodes": int(info.num_non_delegated_nodes),
    }
