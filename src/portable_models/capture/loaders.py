"""One loader per saved-model format. Each returns a :class:`LoadedSource` whose model
:func:`portable_models.export` accepts, plus what the file says about its inputs."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from portable_models.capture.files import (
    _TRUST_FIX,
    LoadedSource,
    check_pt2_safe,
    load_state_dict,
)
from portable_models.errors import InputError, UnsafeModelError, UsageError

__all__ = ["load"]


def _pt2(path: Path, trust: bool, model_class: str | None) -> LoadedSource:
    import torch

    if not trust:
        check_pt2_safe(path)
    try:
        ep = torch.export.load(str(path))
    except Exception as exc:
        raise InputError(f"{path.name} could not be loaded as an ExportedProgram: {exc}",
                         file=str(path), stage="load", fix="re-save it with torch.export.save") from exc
    names = list(ep.graph_signature.user_inputs)
    hints: dict[str, Any] = {"input_names": names}
    if ep.example_inputs is not None:
        hints["example"] = tuple(ep.example_inputs[0])
    hints["dynamic_dims"] = _pt2_dims(ep, names)
    module = ep.module()
    # The program's train/eval behaviour was fixed when it was exported (and eval() is
    # refused on it); only the flag is stale.
    for sub in module.modules():
        sub.training = False
    return LoadedSource("pt2", module, "trusted" if trust else "safe", hints)


def _pt2_dims(ep: Any, names: list[str]) -> dict[str, dict[int, tuple[str, int, int]]]:
    """Dynamic dims of a saved program: symbolic input sizes and their range constraints."""
    ranges = {str(k): v for k, v in ep.range_constraints.items()}
    labels: dict[str, str] = {}
    dims: dict[str, dict[int, tuple[str, int, int]]] = {}
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in names:
            continue
        for axis, size in enumerate(node.meta["val"].shape):
            sym = str(size)
            if sym.isdigit() or sym not in ranges:
                continue
            label = labels.setdefault(sym, "batch" if not labels and axis == 0 else f"dim_{len(labels)}")
            vr = ranges[sym]
            hi = int(vr.upper) if str(vr.upper).isdigit() else 4096
            dims.setdefault(node.name, {})[axis] = (label, max(1, int(vr.lower)), hi)
    return dims


def _torchscript(path: Path, trust: bool, model_class: str | None) -> LoadedSource:
    import torch

    if not trust:
        raise UnsafeModelError(f"{path.name} is a TorchScript archive; loading it runs its code",
                               file=str(path), stage="load",
                               fix="export a .pt2 (torch.export.save) or ONNX instead; or " + _TRUST_FIX)
    module = torch.jit.load(str(path), map_location="cpu")
    return LoadedSource("torchscript", module.eval(), "trusted", {"torchscript": True})


def _import_class(spec: str, path: Path) -> Any:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UsageError(f"--class {spec!r} is not module:Class", file=str(path), stage="load",
                         fix="for example --class mypkg.models:ResNetTiny")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot import {spec}: {exc}", file=str(path), stage="load",
                         fix="make the module importable (PYTHONPATH) and check the class name") from exc


def _state_dict(path: Path, trust: bool, model_class: str | None, fmt: str = "state_dict") -> LoadedSource:
    weights = load_state_dict(path, fmt)  # first: a pickled object is refused as such
    if model_class is None:
        raise UsageError(f"{path.name} holds weights only; the model's code is needed to use them",
                         file=str(path), stage="load",
                         fix="pass --class module:Class (constructed with no arguments)")
    cls = _import_class(model_class, path)
    model = cls()
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise InputError(f"{path.name} does not fit {model_class}: {str(exc).splitlines()[0]}",
                         file=str(path), stage="load", fix="check --class and the checkpoint") from exc
    return LoadedSource(fmt, model.eval(), "safe", {})


def _torch_pickle(path: Path, trust: bool, model_class: str | None) -> LoadedSource:
    import torch

    if not trust:
        raise UnsafeModelError(f"{path.name} is a pickled Python object; loading it can run code",
                               file=str(path), stage="load",
                               fix="save model.state_dict() and pass --class, or export .pt2; or " + _TRUST_FIX)
    obj = torch.load(str(path), weights_only=False, map_location="cpu")
    if not isinstance(obj, torch.nn.Module):
        raise InputError(f"{path.name} holds a {type(obj).__name__}, not an nn.Module", file=str(path),
                         stage="load", fix="pass --class for a state dict")
    return LoadedSource("torch_pickle", obj.eval(), "trusted", {})


def _keras(path: Path, trust: bool, model_class: str | None, fmt: str = "keras") -> LoadedSource:
    import keras

    try:
        model = keras.saving.load_model(str(path), safe_mode=not trust, compile=False)
    except ValueError as exc:
        if "safe_mode" in str(exc) or "Lambda" in str(exc) or "unsafe" in str(exc).lower():
            raise UnsafeModelError(
                f"{path.name} needs unsafe deserialisation (a Lambda layer or custom Python code)",
                file=str(path), stage="load", fix=_TRUST_FIX) from exc
        raise InputError(f"{path.name} could not be loaded by Keras: {exc}", file=str(path),
                         stage="load", fix="check the file and the Keras version") from exc
    return LoadedSource(fmt, model, "trusted" if trust else "safe", {})


def _savedmodel(path: Path, trust: bool, model_class: str | None) -> LoadedSource:
    if not trust:
        raise UnsafeModelError(f"{path} is a TensorFlow SavedModel; its graph may run arbitrary ops",
                               file=str(path), stage="load", fix="save a .keras file instead; or " + _TRUST_FIX)
    import keras
    import tensorflow as tf

    sig = tf.saved_model.load(str(path)).signatures.get("serving_default")
    if sig is None:
        raise InputError(f"{path} has no serving_default signature", file=str(path), stage="load",
                         fix="export it with model.export() or tf.saved_model.save(signatures=...)")
    specs = sig.structured_input_signature[1]
    inputs = {n: keras.Input(shape=tuple(s.shape[1:]), dtype=s.dtype.name, name=n) for n, s in specs.items()}
    layer = keras.layers.TFSMLayer(str(path), call_endpoint="serving_default")
    outputs = layer(inputs if len(inputs) > 1 else next(iter(inputs.values())))
    return LoadedSource("savedmodel", keras.Model(inputs, outputs), "trusted", {})


def _onnx(path: Path, trust: bool, model_class: str | None) -> LoadedSource:
    from portable_models.capture.onnx import OnnxModelFile, graph_specs
    from portable_models.core.onnx_io import check_external_data

    check_external_data(path)  # before onnx or onnxruntime reads any tensor
    ins, _ = graph_specs(path)
    return LoadedSource("onnx", OnnxModelFile(path), "safe",
                        {"input_names": [s.name for s in ins], "input_specs": ins})


_LOADERS: dict[str, Callable[[Path, bool, str | None], LoadedSource]] = {
    "pt2": _pt2, "torchscript": _torchscript, "state_dict": _state_dict,
    "safetensors": lambda p, t, c: _state_dict(p, t, c, "safetensors"),
    "torch_pickle": _torch_pickle, "keras": _keras, "h5": lambda p, t, c: _keras(p, t, c, "h5"),
    "savedmodel": _savedmodel, "onnx": _onnx,
}


def load(path: Path, fmt: str, *, trust: bool, model_class: str | None) -> LoadedSource:
    return _LOADERS[fmt](path, trust, model_class)
