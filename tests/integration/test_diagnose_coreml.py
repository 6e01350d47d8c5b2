"""diagnose on coreml artifacts: an intact bundle agrees everywhere; a weight scaled by 1.05
inside the finished artifact (bundle resealed) is localised to its module, first; over every
layer with weights of the three seeded-fault models, at least 90% are named first (the tally,
with each miss and its reason, is printed)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("coremltools")
import diagnose_faults as df

pytestmark = pytest.mark.slow
TARGET = "coreml"


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diagnose-coreml")
    out = {}
    for name in df.MODELS:
        made = df.export_base(name, root / name, [TARGET])
        assert made.ok, made.report()
        out[name] = root / name
    return out


def test_an_intact_bundle_agrees_everywhere(bases: dict[str, Path]) -> None:
    import portable_models as pm

    for name, base in bases.items():
        (res,) = pm.diagnose(base, targets=[TARGET]).results
        assert not res.get("error"), res
        assert res["first"] is None, (name, res["records"])
        assert any(rec["status"] == "compared" for rec in res["records"]), res["records"]


@pytest.mark.parametrize(("model", "layer"), [("cnn_bn", "conv2"), ("encoder", "block.fc1")])
def test_a_changed_layer_is_named_first(bases: dict[str, Path], tmp_path: Path, model: str, layer: str) -> None:
    (outcome,) = df.seed_and_diagnose(bases[model], model, layer, [TARGET], tmp_path / "broken")
    assert outcome.hit, outcome


def test_most_layers_are_named_first(bases: dict[str, Path], tmp_path: Path) -> None:
    outcomes = []
    for name in df.MODELS:
        for layer in df.MODELS[name]()[3]:
            outcomes += df.seed_and_diagnose(bases[name], name, layer, [TARGET], tmp_path / f"{name}-{layer}")
    print(df.tally(outcomes))
    assert sum(o.hit for o in outcomes) >= 0.9 * len(outcomes), df.tally(outcomes)
