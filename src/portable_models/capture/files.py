"""Saved models on disk: detect the format from the bytes (never the extension) and load
safely. Data only by default; anything whose loading can run code needs ``trust=True``
(``--trust-model``), and is never retried unsafely on our own."""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portable_models.errors import FormatError, InputError, UnsafeModelError

__all__ = ["FORMATS", "LoadedSource", "detect_format", "load_source", "check_pt2_safe"]

FORMATS = ("pt2", "torchscript", "state_dict", "torch_pickle", "safetensors", "keras", "h5",
           "savedmodel", "onnx")
_EXPECTED = {
    ".pt2": ("pt2",), ".pt": ("torchscript", "state_dict", "torch_pickle"),
    ".pth": ("state_dict", "torch_pickle", "torchscript"), ".safetensors": ("safetensors",),
    ".keras": ("keras",), ".h5": ("h5",), ".hdf5": ("h5",), ".onnx": ("onnx",),
}
_TRUST_FIX = "pass --trust-model (trust=True) if the file is yours and you trust it"


@dataclass
class LoadedSource:
    """What a file turned into: a model object for :func:`portable_models.export` plus what
    the file itself says about inputs (names, shapes, dynamic dims)."""

    format: str
    model: Any
    trust: str = "safe"
    hints: dict[str, Any] | None = None


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except zipfile.BadZipFile as exc:
        raise FormatError(f"{path.name} is a damaged or truncated zip archive: {exc}", file=str(path),
                          stage="load", fix="re-save the model; the file is incomplete") from exc


def _zip_format(path: Path) -> str:
    names = _zip_names(path)
    if any(n.endswith("models/model.json") or n.endswith("serialized_exported_program.json") for n in names):
        return "pt2"
    if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "state_dict"
    if "config.json" in names and any(n.startswith("model.weights") for n in names):
        return "keras"
    raise FormatError(f"{path.name} is a zip archive of no model format this library reads",
                      file=str(path), stage="load", fix=f"give one of: {', '.join(FORMATS)}")


def _looks_like_onnx(head: bytes) -> bool:
    # ModelProto: field 1 (ir_version, varint) first; exporters always write it first.
    return len(head) > 2 and head[0] == 0x08 and 3 <= head[1] <= 20


def detect_format(path: str | Path) -> str:
    """The model format of ``path``, judged from its content."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist", file=str(path), stage="load", fix="check the path")
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "savedmodel"
        raise FormatError(f"{path} is a folder but not a TensorFlow SavedModel (no saved_model.pb)",
                          file=str(path), stage="load", fix="give a model file, or a SavedModel folder")
    with open(path, "rb") as fh:
        head = fh.read(64)
    if not head:
        raise FormatError(f"{path.name} is empty", file=str(path), stage="load", fix="re-save the model")
    if head.startswith(b"PK\x03\x04"):
        return _zip_format(path)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "h5"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch_pickle"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100 * 2**20:
        return "safetensors"
    if head.lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml", b"<")):
        raise FormatError(f"{path.name} is an HTML/XML page, not a model (a failed download?)",
                          file=str(path), stage="load", fix="download the model file itself")
    if _looks_like_onnx(head):
        return "onnx"
    raise FormatError(f"{path.name}: unknown model format", file=str(path), stage="load",
                      fix=f"give one of: {', '.join(FORMATS)}")


def check_extension(path: Path, fmt: str) -> None:
    """A file whose name says one format and whose bytes say another is a clear error."""
    expected = _EXPECTED.get(path.suffix.lower())
    if expected is not None and fmt not in expected:
        raise FormatError(
            f"{path.name} is named like {'/'.join(expected)} but its content is {fmt}",
            file=str(path), stage="load", fix=f"rename it to match its content ({fmt})",
        )


def check_pt2_safe(path: Path) -> None:
    """A .pt2 is data only unless a weight or constant is stored pickled."""
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if not name.endswith("_config.json"):
                continue
            config = json.loads(zf.read(name)).get("config", {})
            risky = [k for k, v in config.items()
                     if v.get("use_pickle") or str(v.get("path_name", "")).startswith(("custom_obj", "opaque_obj"))]
            if risky:
                raise UnsafeModelError(
                    f"{path.name} stores {', '.join(risky[:5])} as pickled objects; loading it can run code",
                    file=str(path), stage="load", fix=_TRUST_FIX)


def _unsafe_globals(path: Path) -> list[str]:
    import torch

    try:
        return [str(g) for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))]
    except Exception:  # older torch, or unreadable: fall back to trying the load
        return []


def load_state_dict(path: Path, fmt: str) -> dict[str, Any]:
    import torch

    if fmt == "safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        obj = torch.load(str(path), weights_only=True, map_location="cpu")
    except Exception as exc:
        found = _unsafe_globals(path)
        listed = f" (globals: {', '.join(found[:8])})" if found else ""
        raise UnsafeModelError(
            f"{path.name} needs unsafe globals to load{listed}: it is a pickled object, not plain weights",
            file=str(path), stage="load",
            fix="save model.state_dict() (or export .pt2/ONNX) instead; or " + _TRUST_FIX,
        ) from exc
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path.name} holds a {type(obj).__name__}, not a state dict of tensors",
                         file=str(path), stage="load", fix="save model.state_dict()")
    return obj


def load_source(path: str | Path, *, trust: bool = False, model_class: str | None = None) -> LoadedSource:
    """Load ``path`` as a model object (nn.Module, Keras model or an ONNX path)."""
    path = Path(path)
    fmt = detect_format(path)
    if path.is_file():
        check_extension(path, fmt)
    from portable_models.capture import loaders

    return loaders.load(path, fmt, trust=trust, model_class=model_class)
