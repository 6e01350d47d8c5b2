"""Compatibility passes: small, exact rewrites of a *copy* of the captured program that let a
converter through where it lacks an op, the fixes users apply by hand today. Each pass is
pure (a program in, the same program with some nodes rewritten out), named, tagged with the
converter errors it addresses, and unit-tested to give the same outputs as the original.

A route that fails to convert with an error a pass addresses is tried once more with that
pass (:mod:`portable_models.convert.build`); the artifact's route then reads
``coremltools-export+bool-logical`` and its steps list the pass with the nodes it rewrote.
Parity judges the result like any route's: a rewrite that changed the numbers would fail.
The user's model and the saved ``source/model.pt2`` are never touched: the rewrite happens
in the worker, on the program loaded from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["PASSES", "CompatPass", "apply", "passes_for"]


@dataclass(frozen=True, kw_only=True)
class CompatPass:
    """A row of the pass table. ``impl``: ``module:function`` taking an ExportedProgram,
    rewriting it in place and returning how many nodes it rewrote."""

    name: str
    #: route names it helps (a failed attempt of another route is not retried with it)
    helps: tuple[str, ...]
    #: words of a converter's error message that say this pass applies
    addresses: tuple[str, ...]
    impl: str
    description: str = ""


PASSES: tuple[CompatPass, ...] = (
    CompatPass(name="bool-logical", helps=("coremltools-export", "coremltools-trace"),
               addresses=("kind __and__", "kind __or__", "kind __xor__", "kind __invert__"),
               impl="portable_models.convert.compat:bool_ops_to_logical",
               description="`&`, `|`, `^`, `~` on boolean tensors (attention masks) as logical_and/or/xor/not, "
                           "which coremltools' torch.export frontend converts"),
)


def passes_for(route: str, message: str) -> list[str]:
    """The passes that address a failed conversion of ``route`` with ``message``."""
    return [p.name for p in PASSES if route in p.helps and any(word in message for word in p.addresses)]


def apply(program: Any, names: list[str]) -> dict[str, int]:
    """Run the passes ``names`` on ``program`` in place; the nodes each rewrote."""
    from portable_models.core.imports import load_impl

    by_name = {p.name: p for p in PASSES}
    return {name: int(load_impl(by_name[name].impl)(program)) for name in names}


def bool_ops_to_logical(program: Any) -> int:
    """``aten.__and__``/``bitwise_and`` (and or, xor, not) on boolean tensors become
    ``logical_and`` (…): the same values for booleans, ops every converter knows."""
    import torch

    aten = torch.ops.aten
    swap = {aten.__and__.Tensor: aten.logical_and.default, aten.bitwise_and.Tensor: aten.logical_and.default,
            aten.__or__.Tensor: aten.logical_or.default, aten.bitwise_or.Tensor: aten.logical_or.default,
            aten.__xor__.Tensor: aten.logical_xor.default, aten.bitwise_xor.Tensor: aten.logical_xor.default,
            aten.bitwise_not.default: aten.logical_not.default}
    rewritten = 0
    for node in program.graph_module.graph.nodes:
        if node.op != "call_function" or node.target not in swap:
            continue
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if args and all(getattr(a.meta.get("val"), "dtype", None) == torch.bool for a in args):
            node.target = swap[node.target]
            rewritten += 1
    if rewritten:
        program.graph_module.recompile()
    return rewritten
