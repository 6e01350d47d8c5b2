"""ExecuTorch int8 variants judged on real data (scikit-learn's bundled digits, no download):
PT2E with ExecuTorch's XNNPACKQuantizer, lowered to XNNPACK. A small CNN trained here keeps its
accuracy in int8 (calibrated) and int8-dynamic within the default budget; the .pte reader of the
truth check (run/truth_pte) sees int8 weights in the variants and none in the float32 twin; a
.pte that is not what its label says fails its truth check; verify re-judges it all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import portable_models as pm

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("executorch.backends.xnnpack.quantizer.xnnpack_quantizer")
pytestmark = pytest.mark.slow

ROWS = 40  # rows per golden case


class Digits(torch.nn.Module):
    """The CNN of test_variants.py; ``relu6`` instead of ``relu`` where said (see below)."""

    def __init__(self, relu6: bool = False) -> None:
        super().__init__()
        self.act = torch.nn.functional.relu6 if relu6 else torch.relu
        self.c1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.c1(x))
        x = torch.max_pool2d(self.act(self.c2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def _train(x: np.ndarray, y: np.ndarray, relu6: bool) -> Digits:
    torch.manual_seed(0)
    model = Digits(relu6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x[:1400]), torch.from_numpy(y[:1400])
    for _ in range(80):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits() -> dict[str, Any]:
    """The digits, split; the CNN trained on the first 1400 in a few seconds, with relu and with relu6."""
    from sklearn.datasets import load_digits

    data = load_digits()
    # reshape, not [:, None]: numpy's new axis has stride 0, torch.export keeps it for the example
    # input, and the float32 .pte refuses it ("0 in strides is not supported for ExecuTorch")
    x = (data.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = data.target.astype(np.int64)
    test_x, test_y = x[1400:1400 + 9 * ROWS], y[1400:1400 + 9 * ROWS]
    models = {}
    for relu6 in (False, True):
        models[relu6] = _train(x, y, relu6)
        with torch.no_grad():
            acc = float((models[relu6](torch.from_numpy(test_x)).argmax(1).numpy() == test_y).mean())
        assert acc > 0.9, acc
    return {"relu": models[False], "relu6": models[True],
            "samples": [{"image": test_x[i:i + ROWS]} for i in range(0, len(test_x), ROWS)],
            "labels": [test_y[i:i + ROWS] for i in range(0, len(test_y), ROWS)],
            "calibration": [{"image": x[i:i + 20]} for i in range(0, 400, 20)]}


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
