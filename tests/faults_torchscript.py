"""Seeded fault for TorchScript artifacts: scale a module's weight in the saved module and
save it again. A frozen module (the route's default) keeps its weights as graph constants:
the one scaled is the ``weight`` argument (``params[0]`` for an RNN) of the graph node whose
source range points at the module's node in the flat fx module the route traced (as the
tap maps it), or at a node folded into it (a convolution carries its batch norm's). An
unfrozen module's parameter ``<module>.weight`` is scaled directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def corrupt(artifact: Path, module: str, factor: float, bundle: Path, art: dict[str, Any]) -> None:
    import torch

    from portable_models.convert.torchscript import _flat_module
    from portable_models.diagnosis.torchscript import _FOLDED, _op_name, fx_node_of

    ts = torch.jit.load(str(artifact), map_location="cpu")
    params = dict(ts.named_parameters())
    for name in (f"{module}.weight", f"{module}.weight_ih_l0"):
        if name in params:
            with torch.no_grad():
                params[name].mul_(factor)
            torch.jit.save(ts, str(artifact))
            return
    contract = json.loads((bundle / "contract.json").read_text())
    flat = _flat_module(torch.export.load(str(bundle / contract["source"]["file"])))
    lines = flat.code.splitlines()
    fx_nodes = {n.name: n for n in flat.graph.nodes}

    def belongs(node: Any) -> bool:
        folded = [u for u in node.users if _op_name(u.target) in _FOLDED] if len(node.users) == 1 else []
        return any(_module_of(n) == module for n in [node, *folded])

    for node in ts.graph.nodes():
        fx = fx_node_of(node.sourceRange(), lines)
        if fx in fx_nodes and belongs(fx_nodes[fx]):
            weight = _weight(node)
            if weight is not None:
                weight.mul_(factor)
                torch.jit.save(ts, str(artifact))
                return
    raise LookupError(f"no constant weight of {module} in {artifact.name}")


def _module_of(node: Any) -> str:
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    return stack[-1][0] if stack else ""


def _weight(node: Any) -> Any:
    """The constant tensor passed as ``weight`` (or first of ``params``) to ``node``."""
    import torch

    try:
        schema = torch._C.parse_schema(node.schema())
    except RuntimeError:
        return None
    for index, arg in enumerate(schema.arguments):
        if arg.name not in ("weight", "params") or index >= node.inputsSize():
            continue
        value = node.inputsAt(index)
        if arg.name == "params":
            value = value.node().inputsAt(0) if value.node().kind() == "prim::ListConstruct" else None
        if value is not None and value.node().kind() == "prim::Constant":
            tensor = value.toIValue()
            return tensor if isinstance(tensor, torch.Tensor) else None
    return None
