"""Routes from the eager model's trace, made at capture: the TorchScript-based ONNX exporter
(``torch-onnx-legacy``) and coremltools' TorchScript frontend (``coremltools-eager-trace``,
with the translations coremltools lacks registered through ``register_torch_op``). Real
``transformers`` architectures from tiny configs (random weights, offline), each converted
and judged by parity on golden cases of several batch sizes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from models import CORE_ML_CHECKER
from portable_models.core.golden import load_cases

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


class Vision(torch.nn.Module):
    """A transformers model as users export it: tensors in, the last hidden state out."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, pixels: Any) -> Any:
        return self.model(pixel_values=pixels).last_hidden_state


class Text(Vision):
    def forward(self, ids: Any, mask: Any) -> Any:  # type: ignore[override]
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state


def swin() -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """Shifted-window attention: the dynamo exporter cannot decompose its window views."""
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                     num_heads=[2, 2], window_size=2)
    return (Vision(transformers.SwinModel(config)).eval(), (torch.rand(2, 3, 32, 32),),
            {"input_names": ["pixels"], "output_names": ["hidden"], "input_ranges": {"pixels": (0.0, 1.0)},
             "dynamic_dims": {"pixels": {0: ("batch", 1, 4)}}})


def bert() -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """A boolean attention mask built with ``new_ones`` and ``&``."""
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=32)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    return (Text(transformers.BertModel(config)).eval(), (ids, torch.ones(2, 8, dtype=torch.long)),
            {"input_names": ["ids", "mask"], "output_names": ["hidden"],
             "input_ranges": {"ids": (0, 99), "mask": (1, 1)}, "dynamic_dims": {"ids": {0: ("batch", 1, 4)},
                                                                               "mask": {0: ("batch", 1, 4)}}})


def llama() -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """A decoder whose captured program, compiled to TorchScript, bakes the batch in."""
    _, example, options = bert()  # the same inputs as the encoder's
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      intermediate_size=64, vocab_size=100, max_position_embeddings=32, use_cache=False)
    return Text(transformers.LlamaModel(config)).eval(), example, options


def _export(tmp_path: Path, name: str, build: Any, **options: Any) -> Any:
    import portable_models as pm

    model, example, given = build()
    return pm.export(model, example, out=tmp_path / name, cache=False, diagnose=False, **given, **options)


def test_onnx_legacy_route_converts_shifted_window_attention(tmp_path: Path) -> None:
    bundle = _export(tmp_path, "swin", swin, targets=["onnx"], routes={"onnx": "torch-onnx-legacy"})
    art = bundle.contract.artifacts[0]
    assert art.status == "pass", bundle.report()
    assert art.route_name == "torch-onnx-legacy"
    step = art.route[0]
    assert step["dynamo"] is False and step["dynamic_axes"]["pixels"] == {"0": "batch"}
    sizes = {case["pixels"].shape[0] for case in load_cases(tmp_path / "swin" / "golden" / "inputs.npz")}
    assert len(sizes) > 1  # judged on several batch sizes: the trace kept the dynamic dim
    assert not list((tmp_path / "swin").rglob("*.ts"))  # the eager trace never lands in the bundle
    import portable_models as pm

    assert pm.verify(tmp_path / "swin").ok


def test_core_ml_from_the_eager_trace_registers_new_ones(tmp_path: Path) -> None:
    """Tracing the captured program fails (TorchScript's alias analysis); the eager model's
    trace converts once ``new_ones`` has a translation, and the MIL reference checks it."""
    bundle = _export(tmp_path, "bert", bert, targets=["coreml"], routes={"coreml": "coremltools-eager-trace"})
    art = bundle.contract.artifacts[0]
    assert art.status == "pass", bundle.report()
    assert art.parity["checked_by"] == CORE_ML_CHECKER
    assert art.route[0]["registered_translations"] == ["new_ones"]
    control = _export(tmp_path, "bert-trace", bert, targets=["coreml"], routes={"coreml": "coremltools-trace"})
    assert control.contract.artifacts[0].status == "error"


def test_core_ml_boolean_mask_gathered_in_fp16_is_still_float32(tmp_path: Path) -> None:
    """coremltools gathers the boolean mask as fp16 (gather takes no bools): exact 0/1
    values, so the float32 precision check accepts the program, and the numbers pass."""
    bundle = _export(tmp_path, "bert-export", bert, targets=["coreml"])
    art = bundle.contract.artifacts[0]
    assert art.status == "pass", bundle.report()
    assert art.route_name == "coremltools-export+bool-logical"
    contract = json.loads((tmp_path / "bert-export" / "contract.json").read_text())
    assert contract["artifacts"][0]["meta"]["compute_precision"] == "FLOAT32"


def test_core_ml_converts_shifted_windows_with_merged_dims(tmp_path: Path) -> None:
    """Swin's window partition reshapes to rank 6, which Core ML lacks (coremltools' own
    high-rank pass does not catch it here); with the neighbouring dims merged the program
    converts and the MIL reference checks it at every batch size."""
    bundle = _export(tmp_path, "swin-coreml", swin, targets=["coreml"], routes={"coreml": "coremltools-export"})
    art = bundle.contract.artifacts[0]
    assert art.status == "pass", bundle.report()
    first = art.attempts[0]
    assert first.status == "error" and "only supports tensors with rank <= 5" in first.error["message"]
    assert art.route_name == "coremltools-export+merge-permuted-dims"
    assert art.parity["checked_by"] == CORE_ML_CHECKER


def test_torchscript_from_the_eager_trace_keeps_the_batch(tmp_path: Path) -> None:
    bundle = _export(tmp_path, "llama", llama, targets=["torchscript"])
    art = bundle.contract.artifacts[0]
    assert art.status == "pass", bundle.report()
    first = art.attempts[0]
    assert first.route == "torch-jit-trace" and "fails when dims change" in first.error["message"]
    assert art.route_name == "torch-jit-eager-trace"
    assert art.meta["dynamic_check"]["status"] == "pass"


class GroupNormAudio(torch.nn.Module):
    """A wav2vec2-style feature extractor: coremltools turns the group norm's sizes into a
    constant, which a dynamic batch cannot be, in both of its frontends."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.norm = torch.nn.Conv1d(1, 8, 5, stride=2), torch.nn.GroupNorm(8, 8)

    def forward(self, audio: Any) -> Any:
        return torch.nn.functional.gelu(self.norm(self.conv(audio[:, None])))


def test_core_ml_falls_back_to_fixed_shapes_where_no_route_keeps_the_dims(tmp_path: Path) -> None:
    import portable_models as pm

    bundle = pm.export(GroupNormAudio().eval(), (torch.rand(2, 64),), out=tmp_path / "gn", targets=["coreml"],
                       input_names=["audio"], output_names=["y"], dynamic_dims={"audio": {0: ("batch", 1, 4)}},
                       cache=False, diagnose=False)
    art = bundle.contract.artifacts[0]
    assert art.status == "pass", bundle.report()
    assert art.meta["fixed_shape"] is True and art.meta["input_shapes"] == {"audio": [2, 64]}
    assert "symbolic values" in art.meta["dynamic_note"]
    refused = [a for a in art.attempts if (a.error or {}).get("code") == "dynamic_dims_refused"]
    assert refused and refused[0].route == "coremltools-trace"  # put off until no route kept the dims
    assert art.parity["checked_by"] == CORE_ML_CHECKER
    assert pm.verify(tmp_path / "gn").ok


class Recurrent(torch.nn.Module):
    """A GRU: ExecuTorch's lowering plans its state for the sample's batch, not the max."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gru, self.head = torch.nn.GRU(4, 8, batch_first=True), torch.nn.Linear(8, 3)

    def forward(self, seq: Any) -> Any:
        return self.head(self.gru(seq)[0][:, -1])


def test_executorch_falls_back_to_fixed_shapes_where_memory_is_planned_below_the_max(tmp_path: Path) -> None:
    import portable_models as pm

    bundle = pm.export(Recurrent().eval(), (torch.rand(2, 6, 4),), out=tmp_path / "gru", targets=["executorch"],
                       input_names=["seq"], output_names=["y"], dynamic_dims={"seq": {0: ("batch", 1, 8)}},
                       cache=False, diagnose=False)
    art = bundle.contract.artifacts[0]
    assert art.status == "pass", bundle.report()
    assert art.meta["fixed_shape"] is True and art.meta["input_shapes"] == {"seq": [2, 6, 4]}
    first = art.attempts[0]
    assert first.route == "executorch-xnnpack" and first.error["code"] == "dynamic_dims_refused"
    assert "memory planned for 'batch'=2" in first.error["message"]
    assert pm.verify(tmp_path / "gru").ok
