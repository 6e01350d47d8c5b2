"""Quantised variants judged on real data (scikit-learn's bundled digits, no download): a small
CNN trained here keeps its accuracy in the int8 variants within the budget; a variant whose
contents do not match its label fails its truth check; a model built to quantise badly fails
its int8 budget while the fp32 twin passes; verify re-judges all of it from the bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import portable_models as pm
from digits import ROWS
from digits import digits as load_digits_set
from portable_models.contract.model import load_contract

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits() -> dict[str, Any]:
    return load_digits_set()


def _export(digits: dict[str, Any], out: Path, model: Any = None, **kw: Any) -> Any:
    options: dict[str, Any] = {
        "targets": ["onnx"], "precision": ["fp32", "int8-dynamic", "int8"], "samples": digits["samples"],
        "labels": digits["labels"], "calibration": digits["calibration"], "input_names": ["image"],
        "output_names": ["logits"], "dynamic_dims": {"image": {0: ("batch", 1, 64)}},
        "input_ranges": {"image": (0.0, 1.0)}}
    return pm.export(model or digits["model"], (torch.from_numpy(digits["samples"][0]["image"]),), out=out,
                     **{**options, **kw})


def test_int8_variants_keep_the_accuracy_on_real_data(digits: dict[str, Any], tmp_path: Path) -> None:
    bundle = _export(digits, tmp_path / "digits")
    report = bundle.report()
    assert bundle.ok, report
    arts = {a.key: a for a in bundle.contract.artifacts}
    assert set(arts) == {"onnx", "onnx-int8-dynamic", "onnx-int8"}
    for key in ("onnx-int8-dynamic", "onnx-int8"):
        art = arts[key]
        acc = art.parity["accuracy"]
        assert acc["rows"] == 9 * ROWS and acc["drop_points"] <= 1.0 and acc["status"] == "pass", acc
        assert art.meta["truth"]["int8_share"] > 0.8 and art.meta["size_ratio_to_fp32"] < 0.6, art.meta
        assert f"{key}: accuracy" in report and f"{key}: " in report and "x the fp32 size" in report
    assert arts["onnx-int8"].meta["truth"]["quantized_activations"] > 0
    assert arts["onnx-int8"].meta["calibration"]["cases"] == 20
    contract = load_contract(tmp_path / "digits")
    assert contract.golden["labels"] == "golden/labels.npz" and contract.golden["task"]["output"] == "logits"
    again = pm.verify(tmp_path / "digits")  # re-judged from the bundle alone: truth, budget, accuracy
    assert again.ok, again.table()
    for art in again.results:
        assert art.parity["accuracy"]["artifact"] == arts[art.key].parity["accuracy"]["artifact"]


def test_int8_without_calibration_is_a_usage_error(digits: dict[str, Any], tmp_path: Path) -> None:
    from portable_models.errors import UsageError

    with pytest.raises(UsageError, match="calibration"):
        pm.export(digits["model"], (torch.rand(2, 1, 8, 8),), out=tmp_path / "x", targets=["onnx"],
                  precision=["int8"])


def test_a_variant_that_is_not_what_it_says_fails_its_truth_check(digits: dict[str, Any], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An fp32 copy labelled int8-dynamic, and a dynamic-range model labelled static int8
    (its calibration ignored), are both caught before any number is compared; the real
    quantiser's route is tried next and passes."""
    import os

    tests = str(Path(__file__).resolve().parent.parent)  # where injected_routes lives, for the workers
    monkeypatch.setenv("PYTHONPATH", tests + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("PORTABLE_MODELS_EXTRA_ROUTES", "injected_routes:MISLABELLED_INT8")
    bundle = _export(digits, tmp_path / "mislabelled", cache=False)
    arts = {a.key: a for a in bundle.contract.artifacts}
    fake = arts["onnx-int8-dynamic"].attempts[0]
    assert (fake.route, fake.status, fake.stage) == ("test-fake-int8", "error", "truth")
    assert "is not int8-dynamic" in fake.error["message"] and "0% of weight bytes int8" in fake.error["message"]
    uncalibrated = arts["onnx-int8"].attempts[0]
    assert (uncalibrated.route, uncalibrated.stage) == ("test-int8-uncalibrated", "truth")
    assert "activations are not quantised" in uncalibrated.error["message"]
    assert arts["onnx-int8-dynamic"].route_name == arts["onnx-int8"].route_name == "ort-quantize"
    assert bundle.ok, bundle.report()


def test_a_model_that_quantises_badly_fails_its_budget(digits: dict[str, Any], tmp_path: Path) -> None:
    """One hidden channel of magnitude 1e4 takes the whole int8 range of its layer's
    activations; the other channels round to nothing. fp32 passes, int8 does not."""
    class Outlier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = digits["model"]
            self.spread = torch.nn.Linear(10, 10)
            with torch.no_grad():
                self.spread.weight.copy_(torch.eye(10))
                self.spread.bias.zero_()
                self.spread.weight[0, 0] = 1e4  # channel 0 out of all proportion

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.spread(self.inner(x)) + 20.0)
            return h[:, 1:] - 20.0  # the outlier channel itself is not an output

    bundle = _export(digits, tmp_path / "outlier", model=Outlier().eval(), labels=None, precision=["fp32", "int8"])
    arts = {a.key: a for a in bundle.contract.artifacts}
    assert arts["onnx"].status == "pass"
    assert arts["onnx-int8"].status == "fail", bundle.report()
    assert "onnx-int8" in bundle.report() and ("SQNR" in bundle.report() or "cosine" in bundle.report())


def test_tflite_int8_variants_from_torch(digits: dict[str, Any], tmp_path: Path) -> None:
    """litert-torch's own PT2E quantizer: int8-dynamic (hybrid ops, float io) and int8
    (calibrated, fully integer: the io map carries the input's and output's scale and zero
    point, so the golden float cases are fed and read back through it); ai-edge-quantizer's
    weight-only recipe on the fp32 twin (int8-weight, fed like the twin). All keep the digits
    accuracy within the budget, pass their truth check, and verify re-judges them."""
    bundle = _export(digits, tmp_path / "tfl", targets=["tflite"],
                     precision=["fp32", "int8-weight", "int8-dynamic", "int8"])
    report = bundle.report()
    assert bundle.ok, report
    arts = {a.key: a for a in bundle.contract.artifacts}
    assert set(arts) == {"tflite", "tflite-int8-weight", "tflite-int8-dynamic", "tflite-int8"}, report
    weight_only = arts["tflite-int8-weight"]  # ai-edge-quantizer on the fp32 twin: int8 weights, float compute
    assert weight_only.route_name == "aeq-quantize" and weight_only.io == arts["tflite"].io
    truth = weight_only.meta["truth"]
    assert truth["int8_share"] > 0.8 and truth["quantized_activations"] == truth["dynamic_ops"] == 0, truth
    assert weight_only.parity["accuracy"]["drop_points"] <= 1.0
    for key in ("tflite-int8-dynamic", "tflite-int8"):
        art = arts[key]
        assert art.route_name == "litert-torch-pt2e"
        assert art.parity["accuracy"]["drop_points"] <= 1.0 and art.parity["accuracy"]["status"] == "pass"
        assert art.meta["truth"]["int8_share"] > 0.8 and art.meta["size_ratio_to_fp32"] < 0.6, art.meta
    assert arts["tflite-int8-dynamic"].meta["truth"]["dynamic_ops"] > 0
    assert arts["tflite-int8"].meta["truth"]["quantized_activations"] > 0
    quant = arts["tflite-int8"].io.inputs["image"].quant
    assert quant is not None and quant["dtype"] == "int8" and quant["scale"] > 0, arts["tflite-int8"].io
    again = pm.verify(tmp_path / "tfl")
    assert again.ok, again.table()


def test_tflite_int8_variants_from_keras(digits: dict[str, Any], tmp_path: Path) -> None:
    """The TF/LiteRT converter's own quantiser for a Keras model trained on the digits:
    dynamic range (int8-dynamic) and with the calibration data as its representative dataset
    (int8); both pass their truth check and keep the accuracy within the budget."""
    keras = pytest.importorskip("keras")
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]  # channels last
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
                              keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
                              keras.layers.MaxPooling2D(), keras.layers.Flatten(), keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:1400], data.target[:1400], epochs=8, batch_size=64, verbose=0)
    samples = [{"image": x[1400 + i:1400 + i + ROWS]} for i in range(0, 9 * ROWS, ROWS)]
    bundle = pm.export(model, (samples[0]["image"],), out=tmp_path / "k", targets=["tflite", "executorch"],
                       precision=["fp32", "int8-dynamic", "int8"], samples=samples, labels=digits["labels"],
                       calibration=[{"image": x[i:i + 20]} for i in range(0, 400, 20)], input_names=["image"],
                       output_names=["logits"])
    report = bundle.report()
    assert bundle.ok, report
    arts = {a.key: a for a in bundle.contract.artifacts}
    assert arts["tflite"].parity["accuracy"]["artifact"] > 0.9, report
    for key in ("tflite-int8-dynamic", "tflite-int8"):
        assert arts[key].route_name == "keras-tflite", report
        assert arts[key].parity["accuracy"]["drop_points"] <= 1.0, report
        assert arts[key].meta["truth"]["int8_share"] > 0.8, arts[key].meta
    assert arts["tflite-int8-dynamic"].meta["truth"]["dynamic_ops"] > 0
    assert arts["tflite-int8"].meta["truth"]["quantized_activations"] > 0
    assert arts["tflite-int8"].meta["calibration"]["cases"] == 20
    # ExecuTorch carries int8, but no route makes it from a Keras source: said, not failed
    not_built = {(n["target"], n["precision"]): n["reason"] for n in bundle.contract.options["not_built"]}
    assert not_built == {("executorch", p): "no route makes a " + p + " executorch from a keras source"
                         for p in ("int8-dynamic", "int8")}, not_built
    assert arts["executorch"].status == "pass" and "executorch-int8" not in arts
    assert pm.verify(tmp_path / "k").ok


def test_held_out_eval_data_rules_a_variant_and_random_cases_are_judged_beside_it(
        digits: dict[str, Any], tmp_path: Path) -> None:
    """eval_samples / eval_labels (the held-out digits) beside the seeded random golden cases:
    the contract records the eval set by hash and count; each artifact's accuracy is measured
    on it; a quantised variant's verdict is the real data's, the random cases' verdict is kept
    beside it; the CLI takes the same set as --eval with a 'labels' array per case; verify
    re-judges the same from the bundle."""
    import subprocess
    import sys

    bundle = pm.export(digits["model"], (torch.from_numpy(digits["samples"][0]["image"]),), out=tmp_path / "ev",
                       targets=["onnx", "torchscript"], precision=["fp32", "int8"], eval_samples=digits["samples"],
                       eval_labels=digits["labels"], calibration=digits["calibration"], input_names=["image"],
                       output_names=["logits"], dynamic_dims={"image": {0: ("batch", 1, 64)}},
                       input_ranges={"image": (0.0, 1.0)})
    assert bundle.ok, bundle.report()
    golden = bundle.contract.golden
    assert golden["samples"] == "example+random" and golden["eval"]["cases"] == 9 and golden["eval"]["first"] == 4
    arts = {a.key: a for a in bundle.contract.artifacts}
    for key, rules in (("onnx", "all"), ("torchscript", "all"), ("onnx-int8", "real")):
        split = arts[key].parity["real_vs_random"]
        assert (split["real_cases"], split["random_cases"], split["rules"]) == (9, 4, rules), split
        assert arts[key].parity["accuracy"]["rows"] == 9 * ROWS
    assert arts["onnx-int8"].parity["status"] == arts["onnx-int8"].parity["real_vs_random"]["real"]
    assert "torchscript-int8" not in arts  # no silent fp32 copy: said why, in the contract and the report
    (skipped,) = bundle.contract.options["not_built"]
    assert (skipped["target"], skipped["precision"]) == ("torchscript", "int8") and "quantize_dynamic" in skipped["reason"]
    assert "torchscript-int8: not built: " in bundle.report()
    again = {a.key: a for a in pm.verify(tmp_path / "ev").results}
    for key in arts:
        assert again[key].parity["real_vs_random"] == arts[key].parity["real_vs_random"]
        assert again[key].parity["accuracy"]["artifact"] == arts[key].parity["accuracy"]["artifact"]

    torch.export.save(torch.export.export(digits["model"], (torch.from_numpy(digits["samples"][0]["image"]),)),
                      str(tmp_path / "digits.pt2"))
    np.savez(tmp_path / "eval.npz", **{f"{i}/{k}": v for i, (case, lab) in enumerate(zip(
        digits["samples"], digits["labels"], strict=True)) for k, v in {**case, "labels": lab}.items()})
    r = subprocess.run([sys.executable, "-m", "portable_models.cli", "convert", "digits.pt2", "--out", "cli",
                        "--targets", "onnx", "--input", "image:40x1x8x8:float32:0..1", "--eval", "eval.npz",
                        "--format", "json"], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    made = load_contract(tmp_path / "cli")
    assert made.golden["eval"]["cases"] == 9 and made.golden["task"]["output"]
    assert made.artifacts[0].parity["accuracy"]["rows"] == 9 * ROWS
