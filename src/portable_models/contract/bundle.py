"""Atomic bundle writing and file hashes.

A bundle is written in a staging folder beside its destination and renamed into
place; ``contract.json`` is the last file written. The destination is always either
the old complete bundle or the new complete one. A lock file beside the destination
keeps two exports from writing one bundle at the same time.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portable_models.core.hashing import file_sha256, sha256_path
from portable_models.core.paths import bundle_path
from portable_models.errors import BundleWriteError, ContractError, IntegrityError, UsageError

__all__ = ["BundleScan", "Staging", "writing", "check_files", "folder_digest", "scan_bundle", "list_files", "raise_on_problems"]


def list_files(root: Path, *, exclude: tuple[str, ...] = ("contract.json",)) -> list[dict[str, Any]]:
    """Every regular file of a bundle with its size and sha256, sorted by path; links and
    special files are neither followed nor listed (:func:`scan_bundle`)."""
    out = []
    for rel in sorted(scan_bundle(root).files, key=lambda r: tuple(r.split("/"))):
        if rel in exclude:
            continue
        f = root / rel
        out.append({"path": rel, "bytes": f.stat().st_size, "sha256": sha256_path(f)})
    return out


def check_files(root: Path, files: list[dict[str, Any]]) -> list[str]:
    """Compare a bundle folder with its contract's file list. Returns problems, each naming a file."""
    return [p for p in (check_file(root, entry) for entry in files) if p is not None]


def check_file(root: Path, entry: dict[str, Any]) -> str | None:
    """One entry of a contract's file list against the folder: the problem, or None. A path
    that could leave the bundle (absolute, ``..``, through a symlink) is a problem, never
    looked at (:func:`portable_models.core.paths.bundle_path`)."""
    try:
        path = bundle_path(root, entry["path"], what="file")
    except ContractError as exc:
        return f"refused path: {exc.message}"
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        return f"missing file: {entry['path']}"
    try:
        same = st.st_size == entry["bytes"] and file_sha256(path) == entry["sha256"]
    except OSError as exc:
        return f"unreadable file: {entry['path']} ({exc.strerror or exc})"
    if not same:
        return f"changed file: {entry['path']} (sha256 differs from the contract)"
    return None


@dataclass
class BundleScan:
    """What a bundle folder holds, looked at without following links: its regular files
    (relative POSIX paths) and every entry that is neither a file nor a folder (symlinks,
    FIFOs, devices), which a bundle never has."""

    files: set[str] = field(default_factory=set)
    odd: list[str] = field(default_factory=list)


def scan_bundle(root: Path) -> BundleScan:
    """Walk ``root`` without following links (:class:`BundleScan`)."""
    scan = BundleScan()
    for here, dirs, names in os.walk(root, followlinks=False):
        rel = Path(here).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        for d in list(dirs):
            if os.path.islink(os.path.join(here, d)):
                dirs.remove(d)
                scan.odd.append(prefix + d)
        for name in names:
            try:
                regular = stat.S_ISREG(os.lstat(os.path.join(here, name)).st_mode)
            except OSError:
                regular = False
            (scan.files.add if regular else scan.odd.append)(prefix + name)
    scan.odd.sort()
    return scan


def folder_digest(entries: list[dict[str, Any]], folder: str) -> str:
    """What :func:`sha256_path` gives for the bundle folder ``folder`` (a ``.mlpackage``) when
    its files are the contract's ``entries`` under it, computed from their recorded hashes."""
    h = hashlib.sha256()
    inside = [e for e in entries if e["path"].startswith(folder + "/")]
    for e in sorted(inside, key=lambda e: tuple(e["path"][len(folder) + 1:].split("/"))):
        h.update(e["path"][len(folder) + 1:].encode() + b"\0")
        h.update(str(e["sha256"]).encode())
    return h.hexdigest()


def raise_on_problems(root: Path, problems: list[str], stage: str = "verify") -> None:
    """An :class:`IntegrityError` naming ``problems`` (from :func:`check_files`), if any."""
    if problems:
        raise IntegrityError(
            f"bundle {root} does not match its contract: " + "; ".join(problems),
            file=str(root / problems[0].split(": ", 1)[1].split(" ")[0]), stage=stage,
            fix="re-export the bundle, or restore the files named above",
        )


@contextlib.contextmanager
def writing(what: str, where: Path) -> Iterator[None]:
    """Turn an OS error while writing the bundle (disk full, permissions) into a
    :class:`BundleWriteError` naming the file and the fix."""
    try:
        yield
    except OSError as exc:
        fix = "free some disk space and export again" if exc.errno == errno.ENOSPC else \
            "check the output folder's permissions and free space"
        raise BundleWriteError(f"cannot write {what}: {exc.strerror or exc}",
                               file=str(exc.filename or where), stage="write", fix=fix) from exc


class Staging:
    """A staging folder beside ``dest``; :meth:`commit` swaps it into place."""

    def __init__(self, dest: Path, *, overwrite: bool = False, lock_timeout_s: float = 0.0) -> None:
        self.dest = Path(dest).absolute()
        self.overwrite = overwrite
        self.lock_timeout_s = lock_timeout_s
        self.path = self.dest.parent / f".{self.dest.name}.staging-{uuid.uuid4().hex[:8]}"
        self._lock_fd: int | None = None
        self._lock_path = self.dest.parent / f".{self.dest.name}.lock"

    def __enter__(self) -> Staging:
        self._check_dest()
        self._lock()
        self._remove_stale()
        try:
            self.path.mkdir(parents=True)
        except OSError as exc:
            self._unlock()
            raise BundleWriteError(f"cannot create {self.path}: {exc.strerror}", file=str(self.path),
                                   stage="write", fix="choose a writable output folder") from exc
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if self.path.exists():
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self._unlock()

    def _check_dest(self) -> None:
        if self.dest.exists() and not self.dest.is_dir():
            raise UsageError(f"output path {self.dest} is an existing file", file=str(self.dest),
                             stage="write", fix="choose a folder path for the bundle")
        if self.dest.is_dir() and any(self.dest.iterdir()) and not self.overwrite:
            raise UsageError(f"output folder {self.dest} exists and is not empty",
                             file=str(self.dest), stage="write",
                             fix="pass --overwrite (overwrite=True) to replace it, or choose another folder")
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BundleWriteError(f"cannot create {self.dest.parent}: {exc.strerror}",
                                   file=str(self.dest.parent), stage="write",
                                   fix="choose a writable output folder") from exc
        if not os.access(self.dest.parent, os.W_OK):
            raise BundleWriteError(f"output folder {self.dest.parent} is not writable",
                                   file=str(self.dest.parent), stage="write",
                                   fix="choose a writable output folder or fix its permissions")

    def _lock(self) -> None:
        import fcntl

        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    raise BundleWriteError(
                        f"{self.dest} is being written by {holder}", file=str(self._lock_path),
                        stage="write", fix="wait for the other export to finish, or choose another folder",
                    ) from exc
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        self._lock_fd = fd

    def _remove_stale(self) -> None:
        """Staging and old folders left beside ``dest`` by a writer that died (killed with
        SIGKILL, the machine lost power): every writer holds the lock until its folders are
        gone, and the lock is released when its holder dies, so once this process holds it
        no other live writer owns them."""
        for prefix in (f".{self.dest.name}.staging-", f".{self.dest.name}.old-"):
            for stale in self.dest.parent.glob(glob.escape(prefix) + "*"):
                if stale != self.path and stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            try:
                self._lock_path.unlink()
            except OSError:
                pass

    def write_text(self, rel: str, text: str) -> Path:
        path = self.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        return path

    def commit(self) -> None:
        """Swap the staging folder into place (the old bundle is removed only after)."""
        old = self.dest.parent / f".{self.dest.name}.old-{uuid.uuid4().hex[:8]}"
        try:
            if self.dest.exists():
                os.replace(self.dest, old)
            os.replace(self.path, self.dest)
        except OSError as exc:
            if old.exists() and not self.dest.exists():
                os.replace(old, self.dest)
            raise BundleWriteError(f"cannot move the bundle into {self.dest}: {exc.strerror}",
                                   file=str(self.dest), stage="write",
                                   fix="check permissions and free space") from exc
        shutil.rmtree(old, ignore_errors=True)
