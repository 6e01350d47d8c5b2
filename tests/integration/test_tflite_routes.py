"""Both tflite routes (litert-torch, onnx2tf) on small models, run in LiteRT.

Each case captures a tiny torch model with ``torch.export`` (dynamic batch), builds a
:class:`ConvertJob` by hand, converts, checks the artifact, runs it through
:class:`LiteRTRunner` with logical (NCHW) inputs and compares the logical outputs with
the eager model at atol=1e-4, rtol=1e-3, at the sample batch and at another batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("ai_edge_litert")

import torch

from portable_models.convert.base import ConvertJob, ConvertResult, ensure_artifact
from portable_models.convert.onnx2tf import convert_onnx2tf
from portable_models.convert.tflite import convert_litert_torch
from portable_models.core.spec import DimSpec, TensorSpec
from portable_models.run.base import Runner
from portable_models.run.litert import LiteRTRunner

pytestmark = pytest.mark.slow

ATOL, RTOL = 1e-4, 1e-3
ROUTES: dict[str, Callable[[ConvertJob], ConvertResult]] = {
    "litert-torch": convert_litert_torch,
    "onnx2tf": convert_onnx2tf,
}


# -- the models -------------------------------------------------------------------------
class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)
        self.conv2 = torch.nn.Conv2d(6, 8, 3, stride=2)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv1(image)))
        y = torch.nn.functional.max_pool2d(y, 2)
        y = torch.relu(self.conv2(y)).mean(dim=(2, 3))
        return self.fc(y)


class TinyEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0,
                                                      batch_first=True)
        self.head = torch.nn.Linear(16, 7)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.emb(ids)))


class TwoOutputs(torch.nn.Module):
    """Two outputs of the same shape: a position-matching bug swaps them."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2.0, x + 1.0


class TinyLSTM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(4, 8, batch_first=True)

    def forward(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, _ = self.lstm(seq)
        return out, out[:, -1]


class UpsampleDepthwise(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dw = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.pw = torch.nn.Conv2d(4, 2, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.pw(torch.relu(self.dw(self.up(image))))


@dataclass
class Case:
    name: str
    make: Callable[[], torch.nn.Module]
    inputs: list[TensorSpec]
    outputs: list[str]

    def sample(self, batch: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            shape = tuple(batch if isinstance(d, str) else d for d in spec.shape)
            if spec.dtype == "int64":
                out[spec.name] = rng.integers(0, 50, size=shape, dtype=np.int64)
            else:
                out[spec.name] = rng.standard_normal(shape).astype(np.float32)
        return out


def _spec(name: str, shape: tuple[int | str, ...], dtype: str = "float32",
          layout: str | None = None) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=shape, layout=layout)


CASES = {
    "cnn": Case("cnn", SmallCNN, [_spec("image", ("batch", 3, 16, 16), layout="NCHW")],
                ["logits"]),
    "encoder": Case("encoder", TinyEncoder, [_spec("token_ids", ("batch", 8), "int64")],
                    ["scores"]),
    "two_outputs": Case("two_outputs", TwoOutputs,
                        [_spec("x", ("batch", 3, 4, 4), layout="NCHW")], ["zeta", "alpha"]),
    "lstm": Case("lstm", TinyLSTM, [_spec("seq", ("batch", 5, 4))], ["sequence", "last"]),
    # a logical name that is not an identifier: litert-torch's signature sanitises it
    "upsample_dw": Case("upsample_dw", UpsampleDepthwise,
                        [_spec("pixel.values", ("batch", 4, 6, 6), layout="NCHW")], ["out"]),
}


def _output_specs(model: torch.nn.Module, case: Case,
                  sample: dict[str, np.ndarray]) -> list[TensorSpec]:
    outs = _eager(model, case, sample)
    return [_spec(n, ("batch", *outs[n].shape[1:]), str(outs[n].dtype)) for n in case.outputs]


def _eager(model: torch.nn.Module, case: Case,
           inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        res = model(*[torch.from_numpy(inputs[s.name]) for s in case.inputs])
    flat = res if isinstance(res, tuple) else (res,)
    return {n: t.numpy() for n, t in zip(case.outputs, flat, strict=True)}


def _job(case: Case, route: str, tmp_path: Path) -> tuple[ConvertJob, torch.nn.Module]:
    torch.manual_seed(0)
    model = case.make().eval()
    sample = case.sample(2, seed=1)
    batch = torch.export.Dim("batch", min=1, max=64)
    args = tuple(torch.from_numpy(sample[s.name]) for s in case.inputs)
    ep = torch.export.export(model, args, dynamic_shapes=tuple({0: batch} for _ in args))
    source = tmp_path / "source" / "model.pt2"
    source.parent.mkdir(parents=True)
    torch.export.save(ep, str(source))
    job = ConvertJob(route=route, source_file=source, out_dir=tmp_path / "artifacts",
                     work_dir=tmp_path / "work", inputs=case.inputs,
                     outputs=_output_specs(model, case, sample),
                     dims={"batch": DimSpec(name="batch", min=1, max=64)}, sample_inputs=sample)
    job.work_dir.mkdir()
    return job, model


def _check(runner: Runner, model: torch.nn.Module, case: Case,
           inputs: dict[str, np.ndarray]) -> float:
    got = runner.run(inputs)
    want = _eager(model, case, inputs)
    assert sorted(got) == sorted(want)
    worst = 0.0
    for name, ref in want.items():
        assert got[name].shape == ref.shape, f"{name}: {got[name].shape} != {ref.shape}"
        np.testing.assert_allclose(got[name], ref, atol=ATOL, rtol=RTOL, err_msg=name)
        worst = max(worst, float(np.abs(got[name].astype(np.float64) - ref).max()))
    return worst


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_tflite_route(case_name: str, route: str, tmp_path: Path) -> None:
    case = CASES[case_name]
    job, model = _job(case, route, tmp_path)
    start = time.perf_counter()
    result = ROUTES[route](job)
    convert_s = time.perf_counter() - start
    path = ensure_artifact(job, result)
    assert path.name == "model.tflite"
    assert list(job.out_dir.iterdir()) == [path]
    errors = []
    with LiteRTRunner(path, result.io) as runner:
        errors.append(_check(runner, model, case, job.sample_inputs))
        if result.meta.get("dynamic", True):
            errors.append(_check(runner, model, case, case.sample(3, seed=2)))
    print(f"\nRESULT {case_name} {route} max_abs={max(errors):.3g} convert_s={convert_s:.1f} "
          f"io={result.io.to_dict()} meta={result.meta}")


def _tensor_dtypes(path: Path) -> set[str]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    return {np.dtype(t["dtype"]).name for t in interp.get_tensor_details()}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_fp16_weights(route: str, tmp_path: Path) -> None:
    """float16 weights: model_fp16.tflite, float32 io, parity at the fp16 tolerance."""
    case = CASES["cnn"]
    job, model = _job(case, route, tmp_path)
    job.precision = "float16"
    result = ROUTES[route](job)
    path = ensure_artifact(job, result)
    assert path.name == "model_fp16.tflite"
    assert result.precision == "float16"
    with LiteRTRunner(path, result.io) as runner:
        got = runner.run(job.sample_inputs)
    want = _eager(model, case, job.sample_inputs)
    assert "float16" in _tensor_dtypes(path), "no float16 weights in the fp16 artifact"
    err = float(np.abs(got["logits"] - want["logits"]).max())
    print(f"\nRESULT fp16 {route} max_abs={err:.3g} bytes={path.stat().st_size}")
    np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-2, rtol=1e-2)


def test_fixed_shape_mismatch_is_reported(tmp_path: Path) -> None:
    """A feed whose fixed dim differs from the signature fails with both shapes."""
    from portable_models.errors import RuntimeRunError

    case = CASES["two_outputs"]
    job, _ = _job(case, "litert-torch", tmp_path)
    result = convert_litert_torch(job)
    path = ensure_artifact(job, result)
    with LiteRTRunner(path, result.io) as runner, pytest.raises(RuntimeRunError, match="takes"):
        runner.run({"x": np.zeros((2, 3, 5, 4), dtype=np.float32)})


def test_output_matching_is_by_content_not_position() -> None:
    """Two same-shape outputs listed in the other order are still told apart."""
    from portable_models.convert.onnx2tf import _match_outputs

    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    ref = [x * 2.0, x + 1.0]  # logical order: zeta, alpha
    physical = {"output_0": np.transpose(x + 1.0, (0, 2, 3, 1)),
                "output_1": np.transpose(x * 2.0, (0, 2, 3, 1))}
    chosen, errors = _match_outputs(ref, physical, ["NCHW", "NCHW"])
    assert chosen[0].name == "output_1" and chosen[1].name == "output_0"
    assert chosen[0].perm == (0, 2, 3, 1) and chosen[0].layout == "NHWC"
    assert max(errors.values()) == 0.0


def test_onnx2tf_fixed_image_input_stays_offline(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixed-batch 3-channel image makes onnx2tf fetch test images; it must not."""
    import requests

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"onnx2tf tried the network: {args}")

    monkeypatch.setattr(requests, "get", refuse)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    fixed = Case("cnn_fixed", SmallCNN, [_spec("image", (2, 3, 16, 16), layout="NCHW")],
                 ["logits"])
    torch.manual_seed(0)
    model = SmallCNN().eval()
    sample = fixed.sample(2, seed=1)
    ep = torch.export.export(model, (torch.from_numpy(sample["image"]),))
    source = tmp_path / "model.pt2"
    torch.export.save(ep, str(source))
    out = _eager(model, fixed, sample)["logits"]
    job = ConvertJob(route="onnx2tf", source_file=source, out_dir=tmp_path / "artifacts",
                     work_dir=tmp_path / "work", inputs=fixed.inputs,
                     outputs=[_spec("logits", out.shape)], dims={}, sample_inputs=sample)
    result = convert_onnx2tf(job)
    path = ensure_artifact(job, result)
    assert list(cwd.iterdir()) == [], "the route wrote into the working directory"
    assert result.io.inputs["image"].perm == (0, 2, 3, 1)
    with LiteRTRunner(path, result.io) as runner:
        got = runner.run(sample)["logits"]
    np.testing.assert_allclose(got, out, atol=ATOL, rtol=RTOL)
