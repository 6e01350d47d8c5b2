"""The ``onnx`` target from a captured torch program: ``torch.onnx.export(dynamo=True)``, and
the TorchScript-based exporter on the eager model's trace where the first route fails.

requires: torch, onnx, onnxscript (the route table checks they are installed).
convert:  ``torch.onnx.export(ep, (), model.onnx, dynamo=True)`` from the
          ExportedProgram loaded with ``torch.export.load``; inputs and outputs are
          named with the logical names; the weights stay inside the one file unless
          they pass the 2 GiB protobuf limit (then ``model.onnx.data`` sits next to it).
ensures:  ``onnx.checker.check_model`` passes; the graph has one input per logical
          input, one output per logical output; every dynamic dim of an input is a
          ``dim_param`` (renamed from the exporter's ``s77`` to the DimSpec label, e.g.
          ``batch``) and every fixed dim has the captured size.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from portable_models.convert.base import ConvertJob, ConvertResult, Step
from portable_models.convert.torch_program import load_eager_trace, load_program
from portable_models.core.imports import package_version
from portable_models.core.iomap import Binding, IoMap
from portable_models.errors import ConversionError, MissingDependencyError, PortableModelsError

if TYPE_CHECKING:
    from onnx import ModelProto, ValueInfoProto
    from torch.export import ExportedProgram

__all__ = ["convert_onnx_passthrough", "convert_torch_onnx", "convert_torch_onnx_legacy"]

ARTIFACT = "model.onnx"
#: above this many bytes of weights the exporter must write external data.
_EXTERNAL_DATA_BYTES = 1_900_000_000
#: the TorchScript-based exporter's opset where the options name none (its newest well-trodden one)
_LEGACY_OPSET = 17


def convert_torch_onnx(job: ConvertJob) -> ConvertResult:
    """ExportedProgram (``job.source_file``) -> ``job.out_dir / model.onnx``."""
    onnx = _import_onnx(job)
    ep = load_program(job)
    path = job.out_dir / ARTIFACT
    external = _weight_bytes(ep) > _EXTERNAL_DATA_BYTES
    _export(job, ep, path, external)
    return _finish(job, onnx, path, {"dynamo": True, "onnxscript": package_version("onnxscript"),
                                      "external_data": external}, external)


def convert_torch_onnx_legacy(job: ConvertJob) -> ConvertResult:
    """The eager model's TorchScript trace (made at capture) -> ``model.onnx`` through the
    TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, still in this torch).

    Why a second exporter: the dynamo exporter decomposes the *program* and refuses what it
    cannot decompose (``view`` of a tensor whose strides the decomposition does not allow:
    relative-position and shifted-window attention); the TorchScript exporter translates the
    traced graph op by op with its own symbolic functions and has no such step. The dynamic
    dims become ``dynamic_axes`` named with their labels; parity on every golden case (of
    several sizes) judges whether the trace kept them."""
    import torch

    onnx = _import_onnx(job)
    module = load_eager_trace(job)
    path = job.out_dir / ARTIFACT
    path.parent.mkdir(parents=True, exist_ok=True)
    args = tuple(torch.from_numpy(job.sample_inputs[s.name].copy()) for s in job.inputs)
    axes = {s.name: dict(s.dynamic_axes) for s in [*job.inputs, *job.outputs] if s.dynamic_axes}
    opset = int(job.options.get("opset") or _LEGACY_OPSET)
    try:
        with torch.no_grad():
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=job.input_names,
                              output_names=job.output_names, dynamic_axes=axes or None, opset_version=opset,
                              do_constant_folding=True)
    except Exception as exc:  # any exporter failure fails this route only
        raise ConversionError(f"torch.onnx.export(dynamo=False) failed: {type(exc).__name__}: {exc}",
                              file=str(job.source_file), stage=f"convert:{job.route}",
                              fix="see the log; the other ONNX route was tried first") from exc
    return _finish(job, onnx, path, {"dynamo": False, "source": "torch.jit.trace of the eager model, at capture",
                                      "dynamic_axes": {k: {str(a): v for a, v in d.items()} for k, d in axes.items()}},
                   external=False)


def _finish(job: ConvertJob, onnx: Any, path: Path, detail: dict[str, Any], external: bool) -> ConvertResult:
    """What every torch ONNX route checks and records of the file it wrote: the dims named
    with their labels, one input and output per logical one, the checker's approval."""
    if not path.is_file():
        raise ConversionError("the exporter wrote no file", stage=f"convert:{job.route}")
    model = onnx.load(str(path), load_external_data=False)
    renamed = _rename_dims(model, job)
    io = IoMap(inputs=_bind(job, model.graph.input, job.input_names, "input"),
               outputs=_bind(job, model.graph.output, job.output_names, "output"))
    _check_input_shapes(job, model)
    if renamed:
        onnx.save(model, str(path))
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ConversionError(f"the exported ONNX model is invalid: {exc}", file=str(path),
                              stage=f"convert:{job.route}") from exc
    opset = _opset(model)
    meta: dict[str, Any] = {
        "opset": opset,
        "ir_version": int(model.ir_version),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "dim_params": renamed,
        "external_data": f"{ARTIFACT}.data" if external else None,
    }
    step = Step(step="torch.onnx.export", version=package_version("torch"),
                detail={"dynamo": detail.pop("dynamo"), "opset": opset, **detail})
    return ConvertResult(file=ARTIFACT, io=io, steps=[step], precision="float32", meta=meta)


def _import_onnx(job: ConvertJob) -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError(f"onnx is not importable: {exc}",
                                     stage=f"convert:{job.route}",
                                     fix="pip install 'portable-models[onnx]'") from exc
    return onnx


def _weight_bytes(ep: ExportedProgram) -> int:
    import torch

    tensors = list(ep.state_dict.values()) + list(ep.constants.values())
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _export(job: ConvertJob, ep: ExportedProgram, path: Path, external: bool) -> None:
    import torch

    kwargs: dict[str, Any] = {}
    if job.options.get("opset") is not None:
        kwargs["opset_version"] = int(job.options["opset"])
    job.work_dir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.onnx.export(
            ep, (), str(path), dynamo=True,
            input_names=job.input_names, output_names=job.output_names,
            external_data=external, optimize=True, verify=False, report=False,
            artifacts_dir=str(job.work_dir), **kwargs,
        )
    except PortableModelsError:
        raise
    except Exception as exc:  # any exporter failure fails this target only
        raise ConversionError(
            f"torch.onnx.export failed: {type(exc).__name__}: {exc}",
            file=str(job.source_file), stage=f"convert:{job.route}",
            fix="see logs/onnx.log; an unsupported operator needs a custom translation "
                "or another target",
        ) from exc


def _symbol_map(job: ConvertJob, model: ModelProto) -> dict[str, str]:
    """Exporter symbol (``s77``) -> DimSpec label (``batch``), read off the inputs."""
    found: dict[str, str] = {}
    for spec, value in zip(job.inputs, model.graph.input, strict=False):
        dims = value.type.tensor_type.shape.dim
        for axis, label in spec.dynamic_axes.items():
            if axis < len(dims) and dims[axis].dim_param:
                found.setdefault(dims[axis].dim_param, label)
    return {sym: label for sym, label in found.items() if sym != label}


def _rename_dims(model: ModelProto, job: ConvertJob) -> dict[str, str]:
    """Rename the exporter's dim symbols to the DimSpec labels everywhere in the main
    graph (inputs, outputs, value_info; expressions such as ``2*s77`` included)."""
    mapping = _symbol_map(job, model)
    if not mapping:
        return {}
    pattern = re.compile(r"\b(" + "|".join(re.escape(s) for s in mapping) + r")\b")
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: mapping[m.group(1)], dim.dim_param)
    return mapping


def _bind(job: ConvertJob, values: Any, logical: list[str], kind: str) -> dict[str, Binding]:
    """Logical -> physical by position (the exporter keeps the flat order); the
    physical names are normally the logical ones."""
    physical = [v.name for v in values]
    if len(physical) != len(logical):
        raise ConversionError(
            f"the ONNX graph has {len(physical)} {kind}s {physical}, the program "
            f"{len(logical)} {logical}",
            stage=f"convert:{job.route}",
            fix=f"an unused {kind} may have been dropped; remove it from the model",
        )
    return {name: Binding(name=phys) for name, phys in zip(logical, physical, strict=True)}


def _check_input_shapes(job: ConvertJob, model: ModelProto) -> None:
    """Every logical dynamic dim is symbolic in the graph, every fixed dim matches."""
    for spec, value in zip(job.inputs, model.graph.input, strict=True):
        dims = _dims(value)
        if len(dims) != spec.rank:
            raise ConversionError(f"ONNX input {value.name!r} has rank {len(dims)}, "
                                  f"expected {spec.rank}", stage=f"convert:{job.route}")
        for axis, (want, got) in enumerate(zip(spec.shape, dims, strict=True)):
            if isinstance(want, str) and not isinstance(got, str):
                raise ConversionError(
                    f"ONNX input {value.name!r} axis {axis} ({want!r}) was fixed to {got}",
                    stage=f"convert:{job.route}",
                    fix="the dim was specialised at capture; check the dynamic_dims bounds",
                )
            if isinstance(want, int) and isinstance(got, int) and want != got:
                raise ConversionError(
                    f"ONNX input {value.name!r} axis {axis} is {got}, expected {want}",
                    stage=f"convert:{job.route}")


def _dims(value: ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.dim_param else int(d.dim_value)
            for d in value.type.tensor_type.shape.dim]


def _opset(model: ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ConversionError("the ONNX model imports no default-domain opset")


def convert_onnx_passthrough(job: ConvertJob) -> ConvertResult:
    """An ONNX source is already the ONNX artifact: copy it (and its external data), check it."""
    import shutil

    import onnx

    from portable_models.core.onnx_io import check_external_data

    extra = check_external_data(job.source_file)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    dest = job.out_dir / "model.onnx"
    shutil.copyfile(job.source_file, dest)
    for rel in extra:
        (job.out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(job.source_file.parent / rel, job.out_dir / rel)
    onnx.checker.check_model(str(dest))
    opset = next((o.version for o in onnx.load(str(dest), load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")), None)
    meta: dict[str, object] = {"opset": opset}
    if extra:
        meta["external_data"] = extra[0] if len(extra) == 1 else extra
    return ConvertResult(file="model.onnx", io=IoMap.identity(job.input_names, job.output_names),
                         steps=[Step(step="copy of the ONNX source", version=package_version("onnx"),
                                     detail={"opset": opset})], meta=meta)
