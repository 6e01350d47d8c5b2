"""An output that is the same for every golden case (top-k indices of a classifier whose logits
are dominated by its biases, on random inputs) no longer refuses the whole export: the other
outputs vary, so the check means something. Every output is still checked, the constant ones
are marked as weak evidence in the contract and the report, and real samples are suggested."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from portable_models.core import golden
from portable_models.errors import GoldenSetError

pytestmark = pytest.mark.slow


def test_check_outputs_names_the_constant_ones_and_refuses_only_when_all_are() -> None:
    varied = [{"p": np.full(3, float(i)), "idx": np.array([2, 0])} for i in range(3)]
    assert golden.check_outputs(varied, ["p", "idx"]) == ["idx"]
    with pytest.raises(GoldenSetError, match=r"every output .* is identical for every golden case"):
        golden.check_outputs([{"p": np.ones(3), "idx": np.array([1])}] * 3, ["p", "idx"])


def test_a_classifier_with_constant_topk_indices_exports_and_says_so(tmp_path: Path) -> None:
    import torch
    from torch import nn

    import portable_models as pm

    class Ranked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 5)
            with torch.no_grad():
                self.head.weight.mul_(0.01)
                self.head.bias.copy_(torch.tensor([10.0, 5.0, 0.0, -5.0, -10.0]))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            logits = self.head(x)
            return logits, torch.topk(logits, 2).indices, torch.argmax(logits, dim=-1)

    torch.manual_seed(0)
    bundle = pm.export(Ranked().eval(), (torch.rand(2, 4),), out=tmp_path / "ranked", targets=["onnx", "torchscript"],
                       input_names=["x"], output_names=["logits", "top_idx", "arg"],
                       dynamic_dims={"x": {0: ("batch", 1, 8)}}, input_ranges={"x": (0.0, 1.0)})
    assert bundle.ok, bundle.report()
    contract = json.loads((tmp_path / "ranked" / "contract.json").read_text())
    assert contract["golden"]["constant_outputs"] == ["top_idx", "arg"]
    for art in contract["artifacts"]:  # the constant outputs were checked too, exactly
        assert {k: v["status"] for k, v in art["parity"]["outputs"].items()} == dict.fromkeys(
            ["logits", "top_idx", "arg"], "pass")
    assert "weak evidence: output(s) 'top_idx', 'arg'" in bundle.report()
    assert "samples=" in bundle.report()
    assert pm.verify(tmp_path / "ranked").ok
