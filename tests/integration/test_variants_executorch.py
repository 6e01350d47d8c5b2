"""ExecuTorch int8 variants judged on real data (scikit-learn's bundled digits, no download):
PT2E with ExecuTorch's XNNPACKQuantizer, lowered to XNNPACK. A small CNN trained here keeps its
accuracy in int8 (calibrated) and int8-dynamic within the default budget; the .pte reader of the
truth check (run/truth_pte) sees int8 weights in the variants and none in the float32 twin; a
.pte that is not what its label says fails its truth check; verify re-judges it all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import portable_models as pm
from digits import ROWS
from digits import digits as load_digits_set

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("executorch.backends.xnnpack.quantizer.xnnpack_quantizer")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits() -> dict[str, Any]:
    """The digits CNN with relu, and with relu6 (XNNPACK's dynamic quantizer leaves a conv that
    feeds a plain relu in float: only relu6 nets are int8-dynamic through it)."""
    relu, relu6 = load_digits_set(), load_digits_set(relu6=True)
    return {**relu, "relu": relu["model"], "relu6": relu6["model"]}


def _export(digits: dict[str, Any], out: Path, model: Any, **kw: Any) -> Any:
    options: dict[str, Any] = {
        "targets": ["executorch"], "precision": ["fp32", "int8-dynamic", "int8"], "samples": digits["samples"],
        "labels": digits["labels"], "calibration": digits["calibration"], "input_names": ["image"],
        "output_names": ["logits"], "dynamic_dims": {"image": {0: ("batch", 1, 64)}},
        "input_ranges": {"image": (0.0, 1.0)}}
    return pm.export(model, (torch.from_numpy(digits["samples"][0]["image"]),), out=out, **{**options, **kw})


def test_executorch_int8_variants_keep_the_accuracy_on_real_data(digits: dict[str, Any], tmp_path: Path) -> None:
    """int8 (calibrated: int8 activations in the XNNPACK graph) and int8-dynamic (activations
    quantised at run time) keep the dynamic batch, pass their truth check, keep the accuracy."""
    from portable_models.run.truth_pte import pte_facts

    out = tmp_path / "et"
    bundle = _export(digits, out, digits["relu6"])
    report = bundle.report()
    assert bundle.ok, report
    arts = {a.key: a for a in bundle.contract.artifacts}
    assert set(arts) == {"executorch", "executorch-int8-dynamic", "executorch-int8"}, report
    for key in ("executorch-int8-dynamic", "executorch-int8"):
        art = arts[key]
        acc = art.parity["accuracy"]
        assert art.route_name == "executorch-xnnpack-pt2e", report
        assert acc["rows"] == 9 * ROWS and acc["drop_points"] <= 1.0 and acc["status"] == "pass", acc
        assert art.meta["truth"]["int8_share"] > 0.8 and art.meta["size_ratio_to_fp32"] < 0.9, art.meta
        assert art.meta["dynamic"] is True and art.meta["planned_dims"] == {"batch": 64}, art.meta
        assert art.meta["truth"]["delegates"] == {"XnnpackBackend": 2}, art.meta
        print(f"{key}: accuracy {acc['artifact']:.4f} (source {acc['source']:.4f}), "
              f"{art.meta['size_ratio_to_fp32']}x the fp32 size, truth {art.meta['truth']}")
    assert arts["executorch-int8-dynamic"].meta["truth"]["dynamic_ops"] > 0
    assert arts["executorch-int8-dynamic"].meta["truth"]["quantized_activations"] == 0
    assert arts["executorch-int8"].meta["truth"]["quantized_activations"] > 0
    assert arts["executorch-int8"].meta["truth"]["dynamic_ops"] == 0
    assert arts["executorch-int8"].meta["calibration"]["cases"] == 20
    twin = pte_facts(out / arts["executorch"].file)  # the reader on the real float32 .pte
    assert twin["format"] == "pte" and twin["int8_share"] == 0.0 and twin["bytes"] == arts["executorch"].bytes
    assert set(twin["weight_bytes_by_dtype"]) == {"fp32"} and twin["weight_bytes"] > 4 * 9000, twin
    for key in ("executorch-int8-dynamic", "executorch-int8"):
        assert pte_facts(out / arts[key].file)["int8_share"] > 0.5
    again = pm.verify(out)  # re-judged from the bundle alone: truth, budget, accuracy
    assert again.ok, again.table()
    for art in again.results:
        assert art.parity["accuracy"]["artifact"] == arts[art.key].parity["accuracy"]["artifact"]


def test_executorch_variants_that_are_not_what_they_say_fail_their_truth_check(
        digits: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The float32 .pte copied and labelled int8 is caught before any number is compared, and
    the real quantiser's route, tried next, passes. And a real gap of the quantizer: in dynamic
    mode XNNPACKQuantizer leaves each conv that feeds a ``relu`` in float (the conv+relu pattern
    is static-only), so the relu CNN's int8-dynamic holds only the linear layer in int8 and its
    truth check says so."""
    tests = str(Path(__file__).resolve().parent.parent)  # where injected_routes lives, for the workers
    monkeypatch.setenv("PYTHONPATH", tests + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("PORTABLE_MODELS_EXTRA_ROUTES", "injected_routes:MISLABELLED_PTE")
    bundle = _export(digits, tmp_path / "mislabelled", digits["relu"], cache=False)
    arts = {a.key: a for a in bundle.contract.artifacts}
    fake = arts["executorch-int8"].attempts[0]
    assert (fake.route, fake.status, fake.stage) == ("test-fake-pte-int8", "error", "truth"), fake
    assert "is not int8" in fake.error["message"] and "0% of weight bytes int8" in fake.error["message"]
    assert "its activations are not quantised" in fake.error["message"]
    assert arts["executorch-int8"].route_name == "executorch-xnnpack-pt2e"
    assert arts["executorch-int8"].status == "pass", bundle.report()
    assert arts["executorch-int8"].parity["accuracy"]["drop_points"] <= 1.0
    partial = arts["executorch-int8-dynamic"]
    assert partial.status == "error" and partial.attempts[-1].stage == "truth", bundle.report()
    message = partial.attempts[-1].error["message"]
    assert "is not int8-dynamic" in message and "less than 50% of its weight bytes are int8" in message, message
