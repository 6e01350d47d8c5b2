"""Keras 3 as a source, end to end on real converters and runtimes.

Each model is built here with random weights, exported ONCE (module-scoped fixture) to
all five targets through ``pm.export``, and several tests read the same bundle: every
target passes through some route (TF-native first, then the torch-backend bridge;
Core ML may be "unverified" off macOS), the contract records the Keras names, layouts
and dynamic batch, and ``pm.verify`` re-checks the bundle from its files alone.
Parity is the pipeline's: atol 1e-4, rtol 1e-3 for float32, per output and case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")
pytest.importorskip("torch")

import portable_models as pm  # noqa: E402
from models import CORE_ML_CHECKER  # noqa: E402
from portable_models.capture import CaptureOptions  # noqa: E402
from portable_models.capture.keras import capture_keras  # noqa: E402
from portable_models.errors import UnsafeModelError  # noqa: E402

pytestmark = pytest.mark.slow

ALL = ["onnx", "torchscript", "executorch", "tflite", "coreml"]
ATOL = 1e-4
layers = keras.layers


@dataclass
class Case:
    model: Any
    example: Any
    options: dict[str, Any] = field(default_factory=dict)


# -- the models ----------------------------------------------------------------------------
def small_cnn() -> Case:
    inp = keras.Input((16, 16, 3), name="image")
    x = layers.Conv2D(8, 3, padding="same")(inp)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU()(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(12, 3, strides=2)(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, layers.Dense(5, name="logits")(x))
    rng = np.random.default_rng(1)
    bn = model.get_layer("bn")  # non-trivial statistics, so batch norm is really checked
    bn.moving_mean.assign(rng.normal(size=8).astype("float32") * 0.1)
    bn.moving_variance.assign(rng.uniform(0.5, 1.5, size=8).astype("float32"))
    return Case(model, rng.standard_normal((1, 16, 16, 3)).astype("float32"))


def _calibrate_batch_norm(model: Any, data: np.ndarray) -> None:
    """Give every BatchNormalization the statistics of its inputs on ``data`` (one
    training-mode pass with momentum 0). With the initial statistics (mean 0, var 1)
    activations of a randomly initialised MobileNetV2 vanish layer by layer and every
    input gets the same prediction: a golden set that proves nothing."""
    norms = [x for x in model._flatten_layers() if isinstance(x, layers.BatchNormalization)]
    for bn in norms:
        bn.momentum = 0.0
    model(data, training=True)
    for bn in norms:
        bn.momentum = 0.99


def mobilenet_v2() -> Case:
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35,
                                           classes=10)
    _calibrate_batch_norm(model, np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype("float32"))
    return Case(model, np.random.default_rng(2).uniform(-1, 1, (1, 32, 32, 3)).astype("float32"))


def lstm_text() -> Case:
    inp = keras.Input((12,), dtype="int32", name="tokens")
    x = layers.Embedding(100, 16)(inp)
    x = layers.LSTM(16)(x)
    model = keras.Model(inp, layers.Dense(3, name="label")(x))
    ids = np.random.default_rng(3).integers(0, 100, (1, 12)).astype("int32")
    return Case(model, ids, {"input_ranges": {"tokens": (0, 99)}})


def conv1d_audio() -> Case:
    inp = keras.Input((64, 2), name="audio")
    x = layers.Conv1D(8, 5, strides=2, activation="gelu")(inp)  # exact GELU: Erfc in TF
    x = layers.Conv1D(8, 3, padding="same")(x)
    x = layers.GlobalMaxPooling1D()(x)
    model = keras.Model(inp, layers.Dense(4, name="scores")(x))
    return Case(model, np.random.default_rng(4).standard_normal((1, 64, 2)).astype("float32"))


def two_in_two_out() -> Case:
    a = keras.Input((8,), name="features")
    b = keras.Input((6, 6, 2), name="patch")
    x = layers.Dense(8, activation="relu")(a)
    y = layers.Flatten()(layers.Conv2D(4, 3, activation="relu")(b))
    z = layers.Concatenate()([x, y])
    model = keras.Model([a, b], [layers.Dense(3, name="cls")(z),
                                 layers.Dense(1, activation="sigmoid", name="score")(z)])
    rng = np.random.default_rng(5)
    return Case(model, [rng.standard_normal((1, 8)).astype("float32"),
                        rng.standard_normal((1, 6, 6, 2)).astype("float32")])


def convnext_tiny() -> Case:
    model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3), classes=10)
    return Case(model, np.random.default_rng(6).uniform(0, 255, (1, 32, 32, 3)).astype("float32"))


MODELS: dict[str, Callable[[], Case]] = {
    "small_cnn": small_cnn, "mobilenet_v2": mobilenet_v2, "lstm_text": lstm_text,
    "conv1d_audio": conv1d_audio, "two_in_two_out": two_in_two_out,
    "convnext_tiny": convnext_tiny,
}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any]:
    case = MODELS[request.param]()
    out = tmp_path_factory.mktemp(request.param) / "bundle"
    return request.param, pm.export(case.model, case.example, out=out, targets=ALL, **case.options)


def _explain(bundle: Any) -> str:
    lines = [bundle.report()]
    for art in bundle.contract.artifacts:
        for att in art.attempts:
            lines.append(f"{art.target}: {att.route} {att.status} {att.stage} "
                         f"{(att.error or {}).get('message', '')}")
    return "\n".join(lines)


# -- every model, every target ----------------------------------------------------------
def test_every_target_passes_through_some_route(exported: tuple[str, Any]) -> None:
    name, bundle = exported
    statuses = {a.target: a.status for a in bundle.contract.artifacts}
    assert list(statuses) == ALL, name
    for target, status in statuses.items():
        assert status == "pass", f"{name} {target}: {status}\n{_explain(bundle)}"
    coreml = next(a for a in bundle.contract.artifacts if a.target == "coreml")
    assert coreml.parity["checked_by"] == CORE_ML_CHECKER, coreml.parity
    for art in bundle.contract.artifacts:
        if art.status != "pass":
            continue
        for out in bundle.contract.outputs:
            res = art.parity["outputs"][out.name]
            assert res["status"] == "pass" and res["max_abs"] <= ATOL, (name, art.target, res)


def test_routes_are_recorded_per_attempt(exported: tuple[str, Any]) -> None:
    name, bundle = exported
    assert bundle.contract.source["framework"] == "keras"
    assert bundle.contract.source["file"] == "source/model.keras"
    for art in bundle.contract.artifacts:
        assert art.route_name and art.route_name.startswith("keras-"), (name, art.target)
        tried = [a.route for a in art.attempts]
        kept = tried.index(art.route_name)
        assert art.attempts[kept].status == art.status
        steps = [s["step"] for s in art.route]
        assert all(s["version"] for s in art.route)
        if art.route_name in ("keras-tflite", "keras-tf2onnx", "keras-coreml-tf"):
            assert steps[0] == "tf.function"
        elif art.route_name != "keras-export-onnx":  # the torch-backend bridge
            assert steps[:2] == ["keras->torch bridge", "torch.export.export"], steps
        for failed in art.attempts[:kept]:  # a route that gave way says why
            assert failed.status != "pass" and (failed.error or failed.parity), failed


def test_contract_keeps_keras_names_layouts_and_batch(exported: tuple[str, Any]) -> None:
    name, bundle = exported
    contract = bundle.contract
    for spec in contract.inputs:
        assert spec.shape[0] == "batch", (name, spec)
        if spec.rank == 4 and spec.dtype.startswith("float"):
            assert spec.layout == "NHWC", (name, spec)
    assert contract.dims["batch"].min == 1 and contract.dims["batch"].max == 64
    for art in contract.artifacts:
        assert art.io is not None
        assert list(art.io.inputs) == [s.name for s in contract.inputs]
        assert all(b.perm is None for b in art.io.inputs.values()), (name, art.target)
    if name == "two_in_two_out":
        assert [s.name for s in contract.inputs] == ["features", "patch"]
        assert [s.name for s in contract.outputs] == ["cls", "score"]
        assert [s.shape for s in contract.outputs] == [("batch", 3), ("batch", 1)]
    if name == "lstm_text":
        assert contract.inputs[0].dtype == "int32" and contract.inputs[0].range == (0.0, 99.0)


def test_verify_from_bundle_alone(exported: tuple[str, Any]) -> None:
    _, bundle = exported
    report = pm.verify(bundle.path)
    assert report.ok, report.table()


# -- failure and refusal --------------------------------------------------------------------
def test_one_failing_target_leaves_the_others(tmp_path: Path) -> None:
    """Keras's ONNX export (tf2onnx without an Erfc handler) cannot translate exact GELU:
    forced onto that route, onnx fails with the reason in the contract, and tflite is
    still made and passes."""
    case = conv1d_audio()
    bundle = pm.export(case.model, case.example, out=tmp_path / "b", targets=["onnx", "tflite"],
                       routes={"onnx": "keras-export-onnx"})
    onnx, tflite = bundle.contract.artifacts
    assert onnx.target == "onnx" and onnx.status == "error" and onnx.file is None
    assert "Erfc" in onnx.attempts[0].error["message"]
    assert tflite.status == "pass" and tflite.route_name == "keras-tflite"
    assert not bundle.ok
    saved = pm.load_contract(bundle.path)
    assert "Erfc" in saved.artifacts[0].attempts[0].error["message"]


def test_lambda_layer_is_refused_with_the_opt_in(tmp_path: Path) -> None:
    inp = keras.Input((4,), name="x")
    model = keras.Model(inp, layers.Dense(2)(layers.Lambda(lambda t: t * 2.0 + 1.0)(inp)))
    example = np.ones((2, 4), dtype="float32")
    with pytest.raises(UnsafeModelError) as info:
        pm.export(model, example, out=tmp_path / "b", targets=["onnx"])
    assert "trust_model=True" in str(info.value.fix) and "--trust-model" in str(info.value.fix)
    assert not (tmp_path / "b").exists()


# -- capture alone (no converter) -------------------------------------------------------------
def test_capture_names_a_sequential_and_keeps_its_batch_free(tmp_path: Path) -> None:
    model = keras.Sequential([layers.Dense(3, name="hidden"), layers.Dense(2, name="out")])
    model(np.zeros((1, 5), dtype="float32"))  # built by a call: Keras records batch 1
    example = np.random.default_rng(7).standard_normal((1, 5)).astype("float32")
    cap = capture_keras(model, example, CaptureOptions(), tmp_path / "source")
    assert len(cap.inputs) == 1 and cap.inputs[0].name.startswith("input_layer")
    assert cap.inputs[0].shape == ("batch", 5) and cap.inputs[0].layout is None
    assert [s.name for s in cap.outputs] == ["out"] and cap.outputs[0].shape == ("batch", 2)
    assert {c[cap.inputs[0].name].shape[0] for c in cap.golden_inputs} == {1, 2}
    assert (tmp_path / "source" / "model.keras").is_file()


def test_capture_names_dict_outputs_by_key_and_honours_dynamic_dims(tmp_path: Path) -> None:
    inp = keras.Input((None, 4), name="seq")
    pooled = layers.GlobalAveragePooling1D()(layers.Dense(4)(inp))
    model = keras.Model(inp, {"value": layers.Dense(1)(pooled), "label": layers.Dense(3)(pooled)})
    example = np.random.default_rng(8).standard_normal((2, 6, 4)).astype("float32")
    opts = CaptureOptions(dynamic_dims={"seq": {0: "batch", 1: ("time", 2, 16)}})
    cap = capture_keras(model, example, opts, tmp_path / "source")
    assert [s.name for s in cap.outputs] == ["label", "value"]  # Keras's order: sorted keys
    assert cap.inputs[0].shape == ("batch", "time", 4)
    assert cap.dims["time"].min == 2 and cap.dims["time"].max == 16
    assert [s.shape for s in cap.outputs] == [("batch", 3), ("batch", 1)]
