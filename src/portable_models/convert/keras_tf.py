"""Keras routes on the TensorFlow backend, from the captured ``source/model.keras``.

They run in "tf" workers (``KERAS_BACKEND=tensorflow``). Each reloads the model with
``keras.saving.load_model(safe_mode=True)`` and wraps it in one ``tf.function`` with a
fixed input signature: the logical inputs in their order, named with TF-safe physical
names (the logical names where they are safe), ``None`` for every dynamic dim, and a
dict of outputs keyed by physical names. Inputs keep the Keras layout (NHWC): no perm.

``keras-tflite``
    The function frozen and saved as a SavedModel (custom gradients left out), then
    ``tf.lite.TFLiteConverter.from_saved_model``; float32, or float16 weights.
    An RNN that the converter cannot lower (``TensorListReserve`` with an unknown batch)
    is retried with its RNN layers unrolled (``unroll=True``, same weights): plain
    builtin ops, batch still dynamic, runnable by plain LiteRT (no select-TF ops).
``keras-tf2onnx``
    ``tf2onnx.convert.from_function``, with a handler for ``Erfc`` (exact GELU); an op
    tf2onnx cannot translate fails the route (tf2onnx itself only logs it and writes an
    invalid graph). A model with XLA-compiled calls (Keras's TF backend compiles grouped
    convolutions with XLA) is refused up front here and in the next two routes.
``keras-export-onnx``
    Keras's own ``model.export(format="onnx")`` (tf2onnx underneath, its own wrapping).
``keras-coreml-tf``
    ``coremltools.convert`` of the single concrete function (the SavedModel route fails
    with "Only a single concrete function is supported"); FLOAT32 compute precision
    unless float16 is asked for; bounded ``RangeDim`` for dynamic dims.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.convert.base import ConvertJob, ConvertResult, Step
from portable_models.core.imports import package_version
from portable_models.core.iomap import Binding, IoMap
from portable_models.core.keras_io import flat_outputs, load_saved, pack_inputs, require_backend
from portable_models.errors import ConversionError, PortableModelsError

__all__ = ["convert_tf_tflite", "convert_tf2onnx", "convert_keras_onnx", "convert_tf_coreml",
           "tf_names"]

_ONNX = "model.onnx"
_DEFAULT_OPSET = 17


# -- shared ----------------------------------------------------------------------------------
def tf_names(job: ConvertJob) -> dict[str, str]:
    """Logical -> physical name, safe for TF, TFLite signatures and Core ML features."""
    out: dict[str, str] = {}
    for spec in [*job.inputs, *job.outputs]:
        name = re.sub(r"\W", "_", spec.name)
        if not re.match(r"[A-Za-z]", name):
            name = f"x{name}"
        base, n = name, 1
        while name in out.values():
            name, n = f"{base}_{n}", n + 1
        out[spec.name] = name
    return out


def _key_line(exc: BaseException) -> str:
    """The most telling line of a converter's (often very long) message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "error:" in ln or "Error" in ln:
            return ln[:500]
    return lines[0][:500] if lines else type(exc).__name__


def _fail(job: ConvertJob, what: str, exc: BaseException, fix: str | None = None) -> ConversionError:
    return ConversionError(f"{what} failed: {type(exc).__name__}: {_key_line(exc)}",
                           file=str(job.source_file), stage=f"convert:{job.route}", fix=fix)


def _load(job: ConvertJob) -> Any:
    require_backend(job.route, "tensorflow", "tf", "keras")
    return load_saved(job.source_file, trust=bool(job.options.get("trust_model")),
                      stage=f"convert:{job.route}",
                      modules=list(job.options.get("keras_custom_modules") or ()))


def _signature(job: ConvertJob, names: dict[str, str]) -> list[Any]:
    import tensorflow as tf

    return [tf.TensorSpec([None if isinstance(d, str) else d for d in s.shape],
                          tf.as_dtype(s.dtype), name=names[s.name]) for s in job.inputs]


def _serving(model: Any, job: ConvertJob, names: dict[str, str]) -> Any:
    """One tf.function: flat inputs in logical order -> dict of physical outputs."""
    import tensorflow as tf

    outs = [names[s.name] for s in job.outputs]

    def serve(*args: Any) -> dict[str, Any]:
        leaves = flat_outputs(model(pack_inputs(model, list(args), job.inputs), training=False))
        if len(leaves) != len(outs):
            raise ConversionError(f"the model returns {len(leaves)} outputs, the capture "
                                  f"recorded {len(outs)}", stage=f"convert:{job.route}")
        return dict(zip(outs, leaves, strict=True))

    return tf.function(serve, input_signature=_signature(job, names))


def _io(job: ConvertJob, names: dict[str, str]) -> IoMap:
    return IoMap(inputs={s.name: Binding(name=names[s.name], layout=s.layout) for s in job.inputs},
                 outputs={s.name: Binding(name=names[s.name]) for s in job.outputs})


def _tf_step(job: ConvertJob, names: dict[str, str]) -> Step:
    sig = {names[s.name]: [d if isinstance(d, int) else None for d in s.shape] for s in job.inputs}
    return Step(step="tf.function", version=package_version("tensorflow"),
                detail={"keras": package_version("keras"), "backend": "tensorflow",
                        "reload": "keras.saving.load_model(safe_mode=True)",
                        "input_signature": sig})


def _refuse_xla_calls(job: ConvertJob, concrete: Any, what: str) -> None:
    """Keras's TF backend runs some ops (grouped convolutions, e.g. ConvNeXt's depthwise
    stage) as nested ``tf.function(jit_compile=True)`` calls. tf2onnx and coremltools
    cannot translate those ``StatefulPartitionedCall`` ops: say so before a long
    conversion that is bound to fail."""
    calls = sorted({op.name.split("/")[-2] if "/" in op.name else op.name
                    for op in concrete.graph.get_operations()
                    if op.type in ("StatefulPartitionedCall", "PartitionedCall")})
    if calls:
        raise ConversionError(
            f"{what} cannot convert the model's XLA-compiled calls ({len(calls)}: "
            f"{', '.join(calls[:3])}{' …' if len(calls) > 3 else ''}; Keras's TF backend "
            "compiles grouped convolutions with XLA)", file=str(job.source_file),
            stage=f"convert:{job.route}", fix="the torch-backend bridge route covers it")


# -- tflite ----------------------------------------------------------------------------------
def _has_unroll(config: Any) -> bool:
    if isinstance(config, dict):
        return "unroll" in config or any(_has_unroll(v) for v in config.values())
    return isinstance(config, list) and any(_has_unroll(v) for v in config)


def _has_rnn(model: Any) -> bool:
    """Some layer is an RNN (its config has ``unroll``, also when wrapped)."""
    return any(_has_unroll(layer.get_config()) for layer in model.layers)


def _set_unroll(config: Any) -> None:
    if isinstance(config, dict):
        if "unroll" in config:
            config["unroll"] = True
        for value in config.values():
            _set_unroll(value)
    elif isinstance(config, list):
        for value in config:
            _set_unroll(value)


def _unrolled(model: Any, job: ConvertJob) -> Any:
    """A clone of a functional/Sequential model with every RNN layer unrolled."""
    import keras

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        _set_unroll(config)
        return layer.__class__.from_config(config)

    try:
        copy = keras.models.clone_model(model, clone_function=clone)
        copy.set_weights(model.get_weights())
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise _fail(job, "unrolling the RNN layers", exc) from exc
    return copy


def _frozen(model: Any, job: ConvertJob, names: dict[str, str]) -> Any:
    """The serving function with every variable folded into a constant. Given the Keras
    model as its trackable object, the converter keeps Keras 3 variables as resource
    variables (VAR_HANDLE / READ_VARIABLE) that the LiteRT interpreter never initialises:
    the artifact then answers garbage. Frozen here, re-wrapped so that the signature keeps
    the physical output names."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    outs = [names[s.name] for s in job.outputs]
    concrete = _serving(model, job, names).get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete)
    order = sorted(outs)  # a dict's flattening order

    def named(*args: Any) -> dict[str, Any]:
        return dict(zip(order, tf.nest.flatten(frozen(*args)), strict=True))

    return tf.function(named, input_signature=_signature(job, names)).get_concrete_function()


def _saved_frozen(job: ConvertJob, model: Any, names: dict[str, str]) -> Path:
    """The frozen serving function as a SavedModel whose one signature is
    ``serving_default``. ``from_concrete_functions`` would save it the same way, but with
    custom gradients kept, and when that save fails it says nothing and converts the bare
    graph instead: a ``.tflite`` with no signature. The save does fail for any model with
    ``tf.nn.silu`` (EfficientNet's swish): its custom gradient captures ``beta``, a
    constant once frozen ("Found invalid capture … when saving custom gradients").
    Inference needs no gradient, so the save here leaves them out."""
    import tensorflow as tf

    folder = job.work_dir / "saved_frozen"
    shutil.rmtree(folder, ignore_errors=True)
    tf.saved_model.save(tf.Module(), str(folder),
                        signatures={"serving_default": _frozen(model, job, names)},
                        options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))
    return folder


def _tflite_bytes(job: ConvertJob, model: Any, names: dict[str, str]) -> bytes:
    import tensorflow as tf

    try:
        conv = tf.lite.TFLiteConverter.from_saved_model(str(_saved_frozen(job, model, names)),
                                                        signature_keys=["serving_default"])
        if job.precision == "float16":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.target_spec.supported_types = [tf.float16]
        elif job.precision == "int8-dynamic":  # dynamic range: int8 weights, float activations
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
        elif job.precision == "int8":  # static: activation ranges from the calibration data
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = _representative(job)
        return bytes(conv.convert())
    except PortableModelsError:
        raise
    except Exception as exc:  # the converter's own failure fails this route only
        raise _fail(job, "tf.lite.TFLiteConverter", exc) from exc


_TFLITE_FILES = {"float32": "model.tflite", "float16": "model_fp16.tflite",
                 "int8-dynamic": "model_int8_dynamic.tflite", "int8": "model_int8.tflite"}


def _representative(job: ConvertJob) -> Callable[[], Any]:
    """The calibration cases as the converter's representative dataset: one row at a time
    (a batch of one fits a fixed or a dynamic batch axis), inputs in the signature's order."""
    cases = job.calibration_cases()
    names = [s.name for s in job.inputs]

    def rows() -> Any:
        for case in cases:
            for i in range(len(case[names[0]])):
                yield [np.ascontiguousarray(case[n][i:i + 1]) for n in names]

    return rows


def _check_ops(job: ConvertJob, path: Path) -> list[str]:
    """``ensures``: no resource variables (LiteRT would read them uninitialised)."""
    from ai_edge_litert.interpreter import Interpreter

    details = getattr(Interpreter(model_path=str(path)), "_get_ops_details", None)
    if details is None:  # a LiteRT without the listing: nothing to check by
        return []
    ops = sorted({d["op_name"] for d in details()})
    bad = [op for op in ops if op in ("VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE")]
    if bad:
        raise ConversionError(f"{path.name} keeps resource variables ({bad})", file=str(path),
                              stage=f"convert:{job.route}")
    return ops


def _check_tflite(job: ConvertJob, path: Path, names: dict[str, str]) -> None:
    from ai_edge_litert.interpreter import Interpreter

    sigs = Interpreter(model_path=str(path)).get_signature_list()
    want_in = sorted(names[s.name] for s in job.inputs)
    want_out = sorted(names[s.name] for s in job.outputs)
    got = sigs.get("serving_default", {})
    if sorted(got.get("inputs", [])) != want_in or sorted(got.get("outputs", [])) != want_out:
        raise ConversionError(f"{path.name} has signatures {sigs}, expected serving_default with "
                              f"inputs {want_in} and outputs {want_out}", file=str(path),
                              stage=f"convert:{job.route}")


def convert_tf_tflite(job: ConvertJob) -> ConvertResult:
    """tf.function -> TFLiteConverter -> ``model.tflite`` (fp16, and int8 by the converter's own
    quantiser: dynamic range; static with the calibration data as representative dataset)."""
    if job.precision not in _TFLITE_FILES:
        raise ConversionError(f"tflite makes {', '.join(_TFLITE_FILES)}, not {job.precision!r}",
                              stage=f"convert:{job.route}")
    name = _TFLITE_FILES[job.precision]
    model, names = _load(job), tf_names(job)
    unroll_note = ""
    try:
        data = _tflite_bytes(job, model, names)
    except ConversionError as exc:
        if "TensorList" not in exc.message or not _has_rnn(model):
            raise
        unroll_note = f"unrolled the RNN layers after: {exc.message[:300]}"
        data = _tflite_bytes(job, _unrolled(model, job), names)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    path = job.out_dir / name
    path.write_bytes(data)
    _check_tflite(job, path, names)
    ops = _check_ops(job, path)
    detail: dict[str, Any] = {"from": "SavedModel of the frozen concrete_function",
                              "custom_gradients": False,
                              "float16_weights": job.precision == "float16",
                              "select_tf_ops": False, "rnn_unrolled": bool(unroll_note)}
    if job.precision.startswith("int8"):
        detail.update({"optimizations": ["DEFAULT"],
                       "representative_dataset": job.precision == "int8"})
    steps = [_tf_step(job, names), Step(step="tf.lite.TFLiteConverter",
                                        version=package_version("tensorflow"), detail=detail)]
    meta: dict[str, Any] = {"signature": "serving_default", "rnn_unrolled": bool(unroll_note),
                            "ops": ops,
                            "weights": {"float16": "float16", "float32": "float32"}.get(job.precision, "int8")}
    if job.precision == "int8":
        calibration = job.options["calibration"]
        meta["calibration"] = {"sha256": calibration["sha256"], "cases": calibration["cases"]}
    if unroll_note:
        meta["note"] = unroll_note
    return ConvertResult(file=name, io=_io(job, names), steps=steps, precision=job.precision,
                         meta=meta)


# -- onnx ------------------------------------------------------------------------------------
def _onnx_run(job: ConvertJob, what: str, call: Callable[[], Any]) -> None:
    try:
        call()
    except PortableModelsError:
        raise
    except Exception as exc:  # the converter's own failure fails this route only
        raise _fail(job, what, exc, fix="see logs/onnx.log; the next onnx route may cover it") from exc


def convert_tf2onnx(job: ConvertJob) -> ConvertResult:
    """tf.function -> ``tf2onnx.convert.from_function`` -> ``model.onnx``."""
    import tf2onnx

    model, names = _load(job), tf_names(job)
    opset = int(job.options.get("opset") or _DEFAULT_OPSET)
    path = job.out_dir / _ONNX
    path.parent.mkdir(parents=True, exist_ok=True)
    fn = _serving(model, job, names)
    _refuse_xla_calls(job, fn.get_concrete_function(), "tf2onnx")
    _onnx_run(job, "tf2onnx.convert.from_function", lambda: tf2onnx.convert.from_function(
        fn, input_signature=_signature(job, names), opset=opset, output_path=str(path),
        custom_op_handlers={"Erfc": (_erfc_as_one_minus_erf, [])}))
    step = Step(step="tf2onnx.convert.from_function", version=package_version("tf2onnx"),
                detail={"opset": opset, "custom_op_handlers": {"Erfc": "1 - Erf(x)"}})
    return _finish_onnx(job, path, [_tf_step(job, names), step], names, by_name=True)


def _erfc_as_one_minus_erf(ctx: Any, node: Any, name: str, args: Any) -> None:
    """tf2onnx handler for ``Erfc`` (exact GELU in TF 2.21), which it lacks and ONNX has
    not: ``1 - Erf(x)``."""
    import numpy as np
    from tf2onnx import utils

    node.type = "Erf"
    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    one = ctx.make_const(utils.make_name(f"{name}_one"), np.array(1, dtype=dtype))
    ctx.insert_new_node_on_output("Sub", node.output[0], inputs=[one.output[0], node.output[0]],
                                  name=utils.make_name(f"{name}_one_minus"))


def convert_keras_onnx(job: ConvertJob) -> ConvertResult:
    """Keras's own ``model.export(format="onnx")`` -> ``model.onnx``."""
    model, names = _load(job), tf_names(job)
    _refuse_xla_calls(job, _serving(model, job, names).get_concrete_function(),
                      "Keras's ONNX export (tf2onnx)")
    opset = int(job.options.get("opset") or _DEFAULT_OPSET)
    path = job.out_dir / _ONNX
    path.parent.mkdir(parents=True, exist_ok=True)
    signature = [pack_inputs(model, _signature(job, names), job.inputs)]
    _onnx_run(job, "keras model.export(format='onnx')", lambda: model.export(
        str(path), format="onnx", input_signature=signature, opset_version=opset, verbose=False))
    step = Step(step="keras.Model.export", version=package_version("keras"),
                detail={"format": "onnx", "opset": opset, "backend": "tensorflow",
                        "tf2onnx": package_version("tf2onnx")})
    return _finish_onnx(job, path, [step], names, by_name=False)


def _finish_onnx(job: ConvertJob, path: Path, steps: list[Step], names: dict[str, str], *,
                 by_name: bool) -> ConvertResult:
    """``ensures``: no untranslated op, valid graph, one input/output per logical one;
    dynamic input dims renamed to their labels."""
    import onnx

    if not path.is_file():
        raise ConversionError("the ONNX exporter wrote no file", stage=f"convert:{job.route}")
    model = onnx.load(str(path))
    unknown = sorted({n.op_type for n in model.graph.node
                      if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)})
    if unknown:
        raise ConversionError(f"the ONNX graph holds ops that are not ONNX: {unknown} (the "
                              "converter could not translate them)", file=str(path),
                              stage=f"convert:{job.route}",
                              fix="the next onnx route may cover it (the torch bridge)")
    io = _onnx_io(job, model, names, by_name)
    renamed = _rename_dims(job, model, io)
    onnx.save(model, str(path))
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise _fail(job, "onnx.checker", exc) from exc
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    meta = {"opset": opset, "producer": f"{model.producer_name} {model.producer_version}".strip(),
            "dim_params": renamed}
    return ConvertResult(file=_ONNX, io=io, steps=steps, precision="float32", meta=meta)


def _onnx_io(job: ConvertJob, model: Any, names: dict[str, str], by_name: bool) -> IoMap:
    inits = {i.name for i in model.graph.initializer}
    ins = [i.name for i in model.graph.input if i.name not in inits]
    outs = [o.name for o in model.graph.output]
    if len(ins) != len(job.inputs) or len(outs) != len(job.outputs):
        raise ConversionError(f"the ONNX graph has inputs {ins} and outputs {outs}; the model has "
                              f"{len(job.inputs)} inputs and {len(job.outputs)} outputs",
                              stage=f"convert:{job.route}", fix="the next onnx route may cover it")
    if by_name:
        missing = [names[s.name] for s in [*job.inputs, *job.outputs] if names[s.name] not in ins + outs]
        if missing:
            raise ConversionError(f"the ONNX graph lacks {missing} (inputs {ins}, outputs {outs})",
                                  stage=f"convert:{job.route}")
        ins = [names[s.name] for s in job.inputs]
        outs = [names[s.name] for s in job.outputs]
    return IoMap(inputs={s.name: Binding(name=p, layout=s.layout) for s, p in zip(job.inputs, ins, strict=True)},
                 outputs={s.name: Binding(name=p) for s, p in zip(job.outputs, outs, strict=True)})


def _rename_dims(job: ConvertJob, model: Any, io: IoMap) -> dict[str, str]:
    """The converter's ``unk__22`` on a dynamic input axis becomes its label (``batch``)."""
    values = {v.name: v for v in model.graph.input}
    mapping: dict[str, str] = {}
    for spec in job.inputs:
        dims = values[io.inputs[spec.name].name].type.tensor_type.shape.dim
        for axis, label in spec.dynamic_axes.items():
            if axis < len(dims) and dims[axis].dim_param:
                mapping.setdefault(dims[axis].dim_param, label)
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in mapping:
                dim.dim_param = mapping[dim.dim_param]
    return mapping


# -- coreml ----------------------------------------------------------------------------------
def convert_tf_coreml(job: ConvertJob) -> ConvertResult:
    """coremltools' TF2 frontend on the single concrete function -> ``model.mlpackage``
    (``model_fp16.mlpackage`` for a float16 program)."""
    from portable_models.core.coremltools_import import import_coremltools

    ct = import_coremltools(tensorflow=True)

    from portable_models.convert import coreml as cm

    if job.precision not in ("float32", "float16"):
        raise ConversionError(f"Core ML makes float32 or float16, not {job.precision!r}",
                              stage=f"convert:{job.route}")
    model, names = _load(job), tf_names(job)
    concrete = _serving(model, job, names).get_concrete_function()
    _refuse_xla_calls(job, concrete, "coremltools' TensorFlow frontend")
    target = str(job.options.get("minimum_deployment_target") or cm.DEFAULT_TARGET)
    precision = "FLOAT32" if job.precision == "float32" else "FLOAT16"
    graph_names = {key: t.name.split(":")[0] for key, t in concrete.structured_outputs.items()}
    outputs = [ct.TensorType(name=graph_names[names[s.name]], dtype=cm._ct_dtype(s.dtype))
               for s in job.outputs]  # float32 outputs in a float16 program too
    try:
        mlmodel = ct.convert([concrete], source="tensorflow", inputs=_ct_inputs(ct, job, names),
                             outputs=outputs, convert_to="mlprogram", skip_model_load=True,
                             compute_precision=getattr(ct.precision, precision),
                             minimum_deployment_target=getattr(ct.target, target))
    except Exception as exc:  # the converter's own failure fails this route only
        raise _fail(job, "coremltools (TensorFlow frontend)", exc,
                    fix="the next coreml route (the torch bridge) may cover it") from exc
    mlmodel = _rename_ct_outputs(ct, mlmodel, graph_names, names, job)
    dtypes = cm._physical_dtypes(mlmodel)
    io = cm.read_back(job, _io(job, names), dtypes)
    cm._embed_metadata(mlmodel, job, io)
    artifact = cm.ARTIFACT if job.precision == "float32" else "model_fp16.mlpackage"
    out = job.out_dir / artifact
    if out.exists():
        shutil.rmtree(out)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    mlmodel.save(str(out))
    detail = {"frontend": "TensorFlow2", "convert_to": "mlprogram", "compute_precision": precision,
              "minimum_deployment_target": target}
    steps = [_tf_step(job, names), Step(step="coremltools.convert",
                                        version=package_version("coremltools"), detail=detail)]
    meta = {**detail, "physical_dtypes": dtypes, "casts": cm._casts(job, dtypes),
            "specification_version": int(mlmodel.get_spec().specificationVersion)}
    return ConvertResult(file=artifact, io=io, steps=steps, precision=job.precision, meta=meta)


def _ct_inputs(ct: Any, job: ConvertJob, names: dict[str, str]) -> list[Any]:
    from portable_models.convert import coreml as cm

    out = [cm._input_type(ct, job, spec, names[spec.name]) for spec in job.inputs]
    return out


def _rename_ct_outputs(ct: Any, mlmodel: Any, graph_name: dict[str, str], names: dict[str, str],
                       job: ConvertJob) -> Any:
    """The TF frontend names outputs after the graph (``Identity_1``): rename them to the
    physical names, matched through the concrete function's structured outputs."""
    spec = mlmodel.get_spec()
    have = [o.name for o in spec.description.output]
    for out in job.outputs:
        old, new = graph_name[names[out.name]], names[out.name]
        if old not in have:
            raise ConversionError(f"Core ML outputs are {have}; {old!r} ({out.name}) is missing",
                                  stage=f"convert:{job.route}")
        if old != new:
            ct.utils.rename_feature(spec, old, new, rename_inputs=False)
    return ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)
