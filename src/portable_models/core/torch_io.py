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
    from torch.export import ExportedProgram

    from portable_models.convert.base import ConvertJob

__all__ = [
    "flatten_outputs",
    "import_torch",
    "load_program",
    "resized_inputs",
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


def load_program(job: ConvertJob) -> ExportedProgram:
    """The captured program, loaded with ``torch.export.load``."""
    torch = import_torch(f"convert:{job.route}")
    try:
        return torch.export.load(str(job.source_file))
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise ConversionError(
            f"cannot load the captured program: {exc}", file=str(job.source_file),
            stage=f"convert:{job.route}",
            fix="re-capture the model; the .pt2 must come from torch.export.save",
        ) from exc


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


def _other_size(size: int, lo: int, hi: int) -> int | None:
    for candidate in (size + 1, size - 1, size + 2):
        if lo <= candidate <= hi and candidate != size:
            return candidate
    return None


def resized_inputs(job: ConvertJob) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The sample inputs with every dynamic dim moved to another size within its
    bounds (rows repeated or dropped, so token ids stay valid). Returns the arrays and
    the new size per dim label; an empty size dict means there is nothing dynamic."""
    current: dict[str, int] = {}
    for spec in job.inputs:
        arr = np.asarray(job.sample_inputs[spec.name])
        for axis, label in spec.dynamic_axes.items():
            if axis < arr.ndim:
                current.setdefault(label, int(arr.shape[axis]))
    sizes: dict[str, int] = {}
    for label, size in current.items():
        dim = job.dims.get(label)
        new = _other_size(size, dim.min if dim else 1, dim.max if dim else size + 1)
        if new is not None:
            sizes[label] = new
    out: dict[str, np.ndarray] = {}
    for spec in job.inputs:
        arr = np.asarray(job.sample_inputs[spec.name])
        for axis, label in spec.dynamic_axes.items():
            if label in sizes and axis < arr.ndim:
                idx = np.arange(sizes[label]) % max(arr.shape[axis], 1)
                arr = np.take(arr, idx, axis=axis)
        out[spec.name] = arr
    return out, sizes
