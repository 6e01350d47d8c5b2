"""Compatibility passes: each rewrite is exact on its own, and a model that failed a route
without it now converts and passes parity with it, the pass named in the route."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models import CORE_ML_CHECKER
from portable_models.convert import compat

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow


class Masked(torch.nn.Module):
    """An attention-mask pattern: boolean tensors combined with & | ^ ~."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = (x > 0.2) & (x < 0.8)
        keep = (inside | (x > 0.95)) ^ (x < 0.05)
        return torch.where(keep & ~(x > 0.9), x, torch.zeros_like(x)) * 2.0


def test_bool_logical_is_exact() -> None:
    x = torch.rand(4, 16, generator=torch.Generator().manual_seed(0))
    program = torch.export.export(Masked().eval(), (x,))
    before = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.__and__.Tensor in before
    assert compat.apply(program, ["bool-logical"]) == {"bool-logical": 5}
    after = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert not after & {torch.ops.aten.__and__.Tensor, torch.ops.aten.__or__.Tensor, torch.ops.aten.__xor__.Tensor}
    for seed in range(5):
        y = torch.rand(4, 16, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(program.module()(y), Masked()(y))


def test_bool_logical_leaves_integer_bitwise_ops_alone() -> None:
    class Bits(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x & 6) | 1

    program = torch.export.export(Bits(), (torch.arange(8),))
    assert compat.apply(program, ["bool-logical"]) == {"bool-logical": 0}


def test_passes_are_chosen_by_route_and_error() -> None:
    assert compat.passes_for("coremltools-export", "Unsupported fx node and_1, kind __and__") == ["bool-logical"]
    assert compat.passes_for("torch-onnx", "Unsupported fx node and_1, kind __and__") == []
    assert compat.passes_for("coremltools-export", "some other failure") == []


def test_core_ml_converts_a_boolean_mask_model_with_the_pass(tmp_path: Path) -> None:
    """coremltools' torch.export frontend refuses ``__and__``; with the pass the route converts,
    the MIL reference checks the numbers, and the route says what was done."""
    import portable_models as pm

    bundle = pm.export(Masked().eval(), (torch.rand(2, 16),), out=tmp_path / "masked", targets=["coreml"],
                       routes={"coreml": "coremltools-export"}, input_names=["x"], output_names=["y"],
                       input_ranges={"x": (0.0, 1.0)}, cache=False)
    art = bundle.contract.artifacts[0]
    assert art.status == "pass", bundle.report()
    assert art.route_name == "coremltools-export+bool-logical"
    assert art.parity["checked_by"] == CORE_ML_CHECKER  # judged by numbers, not a saved spec
    first = art.attempts[0]  # the control: without the pass, the converter refuses the model
    assert first.route == "coremltools-export" and first.status == "error"
    assert "__and__" in (first.error or {}).get("message", "")
    steps = json.loads((tmp_path / "masked" / "contract.json").read_text())["artifacts"][0]["route"]
    assert steps[0] == {"step": "compat:bool-logical", "version": pm.__version__, "nodes_rewritten": 5}
    assert pm.verify(tmp_path / "masked").ok
