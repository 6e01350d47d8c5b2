"""The artifact contract (schema ``portable-models/contract/v1``): its types,
(de)serialisation and validation against the JSON Schema shipped in the package."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from portable_models._version import __version__
from portable_models.errors import ContractError
from portable_models.iomap import IoMap
from portable_models.spec import DimSpec, TensorSpec

__all__ = [
    "SCHEMA",
    "STATUSES",
    "Attempt",
    "Artifact",
    "Contract",
    "load_contract",
    "validate_contract",
    "created_with",
]

SCHEMA = "portable-models/contract/v1"
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

    @classmethod
    def _build(cls, d: dict[str, Any]) -> Contract:
        return cls(
            name=d["name"], source=d["source"],
            inputs=[TensorSpec.from_dict(s) for s in d["inputs"]],
            outputs=[TensorSpec.from_dict(s) for s in d["outputs"]],
            dims={k: DimSpec(name=k, **v) for k, v in (d.get("dims") or {}).items()},
            golden=d["golden"], tolerance=d["tolerance"],
            artifacts=[Artifact.from_dict(a) for a in d["artifacts"]],
            files=list(d.get("files") or []), created=d["created_with"],
            options=dict(d.get("options") or {}),
        )


@cache
def _schema() -> dict[str, Any]:
    text = resources.files("portable_models").joinpath("schema/contract-v1.json").read_text()
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
            f"contract schema is {data.get('schema')!r}, this library reads {SCHEMA!r}",
            file=file, stage="load", fix="re-export the bundle with this version of portable_models",
        )
    validator = _validator()
    if validator.is_valid(data):
        return
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ContractError(f"contract is invalid at {where}: {error.message}", file=file,
                            stage="load", fix="the bundle was edited or written by a broken tool: re-export it")


def load_contract(bundle: str | Path) -> Contract:
    """Read and validate ``contract.json`` of a bundle folder (or the file itself)."""
    path = Path(bundle)
    if path.is_dir():
        path = path / "contract.json"
    elif path.is_file() and path.name != "contract.json":
        raise ContractError(f"{path} is a file, not a bundle folder", file=str(path), stage="load",
                            fix="point at the folder that holds contract.json")
    if not path.is_file():
        raise ContractError(f"no contract at {path}", file=str(path), stage="load",
                            fix="point at a bundle folder written by portable_models export/convert")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ContractError(f"{path.name} is not valid JSON: {exc}", file=str(path), stage="load",
                            fix="re-export the bundle") from exc
    if not isinstance(data, dict):
        raise ContractError(f"{path.name} does not hold a JSON object", file=str(path), stage="load",
                            fix="re-export the bundle")
    if _text_digest(text) in _VALID_TEXTS:
        return Contract._build(data)
    try:
        contract = Contract.from_dict(data)
    except ContractError as exc:
        exc.file = str(path)
        raise
    _remember_valid(text)
    return contract
