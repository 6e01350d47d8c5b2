"""The ``tflite`` target's ``litert-torch`` route, and the helpers both TFLite routes share.

``litert-torch``: ``litert_torch.convert`` of the program's module, wrapped to take
keyword inputs and return a dict, so the signature carries the logical names (a name
that is not an identifier is sanitised; the io map says so). Dynamic dims are tried,
else the artifact is fixed-shape (``meta["dynamic"]``; its shapes in
``meta["input_shapes"]``) — or, when the job says so, the route refuses (:class:`DynamicDimsRefused`) and the pipeline tries the later routes first. int64/float64 io become 32-bit
(``enable_x64=False``): ``meta["io_dtypes"]`` has the physical dtypes.

``litert-torch-pt2e``: the int8 variants, quantised by PT2E with litert-torch's own
quantizer (symmetric, per-channel int8 weights; ``int8-dynamic``: activations quantised at run
time, float io; ``int8``: activation ranges observed on the calibration data, fully integer,
io int8 too: the io map records each io tensor's scale and zero point). Fixed shapes.

The second route, ``onnx2tf``, is in :mod:`portable_models.convert.onnx2tf`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from portable_models.convert.base import ConvertJob, ConvertResult, Step
from portable_models.convert.torch_program import calibration_batches, load_program
from portable_models.core.imports import package_version
from portable_models.core.iomap import Binding, IoMap
from portable_models.errors import ConversionError, PortableModelsError

if TYPE_CHECKING:
    import torch

__all__ = ["convert_litert_torch", "convert_litert_torch_pt2e"]


# -- shared helpers ------------------------------------------------------------------
def _artifact_name(job: ConvertJob) -> str:
    if job.precision == "float16":
        return "model_fp16.tflite"
    if job.precision != "float32":
        raise ConversionError(f"tflite routes make float32 or float16, not {job.precision!r}",
                              stage="convert:tflite")
    return "model.tflite"


def _fail(job: ConvertJob, what: str, exc: BaseException) -> ConversionError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ConversionError(f"{what} failed: {type(exc).__name__}: {first}",
                           file=str(job.source_file), stage=f"convert:{job.route}")


def _load_program(job: ConvertJob) -> Any:
    return load_program(job)


def _torch_samples(job: ConvertJob) -> list[torch.Tensor]:
    import torch

    return [torch.from_numpy(np.ascontiguousarray(job.sample_inputs[n])) for n in job.input_names]


def _dynamic_shapes(job: ConvertJob, names: list[str]) -> dict[str, dict[int, Any]] | None:
    """``torch.export`` dynamic shapes keyed by ``names`` (None: all fixed)."""
    import torch

    dims: dict[str, Any] = {}
    out: dict[str, dict[int, Any]] = {}
    for spec, name in zip(job.inputs, names, strict=True):
        for axis, label in spec.dynamic_axes.items():
            d = job.dims.get(label)
            lo, hi = (d.min, d.max) if d is not None else (1, 64)
            dims.setdefault(label, torch.export.Dim(label, min=lo, max=hi))
            out.setdefault(name, {})[axis] = dims[label]
    return out or None


# -- route 1: litert-torch --------------------------------------------------------------
def _identifiers(names: Sequence[str]) -> list[str]:
    """Keyword-usable names: a name that is not an identifier gets '_' for bad chars."""
    out: list[str] = []
    for name in names:
        safe = re.sub(r"\W", "_", name)
        if not safe.isidentifier() or safe in out or safe == "self":
            safe = f"in_{len(out)}_{safe}"
        out.append(safe)
    return out


def _named_module(inner: Any, in_names: list[str], out_names: list[str]) -> Any:
    """Wrap the program's module: keyword inputs, dict outputs (the signature's names)."""
    import inspect

    import torch
    import torch.utils._pytree as pytree

    class Named(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs: torch.Tensor) -> dict[str, torch.Tensor]:
            flat, _ = pytree.tree_flatten(self.inner(*[kwargs[n] for n in in_names]))
            return dict(zip(out_names, flat, strict=True))  # ValueError if counts differ

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in in_names]
    Named.forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapped = Named()
    wrapped.training = False  # the program's module refuses .eval(); nothing trains here
    return wrapped


def _litert_convert(job: ConvertJob, module: Any, kwargs: dict[str, Any],
                    dyn: dict[str, Any] | None) -> tuple[Any, bool, str]:
    """Convert with dynamic dims, falling back to fixed shapes. -> (model, dynamic, note)."""
    import litert_torch
    from litert_torch.generative.quantize import quant_recipes

    quant = quant_recipes.full_fp16_recipe() if job.precision == "float16" else None
    note = ""
    if dyn:
        try:
            model = litert_torch.convert(module, sample_kwargs=kwargs, dynamic_shapes=dyn,
                                         quant_config=quant)
            return model, True, note
        except Exception as exc:
            note = job.fixed_shapes_instead("litert_torch.convert", f"{type(exc).__name__}: {exc}", exc)
    try:
        model = litert_torch.convert(module, sample_kwargs=kwargs, quant_config=quant)
    except PortableModelsError:
        raise
    except Exception as exc:
        raise _fail(job, "litert_torch.convert", exc) from exc
    return model, False, note


def convert_litert_torch(job: ConvertJob) -> ConvertResult:
    """``litert_torch.convert`` of the captured program -> ``model.tflite``."""
    name = _artifact_name(job)
    inner = _load_program(job).module()
    phys_in = _identifiers(job.input_names)
    module = _named_module(inner, phys_in, job.output_names)
    kwargs = dict(zip(phys_in, _torch_samples(job), strict=True))
    model, dynamic, note = _litert_convert(job, module, kwargs, _dynamic_shapes(job, phys_in))
    job.out_dir.mkdir(parents=True, exist_ok=True)
    dest = job.out_dir / name
    try:
        model.export(str(dest))
    except Exception as exc:
        raise _fail(job, "writing the .tflite", exc) from exc
    io_dtypes = _check_signature(job, dest, phys_in, job.output_names)
    io = IoMap(inputs={k: Binding(name=p) for k, p in zip(job.input_names, phys_in, strict=True)},
               outputs={k: Binding(name=k) for k in job.output_names})
    fp16 = job.precision == "float16"
    meta: dict[str, Any] = {"dynamic": dynamic, "signature": "serving_default",
                            "io_dtypes": io_dtypes, "weights": job.precision,
                            **({"note": note} if note else {}),
                            **({} if dynamic else {"input_shapes": _input_shapes(job, dest, phys_in)})}
    detail = {"dynamic_shapes": dynamic, "enable_x64": False,
              "quant_config": "full_fp16_recipe (fp16 weights)" if fp16 else None}
    steps = [Step(step="litert_torch.convert", version=package_version("litert-torch"),
                  detail=detail)]
    return ConvertResult(file=name, io=io, steps=steps, precision=job.precision, meta=meta)


_PT2E_FILES = {"int8-dynamic": "model_int8_dynamic.tflite", "int8": "model_int8.tflite"}


def convert_litert_torch_pt2e(job: ConvertJob) -> ConvertResult:
    """PT2E quantisation with litert-torch's quantizer, then ``litert_torch.convert``."""
    import litert_torch
    import torch
    from litert_torch.quantize.pt2e_quantizer import (
        PT2EQuantizer,
        get_symmetric_quantization_config,
    )
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if job.precision not in _PT2E_FILES:
        raise ConversionError(f"litert-torch-pt2e makes int8-dynamic or int8, not {job.precision!r}",
                              stage=f"convert:{job.route}")
    dynamic = job.precision == "int8-dynamic"
    phys_in = _identifiers(job.input_names)
    module = _named_module(_load_program(job).module(), phys_in, job.output_names)
    kwargs = dict(zip(phys_in, _torch_samples(job), strict=True))
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True,
                                                                              is_dynamic=dynamic))
    rows = 0
    try:
        prepared = prepare_pt2e(torch.export.export(module, (), kwargs).module(), quantizer)
        with torch.no_grad():
            if dynamic:
                prepared(**kwargs)
            else:
                for feed in calibration_batches(job, phys_in, kwargs):
                    prepared(**feed)
                    rows += int(next(iter(feed.values())).shape[0])
            quantized = convert_pt2e(prepared, fold_quantize=False)
        model = litert_torch.convert(quantized, sample_kwargs=kwargs, quant_config=QuantConfig(pt2e_quantizer=quantizer))
        job.out_dir.mkdir(parents=True, exist_ok=True)
        dest = job.out_dir / _PT2E_FILES[job.precision]
        model.export(str(dest))
    except PortableModelsError:
        raise
    except Exception as exc:
        raise _fail(job, "PT2E quantisation + litert_torch.convert", exc) from exc
    io_dtypes = _check_signature(job, dest, phys_in, job.output_names)
    details = {**dict(zip(("in", "out"), _signature_quant(dest), strict=True))}
    io = IoMap(inputs={k: Binding(name=p, quant=details["in"].get(p)) for k, p in zip(job.input_names, phys_in, strict=True)},
               outputs={k: Binding(name=k, quant=details["out"].get(k)) for k in job.output_names})
    meta: dict[str, Any] = {"dynamic": False, "signature": "serving_default", "io_dtypes": io_dtypes, "weights": "int8",
                            "input_shapes": _input_shapes(job, dest, phys_in)}
    if not dynamic:
        calibration = job.options["calibration"]
        meta["calibration"] = {"sha256": calibration["sha256"], "cases": calibration["cases"], "rows": rows}
    steps = [Step(step="torchao prepare_pt2e/convert_pt2e", version=package_version("torchao"),
                  detail={"quantizer": "litert_torch PT2EQuantizer", "symmetric": True, "per_channel": True,
                          "is_dynamic": dynamic, "calibration_rows": rows}),
             Step(step="litert_torch.convert", version=package_version("litert-torch"),
                  detail={"dynamic_shapes": False, "quant_config": "pt2e_quantizer"})]
    return ConvertResult(file=dest.name, io=io, steps=steps, precision=job.precision, meta=meta)


def _signature_quant(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Per io tensor of the signature that is integer with a scale: its quantisation."""
    from portable_models.run import signature_details

    out = []
    for details in signature_details(path):
        found = {}
        for name, d in details.items():
            scale, zero = d.get("quantization", (0.0, 0))
            if np.dtype(d["dtype"]).kind in "iu" and scale:
                found[name] = {"dtype": np.dtype(d["dtype"]).name, "scale": float(scale), "zero_point": int(zero)}
        out.append(found)
    return out[0], out[1]


def _input_shapes(job: ConvertJob, path: Path, ins: list[str]) -> dict[str, list[int]]:
    """A fixed-shape artifact's input shapes by logical name, as its signature has them:
    the golden cases it is checked on are those of these shapes (the Keras bridge converts
    with a batch of 1 grown to 2, so case 0's shapes would not do)."""
    from portable_models.run import signature_details

    in_details, _ = signature_details(path)
    return {name: [int(d) for d in in_details[phys]["shape"]]
            for name, phys in zip(job.input_names, ins, strict=True)}


def _check_signature(job: ConvertJob, path: Path, ins: list[str],
                     outs: list[str]) -> dict[str, str]:
    """``ensures``: the signature names exactly what the io map will say."""
    from portable_models.run import signature_details

    in_details, out_details = signature_details(path)
    if set(in_details) != set(ins) or set(out_details) != set(outs):
        raise ConversionError(
            f"signature of {path.name} names inputs {sorted(in_details)} and outputs "
            f"{sorted(out_details)}, expected {sorted(ins)} and {sorted(outs)}",
            file=str(path), stage=f"convert:{job.route}")
    details = {**in_details, **out_details}
    return {k: np.dtype(v["dtype"]).name for k, v in details.items()}
