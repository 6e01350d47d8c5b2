"""Compatibility passes: each rewrite is exact on its own, and a model that failed a route
without it now converts and passes parity with it, the pass named in the route."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

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
    # the words each converter used when it refused the op (reproduced with the real converters)
    assert compat.passes_for("coremltools-export", "NotImplementedError: Unsupported fx node where, kind "
                                                   "where.scalarother") == ["where-scalars"]
    assert compat.passes_for("coremltools-trace", "NotImplementedError: PyTorch convert function for op "
                                                  "'upsample_bicubic2d' not implemented.") == ["bicubic-as-matmul"]
    assert compat.passes_for("coremltools-export", "Unsupported fx node upsample_bicubic2d, kind "
                                                   "upsample_bicubic2d.vec") == ["bicubic-as-matmul"]
    assert compat.passes_for("coremltools-export", "Core ML only supports tensors with rank <= 5. Layer "
                                                   "\"view_2\", with type \"reshape\", outputs a rank 6 tensor."
                                                   ) == ["merge-permuted-dims"]
    view = "ValueError: Cannot view a tensor with shape torch.Size([1, 8, 2, 4]) and strides (64, 4, 32, 1)"
    assert compat.passes_for("torch-onnx", view) == compat.passes_for("executorch-xnnpack", view) == ["view-to-reshape"]
    assert compat.passes_for("litert-torch", view) == []


def _targets(program: Any) -> set[Any]:
    return {n.target for n in program.graph.nodes if n.op == "call_function"}


def _rewrite(model: torch.nn.Module, shape: tuple[int, ...], name: str, gone: set[Any], *,
             dtype: Any = None) -> tuple[Any, int]:
    """Capture ``model``, check it calls the ``gone`` ops, apply the pass ``name``, check they
    are gone and that the program still validates, saves and loads. The program and the
    nodes rewritten."""
    dtype = dtype or torch.float32
    program = torch.export.export(model.eval(), (torch.rand(*shape, dtype=dtype),))
    assert gone <= _targets(program)
    rewritten = compat.apply(program, [name])[name]
    assert not gone & _targets(program)
    program.validate()
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    torch.export.load(buffer)
    return program, rewritten


def _max_diff(program: Any, model: torch.nn.Module, shape: tuple[int, ...], *, dtype: Any = None) -> float:
    """The largest difference between the rewritten program and the model on 5 random inputs
    in [-2, 2)."""
    worst = 0.0
    for seed in range(5):
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype or torch.float32) * 4 - 2
        with torch.no_grad():
            worst = max(worst, float((program.module()(x) - model(x)).abs().max()))
    return worst


class MaskedAttention(torch.nn.Module):
    """Attention with an additive mask (a relative-position bias, as in Swin or DeBERTa): its
    output, transposed back and reshaped, is what the ONNX exporter cannot view."""

    def __init__(self, width: int = 8, heads: int = 2, tokens: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.heads = torch.nn.Linear(width, 3 * width), heads
        self.bias = torch.nn.Parameter(torch.randn(heads, tokens, tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias.unsqueeze(0))
        return out.transpose(1, 2).reshape(b, n, c) + out.transpose(1, 2).contiguous().view(b, n, c)


def test_view_to_reshape_is_exact() -> None:
    aten = torch.ops.aten
    model = MaskedAttention()
    program, rewritten = _rewrite(model, (2, 8, 8), "view-to-reshape",
                                  {aten.view.default, aten.contiguous.default})
    assert rewritten == 4  # 2 views, 1 contiguous, 1 copy before the reshape of the transposed output
    assert _max_diff(program, model, (2, 8, 8)) == 0.0


class ScalarWheres(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0.5, x, 0.0) + torch.where(x > 0.3, 1.0, x) + torch.where(x < 0.2, 1.0, -1.0)


@pytest.mark.parametrize(("name", "model", "gone", "count"), [
    ("where-scalars", ScalarWheres(), {"where.ScalarOther", "where.ScalarSelf", "where.Scalar"}, 3),
])
def test_creation_and_selection_passes_are_exact(name: str, model: torch.nn.Module, gone: set[str],
                                                 count: int) -> None:
    ops = {getattr(getattr(torch.ops.aten, op.partition(".")[0]), op.partition(".")[2]) for op in gone}
    program, rewritten = _rewrite(model, (5, 8), name, ops)
    assert rewritten == count
    assert _max_diff(program, model, (5, 8)) == 0.0


class Bicubic(torch.nn.Module):
    def __init__(self, **how: Any) -> None:
        super().__init__()
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(x, mode="bicubic", **self.how)


BICUBIC_CASES = [{"size": (7, 5)}, {"size": (7, 5), "align_corners": True}, {"scale_factor": 1.5},
                 {"scale_factor": (2.3, 0.7), "align_corners": True}, {"size": (3, 2)}, {"size": (1, 1)},
                 {"size": (14, 14)}]


@pytest.mark.parametrize("how", BICUBIC_CASES, ids=str)
def test_bicubic_as_matmul_is_exact(how: dict[str, Any]) -> None:
    """Exact to rounding: the weights are ATen's (float64 agrees to 1e-12), only the order of
    the sums differs (float32 within a few ulp)."""
    shape = (2, 3, 4, 6)
    for dtype, bound in ((torch.float32, 5e-6), (torch.float64, 1e-12)):
        model = Bicubic(**how)
        program, rewritten = _rewrite(model, shape, "bicubic-as-matmul", {torch.ops.aten.upsample_bicubic2d.vec},
                                      dtype=dtype)
        assert rewritten == 1
        assert _max_diff(program, model, shape, dtype=dtype) <= bound


def test_bicubic_with_a_dynamic_height_is_left_alone() -> None:
    height = torch.export.Dim("height", min=2, max=16)
    program = torch.export.export(Bicubic(size=(7, 5)), (torch.rand(1, 2, 4, 6),),
                                  dynamic_shapes={"x": {2: height}})
    assert compat.apply(program, ["bicubic-as-matmul"]) == {"bicubic-as-matmul": 0}


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


def _export_one(model: torch.nn.Module, shape: tuple[int, ...], out: Path, target: str, route: str) -> Any:
    """Export ``model`` to one target by one route; the artifact and the route's steps."""
    import portable_models as pm

    bundle = pm.export(model.eval(), (torch.rand(*shape),), out=out, targets=[target], routes={target: route},
                       input_names=["x"], output_names=["y"], input_ranges={"x": (0.0, 1.0)}, cache=False)
    art = bundle.contract.artifacts[0]
    assert art.status == "pass", bundle.report()
    assert pm.verify(out).ok
    return art, json.loads((out / "contract.json").read_text())["artifacts"][0]["route"]


@pytest.mark.parametrize(("target", "route", "runtime"), [("onnx", "torch-onnx", "onnxruntime")])
def test_masked_attention_converts_with_view_to_reshape(tmp_path: Path, target: str, route: str,
                                                        runtime: str) -> None:
    """torch.onnx.export (and ExecuTorch's lowering) decompose the program with attention in
    flash layout, then re-run it in math layout, where the view made of the transposed output
    is illegal; with the views as reshapes and the copies explicit it converts, and the
    target's runtime checks the numbers."""
    art, steps = _export_one(MaskedAttention(), (1, 8, 8), tmp_path / "attn", target, route)
    first = art.attempts[0]
    assert first.route == route and first.status == "error"
    assert "Cannot view a tensor with shape" in (first.error or {}).get("message", "")
    assert art.route_name == f"{route}+view-to-reshape"
    assert runtime in art.parity["checked_by"].lower()
    assert steps[0]["step"] == "compat:view-to-reshape" and steps[0]["nodes_rewritten"] == 4


class PositionGrid(torch.nn.Module):
    """A vision transformer's position embeddings, trained on a 4x4 grid and resized (bicubic)
    to the 6x6 patches of a larger image; tokens below a threshold are dropped with a scalar
    ``where``. Two ops coremltools' torch.export frontend refuses, one error at a time."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.grid = torch.nn.Parameter(torch.randn(1, 8, 4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = torch.nn.functional.interpolate(self.grid, size=(6, 6), mode="bicubic", align_corners=False)
        tokens = x + grid.flatten(2).transpose(1, 2)
        return torch.where(tokens > 0.5, tokens, 0.0)


def test_core_ml_converts_a_position_grid_with_two_passes(tmp_path: Path) -> None:
    """The first error names one pass, the retry's error the other: the route is tried again
    with both, and the MIL reference checks the numbers."""
    art, steps = _export_one(PositionGrid(), (1, 36, 8), tmp_path / "grid", "coreml", "coremltools-export")
    errors = [(a.route, (a.error or {}).get("message", "")) for a in art.attempts[:-1]]
    assert [route for route, _ in errors] == ["coremltools-export", "coremltools-export+bicubic-as-matmul"]
    assert "kind upsample_bicubic2d" in errors[0][1] and "kind where.scalarother" in errors[1][1]
    assert art.route_name == "coremltools-export+bicubic-as-matmul+where-scalars"
    assert art.parity["checked_by"] == CORE_ML_CHECKER
    assert [s["step"] for s in steps[:2]] == ["compat:bicubic-as-matmul", "compat:where-scalars"]


def test_core_ml_trace_converts_bicubic_with_the_pass(tmp_path: Path) -> None:
    """coremltools' TorchScript frontend refuses ``upsample_bicubic2d`` in other words."""
    art, _ = _export_one(Bicubic(scale_factor=1.5), (1, 2, 4, 6), tmp_path / "bicubic", "coreml",
                         "coremltools-trace")
    first = art.attempts[0]
    assert first.status == "error"
    assert "op 'upsample_bicubic2d' not implemented" in (first.error or {}).get("message", "")
    assert art.route_name == "coremltools-trace+bicubic-as-matmul"
    assert art.parity["checked_by"] == CORE_ML_CHECKER


class Windows(torch.nn.Module):
    """Shifted-window attention's window partition and reverse (Swin): a reshape to rank 6
    and a permute (a transpose on the way back), which Core ML (rank <= 5) refuses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        windows = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, 2, 2, c)
        windows = windows * 2 + 1
        return windows.view(b, h // 2, w // 2, 2, 2, c).transpose(2, 3).contiguous().view(b, h, w, c)


def test_merge_permuted_dims_is_exact_with_a_dynamic_batch() -> None:
    aten = torch.ops.aten
    program = torch.export.export(Windows(), (torch.rand(2, 8, 8, 4),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=8)}})
    assert compat.apply(program, ["merge-permuted-dims"]) == {"merge-permuted-dims": 2}
    ranks = {len(n.meta["val"].shape) for n in program.graph.nodes if n.op == "call_function"
             and n.target in (aten.view.default, aten.permute.default, aten.transpose.int)}
    assert max(ranks) == 4
    for batch in (1, 3):
        x = torch.rand(batch, 8, 8, 4, generator=torch.Generator().manual_seed(batch))
        assert torch.equal(program.module()(x), Windows()(x))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    assert torch.equal(torch.export.load(buffer).module()(x), Windows()(x))


def test_merge_permuted_dims_leaves_a_permute_read_elementwise_alone() -> None:
    class Read(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(1, 2, 2, 2, 2, 4).permute(0, 1, 3, 2, 4, 5) + 1  # used as rank 6: no merge

    program = torch.export.export(Read(), (torch.rand(1, 4, 4, 4),))
    assert compat.apply(program, ["merge-permuted-dims"]) == {"merge-permuted-dims": 0}


def test_core_ml_boolean_output_is_read_back_as_booleans(tmp_path: Path) -> None:
    """Core ML has no boolean arrays: a mask output comes back as numbers, and the io map says
    to read it back as booleans (every value 0 or 1), so it compares exactly with the source's."""
    import portable_models as pm

    class MaskOut(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keep = (x > 0.2) & (x < 0.8)
            return torch.where(keep, x, torch.zeros_like(x)), keep

    bundle = pm.export(MaskOut().eval(), (torch.rand(2, 16),), out=tmp_path / "mask", targets=["coreml"],
                       input_names=["x"], output_names=["y", "keep"], input_ranges={"x": (0.0, 1.0)}, cache=False)
    art = bundle.contract.artifacts[0]
    assert art.status == "pass", bundle.report()
    assert art.io is not None and art.io.outputs["keep"].reads_as == "bool"
    assert art.parity["outputs"]["keep"]["dtype"] == "bool"
    assert pm.verify(tmp_path / "mask").ok
