"""Tensor specs: names, dtypes, shapes with symbolic dims, layouts, value ranges.

A shape is a list whose entries are ints (fixed) or strings (a named dynamic dim,
e.g. ``"batch"``). Bounds of named dims live in :class:`DimSpec`, shared by every
tensor that uses the name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from portable_models.errors import UsageError

__all__ = [
    "DTYPES",
    "LAYOUTS",
    "DimSpec",
    "TensorSpec",
    "parse_input_option",
    "parse_dynamic_option",
    "concrete_shape",
    "normalise_dynamic_dims",
]

#: dtypes a tensor spec may carry (numpy names).
DTYPES = (
    "float32",
    "float16",
    "float64",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
)
LAYOUTS = ("NCHW", "NHWC", "NCW", "NWC", "NCDHW", "NDHWC")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")

Dim = int | str


@dataclass(frozen=True, kw_only=True)
class DimSpec:
    """A named dynamic dimension with inclusive bounds."""

    name: str
    min: int = 1
    max: int = 64

    def to_dict(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max}


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """One input or output of a model, as the contract records it."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    layout: str | None = None
    range: tuple[float, float] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not _NAME_RE.match(self.name):
            raise UsageError(
                f"tensor name {self.name!r} is not usable",
                fix="use letters, digits, '_', '.', '-' and start with a letter or '_'",
            )
        if self.dtype not in DTYPES:
            raise UsageError(
                f"tensor {self.name!r} has unsupported dtype {self.dtype!r}",
                fix=f"use one of {', '.join(DTYPES)}",
            )
        if self.layout is not None and self.layout not in LAYOUTS:
            raise UsageError(
                f"tensor {self.name!r} has unknown layout {self.layout!r}",
                fix=f"use one of {', '.join(LAYOUTS)} or leave it out",
            )

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.layout is not None:
            out["layout"] = self.layout
        if self.range is not None:
            out["range"] = [self.range[0], self.range[1]]
        if self.meta:
            out["meta"] = dict(self.meta)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        rng = data.get("range")
        return cls(
            name=str(data["name"]),
            dtype=str(data["dtype"]),
            shape=tuple(d if isinstance(d, str) else int(d) for d in data["shape"]),
            layout=data.get("layout"),
            range=(float(rng[0]), float(rng[1])) if rng is not None else None,
            meta=dict(data.get("meta") or {}),
        )


def concrete_shape(spec: TensorSpec, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """The spec's shape with every named dim replaced by its size in ``sizes``."""
    return tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape)


def _parse_shape(text: str, option: str) -> tuple[Dim, ...]:
    text = text.strip().strip("[]()")
    if not text:
        return ()
    dims: list[Dim] = []
    for part in re.split(r"[x,]", text):
        part = part.strip()
        if part.isdigit():
            dims.append(int(part))
        elif _NAME_RE.match(part):
            dims.append(part)
        else:
            raise UsageError(
                f"bad dimension {part!r} in {option!r}",
                fix="write a shape as 1x3x224x224 or batch,3,224,224",
            )
    return tuple(dims)


def parse_input_option(text: str) -> TensorSpec:
    """Parse ``NAME:SHAPE:DTYPE[:LOW..HIGH]`` (e.g. ``image:1x3x32x32:float32:0..1``)."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise UsageError(
            f"--input {text!r} is not NAME:SHAPE:DTYPE[:LOW..HIGH]",
            fix="for example --input image:1x3x224x224:float32 or --input ids:1x16:int64:0..30000",
        )
    name, shape, dtype = parts[0], _parse_shape(parts[1], text), parts[2].strip()
    rng: tuple[float, float] | None = None
    if len(parts) == 4:
        m = re.fullmatch(r"\s*(-?[\d.eE+-]+)\s*\.\.\s*(-?[\d.eE+-]+)\s*", parts[3])
        if not m:
            raise UsageError(
                f"bad range {parts[3]!r} in --input {text!r}",
                fix="write a range as LOW..HIGH, e.g. 0..1 or 0..30000",
            )
        rng = (float(m.group(1)), float(m.group(2)))
    return TensorSpec(name=name, shape=shape, dtype=dtype, range=rng)


def parse_dynamic_option(text: str) -> tuple[str, int, DimSpec]:
    """Parse ``NAME:AXIS:LABEL[:MIN..MAX]`` (e.g. ``image:0:batch:1..32``)."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or not parts[1].strip().isdigit():
        raise UsageError(
            f"--dynamic {text!r} is not NAME:AXIS:LABEL[:MIN..MAX]",
            fix="for example --dynamic image:0:batch or --dynamic ids:1:seq:2..128",
        )
    lo, hi = 1, 64
    if len(parts) == 4:
        m = re.fullmatch(r"\s*(\d+)\s*\.\.\s*(\d+)\s*", parts[3])
        if not m or int(m.group(1)) > int(m.group(2)):
            raise UsageError(f"bad bounds {parts[3]!r} in --dynamic {text!r}", fix="write MIN..MAX")
        lo, hi = int(m.group(1)), int(m.group(2))
    return parts[0], int(parts[1]), DimSpec(name=parts[2], min=lo, max=hi)


def normalise_dynamic_dims(
    dynamic_dims: Mapping[str, Mapping[int, Any]] | None,
) -> tuple[dict[str, dict[int, str]], dict[str, DimSpec]]:
    """Turn the API's ``{"image": {0: "batch"}}`` (or ``{0: ("batch", 1, 32)}``) into
    per-input axis labels plus one :class:`DimSpec` per label."""
    axes: dict[str, dict[int, str]] = {}
    dims: dict[str, DimSpec] = {}
    for tensor, spec in (dynamic_dims or {}).items():
        for axis, label in spec.items():
            if isinstance(label, DimSpec):
                dim = label
            elif isinstance(label, str):
                dim = DimSpec(name=label)
            elif isinstance(label, Sequence) and len(label) == 3:
                dim = DimSpec(name=str(label[0]), min=int(label[1]), max=int(label[2]))
            else:
                raise UsageError(
                    f"dynamic_dims[{tensor!r}][{axis!r}] = {label!r} is not understood",
                    fix='use a label ("batch") or (label, min, max)',
                )
            if dim.min < 1 or dim.max < dim.min:
                raise UsageError(f"dynamic dim {dim.name!r} has bounds {dim.min}..{dim.max}",
                                 fix="use 1 <= min <= max")
            old = dims.get(dim.name)
            if old is not None and old != dim:
                raise UsageError(f"dynamic dim {dim.name!r} is given two different bounds",
                                 fix="give a shared dim the same bounds everywhere")
            dims[dim.name] = dim
            axes.setdefault(tensor, {})[int(axis)] = dim.name
    return axes, dims
