"""A content-addressed cache of route attempts.

Re-exporting an unchanged model with unchanged options should cost almost nothing. The
key of one attempt hashes everything its outcome depends on: the captured program (by
content, not zip metadata), the golden data, the specs, the route, the precision, the
options, the tolerance, and the versions of every package the route and its runtime use.
A changed weight, option or converter version misses. Only deterministic outcomes are
stored (a pass, a parity failure, a converter's own error) — never a crash, a timeout,
a memory kill or a network refusal.

Location: ``$PORTABLE_MODELS_CACHE``, else ``$XDG_CACHE_HOME/portable_models``, else
``~/.cache/portable_models``. ``cache=False`` (``--no-cache``) turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Any

from portable_models._version import __version__
from portable_models.core import settings
from portable_models.core.imports import package_version
from portable_models.core.settings import CACHE_ENV

__all__ = ["CACHE_ENV", "cache_root", "content_digest", "attempt_key", "load", "store", "discard",
           "UNCACHED_CODES"]

#: error codes that say nothing about the inputs: never cached.
UNCACHED_CODES = frozenset({"crashed", "timeout", "out_of_memory", "network_required", "worker_failed",
                            "missing_dependency"})


def cache_root() -> Path:
    return settings.cache_root()


def content_digest(path: Path) -> str:
    """sha256 of a file's content; for a zip archive (``.pt2``, ``.keras``, ``.npz``), of its
    members' names (first folder stripped) and bytes, so timestamps do not matter."""
    if path.is_dir():  # a package folder (.mlpackage): every file's path and bytes
        from portable_models.core.hashing import sha256_path

        return sha256_path(path)
    h = hashlib.sha256()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for name in sorted(zf.namelist()):
                data = zf.read(name)
                if name == "metadata.json":  # a .keras file's save date says nothing of the model
                    meta = json.loads(data)
                    meta.pop("date_saved", None)
                    data = json.dumps(meta, sort_keys=True).encode()
                h.update(name.split("/", 1)[-1].encode() + b"\0")
                h.update(hashlib.sha256(data).digest())
        return h.hexdigest()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def attempt_key(*, parts: dict[str, Any], packages: tuple[str, ...]) -> str:
    """The key of one route attempt: ``parts`` (JSON-able) plus installed package versions."""
    versions = {p: package_version(p) for p in sorted(set(packages) | {"numpy"})}
    blob = json.dumps({"parts": parts, "versions": versions, "portable_models": __version__,
                       "platform": sys.platform}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def load(key: str, dest: Path) -> dict[str, Any] | None:
    """The stored outcome for ``key`` with its artifact copied into ``dest`` (None: a miss)."""
    entry = cache_root() / key[:2] / key
    record = entry / "record.json"
    if not record.is_file():
        return None
    try:
        data = dict(json.loads(record.read_text()))
        stored = entry / "artifact"
        if stored.exists():
            dest.mkdir(parents=True, exist_ok=True)
            for item in stored.iterdir():
                target = dest / item.name
                if item.is_dir():
                    shutil.copytree(item, target, dirs_exist_ok=True)
                else:
                    shutil.copyfile(item, target)
        return data
    except (OSError, ValueError):
        return None  # a damaged entry is a miss


def discard(key: str) -> None:
    """Remove a stored outcome (a damaged one), so that the next store can take its place."""
    entry = cache_root() / key[:2] / key
    trash = entry.with_name(f".{key}.discarded.{uuid.uuid4().hex[:8]}")
    try:
        os.replace(entry, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def store(key: str, record: dict[str, Any], artifact_dir: Path | None) -> None:
    """Store an outcome (and the folder holding its artifact) atomically; errors are ignored:
    a cache that cannot be written only costs time."""
    if (record.get("error") or {}).get("code") in UNCACHED_CODES:
        return
    root = cache_root() / key[:2]
    tmp = root / f".{key}.{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        if artifact_dir is not None and artifact_dir.exists():
            shutil.copytree(artifact_dir, tmp / "artifact")
        (tmp / "record.json").write_text(json.dumps(record, allow_nan=False))
        os.replace(tmp, root / key)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
