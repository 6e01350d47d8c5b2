"""The golden set: seeded inputs (several cases, several sizes of each dynamic dim) and
the source model's outputs for them, stored as ``.npz`` without pickle.

Case 0 is the user's own example (real data beats random data); the other cases are
drawn per input from its dtype and declared range. Where dims are dynamic, the cases
cover at least two different sizes of each (when the bounds allow it).
"""

from __future__ import annotations

import ast
import base64
import hashlib
import io
import json
import os
import time
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.core.npz import MAX_NPZ_BYTES, read_archive
from portable_models.core.spec import DimSpec, TensorSpec, concrete_shape
from portable_models.errors import (
    ContractError,
    GoldenSetError,
    InputError,
    PortableModelsError,
    UsageError,
)

__all__ = [
    "eval_case_indices",
    "with_eval_cases",
    "Cases",
    "case_sizes",
    "cases_of_shape",
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
    "golden_max_bytes",
    "MAX_NPZ_BYTES",
]

Cases = list[dict[str, np.ndarray]]


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


def cases_of_shape(cases: Cases, shapes: Mapping[str, Sequence[int]] | None = None) -> list[int]:
    """The cases whose inputs have exactly ``shapes`` (by input name; default: case 0's):
    those a fixed-shape artifact of these input shapes can take."""
    want = {k: tuple(int(d) for d in v) for k, v in (shapes or {}).items()} or {
        k: tuple(v.shape) for k, v in cases[0].items()}
    return [i for i, case in enumerate(cases)
            if all(k in case and tuple(case[k].shape) == shape for k, shape in want.items())]


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


#: what a golden archive may hold per element (float64/int64: the widest dtype a spec names)
#: and per member beyond its data (the .npy header), when its cap comes from a contract.
_ELEMENT_BYTES = 8
_MEMBER_OVERHEAD = 4096
#: allowance on top of a contract-derived cap: small golden sets are never refused by it
#: (expression dims, overheads), a bomb still is.
_CAP_SLACK = 16 * 2**20


def golden_max_bytes(specs: Sequence[TensorSpec], dims: Mapping[str, DimSpec], cases: int) -> int:
    """The most bytes a golden archive of ``cases`` cases of ``specs`` may declare, inflated:
    every named dim at its declared maximum (a dim expression such as ``2*batch`` bounded
    from its names; a name without bounds at the largest size declared anywhere, at least
    64), every element 8 bytes, plus a fixed allowance. Pass it to :func:`load_cases` /
    :func:`read_only_cases` as ``max_bytes`` when the archive belongs to a bundle."""
    unknown = max([64, *(d.max for d in dims.values()),
                   *(d for s in specs for d in s.shape if isinstance(d, int))])
    per_case = 0
    for spec in specs:
        elements = 1
        for d in spec.shape:
            elements *= d if isinstance(d, int) else _dim_bound(d, dims, unknown)
        per_case += elements * _ELEMENT_BYTES + _MEMBER_OVERHEAD
    return max(1, cases) * per_case + _CAP_SLACK


_BOUND_CALLS = {"max", "min", "Max", "Min", "CeilToInt", "FloorToInt", "ceiling", "floor", "FloorDiv",
                "CeilDiv", "IntTrueDiv", "TruncToInt", "RoundToInt", "Mod", "PythonMod", "abs", "Abs"}


def _dim_bound(expr: str, dims: Mapping[str, DimSpec], unknown: int) -> int:
    """An upper bound on the size of a named or symbolic dim (``batch``, ``2*s0 + 1``,
    ``Max(1, seq)``): its names at their maxima, ``unknown`` where it cannot be read."""
    if expr in dims:
        return dims[expr].max
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return unknown

    def bound(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return bound(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return abs(node.value)
        if isinstance(node, ast.Name):
            dim = dims.get(node.id)
            return dim.max if dim is not None else unknown
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
            return bound(node.operand)
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Add | ast.Sub):
                return bound(node.left) + bound(node.right)
            if isinstance(node.op, ast.Mult):
                return bound(node.left) * bound(node.right)
            if isinstance(node.op, ast.FloorDiv | ast.Div | ast.Mod):
                return bound(node.left)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _BOUND_CALLS
                and node.args and not node.keywords):
            return max(bound(a) for a in node.args)
        return unknown

    try:
        return bound(tree)
    except RecursionError:
        return unknown


def load_cases(path: Path, *, max_bytes: int | None = None) -> Cases:
    """Read an archive written by :func:`save_cases` (never with pickle).

    ``max_bytes``: the archive belongs to a bundle and may hold at most that many bytes,
    inflated (:func:`golden_max_bytes` of what its contract declares). The file's size,
    the zip directory and every member's header are checked against it before anything is
    inflated or allocated; only numeric dtypes, stored or deflated members are read; any
    problem is a :class:`ContractError` naming the file. Without it: the general limits
    (2 GiB an array, 8 GiB an archive) and :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        error = ContractError if max_bytes is not None else InputError
        raise error(f"{path} is missing or not a file", file=str(path), stage="load",
                    fix="point at the bundle's golden/*.npz")
    return _group(path, read_archive(path, max_bytes), ContractError if max_bytes is not None else InputError)


#: archives read last, by file identity (see :func:`read_only_cases`).
_READ: dict[tuple[int, int, int, int, int], Cases] = {}
_READ_KEPT = 4
#: a file changed less than this long ago is not remembered: file times tick in steps of up
#: to a few ms, so a rewrite of the same size right after the read could keep all of them
_SETTLED_NS = 2_000_000_000


def read_only_cases(path: Path, *, max_bytes: int | None = None) -> Cases:
    """``load_cases(path, max_bytes=max_bytes)``, remembered while the file is unchanged (same
    device, inode, size, modification and status-change times; the last cannot be set back; a
    file changed in the last 2 s is read afresh every time): a verify reads the same golden
    files every time, and a worker runs every artifact of a bundle on the same inputs. The
    arrays are read-only (shared between callers): copy one to write into it. A remembered
    read is handed out under ``max_bytes`` only when its archive declared no more."""
    try:
        st = os.stat(path)
    except OSError:
        return load_cases(path, max_bytes=max_bytes)  # its own clear error
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)  # the file, by any path
    cases = _READ.get(key)
    if cases is not None and max_bytes is not None and not _within(cases, max_bytes):
        cases = None  # remembered from a read without a cap: read again, under this one
    if cases is None:
        cases = load_cases(path, max_bytes=max_bytes)
        for case in cases:
            for arr in case.values():
                arr.setflags(write=False)
        if time.time_ns() - st.st_ctime_ns >= _SETTLED_NS:
            while len(_READ) >= _READ_KEPT:
                _READ.pop(next(iter(_READ)))
            _READ[key] = cases
    return [dict(case) for case in cases]


def _within(cases: Cases, max_bytes: int) -> bool:
    """Whether remembered ``cases`` pass what a read under ``max_bytes`` checks of the data."""
    arrays = [arr for case in cases for arr in case.values()]
    return sum(a.nbytes for a in arrays) <= max_bytes and all(a.dtype.kind in "biufc" for a in arrays)


def _group(path: Path, members: list[tuple[str, np.ndarray]],
           error: type[PortableModelsError] = InputError) -> Cases:
    by_case: dict[int, dict[str, np.ndarray]] = {}
    for key, arr in members:
        case, _, name = key.partition("/")
        if not case.isdigit() or not name or len(case) > 9:
            raise error(f"{path.name}: unexpected member {key!r}", file=str(path),
                        stage="load", fix="members are named <case>/<tensor>")
        by_case.setdefault(int(case), {})[name] = arr
    return [by_case[i] for i in sorted(by_case)]


def eval_case_indices(spec: Mapping[str, Any] | None, total: int) -> tuple[int, ...]:
    """The golden cases that are held-out real data (``golden.eval``: ``first`` and ``cases``),
    within the ``total`` golden cases."""
    if not spec:
        return ()
    first = int(spec.get("first", 0))
    return tuple(i for i in range(first, first + int(spec.get("cases", 0))) if 0 <= i < total)


def with_eval_cases(cases: Cases, specs: Sequence[TensorSpec],
                    eval_samples: Sequence[Mapping[str, Any]] | None) -> tuple[Cases, dict[str, Any]]:
    """``cases`` and then the held-out real inputs ``eval_samples`` (each an array per input,
    cast to its declared dtype), and the meta that says where they start and how many."""
    if not eval_samples:
        return cases, {}
    from portable_models.core.arrays import to_numpy

    extra = []
    for i, case in enumerate(eval_samples):
        missing = [s.name for s in specs if s.name not in case]
        if missing:
            raise UsageError(f"eval sample {i} lacks {missing}", stage="capture",
                             fix="give every eval sample an array per input name")
        extra.append({s.name: np.ascontiguousarray(to_numpy(case[s.name]).astype(s.dtype)) for s in specs})
    return [*cases, *extra], {"eval": {"first": len(cases), "cases": len(extra), "sha256": cases_digest(extra)}}


def check_outputs(cases: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]) -> list[str]:
    """Refuse a golden set that proves nothing: an output that is empty or non-finite, or
    every output the same for every case. Returns the outputs that are the same for every
    case while others vary: they are still checked (an artifact must give the same indices),
    but they are weak evidence (common for ``argmax``/``topk`` indices on random inputs)."""
    fix = "check the model and the example inputs (a check against a constant proves nothing)"
    constant = []
    for name in names:
        arrays = [np.asarray(c[name]) for c in cases]
        if any(a.size == 0 for a in arrays):
            raise GoldenSetError(f"output {name!r} is empty for some golden case", stage="capture",
                                 fix=fix)
        if any(a.dtype.kind in "fc" and not np.isfinite(a).all() for a in arrays):
            raise GoldenSetError(f"output {name!r} holds NaN or Inf on the golden inputs",
                                 stage="capture", fix="fix the model or give inputs where it is finite")
        if len(arrays) < 2:
            continue
        if _same_everywhere(arrays):
            constant.append(name)
    if names and len(cases) >= 2 and len(constant) == len(names):
        which = "the output" if len(names) == 1 else "every output"
        raise GoldenSetError(f"{which} ({', '.join(map(repr, names))}) is identical for every golden case",
                             stage="capture", fix=fix)
    return constant


def _same_everywhere(arrays: list[np.ndarray]) -> bool:
    """Every case gives the same: one value throughout, the same array, or (batches of
    several sizes) the same row for every item of every case."""
    flat = np.concatenate([a.reshape(-1) for a in arrays])
    if (flat == flat[0]).all():
        return True
    if all(a.shape == arrays[0].shape for a in arrays):
        return all(np.array_equal(a, arrays[0]) for a in arrays)
    if all(a.ndim >= 1 and a.shape[1:] == arrays[0].shape[1:] for a in arrays):
        rows = np.concatenate([a.reshape(a.shape[0], -1) for a in arrays])
        return bool((rows == rows[0]).all())
    return False


def load_samples(path: Path) -> Cases:
    """User sample inputs: an ``.npz`` with ``<case>/<name>`` members, or ``<name>`` members
    for a single case. Loaded with the same limits as golden files, never with pickle."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"samples file {path} does not exist", file=str(path), stage="load",
                         fix="pass an .npz written with numpy.savez")
    members = read_archive(path)
    if members and all("/" not in k for k, _ in members):
        return [dict(members)]
    return _group(path, members)
