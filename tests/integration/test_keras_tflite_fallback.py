"""Keras to TFLite: route fallback never ends below the best single route (issue #25).

* The TF route (``keras-tflite``) must write a ``.tflite`` with its ``serving_default``
  signature for an EfficientNet: its swish (``tf.nn.silu``) has a custom gradient that a
  frozen graph cannot save, and the converter used to fall back, silently, to converting
  the bare graph (no signature), failing the route.
* A fixed-shape artifact is checked only on the golden cases of its shape: the bridge's
  ``keras-litert-torch`` fallback is fixed at batch 2 (the bridge grows a batch of 1), so
  it is checked on the batch-2 cases, not on case 0 (batch 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")
pytest.importorskip("torch")
pytest.importorskip("ai_edge_litert")

import portable_models as pm  # noqa: E402
from portable_models.core import golden  # noqa: E402

pytestmark = pytest.mark.slow
layers = keras.layers


def _explain(bundle: Any) -> str:
    art = bundle.contract.artifact("tflite")
    lines = [bundle.report(), *(f"{a.route} {a.status} {a.stage} {(a.error or {}).get('message', '')}"
                                for a in (art.attempts if art else []))]
    return "\n".join(lines)


def _rescaled_cnn() -> Any:
    """A Rescaling input layer: litert-torch refuses a dynamic batch through its ``mul``
    (the same refusal as EfficientNet's), so the bridge route falls back to fixed shapes."""
    inp = keras.Input((16, 16, 3), name="image")
    x = layers.Rescaling(1.0 / 255.0)(inp)
    x = layers.Conv2D(4, 3, activation="swish")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, layers.Dense(3, name="logits")(x))


def _image(size: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype("float32")


def test_efficientnet_passes_through_keras_tflite_with_a_signature(tmp_path: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    model = keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classes=10)
    bundle = pm.export(model, _image(32), out=tmp_path / "b", targets=["tflite"], cache=False)
    art = bundle.contract.artifact("tflite")
    assert art is not None and art.status == "pass", _explain(bundle)
    assert [(a.route, a.status) for a in art.attempts] == [("keras-tflite", "pass")], _explain(bundle)
    assert not art.meta.get("fixed_shape")
    sigs = Interpreter(model_path=str(bundle.path / art.file)).get_signature_list()
    assert art.io is not None  # the signature the io map binds (Keras numbers the input layer's name
    assert sigs == {"serving_default": {  # when other models were built in this process before)
        "inputs": [b.name for b in art.io.inputs.values()], "outputs": ["predictions"]}}


def test_fixed_shape_fallback_is_checked_on_the_cases_of_its_shape(tmp_path: Path) -> None:
    bundle = pm.export(_rescaled_cnn(), _image(16), out=tmp_path / "b", targets=["tflite"],
                       routes={"tflite": "keras-litert-torch"}, cache=False)
    art = bundle.contract.artifact("tflite")
    assert art is not None and art.status == "pass", _explain(bundle)
    assert art.meta["dynamic"] is False and art.meta["fixed_shape"] is True
    assert art.meta["input_shapes"] == {"image": [2, 16, 16, 3]}
    cases = golden.load_cases(bundle.path / "golden" / "inputs.npz")
    batch_two = [i for i, case in enumerate(cases) if case["image"].shape[0] == 2]
    assert batch_two and len(batch_two) < len(cases)
    assert art.meta["cases_checked"] == art.parity["cases_checked"] == batch_two
    assert pm.verify(bundle.path).ok


def test_fixed_shape_artifact_fitting_no_case_is_an_error_not_a_pass(tmp_path: Path) -> None:
    """One golden case (batch 1) and an artifact fixed at batch 2: nothing to check it on."""
    bundle = pm.export(_rescaled_cnn(), _image(16), out=tmp_path / "b", targets=["tflite"],
                       routes={"tflite": "keras-litert-torch"}, cache=False, cases=1)
    art = bundle.contract.artifact("tflite")
    assert art is not None and art.status == "error", _explain(bundle)
    [attempt] = art.attempts
    assert attempt.stage == "run" and "no golden case" in attempt.error["message"], _explain(bundle)
