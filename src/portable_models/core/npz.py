"""Reading an ``.npz`` archive under bounds, never with pickle: every size it declares is
checked before anything is inflated or allocated (the file, the zip directory, each
``.npy`` header), data is inflated a chunk at a time and never past the declared size, and
only numeric arrays are accepted. A bundle's golden archive is read under the bound its
contract allows (:class:`ContractError`); a user's samples under the general ceiling
(:class:`InputError`)."""

from __future__ import annotations

import ast
import copy
import functools
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import IO

import numpy as np

from portable_models.errors import ContractError, InputError, PortableModelsError

__all__ = ["MAX_ARRAY_BYTES", "MAX_BUNDLE_NPZ_BYTES", "MAX_NPZ_BYTES", "read_archive"]


#: largest array a golden/sample archive may declare (uncompressed), and the whole archive.
MAX_ARRAY_BYTES = 2 * 2**30


MAX_NPZ_BYTES = 8 * 2**30


#: the most a bundle's golden archive may inflate to, whatever its contract declares: it is
#: read in the caller, which has no memory limit, and a contract may declare huge dims.
MAX_BUNDLE_NPZ_BYTES = 1 * 2**30


#: how much of a member is read (and inflated) at a time.
_READ_CHUNK = 1 << 20


class _Bounds:
    """What reading one archive may take: the error to raise (:class:`ContractError` for a
    bundle's golden file, :class:`InputError` for a user's samples), the total inflated
    bytes, and whether only numeric dtypes are accepted."""

    def __init__(self, path: Path, max_bytes: int | None) -> None:
        self.path = path
        self.bundle = max_bytes is not None
        self.error: type[PortableModelsError] = ContractError if self.bundle else InputError
        self.total = min(MAX_BUNDLE_NPZ_BYTES, max_bytes) if max_bytes is not None else MAX_NPZ_BYTES
        self.array = min(MAX_ARRAY_BYTES, self.total)

    def refuse(self, message: str, fix: str) -> PortableModelsError:
        return self.error(f"{self.path.name}: {message}", file=str(self.path), stage="load", fix=fix)


_ARCHIVE_FIX = "the archive is larger than its contract allows: re-export the bundle"


def read_archive(path: Path, max_bytes: int | None = None) -> list[tuple[str, np.ndarray]]:
    """Every ``.npy`` member of an archive, in order, read in one pass (never with pickle).
    Declared sizes are checked before anything is inflated or allocated: the file's size
    and the zip directory's first, then each member's own header before its data is read;
    the data is inflated a chunk at a time and never past the size the directory declares."""
    bounds = _Bounds(path, max_bytes)
    try:
        if bounds.bundle and os.stat(path).st_size > bounds.total:
            raise bounds.refuse(f"the file holds {os.stat(path).st_size} bytes, more than the "
                                f"{bounds.total} its contract's shapes allow", _ARCHIVE_FIX)
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            _check_directory(infos, bounds)
            members = []
            for info in infos:
                with _open_member(zf, info) as member:
                    name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                    members.append((name, _read_npy(member, path, info, bounds)))
            return members
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
            zipfile.LargeZipFile) as exc:
        raise bounds.refuse(f"not an .npz archive (or a damaged one): {exc}",
                            "write it with numpy.savez") from exc
    except OSError as exc:
        raise bounds.refuse(f"cannot be read: {exc.strerror or exc}", "check the file") from exc


class _Member:
    """A member's data as the zip module reads it (stored members; other methods)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream

    def read(self, n: int) -> bytes:
        return self.stream.read(n)

    def finish(self) -> bool:
        """Whether the data ended where the directory said (reading to the end checks the CRC)."""
        return not self.stream.read(1)

    def __enter__(self) -> _Member:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.close()


class _Inflating(_Member):
    """A deflated member, inflated here a bounded chunk at a time: never more than the
    directory's ``file_size`` comes out, and a stream that holds more, ends early or does
    not match its CRC is caught (the zip module would stop at the declared size and let
    the rest pass unread)."""

    def __init__(self, raw: IO[bytes], info: zipfile.ZipInfo) -> None:
        super().__init__(raw)
        self.left, self.expected_crc, self.crc = info.file_size, info.CRC, 0
        self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self.pending = b""

    def _input(self) -> bytes:
        if not self.pending and not self.inflater.eof:
            self.pending = self.stream.read(1 << 16)
        return self.pending

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n and self.left > 0 and self._input():
            data = self.inflater.decompress(self.pending, min(n - len(out), self.left))
            self.pending = self.inflater.unconsumed_tail
            self.left -= len(data)
            self.crc = zlib.crc32(data, self.crc)
            out += data
        return bytes(out)

    def finish(self) -> bool:
        while not self.inflater.eof and self._input():
            if self.inflater.decompress(self.pending, 1):
                return False  # more data than the directory declares
            self.pending = self.inflater.unconsumed_tail
        return self.inflater.eof and self.left == 0 and self.crc == self.expected_crc


def _open_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Member:
    if info.compress_type != zipfile.ZIP_DEFLATED:
        return _Member(zf.open(info))
    raw = copy.copy(info)  # the compressed bytes as they are: inflated by _Inflating
    raw.compress_type, raw.file_size = zipfile.ZIP_STORED, info.compress_size
    del raw.CRC  # checked over the inflated data instead
    return _Inflating(zf.open(raw), info)


def _check_directory(infos: list[zipfile.ZipInfo], bounds: _Bounds) -> None:
    """The zip directory against the bounds, before any member is opened."""
    total = 0
    seen: set[str] = set()
    for info in infos:
        total += info.file_size
        if info.file_size > bounds.array or total > bounds.total:
            limit = "its contract's shapes allow" if bounds.bundle else "2 GiB per array"
            raise bounds.refuse(
                f"member {info.filename} declares {info.file_size} bytes",
                _ARCHIVE_FIX if bounds.bundle else f"golden and sample archives are limited to {limit}",
            )
        if bounds.bundle:
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 0x1:
                raise bounds.refuse(f"member {info.filename} is encrypted or compressed with method "
                                    f"{info.compress_type}", "write the archive with numpy.savez")
            if info.filename in seen:
                raise bounds.refuse(f"member {info.filename} appears twice", _ARCHIVE_FIX)
            seen.add(info.filename)


def _read_npy(member: _Member, path: Path, info: zipfile.ZipInfo, bounds: _Bounds) -> np.ndarray:
    """One ``.npy`` member: header checked (no objects, within the bounds, as long as the
    directory says), then the data, a chunk at a time, then the end (the CRC check)."""
    name = info.filename
    magic = member.read(8)
    if not magic.startswith(b"\x93NUMPY") or len(magic) < 8:
        raise bounds.refuse(f"member {name} is not a .npy array", "write the archive with numpy.savez")
    try:
        size_bytes = 2 if magic[6] == 1 else 4 if magic[6] in (2, 3) else 0
        size = int.from_bytes(member.read(size_bytes), "little") if size_bytes else -1
        if not 0 < size <= MAX_NPY_HEADER:
            raise ValueError(f"header of {size} bytes")
        text = member.read(size).decode("utf-8" if magic[6] == 3 else "latin1")
        shape, fortran, dtype = _npy_header(text)
    except (ValueError, SyntaxError, KeyError, TypeError, UnicodeDecodeError, MemoryError,
            RecursionError) as exc:
        raise bounds.refuse(f"member {name} has an unreadable header", "rewrite it with numpy.savez") from exc
    count = math.prod(shape)
    if dtype.hasobject:
        raise bounds.refuse(f"member {name} holds Python objects (pickle)",
                            "store plain numeric arrays; object arrays are never loaded")
    if bounds.bundle and dtype.kind not in "biufc":
        raise bounds.refuse(f"member {name} has dtype {dtype.str}, not a numeric one",
                            "golden arrays are numeric; re-export the bundle")
    nbytes = count * dtype.itemsize
    if nbytes > bounds.array:
        raise bounds.refuse(
            f"member {name} declares a {nbytes / 2**30:.0f} GiB array",
            _ARCHIVE_FIX if bounds.bundle else "golden and sample arrays are limited to 2 GiB",
        )
    declared = info.file_size - 8 - size_bytes - size
    if declared != nbytes:
        how = "shorter" if declared < nbytes else "longer"
        raise bounds.refuse(f"member {name} is {how} than its header declares "
                            f"({declared} bytes of data for {nbytes})", "the archive is damaged; rewrite it")
    flat = np.empty(count, dtype)
    view = flat.view(np.uint8).data if flat.nbytes else memoryview(b"")
    done = 0
    while done < len(view):
        got = member.read(min(_READ_CHUNK, len(view) - done))
        if not got:
            raise bounds.refuse(f"member {name} is shorter than its header declares",
                                "the archive is truncated; rewrite it")
        view[done:done + len(got)] = got
        done += len(got)
    if not member.finish():  # the data ends where the directory says, with its CRC
        raise bounds.refuse(f"member {name}'s data does not end where the zip directory says, "
                            "or fails its CRC", "the archive is damaged; rewrite it")
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


#: longest .npy header read (numpy's own default limit).
MAX_NPY_HEADER = 10000


@functools.lru_cache(maxsize=256)
def _npy_header(text: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of a .npy header, parsed as a literal (never
    evaluated as code). Cached: a golden set repeats a few headers across cases and loads."""
    header = ast.literal_eval(text.strip())
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise ValueError("not a .npy header")
    shape, fortran = header["shape"], header["fortran_order"]
    if (not isinstance(shape, tuple) or not isinstance(fortran, bool)
            or not all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError("bad shape or order")
    return shape, fortran, np.lib.format.descr_to_dtype(header["descr"])
