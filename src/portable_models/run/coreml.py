"""Core ML runtime: structural checks everywhere, ``predict`` on macOS only.

coremltools converts on any system but predicts only on macOS (its native
``libcoremlpython`` exists only there). Off macOS a Core ML artifact cannot be executed
by its real runtime, so :class:`CoreMLRunner` does what *can* be done and says so:

* :meth:`CoreMLRunner.load` runs :func:`structural_check` on the ``.mlpackage``
  (it raises :class:`~portable_models.errors.RuntimeLoadError` naming every mismatch);
* :meth:`CoreMLRunner.run` predicts on macOS; anywhere else it raises
  :class:`~portable_models.errors.UnverifiedError` carrying the list of checks that
  passed. It never returns made-up outputs.

The checks (each listed in :attr:`CoreMLRunner.checked` when it passes):

1. the package loads, saves to a fresh folder and reloads with a byte-identical spec
   and weight file;
2. the spec is an ML program (``mlProgram``) with a ``main`` function; the
   specification version names the deployment target;
3. every weight blob the program references lies inside ``weights/weight.bin`` with a
   valid blob header (sentinel ``0xDEADBEEF``) and the byte size its type and shape need;
4. every logical input and output of the io map is a feature of the model (and the
   model has no other inputs), with the expected Core ML dtype (float32 / float16 /
   int32 — int64 is fed as int32) and shape: fixed dims exactly, dynamic dims as
   ranges with the declared bounds;
5. the compute precision. coremltools' FP16 pass rewrites every op it can to fp16 and
   inserts ``cast`` ops around them, and stores weights as fp16 consts; the FP32 path
   inserts nothing. So the typed values of the ``main`` function tell them apart: a
   float32 program has **no** fp16-typed value at all (no fp16 const, cast or op
   output); a float16 program has fp16 compute ops (the FP16 pass keeps some ops in
   fp32 — overflowing constants, ops without fp16 kernels such as iOS16 ``lstm`` — so
   the share is reported, not required to be 100%).

Expected specs come from ``options.extra`` (``inputs``/``outputs``: TensorSpecs or their
dicts; ``dims``: name -> DimSpec or ``{"min", "max"}``; ``precision``), else from the
``portable_models`` metadata the Core ML routes write into every package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import platform
import struct
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.core.coremltools_import import import_coremltools
from portable_models.core.iomap import IoMap
from portable_models.core.spec import DimSpec, TensorSpec
from portable_models.errors import RuntimeLoadError, RuntimeRunError, UnverifiedError
from portable_models.run.base import COMPUTE_UNITS, Runner

__all__ = ["CoreMLRunner", "predict_unavailable_reason", "structural_check"]

_METADATA_KEY = "portable_models"
_WEIGHTS = Path("Data/com.apple.CoreML/weights")
_BLOB_SENTINEL = 0xDEADBEEF
_ARRAY_NUMPY = {"FLOAT32": np.float32, "FLOAT16": np.float16, "INT32": np.int32,
                "DOUBLE": np.float64}
_MIL_BYTES = {"FLOAT16": 2, "BFLOAT16": 2, "FLOAT32": 4, "FLOAT64": 8, "INT8": 1,
              "UINT8": 1, "INT16": 2, "UINT16": 2, "INT32": 4, "UINT32": 4,
              "INT64": 8, "UINT64": 8, "BOOL": 1}


# -- the public check ---------------------------------------------------------------
def structural_check(
    path: Path | str,
    io: IoMap,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    precision: str,
    *,
    dims: Mapping[str, DimSpec] | None = None,
) -> list[str]:
    """Check a ``.mlpackage`` against its io map and logical specs without running it.

    Returns the checks performed (one line each); raises RuntimeLoadError naming every
    mismatch found."""
    import coremltools as ct

    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise RuntimeLoadError(f"{path} is not an .mlpackage (no Manifest.json)",
                               file=str(path), stage="load:coreml")
    try:
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    except Exception as exc:
        raise RuntimeLoadError(f"coremltools cannot read {path.name}: {exc}", file=str(path),
                               stage="load:coreml") from exc
    checked: list[str] = []
    problems: list[str] = []
    for check in (_check_reload(path, spec), _check_program(spec), _check_weights(path, spec),
                  _check_features(spec, io, inputs, outputs, dims or {}),
                  _check_precision(spec, precision, [*inputs, *outputs])):
        ok, bad = check
        checked.extend(ok)
        problems.extend(bad)
    if problems:
        raise RuntimeLoadError(
            f"Core ML package {path.name} fails its structural checks: " + "; ".join(problems),
            file=str(path), stage="load:coreml")
    return checked


Outcome = tuple[list[str], list[str]]


def _check_reload(path: Path, spec: Any) -> Outcome:
    import coremltools as ct

    with tempfile.TemporaryDirectory(prefix="pm-coreml-") as tmp:
        copy = Path(tmp) / "resaved.mlpackage"
        ct.models.MLModel(str(path), skip_model_load=True).save(str(copy))
        again = ct.models.MLModel(str(copy), skip_model_load=True).get_spec()
        same_spec = _spec_bytes(again) == _spec_bytes(spec)
        same_weights = _weights_digest(copy) == _weights_digest(path)
    bad = []
    if not same_spec:
        bad.append("the spec changes when the package is saved and reloaded")
    if not same_weights:
        bad.append("the weight file changes when the package is saved and reloaded")
    return (["package saves and reloads with an identical spec and weight file"] if not bad
            else [], bad)


def _spec_bytes(spec: Any) -> bytes:
    return bytes(spec.SerializeToString(deterministic=True))


def _weights_digest(package: Path) -> str:
    digest = hashlib.sha256()
    folder = package / _WEIGHTS
    for file in sorted(folder.glob("*")) if folder.is_dir() else []:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _check_program(spec: Any) -> Outcome:
    import coremltools as ct

    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        return [], [f"the spec is a {kind!r} model, not an mlProgram"]
    functions = spec.mlProgram.functions
    if "main" not in functions:
        return [], [f"the ML program has no 'main' function (has {sorted(functions)})"]
    version = int(spec.specificationVersion)
    targets = [k for k, v in ct.target.__members__.items()
               if v.value == version and k.startswith(("iOS", "macOS"))]
    opset = functions["main"].opset
    return [f"spec is an mlProgram (specification version {version}: "
            f"{'/'.join(targets) or 'unknown target'}), function main, opset {opset}"], []


def _main_ops(spec: Any) -> list[Any]:
    """Every operation of the ``main`` function, nested blocks included."""
    main = spec.mlProgram.functions["main"]
    stack = list(main.block_specializations[main.opset].operations)
    ops = []
    while stack:
        op = stack.pop()
        ops.append(op)
        for block in op.blocks:
            stack.extend(block.operations)
    return ops


def _check_weights(path: Path, spec: Any) -> Outcome:
    from coremltools.proto import MIL_pb2

    blobs = 0
    bad: list[str] = []
    for op in _main_ops(spec) if spec.WhichOneof("Type") == "mlProgram" else []:
        for value in op.attributes.values():
            if not value.HasField("blobFileValue"):
                continue
            blobs += 1
            ttype = value.type.tensorType
            nbytes = _MIL_BYTES.get(MIL_pb2.DataType.Name(ttype.dataType))
            count = int(np.prod([d.constant.size for d in ttype.dimensions]))
            problem = _check_blob(path, value.blobFileValue, None if nbytes is None
                                  else nbytes * count)
            if problem:
                bad.append(f"weight of op {op.outputs[0].name!r}: {problem}")
    return ([f"{blobs} weight blob(s) resolve in the weight file with valid headers and sizes"]
            if not bad else [], bad[:5])


def _check_blob(path: Path, blob: Any, expected_bytes: int | None) -> str | None:
    name = blob.fileName.replace("@model_path/", "", 1)
    file = path / "Data/com.apple.CoreML" / name
    if not file.is_file():
        return f"{blob.fileName} is missing"
    with file.open("rb") as fh:
        fh.seek(blob.offset)
        header = fh.read(24)
    if len(header) < 24:
        return f"offset {blob.offset} lies past the end of {name}"
    sentinel, _dtype, size, data_offset = struct.unpack("<IIQQ", header)
    if sentinel != _BLOB_SENTINEL:
        return f"no blob header at offset {blob.offset}"
    if data_offset + size > file.stat().st_size:
        return f"blob at {blob.offset} runs past the end of {name}"
    if expected_bytes is not None and size != expected_bytes:
        return f"blob holds {size} bytes, its type and shape need {expected_bytes}"
    return None


# -- inputs and outputs -------------------------------------------------------------
def _expected_array_dtype(dtype: str) -> str | None:
    """The Core ML multiarray dtype a logical dtype becomes (None: not checked)."""
    if dtype == "float16":
        return "FLOAT16"
    if dtype.startswith("float") or dtype == "bfloat16":
        return "FLOAT32"
    if dtype.startswith(("int", "uint")):
        return "INT32"
    return None


def _check_features(spec: Any, io: IoMap, inputs: Sequence[TensorSpec],
                    outputs: Sequence[TensorSpec], dims: Mapping[str, DimSpec]) -> Outcome:
    ok: list[str] = []
    bad: list[str] = []
    desc = spec.description
    typed = _program_output_types(spec)
    for kind, specs, bindings, features in (("input", inputs, io.inputs, desc.input),
                                            ("output", outputs, io.outputs, desc.output)):
        by_name = {f.name: f for f in features}
        logical = {s.name for s in specs}
        for name in sorted(set(bindings) - logical):
            bad.append(f"the io map names {kind} {name!r}, which the logical specs lack")
        for s in specs:
            binding = bindings.get(s.name)
            if binding is None:
                bad.append(f"the io map has no {kind} {s.name!r}")
                continue
            feature = by_name.get(binding.name)
            if feature is None:
                bad.append(f"{kind} {s.name!r}: the model has no {kind} named {binding.name!r} "
                           f"(it has {sorted(by_name)})")
                continue
            line, problems = _check_feature(kind, s, binding.perm, feature, dims,
                                            typed.get(binding.name))
            bad.extend(problems)
            if not problems:
                ok.append(line)
        fed = {bindings[s.name].name for s in specs if s.name in bindings}
        if kind == "input" and set(by_name) - fed:
            bad.append(f"the model has inputs the io map does not feed: {sorted(set(by_name) - fed)}")
    return ok, bad


def _check_feature(kind: str, s: TensorSpec, perm: tuple[int, ...] | None, feature: Any,
                   dims: Mapping[str, DimSpec],
                   typed: list[int | None] | None) -> tuple[str, list[str]]:
    from coremltools.proto import FeatureTypes_pb2

    where = f"{kind} {s.name!r} ({feature.name!r})"
    if feature.type.WhichOneof("Type") != "multiArrayType":
        return "", [f"{where} is a {feature.type.WhichOneof('Type')}, not a multiarray"]
    arr = feature.type.multiArrayType
    dtype = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(arr.dataType)
    want = _expected_array_dtype(s.dtype)
    problems = [] if want in (None, dtype) else [f"{where} is {dtype}, expected {want}"]
    shape = [s.shape[p] for p in perm] if perm and len(perm) == s.rank else list(s.shape)
    if kind == "input":
        shown, shape_problems = _check_input_shape(where, shape, arr, dims)
    else:
        shown, shape_problems = _check_output_shape(where, shape, arr, typed, dims)
    problems.extend(shape_problems)
    cast = f" (fed as {dtype.lower()}, logical {s.dtype})" if want == "INT32" and \
        s.dtype != "int32" and kind == "input" else ""
    return f"{where}: {dtype}{cast}, shape {shown}", problems


def _check_input_shape(where: str, shape: list[int | str], arr: Any,
                       dims: Mapping[str, DimSpec]) -> tuple[str, list[str]]:
    default = list(arr.shape)
    flex = arr.WhichOneof("ShapeFlexibility")
    if len(default) != len(shape):
        return str(default), [f"{where} has rank {len(default)}, expected {len(shape)}"]
    if flex == "enumeratedShapes":
        return "enumerated", [f"{where} has enumerated shapes; the routes make ranges"]
    ranges = ([(r.lowerBound, r.upperBound) for r in arr.shapeRange.sizeRanges]
              if flex == "shapeRange" else [(d, d) for d in default])
    problems: list[str] = []
    for axis, (dim, (lo, hi)) in enumerate(zip(shape, ranges, strict=True)):
        if isinstance(dim, int):
            if (lo, hi) != (dim, dim) or default[axis] != dim:
                problems.append(f"{where} axis {axis} is {_range(lo, hi)}, expected {dim}")
            continue
        bounds = dims.get(dim)
        if bounds is not None and (lo, hi) != (bounds.min, bounds.max):
            problems.append(f"{where} axis {axis} ({dim}) is {_range(lo, hi)}, "
                            f"expected {bounds.min}..{bounds.max}")
        elif bounds is None and lo == hi:
            problems.append(f"{where} axis {axis} ({dim}) is fixed at {lo} in the model")
    return "[" + ", ".join(_range(lo, hi) for lo, hi in ranges) + "]", problems


def _check_output_shape(where: str, shape: list[int | str], arr: Any,
                        typed: list[int | None] | None,
                        dims: Mapping[str, DimSpec]) -> tuple[str, list[str]]:
    """Outputs: the spec records a shape only when it is static; otherwise the ML
    program's own type of the output value gives the rank and the fixed dims."""
    recorded: list[int | None] = list(arr.shape) or (typed or [])
    source = "" if arr.shape else " (from the program's types)"
    if not recorded:
        return "not recorded", []
    shown = "[" + ", ".join("?" if r is None else str(r) for r in recorded) + "]" + source
    if len(recorded) != len(shape):
        return shown, [f"{where} has rank {len(recorded)}, expected {len(shape)}"]
    wrong = []
    for axis, (got, dim) in enumerate(zip(recorded, shape, strict=True)):
        if isinstance(dim, int) and got is not None and got != dim:
            wrong.append(f"axis {axis} is {got}, expected {dim}")
        bounds = dims.get(dim) if isinstance(dim, str) else None
        if isinstance(dim, str) and got is not None and (bounds is None or bounds.min < bounds.max):
            wrong.append(f"axis {axis} is fixed at {got}, dynamic {dim!r} in the spec")
    return shown, [f"{where} " + ", ".join(wrong)] if wrong else []


def _program_output_types(spec: Any) -> dict[str, list[int | None]]:
    """Shape of every value the ML program's ``main`` block returns (None: unknown)."""
    if spec.WhichOneof("Type") != "mlProgram" or "main" not in spec.mlProgram.functions:
        return {}
    main = spec.mlProgram.functions["main"]
    block = main.block_specializations[main.opset]
    wanted = set(block.outputs)
    out: dict[str, list[int | None]] = {}
    for op in block.operations:
        for value in op.outputs:
            if value.name in wanted and value.type.WhichOneof("type") == "tensorType":
                out[value.name] = [d.constant.size if d.WhichOneof("dimension") == "constant"
                                   else None for d in value.type.tensorType.dimensions]
    return out


def _range(lo: int, hi: int) -> str:
    if lo == hi:
        return str(lo)
    return f"{lo}..{'inf' if hi < 0 else hi}"


# -- compute precision --------------------------------------------------------------
def _check_precision(spec: Any, precision: str, specs: Sequence[TensorSpec]) -> Outcome:
    from coremltools.proto import MIL_pb2

    if spec.WhichOneof("Type") != "mlProgram" or "main" not in spec.mlProgram.functions:
        return [], []
    fp16, fp32 = MIL_pb2.DataType.FLOAT16, MIL_pb2.DataType.FLOAT32
    fp16_values: list[str] = []
    compute = {fp16: 0, fp32: 0}
    ops = _main_ops(spec)
    carriers = _boolean_carriers(ops)
    for op in ops:
        dtypes = {out.type.tensorType.dataType for out in op.outputs
                  if out.type.WhichOneof("type") == "tensorType"}
        fp16_values.extend(f"{op.type} -> {out.name}" for out in op.outputs
                           if out.type.tensorType.dataType == fp16 and out.name not in carriers)
        if op.type not in ("const", "cast") and dtypes & {fp16, fp32}:
            compute[fp16 if fp16 in dtypes else fp32] += 1
    total = compute[fp16] + compute[fp32]
    if precision in ("float32", "int8-weight"):  # int8 weights are dequantised at load: fp32 compute
        if fp16_values and not any(s.dtype == "float16" for s in specs):
            return [], [f"compute precision: asked float32, but the program holds "
                        f"{len(fp16_values)} fp16 value(s) (first: {fp16_values[0]})"]
        return [f"compute precision float32: no fp16 value in the program "
                f"({compute[fp32]} float compute ops in fp32)"], []
    if precision == "float16":
        if compute[fp16] == 0:
            return [], [f"compute precision: asked float16, but only {compute[fp16]} of "
                        f"{total} float compute ops run in fp16"]
        return [f"compute precision float16: {compute[fp16]} of {total} float compute ops "
                f"run in fp16, {len(fp16_values)} fp16 values in all"], []
    return [], [f"precision {precision!r} is not one a Core ML route makes"]


#: ops that move or select values without arithmetic on them
_MOVES = frozenset({"gather", "gather_nd", "gather_along_axis", "reshape", "transpose", "squeeze",
                    "expand_dims", "slice_by_index", "slice_by_size", "concat", "tile", "identity"})


def _boolean_carriers(ops: list[Any]) -> set[str]:
    """The fp16 values that only carry booleans: cast from a bool, then moved or selected
    (coremltools gathers a boolean attention mask as fp16, since gather takes no bools).
    Exactly 0 or 1, so no float32 arithmetic was given up for them."""
    from coremltools.proto import MIL_pb2

    fp16, boolean = MIL_pb2.DataType.FLOAT16, MIL_pb2.DataType.BOOL
    dtype = {out.name: out.type.tensorType.dataType for op in ops for out in op.outputs
             if out.type.WhichOneof("type") == "tensorType"}
    carriers: set[str] = set()
    grew = True
    while grew:  # the ops are not in order (nested blocks): until nothing more is found
        grew = False
        for op in ops:
            args = [a.name for arg in op.inputs.values() for a in arg.arguments if a.name]
            if op.type == "cast":
                source = [a.name for a in op.inputs["x"].arguments] if "x" in op.inputs else []
                carries = bool(source) and all(dtype.get(a) == boolean for a in source)
            else:
                floats = [a for a in args if dtype.get(a) == fp16]
                carries = op.type in _MOVES and bool(floats) and all(a in carriers for a in floats)
            for out in op.outputs:
                if carries and dtype.get(out.name) == fp16 and out.name not in carriers:
                    carriers.add(out.name)
                    grew = True
    return carriers


# -- the runner ---------------------------------------------------------------------
def predict_unavailable_reason() -> str | None:
    """Why Core ML cannot predict here (None: it can)."""
    if sys.platform != "darwin":
        return f"Core ML cannot run on {platform.system()} {platform.machine()}".strip()
    if importlib.util.find_spec("coremltools.libcoremlpython") is None:
        return ("Core ML cannot run here: this coremltools has no native runtime "
                "(libcoremlpython) for this Python")
    return None


@dataclass(frozen=True)
class _Expected:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    precision: str
    dims: dict[str, DimSpec]


class CoreMLRunner(Runner):
    """Structural checks on load; ``predict`` on macOS, UnverifiedError elsewhere."""

    distribution = "coremltools"
    label = "Core ML runtime, macOS"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: the structural checks that passed, one line each.
        self.checked: list[str] = []
        self._model: Any = None
        self._feed_dtypes: dict[str, str] = {}

    def _load_impl(self) -> None:
        ct = import_coremltools()

        record, self._feed_dtypes = _package_info(self.artifact)
        expected = _expectations(self.artifact, self.options.extra, record)
        self.checked = structural_check(self.artifact, self.io, expected.inputs,
                                        expected.outputs, expected.precision,
                                        dims=expected.dims)
        if predict_unavailable_reason() is None:
            units = str(self.options.extra.get("compute_units", "CPU_ONLY"))
            if units not in COMPUTE_UNITS:
                raise RuntimeLoadError(f"unknown Core ML compute units {units!r}",
                                       stage="load:coreml", fix=f"use one of {COMPUTE_UNITS}")
            self._model = ct.models.MLModel(str(self.artifact),
                                            compute_units=getattr(ct.ComputeUnit, units))

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        reason = predict_unavailable_reason()
        if self._model is None or reason is not None:
            raise UnverifiedError(
                f"{reason or 'Core ML model not loaded'}: converted and checked structurally; "
                "numbers not checked", checked=self.checked, file=str(self.artifact),
                stage="run:coreml", fix="run `portable-models verify` on macOS to check numbers")
        prepared = {name: _cast_feed(name, arr, self._feed_dtypes.get(name))
                    for name, arr in feeds.items()}
        out = self._model.predict(prepared)
        return {name: np.asarray(value) for name, value in out.items()}

    def _close_impl(self) -> None:
        self._model = None


def _cast_feed(name: str, arr: np.ndarray, dtype: str | None) -> np.ndarray:
    """Cast a physical feed to the model's input dtype (int64 -> int32 checked)."""
    target = _ARRAY_NUMPY.get(dtype or "")
    if target is None or arr.dtype == target:
        return np.ascontiguousarray(arr)
    if np.issubdtype(target, np.integer) and arr.size:
        info = np.iinfo(np.int32)
        if arr.min() < info.min or arr.max() > info.max:
            raise RuntimeRunError(f"input {name!r} holds values outside int32, and Core ML "
                                  "has no int64 inputs", stage="run:coreml")
    return np.ascontiguousarray(arr.astype(target))


def _package_info(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``portable_models`` metadata record and the dtype of every model input."""
    import coremltools as ct
    from coremltools.proto import FeatureTypes_pb2

    names = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    text = spec.description.metadata.userDefined.get(_METADATA_KEY)
    dtypes = {f.name: names(f.type.multiArrayType.dataType) for f in spec.description.input
              if f.type.WhichOneof("Type") == "multiArrayType"}
    return (dict(json.loads(text)) if text else {}), dtypes


def _expectations(path: Path, extra: Mapping[str, Any], record: Mapping[str, Any]) -> _Expected:
    inputs = extra.get("inputs", record.get("inputs"))
    outputs = extra.get("outputs", record.get("outputs"))
    precision = extra.get("precision", record.get("precision"))
    if inputs is None or outputs is None or precision is None:
        raise RuntimeLoadError(
            f"no logical specs to check {path.name} against", file=str(path),
            stage="load:coreml",
            fix="pass options.extra inputs/outputs/precision, or use a package made by "
                "portable_models (it records them in its metadata)")
    def as_spec(value: TensorSpec | Mapping[str, Any]) -> TensorSpec:
        return value if isinstance(value, TensorSpec) else TensorSpec.from_dict(value)

    ins, outs = [as_spec(s) for s in inputs], [as_spec(s) for s in outputs]
    sizes = _fixed_sizes(ins, record.get("input_shapes"))
    return _Expected(inputs=[_pinned(s, sizes) for s in ins], outputs=[_pinned(s, sizes) for s in outs],
                     precision=str(precision),
                     dims=_as_dims(extra.get("dims", record.get("dims") or {})))


def _fixed_sizes(inputs: Sequence[TensorSpec], shapes: Any) -> dict[str, int]:
    """A fixed-shape package (converted at the sample's sizes where coremltools could not keep
    a dynamic dim) records its input shapes: each dynamic dim's size in it, by label."""
    if not isinstance(shapes, Mapping):
        return {}
    sizes: dict[str, int] = {}
    for spec in inputs:
        shape = shapes.get(spec.name)
        if isinstance(shape, list) and len(shape) == len(spec.shape):
            for axis, label in spec.dynamic_axes.items():
                if isinstance(shape[axis], int):
                    sizes.setdefault(label, shape[axis])
    return sizes


def _pinned(spec: TensorSpec, sizes: Mapping[str, int]) -> TensorSpec:
    """``spec`` with its dynamic dims at the fixed sizes (the package is checked as converted)."""
    if not sizes:
        return spec
    return dataclasses.replace(spec, shape=tuple(sizes.get(d, d) if isinstance(d, str) else d for d in spec.shape))


def _as_dims(value: Mapping[str, Any]) -> dict[str, DimSpec]:
    out: dict[str, DimSpec] = {}
    for name, dim in value.items():
        out[name] = dim if isinstance(dim, DimSpec) else DimSpec(
            name=name, min=int(dim["min"]), max=int(dim["max"]))
    return out
