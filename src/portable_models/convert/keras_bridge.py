"""Bridge routes: a Keras model reloaded on the torch backend is a ``torch.nn.Module``, so
every PyTorch route is a route for a Keras source too.

They run in "keras-torch" workers (``KERAS_BACKEND=torch``; the backend is fixed per
process). Each reloads ``source/model.keras`` with ``safe_mode=True``, wraps it so that
it takes the logical inputs positionally and returns a flat tuple of the logical
outputs (Keras's flattening order, the capture's order), ``torch.export``s it with the
named dynamic dims as ``torch.export.Dim(label, min, max)``, saves the program as a
``.pt2`` in the work folder and hands a copy of the job, whose ``source_file`` is that
``.pt2``, to the PyTorch route named in the table below. The steps start with
``keras->torch bridge`` and ``torch.export.export``.

Inputs keep the Keras layout (NHWC): the torch-backend model takes the same tensors,
so the io map has no perm unless the PyTorch route adds one. The export traces
with Keras's channels-last memory format for convolutions turned off (same values,
plain contiguous tensors that every PyTorch route takes). ``torch.export``
specialises a dim whose example size is 1, so the program is exported, and the
PyTorch route run, on the sample inputs with every dynamic dim of size 1 repeated to
size 2 (within its bounds); an artifact the PyTorch route makes fixed-shape
(``meta["dynamic"] is False``) therefore takes those grown shapes, which the bridge records
as ``meta["input_shapes"]`` unless the route did (the golden cases it is checked on are
those of these shapes). A worker exports each source once and reuses the program
for the later bridge routes of the same export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.convert.base import ConvertJob, ConvertResult, Step
from portable_models.core.imports import load_impl, package_version
from portable_models.core.keras_io import flat_outputs, load_saved, pack_inputs, require_backend
from portable_models.errors import ConversionError, PortableModelsError

__all__ = [
    "TORCH_ROUTES",
    "convert_bridge_onnx",
    "convert_bridge_torchscript",
    "convert_bridge_xnnpack",
    "convert_bridge_portable",
    "convert_bridge_litert",
    "convert_bridge_coreml_export",
    "convert_bridge_coreml_trace",
]

#: bridge function -> the PyTorch route it hands the exported program to.
TORCH_ROUTES = {
    "onnx": "portable_models.convert.onnx:convert_torch_onnx",
    "torchscript": "portable_models.convert.torchscript:convert_trace",
    "xnnpack": "portable_models.convert.executorch:convert_xnnpack",
    "portable": "portable_models.convert.executorch:convert_portable",
    "litert": "portable_models.convert.tflite:convert_litert_torch",
    "coreml_export": "portable_models.convert.coreml:convert_from_export",
    "coreml_trace": "portable_models.convert.coreml:convert_from_trace",
}

#: per worker process: (variant, source, size, mtime, specs) -> (saved .pt2, seconds it took)
_EXPORTED: dict[str, tuple[Path, float]] = {}
#: per worker process: the last source's exported program, before any rewrite
_RAW: dict[str, Any] = {}


def convert_bridge_onnx(job: ConvertJob) -> ConvertResult:
    return _bridge(job, "onnx")


def convert_bridge_torchscript(job: ConvertJob) -> ConvertResult:
    return _bridge(job, "torchscript")


def convert_bridge_xnnpack(job: ConvertJob) -> ConvertResult:
    return _bridge(job, "xnnpack")


def convert_bridge_portable(job: ConvertJob) -> ConvertResult:
    return _bridge(job, "portable")


def convert_bridge_litert(job: ConvertJob) -> ConvertResult:
    return _bridge(job, "litert")


def convert_bridge_coreml_export(job: ConvertJob) -> ConvertResult:
    return _bridge(job, "coreml_export")


def convert_bridge_coreml_trace(job: ConvertJob) -> ConvertResult:
    return _bridge(job, "coreml_trace")


# -- the bridge ------------------------------------------------------------------------------
def _bridge(job: ConvertJob, which: str) -> ConvertResult:
    _check_backend(job)
    samples = export_samples(job)
    slices = which in ("xnnpack", "portable")
    pt2, seconds, reused = _program(job, samples, split_as_slices=slices)
    route = load_impl(TORCH_ROUTES[which])
    result: ConvertResult = route(dataclasses.replace(job, source_file=pt2, sample_inputs=samples))
    dynamic = {k: [d.min, d.max] for k, d in job.dims.items()}
    result.steps = [
        Step(step="keras->torch bridge", version=package_version("keras"),
             detail={"backend": "torch", "reload": "keras.saving.load_model(safe_mode=True)"}),
        Step(step="torch.export.export", version=package_version("torch"),
             detail={"strict": False, "dynamic_dims": dynamic, "memory_format": "contiguous",
                     "aliases": "subtract/divide/multiply -> sub/div/mul",
                     **({"split_as_slices": True} if slices else {})}),
        *result.steps,
    ]
    result.meta = {**result.meta, "bridge": {"torch_route": TORCH_ROUTES[which],
                                             "export_s": round(seconds, 3),
                                             "program_reused": reused}}
    if result.meta.get("dynamic") is False:  # fixed at the grown samples' shapes, not case 0's
        result.meta.setdefault("input_shapes", {k: list(v.shape) for k, v in samples.items()})
    return result


def _check_backend(job: ConvertJob) -> None:
    require_backend(job.route, "torch", "keras-torch", "keras,torch")


def export_samples(job: ConvertJob) -> dict[str, np.ndarray]:
    """The sample inputs with every dynamic dim of size 1 repeated to size 2 (when its
    bounds allow): ``torch.export`` would specialise a size-1 dim."""
    grow = {label for label, d in job.dims.items() if d.max >= 2}
    out: dict[str, np.ndarray] = {}
    for spec in job.inputs:
        arr = np.asarray(job.sample_inputs[spec.name])
        for axis, label in spec.dynamic_axes.items():
            if label in grow and axis < arr.ndim and arr.shape[axis] == 1:
                arr = np.repeat(arr, 2, axis=axis)
        out[spec.name] = np.ascontiguousarray(arr)
    return out


def _cache_key(job: ConvertJob, variant: str) -> str:
    st = job.source_file.stat()
    return json.dumps([variant, str(job.source_file), st.st_size, st.st_mtime_ns,
                       [s.to_dict() for s in job.inputs], [s.to_dict() for s in job.outputs],
                       {k: d.to_dict() for k, d in job.dims.items()},
                       bool(job.options.get("trust_model"))], sort_keys=True)


def _program(job: ConvertJob, samples: dict[str, np.ndarray], *,
             split_as_slices: bool) -> tuple[Path, float, bool]:
    """The saved ``.pt2`` of the torch-backend model. A worker exports a source once
    and writes each variant (plain, split-as-slices) once."""
    import torch

    key = _cache_key(job, "slices" if split_as_slices else "plain")
    cached = _EXPORTED.get(key)
    if cached is not None and cached[0].is_file():
        return cached[0], cached[1], True
    start = time.perf_counter()
    raw = _raw_program(job, samples)
    ep = _normalise(raw, split_as_slices=split_as_slices)
    path = job.work_dir / "bridge" / "model.pt2"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, str(path))
    seconds = time.perf_counter() - start
    _EXPORTED[key] = (path, seconds)
    return path, seconds, False


def _raw_program(job: ConvertJob, samples: dict[str, np.ndarray]) -> Any:
    """``torch.export`` of the reloaded model, kept in memory for the other variants."""
    import torch

    key = _cache_key(job, "raw")
    if key not in _RAW:
        model = load_saved(job.source_file, trust=bool(job.options.get("trust_model")),
                           stage=f"convert:{job.route}",
                           modules=list(job.options.get("keras_custom_modules") or ()))
        args = tuple(torch.from_numpy(samples[s.name].copy()) for s in job.inputs)
        _RAW.clear()  # one source at a time: programs hold the weights
        _RAW[key] = _export(job, _flat_module(model, job), args)
    return _RAW[key]


def _flat_module(model: Any, job: ConvertJob) -> Any:
    """The Keras model as a module: positional logical inputs -> flat tuple of outputs."""
    import torch

    specs = list(job.inputs)

    class KerasFlat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.model(pack_inputs(self.model, list(args), specs), training=False)
            return tuple(flat_outputs(out))

    module = KerasFlat().eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def _export(job: ConvertJob, module: Any, args: tuple[Any, ...]) -> Any:
    import torch

    made = {k: torch.export.Dim(k, min=d.min, max=d.max) for k, d in job.dims.items()}
    per_input = tuple({axis: made[label] for axis, label in s.dynamic_axes.items()} or None
                      for s in job.inputs)
    dynamic = {"args": per_input} if any(per_input) else None
    try:
        with torch.no_grad(), _contiguous_convolutions():
            ep = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
    except PortableModelsError:
        raise
    except Exception as exc:  # torch.export's own failure fails this route only
        first = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
        raise ConversionError(
            f"torch.export of the torch-backend Keras model failed: {type(exc).__name__}: {first}",
            file=str(job.source_file), stage=f"convert:{job.route}",
            fix="see the log; a layer whose torch-backend code is not exportable needs a TF route",
        ) from exc
    outs = next(n for n in ep.graph.nodes if n.op == "output").args[0]
    if len(outs) != len(job.outputs):
        raise ConversionError(f"the exported program has {len(outs)} outputs, the capture "
                              f"{len(job.outputs)}", stage=f"convert:{job.route}")
    return ep


@contextlib.contextmanager
def _contiguous_convolutions() -> Iterator[None]:
    """Keras's torch backend moves convolution inputs and kernels to
    ``torch.channels_last`` memory (a speed-up in eager mode). In an exported program those
    strides turn into channels-last dim orders that ExecuTorch's kernels reject at run time
    (``_clone_dim_order`` / ``permute_copy``: error 0x12). The values are the same either
    way, so the export traces with the conversion turned off."""
    try:
        from keras.src.backend.torch import nn as torch_nn
    except ImportError:
        yield
        return
    original = getattr(torch_nn, "_maybe_convert_to_channels_last", None)
    if original is None:
        yield
        return
    torch_nn._maybe_convert_to_channels_last = lambda tensor: tensor
    try:
        yield
    finally:
        torch_nn._maybe_convert_to_channels_last = original


def _normalise(ep: Any, *, split_as_slices: bool) -> Any:
    """Rewrite what some PyTorch routes trip over, values unchanged:

    * the aliases Keras's torch backend calls (``aten.subtract`` / ``divide`` /
      ``multiply``) become ``sub`` / ``div`` / ``mul`` (coremltools' torch.export
      frontend: "Unsupported fx node subtract");
    * for ExecuTorch, ``split`` / ``chunk`` / ``split_with_sizes`` along a fixed dim
      become slices (Keras's LSTM/GRU cells chunk their gates): ExecuTorch's edge dtype
      verifier takes a single ``Tensor[]`` return for several returns and calls ``len()``
      on the first tensor, which guards its dim 0, so a dynamic batch would be fixed at
      the example size."""
    import torch

    aten = torch.ops.aten
    table: dict[Any, Any] = {}
    used = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    aliases = {aten.subtract.Tensor: aten.sub.Tensor, aten.divide.Tensor: aten.div.Tensor,
               aten.multiply.Tensor: aten.mul.Tensor}
    for alias, op in aliases.items():
        if alias in used:
            table[alias] = op
    if split_as_slices:
        table.update(_slicing_table(ep))
    return ep.run_decompositions(table) if table else ep


def _slicing_table(ep: Any) -> dict[Any, Any]:
    import torch

    aten = torch.ops.aten
    kinds = {aten.split.Tensor, aten.chunk.default, aten.split_with_sizes.default}
    splits = [n for n in ep.graph.nodes if n.op == "call_function" and n.target in kinds]
    if not splits or not all(_static_split(n) for n in splits):
        return {}

    def by_sizes(x: torch.Tensor, sizes: list[int], dim: int = 0) -> list[torch.Tensor]:
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [aten.slice.Tensor(x, dim, a, a + n) for a, n in zip(starts, sizes, strict=True)]

    def by_size(x: torch.Tensor, size: int, dim: int = 0) -> list[torch.Tensor]:
        total = int(x.shape[dim])
        return by_sizes(x, [min(size, total - a) for a in range(0, total, size)], dim)

    return {aten.split.Tensor: by_size, aten.split_with_sizes.default: by_sizes}


def _static_split(node: Any) -> bool:
    val = node.args[0].meta.get("val")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return val is not None and isinstance(val.shape[dim], int)
