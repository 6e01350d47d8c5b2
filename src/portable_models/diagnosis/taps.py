"""What a runtime's tap gives back, and the reference it is compared with.

A *tap* (one module per runtime: :mod:`.onnx`, :mod:`.tflite`, :mod:`.coreml`,
:mod:`.executorch`, :mod:`.torchscript`) runs one artifact on one golden case with its
intermediate values exposed and yields, in any order, what it can map back to a source module:

* ``Tapped(module, value)`` — the artifact's value of that module's output, in the
  reference's layout (a tap undoes its own layout changes, e.g. NHWC);
* ``Held(modules, why)`` — modules the artifact holds as one unit (a delegate, a fused
  kernel); their outputs cannot be seen, and the report says so instead of guessing.

Values are compared as they come and dropped, so a tap that can stream (one module at a
time) keeps memory bounded; the reference values wait on disk (:class:`ReferenceStore`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Held", "ModuleRef", "NodeRef", "ReferenceStore", "TapRequest", "Tapped", "scoped_names"]


@dataclass(frozen=True)
class Tapped:
    """The artifact's value of ``module``'s output; or, with ``node``, of that reference node
    (one of the module's, not necessarily its last: a runtime that fuses a module's ops into
    the next module's op still shows the fused op's output, which is that later node's)."""

    module: str
    value: np.ndarray
    node: str | None = None


@dataclass(frozen=True)
class Held:
    modules: tuple[str, ...]
    why: str


@dataclass(frozen=True)
class NodeRef:
    """One reference node, in execution order: its module, op, output shape and source line."""

    name: str
    module: str
    op: str
    shape: tuple[int, ...]
    where: str | None = None


@dataclass
class ModuleRef:
    """One source module, as the reference saw it: the nodes it ran (in order: the last is
    its output), the op of that last node, where it is in the user's code, its output's shape."""

    module: str
    nodes: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    op: str = ""
    where: str | None = None
    shape: tuple[int, ...] = ()
    dtype: str = "float32"

    @property
    def last_node(self) -> str:
        return self.nodes[-1]


class ReferenceStore:
    """The reference activations, one ``.npy`` per node's output under ``folder``, written as
    the reference runs, so that only one activation at a time is held here; :meth:`value`
    (a module's output: its last node's) and :meth:`node_value` read one back, memory-mapped."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.modules: dict[str, ModuleRef] = {}  # in the order each module first ran
        self.order: list[str] = []  # in the order each module's output was last made
        self.nodes: list[NodeRef] = []  # every node, in execution order

    def _file(self, node: str) -> Path:
        return self.folder / (hashlib.sha256(node.encode()).hexdigest()[:24] + ".npy")

    def record(self, module: str, node: str, op: str, where: str | None, value: np.ndarray) -> None:
        ref = self.modules.setdefault(module, ModuleRef(module))
        ref.nodes.append(node)
        ref.ops.append(op)
        ref.op, ref.shape, ref.dtype = op, tuple(value.shape), str(value.dtype)
        ref.where = where or ref.where
        self.nodes.append(NodeRef(node, module, op, tuple(value.shape), where))
        np.save(self._file(node), np.ascontiguousarray(value), allow_pickle=False)
        if module in self.order:
            self.order.remove(module)
        self.order.append(module)

    def node_value(self, node: str) -> np.ndarray:
        return np.load(self._file(node), mmap_mode="r", allow_pickle=False)

    def value(self, module: str) -> np.ndarray:
        return self.node_value(self.modules[module].last_node)

    def refs(self) -> list[ModuleRef]:
        """The modules in the order their outputs were made (execution order)."""
        return [self.modules[m] for m in self.order]

    def node_modules(self) -> dict[str, str]:
        """Every reference node's name -> the module it belongs to."""
        return {node.name: node.module for node in self.nodes}


@dataclass
class TapRequest:
    """What a tap is given: the artifact, its io map (``core.iomap`` dict), the golden case
    (logical inputs by the contract's input names), the reference's modules (execution
    order), a scratch folder and the payload the job came with (route, target, ...)."""

    artifact: Path
    io: dict[str, Any]
    case: dict[str, np.ndarray]
    modules: list[ModuleRef]
    work: Path
    payload: dict[str, Any] = field(default_factory=dict)
    #: every reference node in execution order (a tap may answer per node: ``Tapped.node``)
    nodes: list[NodeRef] = field(default_factory=list)

    def feeds(self) -> dict[str, np.ndarray]:
        """The artifact's own inputs (physical names and layouts), from the logical case."""
        from portable_models.core.iomap import IoMap

        return IoMap.from_dict(self.io).feeds(self.case)

    def node_modules(self) -> dict[str, str]:
        return {node: ref.module for ref in self.modules for node in ref.nodes}


TapStream = Iterator[Tapped | Held]

#: the suffix Keras 3 adds to a layer's name scope to keep it unique (layer "bn1" runs in "bn1_1")
_UNIQUE = re.compile(r"_\d+$")


def scoped_names(parts: list[str], known: set[str] | dict[str, Any]) -> list[str]:
    """The names among a converter's scope ``parts`` (``model/layer/op`` pieces) that are in
    ``known``, as they are or without the unique-scope suffix Keras adds; in order, once each."""
    found: list[str] = []
    for part in parts:
        name = part if part in known else _UNIQUE.sub("", part)
        if name in known and name not in found:
            found.append(name)
    return found
