"""Capture of a Keras 3 model: ``source/model.keras``, specs, golden set.

Functional, Sequential and subclassed models are captured in the caller's process with
whatever Keras backend it runs. The routes reload the saved file in worker processes:
a model with classes of its own (a subclassed model, custom layers) reloads there only
when those classes are registered (``@keras.saving.register_keras_serializable``) in
modules the worker can import; the capture lists them in ``meta["custom_modules"]`` and
the routes import the ones named in the job option ``keras_custom_modules``. Names come from the model: an input is named after its
``InputLayer`` (``keras.Input(name=...)``), an output after the layer that makes it, or
after its key when the model returns a dict; ``input_names`` / ``output_names`` override
them. 4-D float inputs are recorded as ``NHWC`` (the Keras convention). Axis 0 of every
input is a dynamic ``batch`` dim (1..64) unless the model fixes it with an explicit
``keras.Input(batch_size=N)`` or ``dynamic_dims`` says otherwise; other ``None`` dims
of the model are fixed at the example's size unless ``dynamic_dims`` names them.

The saved ``model.keras`` must reload with ``safe_mode=True`` (no Python code inside,
such as a ``Lambda`` layer's function) and reproduce the outputs; a model that needs
unsafe loading is refused with :class:`UnsafeModelError` unless the caller trusts it.

The helpers :func:`load_saved`, :func:`pack_inputs` and :func:`flat_outputs` are the
one way the Keras routes reload a captured model and call it in their workers.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from portable_models.capture import Captured
from portable_models.core import golden
from portable_models.core.arrays import to_numpy
from portable_models.core.imports import package_version
from portable_models.core.keras_io import first_line as _first
from portable_models.core.keras_io import flat_outputs, load_saved, pack_inputs
from portable_models.core.spec import DTYPES, DimSpec, TensorSpec, normalise_dynamic_dims
from portable_models.errors import (
    CaptureError,
    UsageError,
)

if TYPE_CHECKING:
    from portable_models.capture import CaptureOptions

__all__ = ["capture_keras", "custom_modules"]

_STAGE = "capture"
_BAD_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")
#: (atol, rtol) of the reload check: the saved file must reproduce the model's outputs.
_RELOAD_TOL = (1e-6, 1e-5)


def custom_modules(model: Any) -> list[str]:
    """Python modules that define non-Keras classes of the model (they must be imported
    before a worker can reload it)."""
    found = {type(model).__module__}
    for layer in getattr(model, "_flatten_layers", lambda: [])():
        found.add(type(layer).__module__)
    return sorted(m for m in found if m.split(".")[0] not in ("keras", "tf_keras"))


# -- names, structure and example arrays -------------------------------------------------
def _clean(name: str, used: set[str]) -> str:
    out = _BAD_CHARS.sub("_", name) or "tensor"
    if not re.match(r"[A-Za-z_]", out):
        out = f"_{out}"
    base, n = out, 1
    while out in used:
        out, n = f"{base}_{n}", n + 1
    used.add(out)
    return out


def _declared_inputs(model: Any) -> list[Any]:
    try:
        return list(model.inputs)
    except (AttributeError, ValueError):
        return []


def _layer_name(tensor: Any) -> str:
    history = getattr(tensor, "_keras_history", None)
    op = getattr(history, "operation", None)
    return str(getattr(op, "name", None) or getattr(tensor, "name", "input"))


def _example_arrays(model: Any, example: Any, declared: list[Any]) -> tuple[list[np.ndarray], list[str] | None]:
    """Flat example arrays in the model's input order, plus the dict keys if the example
    is a dict for a model without declared inputs."""
    if isinstance(example, Mapping):
        if declared:
            by_name = {str(k): v for k, v in example.items()}
            names = [_layer_name(t) for t in declared]
            missing = [n for n in names if n not in by_name]
            if missing:
                raise UsageError(f"example_inputs lacks {missing}", stage=_STAGE,
                                 fix=f"key the example by the model's input names {names}")
            return [to_numpy(by_name[n]) for n in names], None
        keys = sorted(str(k) for k in example)
        return [to_numpy(example[k]) for k in keys], keys
    items = list(example) if isinstance(example, (list, tuple)) else [example]
    if not items:
        raise UsageError("example_inputs is empty", stage=_STAGE, fix="pass one array per input")
    return [to_numpy(v) for v in items], None


def _input_names(model: Any, declared: list[Any], n: int, keys: list[str] | None,
                 given: Sequence[str] | None) -> list[str]:
    if given is not None:
        if len(given) != n:
            raise UsageError(f"input_names has {len(given)} names for {n} inputs", stage=_STAGE,
                             fix="give one name per model input")
        return list(given)
    used: set[str] = set()
    if declared:
        return [_clean(_layer_name(t), used) for t in declared]
    if keys:
        return [_clean(k, used) for k in keys]
    params = [p.name for p in inspect.signature(model.call).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if n == 1 and params:
        return [_clean(params[0], used)]
    return [_clean(f"input_{i}", used) for i in range(n)]


def _align(arrays: list[np.ndarray], declared: list[Any], names: list[str]) -> list[np.ndarray]:
    """Cast each example to the dtype its Input declares and check the fixed dims."""
    if declared and len(declared) != len(arrays):
        raise UsageError(f"the model has {len(declared)} inputs, example_inputs {len(arrays)}",
                         stage=_STAGE, fix="pass one array per model input, in model.inputs order")
    out = []
    for i, arr in enumerate(arrays):
        want = str(declared[i].dtype) if declared else arr.dtype.name
        if arr.dtype.kind == "f" and want not in DTYPES:
            want = "float32"
        if want not in DTYPES:
            raise UsageError(f"input {names[i]!r} has dtype {want}", stage=_STAGE,
                             fix=f"use one of {', '.join(DTYPES)}")
        cast = arr.astype(want) if want != "bfloat16" else arr.astype("float32")
        if arr.dtype.kind in "iub" and not np.array_equal(cast, arr):
            raise UsageError(f"example input {names[i]!r} does not fit the model's {want}",
                             stage=_STAGE, fix=f"pass {want} values")
        if declared:
            shape = tuple(declared[i].shape)
            if len(shape) != cast.ndim or any(d is not None and d != s for d, s in zip(shape, cast.shape, strict=False)):
                raise UsageError(f"example input {names[i]!r} has shape {list(cast.shape)}; the "
                                 f"model takes {list(shape)}", stage=_STAGE,
                                 fix="pass an example of the model's input shape (None: any size)")
        out.append(np.ascontiguousarray(cast))
    return out


# -- dims and specs -----------------------------------------------------------------------
def _free_shapes(model: Any, declared: list[Any], arrays: list[np.ndarray]) -> list[tuple[int | None, ...]]:
    """Per input, the sizes the model fixes (None: free). Only a functional model's
    ``keras.Input`` fixes the batch; a Sequential built by calling it records the first
    call's batch, which binds nothing (Keras layers are batch-agnostic)."""
    if not declared:
        return [(None,) * arr.ndim for arr in arrays]
    functional = hasattr(model, "_inputs_struct")
    out = []
    for t in declared:
        shape = tuple(t.shape)
        out.append(shape if functional or not shape else (None, *shape[1:]))
    return out


def _default_axes(names: list[str], free: list[tuple[int | None, ...]]) -> dict[str, Mapping[int, Any]]:
    """Axis 0 of every input is the dynamic batch, unless the model fixes it."""
    batch = DimSpec(name="batch", min=1, max=64)
    return {n: {0: batch} for n, shape in zip(names, free, strict=True) if shape and shape[0] is None}


def _check_axes(axes: dict[str, dict[int, str]], dims: dict[str, DimSpec], names: list[str],
                arrays: list[np.ndarray], free: list[tuple[int | None, ...]]) -> None:
    unknown = set(axes) - set(names)
    if unknown:
        raise UsageError(f"dynamic_dims names unknown inputs {sorted(unknown)}", stage=_STAGE,
                         fix=f"the inputs are {', '.join(names)}")
    for i, (name, arr) in enumerate(zip(names, arrays, strict=True)):
        for axis, label in axes.get(name, {}).items():
            if axis >= arr.ndim:
                raise UsageError(f"dynamic dim {label!r}: input {name!r} has no axis {axis}",
                                 stage=_STAGE, fix=f"{name!r} has rank {arr.ndim}")
            dim, size = dims[label], int(arr.shape[axis])
            if not dim.min <= size <= dim.max:
                raise UsageError(f"dynamic dim {label!r} is {size} in the example {name!r}",
                                 stage=_STAGE, fix=f"give an example size in {dim.min}..{dim.max}")
            fixed = free[i][axis]
            if fixed is not None:
                raise UsageError(f"dynamic dim {label!r}: the model fixes axis {axis} of "
                                 f"{name!r} to {fixed}", stage=_STAGE,
                                 fix="declare that axis None in keras.Input, or leave it fixed")


def _input_specs(names: list[str], arrays: list[np.ndarray], axes: dict[str, dict[int, str]],
                 keys: list[str] | None, opts: CaptureOptions) -> list[TensorSpec]:
    specs = []
    for i, (name, arr) in enumerate(zip(names, arrays, strict=True)):
        shape = tuple(axes.get(name, {}).get(a, int(s)) for a, s in enumerate(arr.shape))
        layout = opts.layouts.get(name, "NHWC" if arr.ndim == 4 and arr.dtype.kind == "f" else None)
        rng = opts.input_ranges.get(name)
        specs.append(TensorSpec(name=name, dtype=arr.dtype.name, shape=shape, layout=layout,
                                range=(float(rng[0]), float(rng[1])) if rng is not None else None,
                                meta={"keras_key": keys[i]} if keys else {}))
    return specs


# -- reference outputs ----------------------------------------------------------------------
def _run(model: Any, specs: list[TensorSpec], cases: golden.Cases) -> tuple[Any, list[list[np.ndarray]]]:
    """The model on every case: the first result's structure, and the flat outputs."""
    results: list[list[np.ndarray]] = []
    first: Any = None
    for i, case in enumerate(cases):
        flat = [case[s.name] for s in specs]
        try:
            out = model(pack_inputs(model, flat, specs), training=False)
        except Exception as exc:
            shapes = {s.name: list(case[s.name].shape) for s in specs}
            raise CaptureError(
                f"the model failed on golden case {i} {shapes}: {type(exc).__name__}: {_first(exc)}",
                stage=_STAGE, fix="check input dtypes, shapes and declared ranges; a model that "
                                  "needs a fixed batch size takes dynamic_dims={}") from exc
        first = out if first is None else first
        results.append([to_numpy(t) for t in flat_outputs(out)])
    return first, results


def _output_names(model: Any, out: Any, n: int, given: Sequence[str] | None) -> list[str]:
    import keras

    if given is not None:
        if len(given) != n:
            raise UsageError(f"output_names has {len(given)} names but the model returns {n} "
                             "tensors", stage=_STAGE, fix="give one name per returned tensor")
        return list(given)
    used: set[str] = set()
    if isinstance(out, Mapping):
        paths = [path for path, _ in keras.tree.flatten_with_path(out)]
        return [_clean(".".join(str(k) for k in p), used) for p in paths]
    try:
        declared = list(model.outputs)
    except (AttributeError, ValueError):
        declared = []
    if len(declared) == n:
        return [_clean(_layer_name(t), used) for t in declared]
    if n == 1:
        return ["output"]
    return [_clean(f"output_{i}", used) for i in range(n)]


def _check_deterministic(model: Any, specs: list[TensorSpec], case: dict[str, np.ndarray],
                         first: dict[str, np.ndarray]) -> None:
    _, again = _run(model, specs, [case])
    for (name, arr), other in zip(first.items(), again[0], strict=True):
        if not np.array_equal(arr, other, equal_nan=arr.dtype.kind in "fc"):
            raise CaptureError(
                f"output {name!r} changes between two runs on the same input: the reference is "
                "not deterministic", stage=_STAGE,
                fix="remove randomness from call() (layers that are random at inference, "
                    "seeds drawn per call)")


def _case_sizes(specs: list[TensorSpec], case: Mapping[str, np.ndarray]) -> dict[str, int]:
    return {label: int(case[s.name].shape[axis]) for s in specs
            for axis, label in s.dynamic_axes.items()}


def _output_specs(names: list[str], outputs: golden.Cases, cases: golden.Cases,
                  in_specs: list[TensorSpec]) -> list[TensorSpec]:
    """Output shapes: an axis whose size follows a dynamic input dim across the golden
    cases gets that dim's label."""
    sizes = [_case_sizes(in_specs, c) for c in cases]
    specs = []
    for name in names:
        arrays = [o[name] for o in outputs]
        shape: list[int | str] = list(arrays[0].shape)
        for axis in range(arrays[0].ndim):
            seen = [a.shape[axis] if a.ndim > axis else -1 for a in arrays]
            if len(set(seen)) == 1:
                continue
            labels = [lb for lb in sizes[0] if [s[lb] for s in sizes] == seen]
            shape[axis] = labels[0] if labels else f"{name}_d{axis}"
        specs.append(TensorSpec(name=name, dtype=arrays[0].dtype.name, shape=tuple(shape)))
    return specs


# -- saving and the safe reload ---------------------------------------------------------------
def _save(model: Any, source_dir: Path) -> Path:
    source_dir.mkdir(parents=True, exist_ok=True)
    path = source_dir / "model.keras"
    try:
        model.save(str(path))
    except (NotImplementedError, TypeError, ValueError) as exc:
        raise CaptureError(f"model.save failed: {type(exc).__name__}: {_first(exc)}",
                           stage=_STAGE, fix="custom layers need get_config() and "
                                             "@keras.saving.register_keras_serializable") from exc
    return path


def _check_reload(path: Path, specs: list[TensorSpec], case: dict[str, np.ndarray],
                  expected: dict[str, np.ndarray], trust: bool) -> None:
    """The saved file reloads safely and reproduces the outputs of golden case 0."""
    reloaded = load_saved(path, trust=trust, stage=_STAGE)
    _, got = _run(reloaded, specs, [case])
    atol, rtol = _RELOAD_TOL
    for (name, want), have in zip(expected.items(), got[0], strict=True):
        same = want.shape == have.shape and (
            np.allclose(have, want, atol=atol, rtol=rtol, equal_nan=True) if want.dtype.kind in "fc"
            else np.array_equal(have, want))
        if not same:
            raise CaptureError(
                f"the saved model.keras does not reproduce output {name!r} "
                f"({list(have.shape)} vs {list(want.shape)})", file=str(path), stage=_STAGE,
                fix="custom layers must save all their state: get_config(), build() and weights")


def _import_keras() -> Any:
    try:
        import keras
    except ImportError as exc:
        raise UsageError(f"keras is not importable: {exc}", stage=_STAGE,
                         fix="pip install 'portable-models[keras]'") from exc
    return keras


def capture_keras(model: Any, example_inputs: Any, opts: CaptureOptions, source_dir: Path) -> Captured:
    """Save the model as ``model.keras``, draw the golden set, compute reference outputs."""
    keras = _import_keras()
    if not isinstance(model, keras.Model):
        raise UsageError(f"{type(model).__module__}.{type(model).__name__} is not a Keras 3 model",
                         stage=_STAGE, fix="pass a keras.Model (a tf_keras / Keras 2 model: save "
                                           "it as .h5 and convert the file)")
    trust = bool(getattr(opts, "trust_model", False))
    declared = _declared_inputs(model)
    arrays, keys = _example_arrays(model, example_inputs, declared)
    if not model.built:
        model(pack_inputs(model, arrays), training=False)
        declared = _declared_inputs(model)
    names = _input_names(model, declared, len(arrays), keys, opts.input_names)
    arrays = _align(arrays, declared, names)
    free = _free_shapes(model, declared, arrays)
    wanted = opts.dynamic_dims if opts.dynamic_dims is not None else _default_axes(names, free)
    axes, dims = normalise_dynamic_dims(wanted)
    _check_axes(axes, dims, names, arrays, free)
    specs = _input_specs(names, arrays, axes, keys, opts)
    cases, eval_meta = golden.with_eval_cases(_cases(specs, dims, dict(zip(names, arrays, strict=True)), opts),
                                              specs, opts.eval_samples)
    struct, flat = _run(model, specs, cases)
    out_names = _output_names(model, struct, len(flat[0]), opts.output_names)
    outputs = [dict(zip(out_names, o, strict=True)) for o in flat]
    _check_deterministic(model, specs, cases[0], outputs[0])
    constant = golden.check_outputs(outputs, out_names)
    path = _save(model, source_dir)
    _check_reload(path, specs, cases[0], outputs[0], trust)
    return Captured(
        framework="keras", version=package_version("keras") or str(keras.__version__),
        source_file=path, inputs=specs, outputs=_output_specs(out_names, outputs, cases, specs),
        dims=dims, golden_inputs=cases, golden_outputs=outputs,
        meta={"samples": "user" if opts.samples else "example+random", "constant_outputs": constant,
              "keras_backend": keras.backend.backend(), "keras_class": type(model).__name__,
              "custom_modules": custom_modules(model), "trust": "trusted" if trust else "safe", **eval_meta},
    )


def _cases(specs: list[TensorSpec], dims: dict[str, DimSpec], example: dict[str, np.ndarray],
           opts: CaptureOptions) -> golden.Cases:
    if not opts.samples:
        return golden.make_inputs(specs, dims, example, cases=opts.cases, seed=opts.seed)
    out = []
    for i, case in enumerate(opts.samples):
        missing = [s.name for s in specs if s.name not in case]
        if missing:
            raise UsageError(f"sample {i} lacks {missing}", stage=_STAGE,
                             fix="give every sample an array per input name")
        out.append({s.name: np.ascontiguousarray(to_numpy(case[s.name]).astype(s.dtype))
                    for s in specs})
    return out


