"""Both tflite routes (litert-torch, onnx2tf) on small models, run in LiteRT.

Each case (``models.ROUTE_MODELS``) is captured by ``harness.route_job`` (dynamic batch),
converted, checked, run through :class:`LiteRTRunner` with logical (NCHW) inputs, and its
logical outputs judged against the eager model by the library's parity engine (float32
default: atol=1e-4, rtol=1e-3, cosine floor) at the sample batch and at another batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("ai_edge_litert")

from harness import RouteJob, max_abs, route_job
from models import ROUTE_MODELS
from portable_models.convert.base import ConvertJob, ConvertResult
from portable_models.convert.onnx2tf import convert_onnx2tf
from portable_models.convert.tflite import convert_litert_torch
from portable_models.run.litert import LiteRTRunner

pytestmark = pytest.mark.slow

BATCH = (1, 64)
ROUTES: dict[str, Callable[[ConvertJob], ConvertResult]] = {
    "litert-torch": convert_litert_torch,
    "onnx2tf": convert_onnx2tf,
}
#: upsample_depthwise's input is ``pixel.values``, not an identifier: litert-torch's
#: signature sanitises it
CASES = ["cnn", "encoder", "two_heads", "lstm", "upsample_depthwise"]


def _job(name: str, route: str, tmp_path: Path, **kwargs: Any) -> RouteJob:
    return route_job(ROUTE_MODELS[name](), tmp_path, route=route, batch=BATCH, **kwargs)


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_tflite_route(case_name: str, route: str, tmp_path: Path) -> None:
    built = _job(case_name, route, tmp_path)
    result, path, convert_s = built.convert(ROUTES[route])
    assert path.name == "model.tflite"
    assert list(built.job.out_dir.iterdir()) == [path]
    # the sample batch, then (where the artifact kept the dynamic batch) another one
    feeds = built.cases if result.meta.get("dynamic", True) else built.cases[:1]
    with LiteRTRunner(path, result.io) as runner:
        parity = built.check(runner.run, feeds)
    print(f"\nRESULT {case_name} {route} max_abs={max_abs(parity):.3g} convert_s={convert_s:.1f} "
          f"io={result.io.to_dict()} meta={result.meta}")


def _tensor_dtypes(path: Path) -> set[str]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    return {np.dtype(t["dtype"]).name for t in interp.get_tensor_details()}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_fp16_weights(route: str, tmp_path: Path) -> None:
    """float16 weights: model_fp16.tflite, float32 io, parity at the fp16 tolerance."""
    built = _job("cnn", route, tmp_path, precision="float16")
    result, path, _ = built.convert(ROUTES[route])
    assert path.name == "model_fp16.tflite"
    assert result.precision == "float16"
    assert "float16" in _tensor_dtypes(path), "no float16 weights in the fp16 artifact"
    with LiteRTRunner(path, result.io) as runner:
        parity = built.check(runner.run, built.cases[:1])  # at the float16 default
    print(f"\nRESULT fp16 {route} max_abs={max_abs(parity):.3g} bytes={path.stat().st_size}")


def test_fixed_shape_mismatch_is_reported(tmp_path: Path) -> None:
    """A feed whose fixed dim differs from the signature fails with both shapes."""
    from portable_models.errors import RuntimeRunError

    result, path, _ = _job("two_heads", "litert-torch", tmp_path).convert(convert_litert_torch)
    with LiteRTRunner(path, result.io) as runner, pytest.raises(RuntimeRunError, match="takes"):
        runner.run({"x": np.zeros((2, 3, 5, 4), dtype=np.float32)})


def test_output_matching_is_by_content_not_position() -> None:
    """Two same-shape outputs listed in the other order are still told apart."""
    from portable_models.convert.onnx2tf import _match_outputs

    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    ref = [x * 2.0, x + 1.0]  # logical order
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
    built = route_job(ROUTE_MODELS["cnn"](), tmp_path / "job", route="onnx2tf", dynamic_dims={})
    assert built.job.inputs[0].shape == (2, 3, 16, 16) and built.job.inputs[0].layout == "NCHW"
    result, path, _ = built.convert(convert_onnx2tf)
    assert list(cwd.iterdir()) == [], "the route wrote into the working directory"
    assert result.io.inputs["image"].perm == (0, 2, 3, 1)
    with LiteRTRunner(path, result.io) as runner:
        built.check(runner.run, built.cases[:1])
