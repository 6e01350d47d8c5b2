"""sha256 and size of a file or a folder (an ``.mlpackage``), as the contract records them:
what capture, convert and the contract all need."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["file_sha256", "path_bytes", "sha256_path"]


def sha256_path(path: Path) -> str:
    """sha256 of a file; of a folder (``.mlpackage``), over its sorted relative paths and contents."""
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
            h.update(sha256_path(f).encode())
        return h.hexdigest()
    return file_sha256(path)


def path_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


#: files up to this size are hashed from one read; larger ones in chunks of it.
_WHOLE = 8 << 20


def file_sha256(path: str | Path) -> str:
    """sha256 of one file. A small file in one read of its size: a fixed large buffer
    (``hashlib.file_digest`` takes 256 KiB) is mapped and faulted in afresh on every call,
    which made hashing a 30 KB artifact ~4x slower in a worker (0.3 ms a file)."""
    with open(path, "rb", buffering=0) as fh:
        if os.fstat(fh.fileno()).st_size <= _WHOLE:
            return hashlib.sha256(fh.readall()).hexdigest()
        h = hashlib.sha256()
        while chunk := fh.read(_WHOLE):
            h.update(chunk)
        return h.hexdigest()
