"""ONNX as a source: the graph says the inputs and outputs; onnxruntime (in a worker)
gives the reference outputs; the file is copied into ``source/model.onnx``.

External data is checked before onnx or onnxruntime opens the file: every location must
stay inside the model's own folder (no ``..``, no absolute path, no symlink out).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.capture import Captured
from portable_models.core import golden
from portable_models.core.imports import package_version
from portable_models.core.onnx_io import check_external_data, load_graph
from portable_models.core.spec import DimSpec, TensorSpec, normalise_dynamic_dims
from portable_models.errors import CaptureError, UsageError

__all__ = ["OnnxModelFile", "capture_onnx", "graph_specs"]

_STAGE = "capture"


@dataclass(frozen=True)
class OnnxModelFile:
    """An ONNX model on disk, handed to :func:`portable_models.export` as the model."""

    path: Path


def _dtype(elem_type: int) -> str:
    from onnx.helper import tensor_dtype_to_np_dtype

    return str(np.dtype(tensor_dtype_to_np_dtype(elem_type)))


def _shape(value_info: Any) -> tuple[int | str, ...]:
    dims: list[int | str] = []
    for i, d in enumerate(value_info.type.tensor_type.shape.dim):
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or f"dim_{value_info.name}_{i}"))
    return tuple(dims)


def graph_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs (initializers excluded) and outputs as declared by the graph."""
    model = load_graph(path)
    init = {t.name for t in model.graph.initializer}
    ins = [TensorSpec(name=v.name, dtype=_dtype(v.type.tensor_type.elem_type), shape=_shape(v))
           for v in model.graph.input if v.name not in init]
    outs = [TensorSpec(name=v.name, dtype=_dtype(v.type.tensor_type.elem_type), shape=_shape(v))
            for v in model.graph.output]
    return ins, outs


def _copy(src: Path, source_dir: Path, extra: list[str]) -> Path:
    source_dir.mkdir(parents=True, exist_ok=True)
    dest = source_dir / "model.onnx"
    shutil.copyfile(src, dest)
    for rel in extra:
        (source_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.parent / rel, source_dir / rel)
    return dest


def _reference(model_file: Path, specs: list[TensorSpec], outs: list[TensorSpec],
               cases: golden.Cases) -> golden.Cases:
    """The source's outputs, from onnxruntime in an isolated worker."""
    from portable_models.core.iomap import IoMap
    from portable_models.isolation.pool import JobFailed, shared_pool

    scratch = Path(tempfile.mkdtemp(prefix="portable-models-ref-"))
    try:
        golden.save_cases(scratch / "in.npz", cases, compress=False)
        io = IoMap.identity([s.name for s in specs], [o.name for o in outs])
        result, _ = shared_pool().call(
            kind="run", framework="none", step="capture:onnxruntime", work_dir=scratch / "run",
            log=scratch / "ref.log",
            payload={"runtime": "onnxruntime", "artifact": str(model_file), "io": io.to_dict(),
                     "inputs": str(scratch / "in.npz"), "out": str(scratch / "out.bin")})
        return golden.unpack_outputs(result, scratch / "out.bin")
    except JobFailed as failed:
        raise CaptureError(f"onnxruntime could not run the source model: {failed.error.message}",
                           file=str(model_file), stage=_STAGE, fix="check the model with onnxruntime") from failed
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def capture_onnx(src: OnnxModelFile, example_inputs: Any, copts: Any, source_dir: Path) -> Captured:
    path = Path(src.path)
    extra = check_external_data(path)
    ins, outs = graph_specs(path)
    if copts.input_names and list(copts.input_names) != [s.name for s in ins]:
        raise UsageError(f"an ONNX source keeps its own input names {[s.name for s in ins]}",
                         file=str(path), stage=_STAGE, fix="leave --input names as the graph has them")
    axes, dims = normalise_dynamic_dims(copts.dynamic_dims)
    for s in ins:
        for d in s.shape:
            if isinstance(d, str):
                dims.setdefault(d, DimSpec(name=d))
    ins = [TensorSpec(name=s.name, dtype=s.dtype, layout=copts.layouts.get(s.name),
                      range=copts.input_ranges.get(s.name),
                      shape=tuple(axes.get(s.name, {}).get(i, d) for i, d in enumerate(s.shape)))
           for s in ins]
    arrays = list(example_inputs) if isinstance(example_inputs, (tuple, list)) else [example_inputs]
    if len(arrays) != len(ins):
        raise UsageError(f"{len(arrays)} example inputs for {len(ins)} graph inputs", file=str(path),
                         stage=_STAGE, fix=f"the graph takes {', '.join(s.name for s in ins)}")
    example = {s.name: np.asarray(a) for s, a in zip(ins, arrays, strict=True)}
    cases = ([{s.name: np.asarray(c[s.name]) for s in ins} for c in copts.samples] if copts.samples
             else golden.make_inputs(ins, dims, example, cases=copts.cases, seed=copts.seed))
    cases, eval_meta = golden.with_eval_cases(cases, ins, copts.eval_samples)
    model_file = _copy(path, source_dir, extra)
    outputs = _reference(model_file, ins, outs, cases)
    constant = golden.check_outputs(outputs, [o.name for o in outs])
    out_specs = [TensorSpec(name=o.name, dtype=str(outputs[0][o.name].dtype), shape=o.shape) for o in outs]
    return Captured(framework="onnx", version=package_version("onnx"), source_file=model_file,
                    inputs=ins, outputs=out_specs, dims=dims, golden_inputs=cases, golden_outputs=outputs,
                    meta={"samples": "user" if copts.samples else "example+random", "external_data": extra,
                          "constant_outputs": constant, **eval_meta})
