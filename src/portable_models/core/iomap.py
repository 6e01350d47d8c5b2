"""The io map: how an artifact's physical inputs/outputs relate to the logical ones.

``perm`` is the axis permutation from the logical layout to the physical one:
``physical = logical.transpose(perm)``. To read a physical output back into the
logical layout, apply the inverse permutation. ``None`` means no change.

``quant`` says that the physical tensor is integer (a fully integer int8 artifact's input or
output): ``physical = clip(round(logical / scale) + zero_point)`` as ``dtype``, and back
``logical = (physical - zero_point) * scale``. ``None``: the physical tensor is the logical one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Binding", "IoMap", "inverse_perm"]


def inverse_perm(perm: list[int] | tuple[int, ...]) -> list[int]:
    """The permutation that undoes ``perm``."""
    return [int(i) for i in np.argsort(np.asarray(perm))]


@dataclass(frozen=True, kw_only=True)
class Binding:
    """One logical tensor's physical name, layout and permutation in an artifact."""

    name: str
    layout: str | None = None
    perm: tuple[int, ...] | None = None
    #: {"dtype": "int8", "scale": float, "zero_point": int} when the physical tensor is quantised
    quant: Mapping[str, Any] | None = None
    #: ``"bool"``: an output the runtime returns as numbers (Core ML has no boolean arrays),
    #: read back as booleans when, and only when, every value is 0 or 1
    reads_as: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "perm": list(self.perm) if self.perm else None}
        if self.layout is not None:
            out["layout"] = self.layout
        if self.quant is not None:
            out["quant"] = dict(self.quant)
        if self.reads_as is not None:
            out["reads_as"] = self.reads_as
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Binding:
        perm = data.get("perm")
        return cls(
            name=str(data["name"]),
            layout=data.get("layout"),
            perm=tuple(int(p) for p in perm) if perm else None,
            quant=dict(data["quant"]) if data.get("quant") else None,
            reads_as=str(data["reads_as"]) if data.get("reads_as") else None,
        )

    def to_physical(self, logical: np.ndarray) -> np.ndarray:
        out = logical if not self.perm else np.ascontiguousarray(np.transpose(logical, self.perm))
        if self.quant is None:
            return out
        dtype = np.dtype(self.quant["dtype"])
        limits = np.iinfo(dtype)
        q = np.round(np.asarray(out, dtype=np.float64) / float(self.quant["scale"])) + int(self.quant["zero_point"])
        return np.clip(q, limits.min, limits.max).astype(dtype)

    def to_logical(self, physical: np.ndarray) -> np.ndarray:
        if self.quant is not None:
            physical = ((np.asarray(physical, dtype=np.float64) - int(self.quant["zero_point"]))
                        * float(self.quant["scale"])).astype(np.float32)
        if self.reads_as == "bool":
            values = np.asarray(physical)
            if values.dtype.kind in "iuf" and np.isin(values, (0, 1)).all():
                physical = values.astype(bool)  # other values stay numbers: the compare step says so
        if not self.perm:
            return physical
        if physical.ndim != len(self.perm):
            # Leave it as it is: the compare step reports the shape mismatch.
            return physical
        return np.ascontiguousarray(np.transpose(physical, inverse_perm(self.perm)))


@dataclass(frozen=True, kw_only=True)
class IoMap:
    """Logical name -> :class:`Binding`, for inputs and outputs, in logical order."""

    inputs: dict[str, Binding] = field(default_factory=dict)
    outputs: dict[str, Binding] = field(default_factory=dict)

    @classmethod
    def identity(cls, input_names: list[str], output_names: list[str]) -> IoMap:
        return cls(
            inputs={n: Binding(name=n) for n in input_names},
            outputs={n: Binding(name=n) for n in output_names},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": {k: b.to_dict() for k, b in self.inputs.items()},
            "outputs": {k: b.to_dict() for k, b in self.outputs.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IoMap:
        return cls(
            inputs={k: Binding.from_dict(v) for k, v in data.get("inputs", {}).items()},
            outputs={k: Binding.from_dict(v) for k, v in data.get("outputs", {}).items()},
        )

    def feeds(self, logical: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Logical inputs -> physical feeds (renamed and permuted)."""
        return {b.name: b.to_physical(np.asarray(logical[k])) for k, b in self.inputs.items()}

    def results(self, physical: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Physical outputs -> logical outputs. A missing physical name is left out
        (the compare step reports it as a missing output)."""
        out: dict[str, np.ndarray] = {}
        for k, b in self.outputs.items():
            if b.name in physical:
                out[k] = b.to_logical(np.asarray(physical[b.name]))
        return out
