"""Capture of a PyTorch model: ``torch.export`` -> ``source/model.pt2``, specs, golden set."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from portable_models.capture import Captured, CaptureOptions
from portable_models.core import golden
from portable_models.core.arrays import to_numpy
from portable_models.core.imports import package_version
from portable_models.core.spec import DimSpec, TensorSpec, normalise_dynamic_dims
from portable_models.core.torch_io import output_leaves
from portable_models.errors import CaptureError, UsageError

if TYPE_CHECKING:
    import torch

__all__ = ["EAGER_TRACE", "capture_torch", "flatten_outputs"]

_STAGE = "capture"
#: the file name of the eager model's TorchScript trace in the export's scratch folder
EAGER_TRACE = "eager/model.ts"


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _input_names(model: torch.nn.Module, n: int, given: Sequence[str] | None) -> list[str]:
    if given is not None:
        if len(given) != n:
            raise UsageError(f"input_names has {len(given)} names for {n} inputs",
                             stage=_STAGE, fix="give one name per example input")
        return list(given)
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):  # TorchScript methods have no Python signature
        params = []
    if len(params) >= n:
        return [p.name for p in params[:n]]
    return [f"input_{i}" for i in range(n)]


def flatten_outputs(out: Any, names: Sequence[str] | None) -> tuple[list[str], list[torch.Tensor]]:
    """Flatten a tensor / tuple / list / dict (nested) into named tensors, in pytree order."""
    import torch

    tensors, auto = [], []
    for path, leaf in output_leaves(out):
        label = path or "output"
        if leaf is None:
            raise CaptureError(f"model output {label!r} is None", stage=_STAGE,
                               fix="return only tensors: leave the None entries out of the outputs")
        if not isinstance(leaf, torch.Tensor):
            raise CaptureError(
                f"model output {label!r} is a {type(leaf).__name__}, not a tensor",
                stage=_STAGE, fix="return tensors only (a tensor, a tuple/list or a dict of tensors)",
            )
        tensors.append(leaf)
        auto.append(label if not label[:1].isdigit() else f"output_{label}")
    if not tensors:
        raise CaptureError("the model returned no tensors", stage=_STAGE, fix="return at least one tensor")
    if names is not None:
        if len(names) != len(tensors):
            raise UsageError(f"output_names has {len(names)} names but the model returns "
                             f"{len(tensors)} tensors ({', '.join(auto)})", stage=_STAGE,
                             fix="give one name per returned tensor, in that order")
        return list(names), tensors
    if len(tensors) == 1 and auto == ["output"]:
        return ["output"], tensors
    return auto, tensors


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    import torch

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    else:
        raise UsageError(f"example_inputs is a {type(example_inputs).__name__}", stage=_STAGE,
                         fix="pass a tensor or a tuple of tensors, one per forward() argument")
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise UsageError(f"example input {i} is a {type(a).__name__}, not a tensor", stage=_STAGE,
                             fix="pass tensors only")
    # fresh row-major strides: a view such as x[:, None] of a numpy array keeps a stride of 0 on
    # its unit axis, which torch.export records and ExecuTorch refuses ("0 in strides")
    return tuple(a.clone(memory_format=torch.contiguous_format) for a in args)


def _dynamic_shapes(names: list[str], args: tuple[Any, ...], axes: dict[str, dict[int, str]],
                    dims: dict[str, DimSpec]) -> tuple[Any, ...] | None:
    import torch

    if not axes:
        return None
    unknown = set(axes) - set(names)
    if unknown:
        raise UsageError(f"dynamic_dims names unknown inputs {sorted(unknown)}", stage=_STAGE,
                         fix=f"the inputs are {', '.join(names)}")
    made = {d.name: torch.export.Dim(d.name, min=d.min, max=d.max) for d in dims.values()}
    shapes = []
    for name, arg in zip(names, args, strict=True):
        spec = axes.get(name, {})
        for axis, label in spec.items():
            if axis >= arg.ndim:
                raise UsageError(f"dynamic dim {label!r}: input {name!r} has no axis {axis}",
                                 stage=_STAGE, fix=f"{name!r} has rank {arg.ndim}")
            size, dim = arg.shape[axis], dims[label]
            if size < 2 or not dim.min <= size <= dim.max:
                raise UsageError(
                    f"dynamic dim {label!r} is {size} in the example input {name!r}", stage=_STAGE,
                    fix=f"torch.export needs an example size between max(2, {dim.min}) and {dim.max}")
        shapes.append({axis: made[label] for axis, label in spec.items()} or None)
    return tuple(shapes)


def _as_signature(model: Any, shapes: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """The per-input dynamic shapes laid out as ``forward`` takes its inputs: torch.export
    wants the ones that land in ``*args`` as one tuple in that parameter's place."""
    if shapes is None:
        return None
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # TorchScript methods have no Python signature
        return shapes
    fixed = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not any(p.kind == p.VAR_POSITIONAL for p in params) or len(shapes) <= len(fixed):
        return shapes
    return (*shapes[:len(fixed)], tuple(shapes[len(fixed):]))


def _input_specs(names: list[str], args: tuple[Any, ...], axes: dict[str, dict[int, str]],
                 opts: CaptureOptions) -> list[TensorSpec]:
    specs = []
    for name, arg in zip(names, args, strict=True):
        shape = [axes.get(name, {}).get(i, int(s)) for i, s in enumerate(arg.shape)]
        layout = opts.layouts.get(name, "NCHW" if arg.ndim == 4 and arg.is_floating_point() else None)
        rng = opts.input_ranges.get(name)
        specs.append(TensorSpec(name=name, dtype=_dtype_name(arg), shape=tuple(shape), layout=layout,
                                range=(float(rng[0]), float(rng[1])) if rng is not None else None))
    return specs


def _run_eager(model: torch.nn.Module, specs: list[TensorSpec], cases: golden.Cases,
               out_names: Sequence[str] | None) -> tuple[list[str], golden.Cases]:
    import torch

    results: golden.Cases = []
    names: list[str] = []
    with torch.no_grad():
        for i, case in enumerate(cases):
            args = tuple(torch.from_numpy(np.ascontiguousarray(case[s.name])) for s in specs)
            try:
                out = model(*args)
            except Exception as exc:
                raise CaptureError(f"the model failed on golden case {i}: {type(exc).__name__}: {exc}",
                                   stage=_STAGE, fix="check input dtypes, shapes and declared ranges") from exc
            names, tensors = flatten_outputs(out, out_names)
            results.append({n: np.ascontiguousarray(to_numpy(t)) for n, t in zip(names, tensors, strict=True)})
    return names, results


def _check_deterministic(model: torch.nn.Module, specs: list[TensorSpec], case: dict[str, np.ndarray],
                         first: dict[str, np.ndarray], out_names: Sequence[str] | None) -> None:
    _, again = _run_eager(model, specs, [case], out_names)
    for name, arr in first.items():
        if not np.array_equal(arr, again[0][name], equal_nan=arr.dtype.kind in "fc"):
            raise CaptureError(
                f"output {name!r} changes between two runs on the same input: the reference is "
                "not deterministic", stage=_STAGE,
                fix="call model.eval() (dropout, batch-norm statistics) and remove randomness from forward()",
            )


def _output_specs(ep: Any, names: list[str], ref: dict[str, np.ndarray],
                  in_specs: list[TensorSpec], axes: dict[str, dict[int, str]]) -> list[TensorSpec]:
    """Output shapes with symbolic dims, read from the exported program's graph."""
    symbols: dict[str, str] = {}
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    user_inputs = [n for n in placeholders if n.name in ep.graph_signature.user_inputs]
    for spec, node in zip(in_specs, user_inputs, strict=False):
        val = node.meta.get("val")
        for axis, label in axes.get(spec.name, {}).items():
            if val is not None and axis < val.ndim:
                symbols[str(val.shape[axis])] = label
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    vals = [getattr(a, "meta", {}).get("val") for a in out_node.args[0]]
    specs = []
    for i, name in enumerate(names):
        arr = ref[name]
        shape: list[int | str] = list(arr.shape)
        val = vals[i] if i < len(vals) else None
        if val is not None and hasattr(val, "shape") and len(val.shape) == arr.ndim:
            for axis, d in enumerate(val.shape):
                text = str(d)
                if not text.lstrip("-").isdigit():
                    for sym, label in symbols.items():
                        text = text.replace(sym, label)
                    shape[axis] = text
        specs.append(TensorSpec(name=name, dtype=str(arr.dtype), shape=tuple(shape)))
    return specs


def capture_torch(model: Any, example_inputs: Any, opts: CaptureOptions, source_dir: Path,
                  scratch: Path | None = None) -> Captured:
    """Export the model, draw the golden set, compute reference outputs, save ``model.pt2``.
    ``scratch``: where a TorchScript trace of the *eager* model goes (never into the bundle),
    for the routes whose converter reads TorchScript (:data:`EAGER_TRACE`).
    Runs in a forked child of the caller where that is safe (see :mod:`portable_models.capture.fork`):
    the tracing machinery's memory stays out of the caller's process."""
    from portable_models.capture.fork import fork_unavailable, run_forked

    if fork_unavailable() is None:
        return run_forked(_capture_torch, model, example_inputs, opts, source_dir, scratch, stage=_STAGE)
    return _capture_torch(model, example_inputs, opts, source_dir, scratch)


def _capture_torch(model: Any, example_inputs: Any, opts: CaptureOptions, source_dir: Path,
                   scratch: Path | None = None) -> Captured:
    import torch

    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"model is a {type(model).__name__}, not a torch.nn.Module", stage=_STAGE,
                         fix="pass the nn.Module itself")
    if model.training:
        raise UsageError("the model is in training mode (dropout and batch norm behave randomly)",
                         stage=_STAGE, fix="call model.eval() before exporting")
    args = _as_args(example_inputs)
    names = _input_names(model, len(args), opts.input_names)
    axes, dims = normalise_dynamic_dims(opts.dynamic_dims)
    in_specs = _input_specs(names, args, axes, opts)
    example = {n: np.ascontiguousarray(to_numpy(a)) for n, a in zip(names, args, strict=True)}
    if opts.samples:
        cases = [{s.name: np.asarray(c[s.name]) for s in in_specs} for c in opts.samples]
    else:
        cases = golden.make_inputs(in_specs, dims, example, cases=opts.cases, seed=opts.seed)
    cases, eval_meta = golden.with_eval_cases(cases, in_specs, opts.eval_samples)
    out_names, outputs = _run_eager(model, in_specs, cases, opts.output_names)
    _check_deterministic(model, in_specs, cases[0], outputs[0], opts.output_names)
    constant = golden.check_outputs(outputs, out_names)
    dynamic_shapes = _as_signature(model, _dynamic_shapes(names, args, axes, dims))
    key, how = _capture_key(model, opts, in_specs, dims, out_names, cases, outputs)
    meta = {"samples": "user" if opts.samples else "example+random", "capture_cache": how,
            "constant_outputs": constant, **eval_meta}
    if scratch is not None:
        meta["eager_trace"] = _trace_eager(model, args, scratch / EAGER_TRACE)
    if key is not None and (out_specs := _cached_capture(key, source_dir)) is not None:
        return Captured(framework="torch", version=package_version("torch") or torch.__version__,
                        source_file=source_dir / "model.pt2", inputs=in_specs, outputs=out_specs, dims=dims,
                        golden_inputs=cases, golden_outputs=outputs, meta={**meta, "capture_cache": "hit"})
    try:
        exportable = model
        if isinstance(model, torch.jit.ScriptModule):  # a TorchScript source: to a program first
            from torch._export.converter import TS2EPConverter

            exportable = TS2EPConverter(model, args).convert().module()
        ep = torch.export.export(exportable, args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        raise CaptureError(f"torch.export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                           stage=_STAGE,
                           fix="make forward() exportable (see the torch.export docs), or check dynamic_dims") from exc
    source_dir.mkdir(parents=True, exist_ok=True)
    path = source_dir / "model.pt2"
    torch.export.save(ep, str(path))
    out_specs = _output_specs(ep, out_names, outputs[0], in_specs, axes)
    if key is not None:
        from portable_models.core import cache
        from portable_models.core.hashing import sha256_path

        cache.store(key, {"outputs": [s.to_dict() for s in out_specs], "sha256": sha256_path(path)}, source_dir)
    return Captured(
        framework="torch", version=package_version("torch") or torch.__version__, source_file=path,
        inputs=in_specs, outputs=out_specs, dims=dims, golden_inputs=cases, golden_outputs=outputs, meta=meta,
    )


def _trace_eager(model: Any, args: tuple[Any, ...], dest: Path) -> dict[str, str]:
    """``torch.jit.trace`` of the eager model on the example inputs, saved at ``dest``: what a
    TorchScript-reading converter (the TorchScript-based ONNX exporter, coremltools' TorchScript
    frontend) is given when it cannot read the captured program, and only then. Tracing the
    program's module instead fails where the eager model traces (TorchScript's alias analysis
    on exported graphs). Best effort: a model that does not trace says why, and those routes
    then fail with that reason. A TorchScript source is saved as it is."""
    import warnings

    import torch

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings: parity judges the trace's routes
            scripted = model if isinstance(model, torch.jit.ScriptModule) else torch.jit.trace(
                model, args, strict=False, check_trace=False)
        dest.parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(scripted, str(dest))
    except Exception as exc:  # any tracing failure only takes those routes away
        return {"error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"}
    return {"file": str(dest)}


def _capture_key(model: Any, opts: CaptureOptions, in_specs: list[TensorSpec], dims: dict[str, DimSpec],
                 out_names: list[str], cases: golden.Cases, outputs: golden.Cases) -> tuple[str | None, str]:
    """The capture cache's key (None when it is off or the model cannot be fingerprinted) and
    what became of it: the key covers the model's fingerprint, the golden inputs and the
    reference outputs just computed from them, the specs and the versions."""
    if not opts.cache:
        return None, "off"
    from portable_models.capture.fingerprint import Unfingerprintable, model_fingerprint
    from portable_models.core import cache

    try:
        fingerprint = model_fingerprint(model)
    except Unfingerprintable as exc:
        return None, f"not used: {exc}"
    parts = {"capture": "torch.export(strict=False)", "model": fingerprint,
             "inputs": [s.to_dict() for s in in_specs], "dims": {k: d.to_dict() for k, d in dims.items()},
             "outputs": out_names, "golden_inputs": golden.cases_digest(cases),
             "golden_outputs": golden.cases_digest(outputs)}
    return cache.attempt_key(parts=parts, packages=("torch",)), "miss"


def _cached_capture(key: str, source_dir: Path) -> list[TensorSpec] | None:
    """The output specs of a stored capture, its ``model.pt2`` copied into ``source_dir``;
    None on a miss (a damaged entry is one)."""
    from portable_models.core import cache
    from portable_models.core.hashing import sha256_path

    record = cache.load(key, source_dir)
    if record is None:
        return None
    path = source_dir / "model.pt2"
    try:
        if sha256_path(path) == record["sha256"]:
            return [TensorSpec.from_dict(d) for d in record["outputs"]]
    except (OSError, KeyError, TypeError, ValueError):
        pass
    path.unlink(missing_ok=True)
    cache.discard(key)
    return None
