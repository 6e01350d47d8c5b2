"""Helpers shared by the routes that start from a captured ``torch.export`` program
(``source/model.pt2``): loading it, turning sample inputs into tensors in the
program's flat input order, flattening outputs in pytree order, and making inputs
of another size along every dynamic dim (to check an artifact did not bake sizes in).

torch is imported inside the functions only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from portable_models.core.spec import TensorSpec
from portable_models.errors import ConversionError, MissingDependencyError

if TYPE_CHECKING:
    import torch


__all__ = [
    "flatten_outputs",
    "output_leaves",
    "import_torch",
    "sample_args",
    "to_tensor",
]


def import_torch(stage: str) -> Any:
    """``import torch``, translated into :class:`MissingDependencyError`."""
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError(
            f"torch is not importable: {exc}", stage=stage,
            fix="pip install 'portable-models[torch]'",
        ) from exc
    return torch


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """A numpy array as a CPU tensor of the same dtype (bool, ints, float16 … kept)."""
    import torch

    arr = np.asarray(array)
    if arr.dtype.kind not in "biuf":
        raise ConversionError(f"cannot turn a {arr.dtype} array into a tensor")
    # A private, contiguous, writable copy: torch.from_numpy shares memory.
    return torch.from_numpy(np.array(arr, copy=True, order="C"))


def sample_args(specs: list[TensorSpec], arrays: Mapping[str, np.ndarray]) -> tuple[Any, ...]:
    """Tensors for ``specs`` (the program's flat input order) from logical arrays."""
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise ConversionError(f"sample inputs lack {missing}", stage="convert",
                              fix="give a sample array for every input")
    return tuple(to_tensor(arrays[s.name]) for s in specs)


def output_leaves(value: Any) -> list[tuple[str, Any]]:
    """The leaves of a model's (nested) tuple / list / dict output with their paths
    (``"1"``, ``"boxes"``, ``"0.scores"``), in torch's pytree order (dicts in insertion
    order): the one order of a torch model's outputs, from the capture to every runner."""
    from torch.utils import _pytree as pytree

    leaves, _ = pytree.tree_flatten_with_path(value)
    return [(".".join(_key_label(k) for k in path), leaf) for path, leaf in leaves]


def _key_label(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flatten_outputs(value: Any) -> list[Any]:
    """The leaves of :func:`output_leaves`, without their paths."""
    return [leaf for _, leaf in output_leaves(value)]


