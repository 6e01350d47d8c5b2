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
    "import_torch",
    "sample_args",
    "to_numpy",
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


def to_numpy(value: Any) -> np.ndarray:
    """A tensor (or a Python number) as a numpy array; bfloat16 becomes float32,
    which numpy cannot hold."""
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.to(torch.float32)
        return t.numpy()
    return np.asarray(value)


def sample_args(specs: list[TensorSpec], arrays: Mapping[str, np.ndarray]) -> tuple[Any, ...]:
    """Tensors for ``specs`` (the program's flat input order) from logical arrays."""
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise ConversionError(f"sample inputs lack {missing}", stage="convert",
                              fix="give a sample array for every input")
    return tuple(to_tensor(arrays[s.name]) for s in specs)


def flatten_outputs(value: Any) -> list[Any]:
    """Leaves of a (nested) tuple / list / dict of tensors, in pytree order (dict
    insertion order), which is the order of ``job.outputs``."""
    if isinstance(value, Mapping):
        return [leaf for v in value.values() for leaf in flatten_outputs(v)]
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in flatten_outputs(v)]
    return [value]


