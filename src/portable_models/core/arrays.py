"""One way to turn what a framework or runtime hands back into numpy arrays, for every stage:
a torch tensor (detached, on the CPU, bfloat16 as float32, which numpy cannot hold), a
TensorFlow eager tensor, or anything numpy takes as it is. Imports no framework."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["to_numpy"]


def to_numpy(value: Any, *, copy: bool = False) -> np.ndarray:
    """``value`` as a numpy array. ``copy``: never share memory with ``value`` (a runtime
    that reuses its output buffers between runs, as ExecuTorch does)."""
    if hasattr(value, "detach"):  # torch, told apart without importing it
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        out = tensor.numpy()
    elif hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # a TensorFlow eager tensor
        out = value.numpy()
    else:
        out = value
    return np.array(out, copy=True) if copy else np.asarray(out)
