"""The artifact contract (schema ``portable-models/contract/v1``): its types,
(de)serialisation and validation against the JSON Schema shipped in the package.

``contract.json`` comes from a bundle, and a bundle is untrusted input: :func:`load_contract`
reads at most :data:`MAX_CONTRACT_BYTES`, refuses duplicate keys, ``NaN``/``Infinity``,
numbers outside int64 or float range, nesting deeper than :data:`MAX_DEPTH` and lone
surrogates, validates against the (strict) schema, then checks what the schema cannot say
(names unique, dims ordered, io maps and tolerances usable). Every problem is a
:class:`ContractError` naming the file — never another exception.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import platform
import re
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from portable_models._version import __version__
from portable_models.core.golden import golden_max_bytes
from portable_models.core.iomap import IoMap
from portable_models.core.paths import user_path
from portable_models.core.spec import DimSpec, TensorSpec
from portable_models.core.text import escape
from portable_models.core.tolerance import TolerancePolicy
from portable_models.errors import ContractError, PortableModelsError

__all__ = [
    "SCHEMA",
    "STATUSES",
    "Attempt",
    "Artifact",
    "Contract",
    "load_contract",
    "parse_contract_text",
    "validate_contract",
    "created_with",
    "MAX_CONTRACT_BYTES",
    "MAX_DEPTH",
]

SCHEMA = "portable-models/contract/v1"
#: the largest contract.json read (a contract of a few hundred artifacts' files is < 1 MiB).
MAX_CONTRACT_BYTES = 16 * 2**20
#: the deepest nesting of objects and arrays a contract may have (the library writes < 12).
MAX_DEPTH = 64
#: what an artifact (or one route attempt) can end as.
STATUSES = ("pass", "fail", "error", "unverified", "skipped")


def created_with() -> dict[str, str]:
    machine = platform.machine().lower() or "unknown"
    return {
        "portable_models": __version__,
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{machine}",
    }


@dataclass(kw_only=True)
class Attempt:
    """One route tried for a target: how far it got and why it stopped."""

    route: str
    status: str
    stage: str | None = None
    error: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"route": self.route, "status": self.status, "seconds": round(self.seconds, 3)}
        if self.stage:
            out["stage"] = self.stage
        if self.error:
            out["error"] = self.error
        if self.parity:
            out["parity"] = self.parity
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Attempt:
        return cls(route=d["route"], status=d["status"], stage=d.get("stage"), error=d.get("error"),
                   parity=d.get("parity"), seconds=float(d.get("seconds", 0.0)))


@dataclass(kw_only=True)
class Artifact:
    """One target's outcome: the artifact (when one was kept), how to feed it, its verdict."""

    target: str
    status: str
    precision: str = "float32"
    route_name: str | None = None
    file: str | None = None
    sha256: str | None = None
    bytes: int | None = None
    runtime: str | None = None
    route: list[dict[str, Any]] = field(default_factory=list)
    io: IoMap | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Unique per bundle: the target, plus the precision when not float32."""
        return self.target if self.precision == "float32" else f"{self.target}-{self.precision}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "target": self.target, "status": self.status, "precision": self.precision,
            "route_name": self.route_name, "file": self.file, "sha256": self.sha256,
            "bytes": self.bytes, "runtime": self.runtime, "route": self.route,
            "io": self.io.to_dict() if self.io else None, "parity": self.parity,
            "timings": self.timings, "attempts": [a.to_dict() for a in self.attempts],
        }
        if self.meta:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Artifact:
        return cls(
            target=d["target"], status=d["status"], precision=d.get("precision", "float32"),
            route_name=d.get("route_name"), file=d.get("file"), sha256=d.get("sha256"),
            bytes=d.get("bytes"), runtime=d.get("runtime"), route=list(d.get("route") or []),
            io=IoMap.from_dict(d["io"]) if d.get("io") else None, parity=dict(d.get("parity") or {}),
            timings=dict(d.get("timings") or {}),
            attempts=[Attempt.from_dict(a) for a in d.get("attempts") or []],
            meta=dict(d.get("meta") or {}),
        )


@dataclass(kw_only=True)
class Contract:
    name: str
    source: dict[str, Any]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: dict[str, DimSpec]
    golden: dict[str, Any]
    tolerance: dict[str, Any]
    artifacts: list[Artifact] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    created: dict[str, str] = field(default_factory=created_with)
    options: dict[str, Any] = field(default_factory=dict)

    def artifact(self, key: str) -> Artifact | None:
        for a in self.artifacts:
            if a.key == key or a.target == key:
                return a
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "name": self.name,
            "created_with": self.created,
            "source": self.source,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "dims": {k: v.to_dict() for k, v in self.dims.items()},
            "golden": self.golden,
            "tolerance": self.tolerance,
            "options": self.options,
            "artifacts": [a.to_dict() for a in self.artifacts],
            "files": self.files,
        }

    def to_json(self) -> str:
        data = self.to_dict()
        validate_contract(data)
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
        _remember_valid(text)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Contract:
        validate_contract(d)
        return cls._build(d)

    def golden_max_bytes(self, which: str) -> int:
        """The most bytes the bundle's golden ``"inputs"`` or ``"outputs"`` archive may hold,
        inflated, by what this contract declares (shapes at their dims' maxima x cases):
        the ``max_bytes`` for :func:`golden.load_cases` / :func:`golden.read_only_cases`."""
        specs = {"inputs": self.inputs, "outputs": self.outputs}[which]
        return golden_max_bytes(specs, self.dims, int(self.golden["cases"]))

    @classmethod
    def _build(cls, d: dict[str, Any]) -> Contract:
        """The contract of a schema-valid dict, checked for what the schema cannot say.
        Content the schema lets through but the types refuse (a tensor name twice, a dim
        whose min exceeds its max, a perm that is no permutation) is a :class:`ContractError`:
        a contract is data, and nothing in it may surface as another exception."""
        try:
            contract = cls(
                name=d["name"], source=d["source"],
                inputs=[TensorSpec.from_dict(s) for s in d["inputs"]],
                outputs=[TensorSpec.from_dict(s) for s in d["outputs"]],
                dims={k: DimSpec(name=k, **v) for k, v in (d.get("dims") or {}).items()},
                golden=d["golden"], tolerance=d["tolerance"],
                artifacts=[Artifact.from_dict(a) for a in d["artifacts"]],
                files=list(d.get("files") or []), created=d["created_with"],
                options=dict(d.get("options") or {}),
            )
            TolerancePolicy.from_dict(contract.tolerance)
        except ContractError:
            raise
        except (PortableModelsError, KeyError, TypeError, ValueError, OverflowError, IndexError) as exc:
            raise ContractError(f"contract content is not usable: {escape(exc, limit=300)}", stage="load",
                                fix="the bundle was edited or written by a broken tool: re-export it") from exc
        _check_consistent(contract)
        return contract


@cache
def _schema() -> dict[str, Any]:
    text = resources.files("portable_models").joinpath("contract/schema/contract-v1.json").read_text()
    return dict(json.loads(text))


#: digests of contract texts that passed the schema in this process, newest last: the
#: schema walk is pure Python (milliseconds), and a bundle verified right after its export,
#: or verified again, has the very same text.
_VALID_TEXTS: dict[str, None] = {}
_VALID_TEXTS_MAX = 64


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _remember_valid(text: str) -> None:
    _VALID_TEXTS[_text_digest(text)] = None
    while len(_VALID_TEXTS) > _VALID_TEXTS_MAX:
        del _VALID_TEXTS[next(iter(_VALID_TEXTS))]


@cache
def _validator() -> Any:
    """One validator per process: it keeps the schema's resolved references between calls."""
    import jsonschema

    return jsonschema.Draft202012Validator(_schema())


def validate_contract(data: dict[str, Any], *, file: str | None = None) -> None:
    """Raise :class:`ContractError` naming the first place where ``data`` breaks the schema."""
    import jsonschema

    if data.get("schema") != SCHEMA:
        raise ContractError(
            f"contract schema is {escape(repr(data.get('schema')), limit=100)}, this library reads {SCHEMA!r}",
            file=file, stage="load", fix="re-export the bundle with this version of portable_models",
        )
    validator = _validator()
    if validator.is_valid(data):
        return
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ContractError(f"contract is invalid at {escape(where, limit=200)}: {_explain(error)}",
                            file=file,
                            stage="load", fix="the bundle was edited or written by a broken tool: re-export it")


def _explain(error: Any) -> str:
    """A schema error in one escaped line: a pattern by what it means (its description),
    a long string by its length, anything else by jsonschema's message, cut."""
    instance, schema = error.instance, error.schema if isinstance(error.schema, dict) else {}
    shown = escape(repr(instance), limit=80)
    if error.validator == "pattern" and schema.get("description"):
        return f"{shown} is not {escape(schema['description'])}"
    if error.validator == "maxLength" and isinstance(instance, str | list | dict):
        return f"{len(instance)} characters, more than the {schema.get('maxLength')} allowed"
    return escape(error.message, limit=300)


def load_contract(bundle: str | Path) -> Contract:
    """Read and validate ``contract.json`` of a bundle folder (or the file itself): at most
    :data:`MAX_CONTRACT_BYTES`, parsed strictly (:func:`parse_contract_text`), checked
    against the schema and for consistency. Every problem is a :class:`ContractError`
    naming the file."""
    path = user_path(bundle)
    if path.is_dir():
        path = path / "contract.json"
    elif path.is_file() and path.name != "contract.json":
        raise ContractError(f"{path} is a file, not a bundle folder", file=str(path), stage="load",
                            fix="point at the folder that holds contract.json")
    text = _read_bounded(path)
    try:
        data = parse_contract_text(text)
        if _text_digest(text) in _VALID_TEXTS:
            return Contract._build(data)
        contract = Contract.from_dict(data)
    except ContractError as exc:
        exc.file = str(path)
        raise
    _remember_valid(text)
    return contract


def _read_bounded(path: Path) -> str:
    """The text of ``path``, a regular file of at most :data:`MAX_CONTRACT_BYTES`: checked on
    the open file (a FIFO or a device is never read, and cannot block the open), then again
    while reading (the file may grow meanwhile)."""
    def refuse(message: str, fix: str) -> ContractError:
        return ContractError(message, file=str(path), stage="load", fix=fix)

    missing = refuse(f"no contract at {escape(path, limit=300)}",
                     "point at a bundle folder written by portable_models export/convert")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise missing from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a bundle's files are never read through links
            raise refuse(f"{escape(path, limit=300)} is a symlink", "a bundle's contract.json must be the "
                         "file itself: copy the bundle without links, or re-export it") from exc
        raise refuse(f"{escape(path, limit=300)} cannot be opened: {exc.strerror or exc}",
                     "check the path and its permissions") from exc
    except ValueError as exc:  # a NUL in the path  # ValueError: a NUL in the path
        raise refuse(f"{escape(path, limit=300)} cannot be opened: {getattr(exc, 'strerror', None) or exc}",
                     "check the path and its permissions") from exc
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise missing
        if st.st_size > MAX_CONTRACT_BYTES:
            raise refuse(f"{path.name} holds {st.st_size} bytes, more than the {MAX_CONTRACT_BYTES} a contract may",
                         "this is not a contract written by portable_models: re-export the bundle")
        try:
            raw = fh.read(MAX_CONTRACT_BYTES + 1)
        except OSError as exc:
            raise refuse(f"{path.name} cannot be read: {exc.strerror or exc}", "check the file") from exc
    if len(raw) > MAX_CONTRACT_BYTES:
        raise refuse(f"{path.name} is larger than the {MAX_CONTRACT_BYTES} bytes a contract may",
                     "this is not a contract written by portable_models: re-export the bundle")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise refuse(f"{path.name} is not UTF-8 text: {exc.reason} at byte {exc.start}",
                     "re-export the bundle") from exc


class _Refused(ValueError):
    """A JSON construct a contract may not use (raised from the decoder's hooks)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"key {escape(repr(key), limit=100)} appears twice in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text) if len(text) <= 400 else math.inf
    if not math.isfinite(value):
        raise _Refused(f"number {escape(text, limit=40)} is out of range")
    return value


def _int64(text: str) -> int:
    value = int(text) if len(text) <= 20 else 1 << 64
    if not -(1 << 63) <= value < (1 << 63):
        raise _Refused(f"integer {escape(text, limit=40)} is out of range")
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                            parse_float=_finite_float, parse_int=_int64)


def parse_contract_text(text: str) -> dict[str, Any]:
    """The JSON object of a contract's text, parsed strictly: duplicate keys, ``NaN`` and
    ``Infinity``, integers outside int64, floats that overflow, nesting deeper than
    :data:`MAX_DEPTH` and lone surrogates are refused with a :class:`ContractError` (no
    ``file``: :func:`load_contract` adds it). Never raises ``RecursionError``."""
    fix = "re-export the bundle"
    if _nesting(text) > MAX_DEPTH:  # before the C decoder, whose recursion can overflow the stack
        raise ContractError(f"contract.json nests deeper than {MAX_DEPTH} levels", stage="load", fix=fix)
    try:
        data = _DECODER.decode(text)
    except _Refused as exc:
        raise ContractError(f"contract.json is not a contract: {exc}", stage="load", fix=fix) from exc
    except RecursionError as exc:
        raise ContractError(f"contract.json nests deeper than {MAX_DEPTH} levels", stage="load",
                            fix=fix) from exc
    except ValueError as exc:  # json.JSONDecodeError, and too many digits for an int
        raise ContractError(f"contract.json is not valid JSON: {escape(exc, limit=200)}", stage="load",
                            fix=fix) from exc
    if not isinstance(data, dict):
        raise ContractError("contract.json does not hold a JSON object", stage="load", fix=fix)
    _check_tree(data)
    return data


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _nesting(text: str) -> int:
    """The deepest bracket nesting of a JSON text, strings left out, counted without
    recursion: json's C scanner recurses once a level, and a process whose recursion limit
    a library raised (torch's compiler does) can overflow its C stack on a deep enough text
    instead of raising ``RecursionError``."""
    import numpy as np

    bare = _JSON_STRING.sub("", text).encode("utf-8", "replace")
    codes = np.frombuffer(bare, dtype=np.uint8)
    steps = (np.isin(codes, (0x5B, 0x7B)).astype(np.int64) - np.isin(codes, (0x5D, 0x7D)).astype(np.int64))
    return int(np.cumsum(steps).max(initial=0))


def _check_tree(data: dict[str, Any]) -> None:
    """Depth and strings of a parsed contract, walked without recursion."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ContractError(f"contract.json nests deeper than {MAX_DEPTH} levels", stage="load",
                                fix="re-export the bundle")
        if isinstance(node, dict):
            for key, value in node.items():
                _check_string(key)
                stack.append((value, depth + 1))
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)
        elif isinstance(node, str):
            _check_string(node)


def _check_string(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ContractError(f"contract.json holds a lone surrogate ({escape(s[exc.start:exc.end])}) in a string",
                            stage="load", fix="re-export the bundle") from exc


def _check_consistent(c: Contract) -> None:
    """What the schema cannot say: unique names, ordered dims, usable io maps and records."""
    def refuse(message: str) -> ContractError:
        return ContractError(f"contract is inconsistent: {message}", stage="load",
                             fix="the bundle was edited or written by a broken tool: re-export it")

    for label, specs in (("inputs", c.inputs), ("outputs", c.outputs)):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise refuse(f"{label} name a tensor twice")
    for name, dim in c.dims.items():
        if dim.min > dim.max:
            raise refuse(f"dim {escape(name, limit=100)} has min {dim.min} > max {dim.max}")
    cases = int(c.golden["cases"])
    keys, paths = [a.key for a in c.artifacts], [f["path"] for f in c.files]
    if len(set(keys)) != len(keys):
        raise refuse("two artifacts have the same target and precision")
    if len(set(paths)) != len(paths):
        raise refuse("the file list names a file twice")
    for art in c.artifacts:
        if art.io is not None:
            _check_io(art, c, refuse)
        checked = art.meta.get("cases_checked") or []
        if any(i >= cases for i in checked):
            raise refuse(f"artifact {art.key}: cases_checked names a case past the {cases} golden cases")


def _check_io(art: Artifact, c: Contract, refuse: Callable[[str], ContractError]) -> None:
    assert art.io is not None
    for label, binds, specs in (("inputs", art.io.inputs, c.inputs), ("outputs", art.io.outputs, c.outputs)):
        known = {s.name for s in specs}
        for logical, binding in binds.items():
            if logical not in known:
                raise refuse(f"artifact {art.key}: io {label} names {escape(logical, limit=100)!s}, "
                             f"which is not one of the contract's {label}")
            perm = binding.perm
            if perm is not None and sorted(perm) != list(range(len(perm))):
                raise refuse(f"artifact {art.key}: io perm {list(perm)} of {logical} is not a permutation")
