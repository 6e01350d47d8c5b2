"""The ``tflite`` target's ``onnx2tf`` route.

ONNX (the ONNX artifact, else ``torch.onnx.export`` into work_dir) -> onnx2tf (a
SavedModel) -> ``tf.lite.TFLiteConverter`` from that SavedModel (onnx2tf's own .tflite
files carry no signature). onnx2tf makes 3-D/4-D/5-D inputs channel-last and may rename,
reorder and transpose outputs: the io map comes from one run on the sample inputs,
matching outputs to the source's by shape and values (``meta["io_matching"]``). onnx2tf
gets local ``.npy`` samples and runs inside the work folder, where its "download test
images" step finds a local file instead.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.convert.base import ConvertJob, ConvertResult, Step
from portable_models.convert.tflite import _artifact_name, _fail, _load_program, _torch_samples
from portable_models.core.imports import package_version
from portable_models.core.iomap import Binding, IoMap
from portable_models.errors import ConversionError, PortableModelsError

__all__ = ["convert_onnx2tf"]

# onnx2tf makes inputs of these ranks channel-last.
_TRANSPOSED_RANKS = (3, 4, 5)
_CHANNEL_LAST = {"NCW": "NWC", "NCHW": "NHWC", "NCDHW": "NDHWC"}
# onnx2tf reads this file from the working directory instead of downloading it.
_ONNX2TF_TEST_IMAGES = "calibration_image_sample_data_20x128x128x3_float32.npy"


def _perm_to_last(rank: int) -> tuple[int, ...]:
    return (0, *range(2, rank), 1)


def _reference_outputs(module: Any, job: ConvertJob) -> list[np.ndarray]:
    """The source program's outputs on the sample inputs, flattened in logical order."""
    import torch
    import torch.utils._pytree as pytree

    with torch.no_grad():
        flat, _ = pytree.tree_flatten(module(*_torch_samples(job)))
    return [t.detach().cpu().numpy() for t in flat]


def _export_onnx(job: ConvertJob, program: Any, static: bool) -> tuple[Path, list[Step]]:
    """``torch.onnx.export`` into work_dir. ``static``: the program exported again without
    dynamic shapes first, so that shape computations fold to constants."""
    import torch

    path = job.work_dir / ("onnx_static" if static else "onnx") / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if static:
            program = torch.export.export(program.module(), tuple(_torch_samples(job)))
        torch.onnx.export(program, (), str(path), dynamo=True, external_data=False,
                          input_names=job.input_names, output_names=job.output_names,
                          artifacts_dir=str(job.work_dir))
    except Exception as exc:
        raise _fail(job, "torch.onnx.export", exc) from exc
    return path, [Step(step="torch.onnx.export", version=package_version("torch"),
                       detail={"dynamo": True, "fixed_shapes": static})]


def _onnx_source(job: ConvertJob, program: Any) -> tuple[Path, list[Step]]:
    """The ONNX file to start from: the ONNX source or artifact, or a fresh export in work_dir."""
    if program is None:  # the source itself is ONNX
        return job.source_file, [Step(step="ONNX source", version=package_version("onnx"))]
    prior = job.prior_artifacts.get("onnx")
    if prior is not None and Path(prior).is_file():
        return Path(prior), [Step(step="onnx artifact", version=package_version("onnx"),
                                  detail={"file": Path(prior).name})]
    return _export_onnx(job, program, static=False)


def _onnx_input_names(job: ConvertJob, path: Path) -> list[str]:
    """ONNX graph inputs; they follow the program's flattened order."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    ins = [i.name for i in graph.input if i.name not in inits]
    outs = [o.name for o in graph.output]
    if len(ins) != len(job.inputs) or len(outs) != len(job.outputs):
        raise ConversionError(
            f"{path.name} has {len(ins)} inputs / {len(outs)} outputs, the program has "
            f"{len(job.inputs)} / {len(job.outputs)}", file=str(path), stage="convert:onnx2tf")
    return ins


def _onnx2tf_name(onnx_name: str) -> str:
    """How onnx2tf renames a graph input (with output_signaturedefs)."""
    return re.sub("^/", "wa/", onnx_name.replace(":", "__"))


def _write_samples(job: ConvertJob, onnx_ins: list[str], folder: Path) -> list[list[str]]:
    """Sample inputs as .npy in onnx2tf's (channel-last) order, plus the local stand-in
    for the test images onnx2tf would otherwise download."""
    params: list[list[str]] = []
    stand_in: np.ndarray | None = None
    for spec, onnx_name in zip(job.inputs, onnx_ins, strict=True):
        arr = np.asarray(job.sample_inputs[spec.name])
        if arr.ndim in _TRANSPOSED_RANKS:
            arr = np.ascontiguousarray(np.transpose(arr, _perm_to_last(arr.ndim)))
        path = folder / f"sample_{len(params)}.npy"
        np.save(path, arr)
        params.append([_onnx2tf_name(onnx_name), str(path)])
        if stand_in is None and arr.ndim == 4 and arr.dtype.kind == "f":
            stand_in = arr.astype(np.float32)
    if stand_in is None:
        stand_in = np.zeros((1, 8, 8, 3), dtype=np.float32)
    np.save(folder / _ONNX2TF_TEST_IMAGES, stand_in)
    return params


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    """Run with ``folder`` as the working directory (onnx2tf writes and reads there)."""
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def _run_onnx2tf(job: ConvertJob, onnx_path: Path, folder: Path,
                 tag: str) -> tuple[Path, list[str]]:
    """onnx2tf into ``folder/tag``. -> (SavedModel folder, ONNX input names)."""
    import onnx2tf

    onnx_ins = _onnx_input_names(job, onnx_path)
    samples = _write_samples(job, onnx_ins, folder)
    saved = folder / tag
    try:
        with _inside(folder):
            onnx2tf.convert(input_onnx_file_path=str(onnx_path), output_folder_path=str(saved),
                            output_signaturedefs=True, custom_input_op_name_np_data_path=samples,
                            not_use_onnxsim=True, verbosity="info")
    except PortableModelsError:
        raise
    except SystemExit as exc:  # onnx2tf calls sys.exit(1) on many errors
        raise _fail(job, "onnx2tf", RuntimeError(f"onnx2tf exited with {exc.code}")) from exc
    except Exception as exc:
        raise _fail(job, "onnx2tf", exc) from exc
    if not (saved / "saved_model.pb").is_file():
        raise ConversionError("onnx2tf wrote no SavedModel (see the log for its error)",
                              file=str(onnx_path), stage="convert:onnx2tf")
    return saved, onnx_ins


def _onnx2tf_any_shape(job: ConvertJob, program: Any,
                       folder: Path) -> tuple[Path, list[str], list[Step], dict[str, Any]]:
    """onnx2tf on the ONNX with its dynamic dims; if that fails, on a fixed-shape ONNX.
    -> (SavedModel, ONNX input names, steps so far, what happened)."""
    onnx_path, steps = _onnx_source(job, program)
    try:
        saved, onnx_ins = _run_onnx2tf(job, onnx_path, folder, "saved_model")
        return saved, onnx_ins, steps, {"dynamic_attempt": "ok"}
    except ConversionError as exc:
        if program is None or not any(s.dynamic_axes for s in job.inputs):
            raise
        first = exc
    static_path, steps = _export_onnx(job, program, static=True)
    try:
        saved, onnx_ins = _run_onnx2tf(job, static_path, folder, "saved_model_static")
    except ConversionError as exc:
        raise exc from first
    fixed = {n: list(np.shape(job.sample_inputs[n])) for n in job.input_names}
    return saved, onnx_ins, steps, {"dynamic_attempt": first.message, "fixed_shapes": fixed}


def _saved_model_to_tflite(job: ConvertJob, saved: Path, dest: Path) -> None:
    """TFLiteConverter from onnx2tf's SavedModel: keeps the serving_default signature."""
    import tensorflow as tf

    try:
        conv = tf.lite.TFLiteConverter.from_saved_model(str(saved),
                                                        signature_keys=["serving_default"])
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                          tf.lite.OpsSet.SELECT_TF_OPS]
        if job.precision == "float16":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.target_spec.supported_types = [tf.float16]
        dest.write_bytes(conv.convert())
    except Exception as exc:
        raise _fail(job, "tf.lite.TFLiteConverter", exc) from exc


def _find_name(wanted: str, names: Sequence[str]) -> str | None:
    """A signature name for an ONNX/onnx2tf name: exact, then alphanumerics only."""
    if wanted in names:
        return wanted
    key = re.sub(r"\W", "", wanted).lower()
    hits = [n for n in names if re.sub(r"\W", "", n.split(":")[0]).lower() == key]
    return hits[0] if len(hits) == 1 else None


def _input_candidates(job: ConvertJob, onnx_ins: list[str],
                      in_details: dict[str, dict[str, Any]]) -> list[list[Binding]]:
    """Per logical input, the bindings (physical name + perm) its signature allows."""
    from portable_models.run import shape_fits as _fits

    out: list[list[Binding]] = []
    for spec, onnx_name in zip(job.inputs, onnx_ins, strict=True):
        phys = _find_name(_onnx2tf_name(onnx_name), list(in_details))
        if phys is None:
            raise ConversionError(f"input {spec.name!r} (ONNX {onnx_name!r}) is not in the "
                                  f"signature {sorted(in_details)}", stage="convert:onnx2tf")
        sig = [int(d) for d in in_details[phys]["shape_signature"]]
        shape = np.asarray(job.sample_inputs[spec.name]).shape
        options: list[Binding] = []
        if len(shape) in _TRANSPOSED_RANKS:
            perm = _perm_to_last(len(shape))
            if _fits([shape[p] for p in perm], sig):
                layout = _CHANNEL_LAST.get(spec.layout or "")  # None: a transpose, no layout
                options.append(Binding(name=phys, layout=layout, perm=perm))
        if _fits(shape, sig):
            options.append(Binding(name=phys, layout=spec.layout))
        if not options:
            raise ConversionError(f"input {spec.name!r} {list(shape)} fits no layout of its "
                                  f"signature shape {sig}", stage="convert:onnx2tf")
        out.append(options)
    return out


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.astype(np.float64), b.astype(np.float64)
    diff = np.where((x == y) | (np.isnan(x) & np.isnan(y)), 0.0, np.abs(x - y))
    return float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0))


def _match_outputs(ref: list[np.ndarray], physical: dict[str, np.ndarray],
                   layouts: list[str | None]) -> tuple[dict[int, Binding], dict[int, float]]:
    """Greedy assignment of physical outputs to logical ones by shape, then values."""
    pairs: list[tuple[float, int, int, str, tuple[int, ...] | None]] = []
    for (li, r), (pi, (pname, arr)) in itertools.product(enumerate(ref),
                                                         enumerate(physical.items())):
        perms: list[tuple[int, ...] | None] = [None]
        if r.ndim in _TRANSPOSED_RANKS:
            perms.append(_perm_to_last(r.ndim))
        for perm in perms:
            want = r if perm is None else np.transpose(r, perm)
            if want.shape == arr.shape:
                pairs.append((_max_abs(want, arr), li, pi, pname, perm))
    pairs.sort(key=lambda p: (p[0], p[1], p[2], p[4] is not None))
    chosen: dict[int, Binding] = {}
    errors: dict[int, float] = {}
    used: set[str] = set()
    for err, li, _, pname, perm in pairs:
        if li in chosen or pname in used:
            continue
        layout = _CHANNEL_LAST.get(layouts[li] or "") if perm else layouts[li]
        chosen[li], errors[li] = Binding(name=pname, layout=layout, perm=perm), err
        used.add(pname)
    return chosen, errors


def _run_physical(path: Path, inputs: dict[str, Binding], out_names: list[str],
                  sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from portable_models.run import LiteRTRunner

    io = IoMap(inputs=inputs, outputs={n: Binding(name=n) for n in out_names})
    with LiteRTRunner(path, io) as runner:
        return runner.run(sample)


def _match_io(job: ConvertJob, path: Path, onnx_ins: list[str],
              ref: list[np.ndarray]) -> tuple[IoMap, dict[str, Any]]:
    """Find the io map by running the artifact on the sample inputs (see module doc)."""
    from portable_models.run import signature_details

    in_details, out_details = signature_details(path)
    candidates = _input_candidates(job, onnx_ins, in_details)
    best: tuple[float, IoMap, dict[int, float]] | None = None
    for combo in itertools.product(*candidates):
        inputs = dict(zip(job.input_names, combo, strict=True))
        physical = _run_physical(path, inputs, list(out_details), job.sample_inputs)
        chosen, errors = _match_outputs(ref, physical, [s.layout for s in job.outputs])
        if len(chosen) < len(ref):
            continue
        total = max(errors.values(), default=0.0)
        if best is None or total < best[0]:
            outs = {job.output_names[i]: chosen[i] for i in range(len(ref))}
            best = (total, IoMap(inputs=inputs, outputs=outs), errors)
    if best is None:
        shapes = {k: v["shape_signature"].tolist() for k, v in out_details.items()}
        raise ConversionError(
            f"the outputs of {path.name} {shapes} cannot be matched to the program's "
            f"{[list(r.shape) for r in ref]}", file=str(path), stage="convert:onnx2tf")
    meta = {"dynamic": _keeps_dynamic_dims(job, best[1], in_details),
            "method": "ran the artifact once on the sample inputs (golden case 0) and "
                      "matched each physical output to the source program's output by "
                      "shape (as is, or channel-last) and then smallest max abs difference",
            "input_layouts_tried": int(np.prod([len(c) for c in candidates])),
            "max_abs_on_sample": {job.output_names[i]: e for i, e in best[2].items()}}
    return best[1], meta


def _keeps_dynamic_dims(job: ConvertJob, io: IoMap,
                        in_details: dict[str, dict[str, Any]]) -> bool:
    """Every named dim of every input is ``-1`` in the signature (after the perm)."""
    for spec in job.inputs:
        binding = io.inputs[spec.name]
        sig = [int(d) for d in in_details[binding.name]["shape_signature"]]
        phys = list(binding.perm) if binding.perm else list(range(len(sig)))
        if any(sig[phys.index(axis)] != -1 for axis in spec.dynamic_axes):
            return False
    return True


def _onnxruntime_outputs(job: ConvertJob) -> list[np.ndarray]:
    """An ONNX source's outputs on the sample inputs (the reference for io matching)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(job.source_file), providers=["CPUExecutionProvider"])
    feeds = {i.name: job.sample_inputs[i.name] for i in session.get_inputs()}
    return [np.asarray(a) for a in session.run(job.output_names, feeds)]


def convert_onnx2tf(job: ConvertJob) -> ConvertResult:
    """ONNX -> onnx2tf -> TFLiteConverter -> ``model.tflite`` (channel-last inputs).
    The ONNX comes from the source when it is ONNX, else from the captured program."""
    name = _artifact_name(job)
    if job.source_file.suffix == ".onnx":
        program, ref = None, _onnxruntime_outputs(job)
    else:
        program = _load_program(job)
        ref = _reference_outputs(program.module(), job)
    folder = job.work_dir / "onnx2tf"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    saved, onnx_ins, steps, shape_meta = _onnx2tf_any_shape(job, program, folder)
    built = folder / name
    _saved_model_to_tflite(job, saved, built)
    io, matching = _match_io(job, built, onnx_ins, ref)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(built, job.out_dir / name)
    steps += [
        Step(step="onnx2tf", version=package_version("onnx2tf"),
             detail={"output_signaturedefs": True, "local_sample_data": True}),
        Step(step="tf.lite.TFLiteConverter", version=package_version("tensorflow"),
             detail={"from": "saved_model", "float16_weights": job.precision == "float16"}),
    ]
    meta: dict[str, Any] = {"dynamic": matching.pop("dynamic"), "signature": "serving_default",
                            "io_matching": matching, "onnx2tf_shapes": shape_meta,
                            "weights": job.precision}
    return ConvertResult(file=name, io=io, steps=steps, precision=job.precision, meta=meta)
