"""Run a TorchScript artifact with ``torch.jit.load`` on the CPU.

TorchScript has no input names: inputs go in positionally, in the order of the io
map's inputs; outputs (a tuple, list or dict, nested or not) are flattened in order
and named with the io map's physical output names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from portable_models.core.arrays import to_numpy
from portable_models.core.torch_io import (
    flatten_outputs,
    import_torch,
    to_tensor,
)
from portable_models.errors import RuntimeRunError
from portable_models.run.base import Runner

__all__ = ["TorchScriptRunner"]


class TorchScriptRunner(Runner):
    """``torch.jit.load(path, map_location="cpu")``, called positionally."""

    distribution = "torch"
    label = "TorchScript (torch.jit)"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._module: Any = None
        self._threads_before: int | None = None

    def _load_impl(self) -> None:
        torch = import_torch("load:torchscript")
        if self.options.threads:  # torch's count is the process's: put back at close
            before = torch.get_num_threads()
            if before != int(self.options.threads):
                torch.set_num_threads(int(self.options.threads))
                self._threads_before = before
        self._module = torch.jit.load(str(self.artifact), map_location="cpu")
        self._module.eval()

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [to_tensor(feeds[b.name]) for b in self.io.inputs.values()]
        with torch.no_grad():
            leaves = flatten_outputs(self._module(*args))
        names = [b.name for b in self.io.outputs.values()]
        if len(leaves) != len(names):
            raise RuntimeRunError(
                f"{self.artifact.name} returned {len(leaves)} outputs, the io map names "
                f"{len(names)} {names}", file=str(self.artifact), stage="run:torchscript")
        return {name: to_numpy(v) for name, v in zip(names, leaves, strict=True)}

    def _close_impl(self) -> None:
        self._module = None
        if self._threads_before is not None:
            import torch

            torch.set_num_threads(self._threads_before)
            self._threads_before = None
