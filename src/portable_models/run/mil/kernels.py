"""The kernel table: op type -> kernel, and which op types the executor supports.

A kernel is ``kernel(op, args) -> value`` (a tuple of values for multi-output ops):
``op`` is coremltools' MIL ``Operation`` and ``args`` its inputs' run-time values by
input name. Op types listed in :data:`~.kernels_infer.INFERRED_OPS` are computed by
coremltools' own value inference; the rest by the numpy kernels of the sibling
modules. ``cond`` and ``while_loop`` are run by the executor itself. Linearly quantised weights
(``constexpr_affine_dequantize``, ``constexpr_blockwise_shift_scale``) are dequantised by
the numpy kernels of :mod:`~.kernels_constexpr`, written from the op specs; the other
constexpr ops by coremltools' own decompression.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from portable_models.run.mil.kernels_constexpr import CONSTEXPR_KERNELS
from portable_models.run.mil.kernels_infer import INFERRED_OPS, infer_with_coremltools
from portable_models.run.mil.kernels_misc import MISC_KERNELS, constexpr
from portable_models.run.mil.kernels_nn import NN_KERNELS
from portable_models.run.mil.kernels_resize import RESIZE_KERNELS
from portable_models.run.mil.kernels_rnn import RNN_KERNELS
from portable_models.run.mil.kernels_sample import SAMPLE_KERNELS

__all__ = ["CONSTEXPR_OPS", "CONTROL_FLOW_OPS", "KERNELS", "Kernel", "supported_ops"]

Kernel = Callable[[Any, dict[str, Any]], Any]

#: run by the executor (they hold nested blocks).
CONTROL_FLOW_OPS: frozenset[str] = frozenset({"cond", "while_loop"})

#: compressed-weight ops decompressed by coremltools' own op definitions (the linear
#: quantisation ones have numpy kernels: :data:`~.kernels_constexpr.CONSTEXPR_KERNELS`).
CONSTEXPR_OPS: frozenset[str] = frozenset({
    "constexpr_cast", "constexpr_lut_to_dense", "constexpr_sparse_to_dense", "constexpr_lut_to_sparse",
    "constexpr_sparse_blockwise_shift_scale",
})


def _build_table() -> dict[str, Kernel]:
    table: dict[str, Kernel] = {name: infer_with_coremltools for name in INFERRED_OPS}
    table.update({name: constexpr for name in CONSTEXPR_OPS})
    for group in (NN_KERNELS, RESIZE_KERNELS, SAMPLE_KERNELS, RNN_KERNELS, MISC_KERNELS, CONSTEXPR_KERNELS):
        overlap = set(group) & set(table)
        if overlap:
            raise AssertionError(f"op types with two kernels: {sorted(overlap)}")
        table.update(group)
    return table


#: op type -> kernel. Tests may remove entries (monkeypatch.delitem) to see refusals.
KERNELS: dict[str, Kernel] = _build_table()


def supported_ops() -> set[str]:
    """Every MIL op type the reference executor can run."""
    return set(KERNELS) | set(CONTROL_FLOW_OPS)
