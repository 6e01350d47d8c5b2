"""What an artifact's file must be, checked from its bytes before a runtime loads it.

A contract cannot choose how its artifacts are loaded: the runtime follows from the target
(:data:`portable_models.convert.registry.TARGET_INFO`), and the file must look like that target's
format. A TorchScript archive labelled ONNX, or garbage labelled anything, is refused here,
unloaded, naming the file.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

from portable_models.errors import FormatError

__all__ = ["FORMAT_CHECKS", "check_format"]

#: the first byte of an ONNX ModelProto: the tag of one of its fields (protobuf writes
#: ir_version, field 1, first; other writers may start with another field).
_ONNX_FIRST = {0x08, 0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xAA, 0xCA}


def _head(path: Path, n: int = 16) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def _file(path: Path) -> None:
    if not path.is_file():
        raise FormatError(f"{path.name} is not a file", file=str(path), stage="load",
                          fix="re-export the bundle")


def _onnx(path: Path) -> None:
    _file(path)
    head = _head(path)
    if not head or head[0] not in _ONNX_FIRST or head.startswith(b"PK"):
        raise FormatError(f"{path.name} is not an ONNX model (it starts with {head[:8]!r})", file=str(path),
                          stage="load", fix="the bundle's ONNX artifact was replaced: re-export it")


def _flatbuffer(ident: bytes, what: str) -> Callable[[Path], None]:
    """A flatbuffer whose file identifier (bytes 4-8) is ``ident``; a trailing ``??`` in it
    stands for two digits (the ExecuTorch schema version: ET12)."""

    def matches(got: bytes) -> bool:
        if ident.endswith(b"??"):
            return got[:2] == ident[:2] and got[2:4].isdigit()
        return got == ident

    def check(path: Path) -> None:
        _file(path)
        head = _head(path)
        if len(head) < 8 or not matches(head[4:8]):
            raise FormatError(f"{path.name} is not a {what} (no {ident.decode()} identifier)", file=str(path),
                              stage="load", fix=f"the bundle's {what} was replaced: re-export it")
    return check


def _torchscript(path: Path) -> None:
    _file(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise FormatError(f"{path.name} is not a TorchScript archive ({exc})", file=str(path), stage="load",
                          fix="the bundle's TorchScript artifact was replaced: re-export it") from exc
    if not any(n.endswith("/data.pkl") for n in names) or not any("/code/" in n for n in names):
        raise FormatError(f"{path.name} is a zip archive but not a TorchScript module", file=str(path),
                          stage="load", fix="the bundle's TorchScript artifact was replaced: re-export it")


def _mlpackage(path: Path) -> None:
    manifest = path / "Manifest.json"
    if not path.is_dir() or not manifest.is_file():
        raise FormatError(f"{path.name} is not a Core ML package (no Manifest.json)", file=str(path),
                          stage="load", fix="the bundle's Core ML artifact was replaced: re-export it")
    if os.path.getsize(manifest) > 1 << 20:
        raise FormatError(f"{path.name}/Manifest.json is implausibly large", file=str(manifest), stage="load",
                          fix="the bundle's Core ML artifact was replaced: re-export it")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        ok = isinstance(data, dict) and isinstance(data.get("itemInfoEntries"), dict)
    except (ValueError, OSError, RecursionError):
        ok = False
    if not ok:
        raise FormatError(f"{path.name}/Manifest.json is not a Core ML package manifest", file=str(manifest),
                          stage="load", fix="the bundle's Core ML artifact was replaced: re-export it")


#: file format name -> its check (formats are named by :data:`targets.TARGET_INFO`).
FORMAT_CHECKS: dict[str, Callable[[Path], None]] = {
    "onnx": _onnx,
    "tflite": _flatbuffer(b"TFL3", "TFLite flatbuffer"),
    "pte": _flatbuffer(b"ET??", "ExecuTorch program"),
    "torchscript": _torchscript,
    "mlpackage": _mlpackage,
}


def check_format(file_format: str, path: Path) -> None:
    """Raise :class:`FormatError` unless ``path`` looks like ``file_format``."""
    try:
        FORMAT_CHECKS[file_format](path)
    except OSError as exc:
        raise FormatError(f"cannot read {path.name}: {exc.strerror or exc}", file=str(path), stage="load",
                          fix="check the bundle's files and permissions") from exc
