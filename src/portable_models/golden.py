"""The golden set: seeded inputs (several cases, several sizes of each dynamic dim) and
the source model's outputs for them, stored as ``.npz`` without pickle.

Case 0 is the user's own example (real data beats random data); the other cases are
drawn per input from its dtype and declared range. Where dims are dynamic, the cases
cover at least two different sizes of each (when the bounds allow it).
"""

from __future__ import annotations

import ast
import base64
import functools
import hashlib
import io
import json
import math
import os
import time
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from portable_models.errors import GoldenSetError, InputError, UsageError
from portable_models.spec import DimSpec, TensorSpec, concrete_shape

__all__ = [
    "Cases",
    "case_sizes",
    "make_inputs",
    "save_cases",
    "cases_digest",
    "load_cases",
    "read_only_cases",
    "save_scratch",
    "load_scratch",
    "pack_outputs",
    "unpack_outputs",
    "check_outputs",
    "draw",
    "load_samples",
    "MAX_NPZ_BYTES",
]

Cases = list[dict[str, np.ndarray]]

#: largest array a golden/sample archive may declare (uncompressed), and the whole archive.
MAX_ARRAY_BYTES = 2 * 2**30
MAX_NPZ_BYTES = 8 * 2**30


def case_sizes(
    specs: Sequence[TensorSpec], dims: Mapping[str, DimSpec], example: Mapping[str, np.ndarray],
    cases: int,
) -> list[dict[str, int]]:
    """Size of every named dim in every case: case 0 uses the example's sizes, the others
    alternate with a second size inside the bounds."""
    base: dict[str, int] = {}
    for spec in specs:
        arr = example.get(spec.name)
        for axis, label in spec.dynamic_axes.items():
            if arr is not None and axis < arr.ndim:
                base.setdefault(label, int(arr.shape[axis]))
    for label, dim in dims.items():
        base.setdefault(label, dim.min)
    other: dict[str, int] = {}
    for label, size in base.items():
        dim = dims.get(label, DimSpec(name=label))
        other[label] = size + 1 if size + 1 <= dim.max else max(dim.min, size - 1)
    return [dict(base) if i % 2 == 0 else dict(other) for i in range(cases)]


def draw(spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Seeded values for one input: within its range, of its dtype."""
    if spec.dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if spec.dtype.startswith(("int", "uint")):
        if spec.range is None:
            raise UsageError(
                f"integer input {spec.name!r} has no value range",
                fix=f"declare one, e.g. input_ranges={{{spec.name!r}: (0, vocab_size - 1)}} "
                f"or --input {spec.name}:SHAPE:{spec.dtype}:0..N",
            )
        lo, hi = int(spec.range[0]), int(spec.range[1])
        return rng.integers(lo, hi + 1, size=shape).astype(spec.dtype)
    if spec.range is not None:
        lo_f, hi_f = spec.range
        values = rng.uniform(lo_f, hi_f, size=shape)
    else:
        values = rng.standard_normal(size=shape)
    return values.astype(spec.dtype if spec.dtype != "bfloat16" else "float32")


def make_inputs(
    specs: Sequence[TensorSpec], dims: Mapping[str, DimSpec], example: Mapping[str, np.ndarray],
    *, cases: int = 4, seed: int = 0,
) -> Cases:
    """Golden inputs: the example as case 0, then seeded draws at alternating sizes."""
    if cases < 1:
        raise UsageError(f"cases={cases}: need at least one golden case", fix="use cases >= 2")
    rng = np.random.default_rng(seed)
    sizes = case_sizes(specs, dims, example, cases)
    out: Cases = [{s.name: np.asarray(example[s.name]) for s in specs}]
    for i in range(1, cases):
        out.append({s.name: draw(s, concrete_shape(s, sizes[i]), rng) for s in specs})
    return out


def save_cases(path: Path, cases: Sequence[Mapping[str, np.ndarray]], *, compress: bool = True) -> None:
    """Write cases as ``<case>/<name>.npy`` members of one ``.npz`` (no pickle, no timestamps:
    the same cases give the same bytes). With ``compress``, a member is deflated only where
    that saves a quarter of its size: random float data barely compresses, and every
    ``verify`` would pay for inflating it. ``compress=False``: scratch files read once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh, zipfile.ZipFile(fh, "w", allowZip64=True) as zf:
        for i, case in enumerate(cases):
            for name, arr in case.items():
                a = _numeric(arr, f"golden array {name!r}", "pass numeric arrays")
                buf = io.BytesIO()
                np.lib.format.write_array(buf, a, allow_pickle=False)
                raw = buf.getbuffer()
                method = zipfile.ZIP_DEFLATED if compress and _compresses(raw) else zipfile.ZIP_STORED
                info = zipfile.ZipInfo(f"{i}/{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = method
                zf.writestr(info, raw)


#: first line of a scratch file (:func:`save_scratch`).
SCRATCH_MAGIC = b"portable-models scratch 1\n"


def save_scratch(path: Path, cases: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Cases handed from a worker to the caller once: a line naming the arrays of every case,
    then the arrays as plain ``.npy`` records back to back (no zip directory, no checksums:
    a tenth of :func:`save_cases`' time for small outputs)."""
    names = [list(case) for case in cases]
    with open(path, "wb") as fh:
        fh.write(SCRATCH_MAGIC + json.dumps(names).encode() + b"\n")
        for case in cases:
            for name, arr in case.items():
                a = _numeric(arr, f"output {name!r}", "models must return numeric arrays")
                np.lib.format.write_array(fh, a, allow_pickle=False)


#: run outputs up to this many bytes travel in the worker's answer line (base64), larger
#: ones through a scratch file (:func:`pack_outputs`).
INLINE_OUTPUTS_MAX = 1 << 20


def pack_outputs(cases: Sequence[Mapping[str, np.ndarray]], path: Path) -> dict[str, Any]:
    """A run's outputs for the caller: small ones in the answer itself (``{"outputs": …}``:
    per case, per name, ``[dtype, shape, base64 bytes]``; no file to write, read and delete
    for each run of a verify), larger ones saved at ``path`` (``{}``). :func:`unpack_outputs`
    reads either."""
    arrays = [{name: _numeric(arr, f"output {name!r}", "models must return numeric arrays")
               for name, arr in case.items()} for case in cases]
    if sum(a.nbytes for case in arrays for a in case.values()) > INLINE_OUTPUTS_MAX:
        save_scratch(path, arrays)
        return {}
    return {"outputs": [{name: [a.dtype.str, list(a.shape), base64.b64encode(a.tobytes()).decode("ascii")]
                         for name, a in case.items()} for case in arrays]}


def unpack_outputs(result: Mapping[str, Any], path: Path) -> Cases:
    """The outputs :func:`pack_outputs` handed over: from the answer, else from ``path``."""
    if "outputs" not in result:
        return load_scratch(path)
    cases = []
    for case in result["outputs"]:
        arrays = {}
        for name, (dtype, shape, data) in case.items():
            dt = np.dtype(dtype)
            if dt.hasobject:
                raise InputError(f"output {name!r} came back as dtype object", stage="load",
                                 fix="a worker of another portable_models version answered: run again")
            arrays[name] = np.frombuffer(base64.b64decode(data), dtype=dt).reshape(shape).copy()
        cases.append(arrays)
    return cases


def _numeric(arr: np.ndarray, what: str, fix: str) -> np.ndarray:
    """``arr`` as an array that can be written without pickle (object arrays are refused)."""
    a = np.asarray(arr)
    if a.dtype == object:
        raise UsageError(f"{what} has dtype object", fix=fix)
    return a


def load_scratch(path: Path) -> Cases:
    """Read what :func:`save_scratch` wrote (never with pickle)."""
    with open(path, "rb") as fh:
        if fh.readline() != SCRATCH_MAGIC:
            raise InputError(f"{path} is not a scratch file of this version", file=str(path), stage="load",
                             fix="a worker of another portable_models version wrote it: run again")
        names = json.loads(fh.readline())
        return [{name: np.lib.format.read_array(fh, allow_pickle=False) for name in case} for case in names]


def _compresses(raw: memoryview, sample: int = 1 << 20) -> bool:
    """Whether deflating saves at least a quarter, judged on the first MiB."""
    head = bytes(raw[:sample])
    return len(zlib.compress(head, 1)) < 0.75 * len(head)


def cases_digest(cases: Sequence[Mapping[str, np.ndarray]]) -> str:
    """sha256 of cases by content: names, dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for i, case in enumerate(cases):
        for name, arr in case.items():
            a = np.ascontiguousarray(arr)
            h.update(f"{i}/{name}:{a.dtype.str}:{a.shape}\0".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def _read_archive(path: Path) -> list[tuple[str, np.ndarray]]:
    """Every ``.npy`` member of an archive, in order, read in one pass (never with pickle).
    Declared sizes are checked before anything is allocated: the zip directory's first,
    then each member's own header before its data is read."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            total = 0
            for info in infos:
                total += info.file_size
                if info.file_size > MAX_ARRAY_BYTES or total > MAX_NPZ_BYTES:
                    raise InputError(
                        f"{path.name}: member {info.filename} declares {info.file_size} bytes",
                        file=str(path), stage="load",
                        fix="golden and sample archives are limited to 2 GiB per array",
                    )
            members = []
            for info in infos:
                with zf.open(info) as member:
                    name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                    members.append((name, _read_npy(member, path, info.filename)))
            return members
    except zipfile.BadZipFile as exc:
        raise InputError(f"{path.name} is not an .npz archive: {exc}", file=str(path),
                         stage="load", fix="write it with numpy.savez") from exc


def _read_npy(member: IO[bytes], path: Path, name: str) -> np.ndarray:
    """One ``.npy`` member: header checked (no objects, at most 2 GiB), then the data."""
    magic = member.read(8)
    if not magic.startswith(b"\x93NUMPY") or len(magic) < 8:
        raise InputError(f"{path.name}: member {name} is not a .npy array", file=str(path),
                         stage="load", fix="write the archive with numpy.savez")
    try:
        size_bytes = 2 if magic[6] == 1 else 4 if magic[6] in (2, 3) else 0
        size = int.from_bytes(member.read(size_bytes), "little") if size_bytes else -1
        if not 0 < size <= MAX_NPY_HEADER:
            raise ValueError(f"header of {size} bytes")
        text = member.read(size).decode("utf-8" if magic[6] == 3 else "latin1")
        shape, fortran, dtype = _npy_header(text)
    except (ValueError, SyntaxError, KeyError, TypeError, UnicodeDecodeError, MemoryError,
            RecursionError) as exc:
        raise InputError(f"{path.name}: member {name} has an unreadable header",
                         file=str(path), stage="load", fix="rewrite it with numpy.savez") from exc
    count = math.prod(shape)
    if dtype.hasobject:
        raise InputError(f"{path.name}: member {name} holds Python objects (pickle)",
                         file=str(path), stage="load",
                         fix="store plain numeric arrays; object arrays are never loaded")
    if count * dtype.itemsize > MAX_ARRAY_BYTES:
        raise InputError(
            f"{path.name}: member {name} declares a {count * dtype.itemsize / 2**30:.0f} GiB array",
            file=str(path), stage="load", fix="golden and sample arrays are limited to 2 GiB",
        )
    flat = np.empty(count, dtype)
    view = flat.view(np.uint8).data if flat.nbytes else memoryview(b"")
    done = 0
    while done < len(view):
        got = member.readinto(view[done:])  # type: ignore[attr-defined]
        if not got:
            raise InputError(f"{path.name}: member {name} is shorter than its header declares",
                             file=str(path), stage="load", fix="the archive is truncated; rewrite it")
        done += got
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


def load_cases(path: Path) -> Cases:
    """Read an archive written by :func:`save_cases` (never with pickle)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} is missing or not a file", file=str(path), stage="load",
                         fix="point at the bundle's golden/*.npz")
    return _group(path, _read_archive(path))


#: archives read last, by file identity (see :func:`read_only_cases`).
_READ: dict[tuple[int, int, int, int, int], Cases] = {}
_READ_KEPT = 4
#: a file changed less than this long ago is not remembered: file times tick in steps of up
#: to a few ms, so a rewrite of the same size right after the read could keep all of them
_SETTLED_NS = 2_000_000_000


def read_only_cases(path: Path) -> Cases:
    """``load_cases(path)``, remembered while the file is unchanged (same device, inode, size,
    modification and status-change times; the last cannot be set back; a file changed in the
    last 2 s is read afresh every time): a verify reads the same golden files every time, and
    a worker runs every artifact of a bundle on the same inputs. The arrays are read-only
    (shared between callers): copy one to write into it."""
    try:
        st = os.stat(path)
    except OSError:
        return load_cases(path)  # its own clear error
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)  # the file, by any path
    cases = _READ.get(key)
    if cases is None:
        cases = load_cases(path)
        for case in cases:
            for arr in case.values():
                arr.setflags(write=False)
        if time.time_ns() - st.st_ctime_ns >= _SETTLED_NS:
            while len(_READ) >= _READ_KEPT:
                _READ.pop(next(iter(_READ)))
            _READ[key] = cases
    return [dict(case) for case in cases]


def _group(path: Path, members: list[tuple[str, np.ndarray]]) -> Cases:
    by_case: dict[int, dict[str, np.ndarray]] = {}
    for key, arr in members:
        case, _, name = key.partition("/")
        if not case.isdigit() or not name:
            raise InputError(f"{path.name}: unexpected member {key!r}", file=str(path),
                             stage="load", fix="members are named <case>/<tensor>")
        by_case.setdefault(int(case), {})[name] = arr
    return [by_case[i] for i in sorted(by_case)]


def check_outputs(cases: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]) -> None:
    """Refuse a golden set that proves nothing: non-finite, empty or constant outputs."""
    for name in names:
        arrays = [np.asarray(c[name]) for c in cases]
        fix = "check the model and the example inputs (a check against a constant proves nothing)"
        if any(a.size == 0 for a in arrays):
            raise GoldenSetError(f"output {name!r} is empty for some golden case", stage="capture",
                                 fix=fix)
        if any(a.dtype.kind in "fc" and not np.isfinite(a).all() for a in arrays):
            raise GoldenSetError(f"output {name!r} holds NaN or Inf on the golden inputs",
                                 stage="capture", fix="fix the model or give inputs where it is finite")
        if len(arrays) < 2:
            continue
        flat = np.concatenate([a.reshape(-1) for a in arrays])
        same_shape = all(a.shape == arrays[0].shape for a in arrays)
        if (flat == flat[0]).all() or (same_shape and all(np.array_equal(a, arrays[0]) for a in arrays)):
            raise GoldenSetError(
                f"output {name!r} is identical for every golden case", stage="capture", fix=fix,
            )


def load_samples(path: Path) -> Cases:
    """User sample inputs: an ``.npz`` with ``<case>/<name>`` members, or ``<name>`` members
    for a single case. Loaded with the same limits as golden files, never with pickle."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"samples file {path} does not exist", file=str(path), stage="load",
                         fix="pass an .npz written with numpy.savez")
    members = _read_archive(path)
    if members and all("/" not in k for k, _ in members):
        return [dict(members)]
    return _group(path, members)
