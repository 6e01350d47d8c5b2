"""diagnose on TFLite artifacts (litert-torch route): an intact bundle agrees everywhere; a
weight tensor scaled by 1.05 inside the .tflite file (bundle resealed) is named first, in a
CNN with batch norm and in a transformer encoder; over every weighted layer of the three
seeded-fault models (tests/diagnose_faults.py) at least 90% are named first."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")
pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diagnose_faults as df  # noqa: E402

MODELS = ("cnn_bn", "encoder", "gru")


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One fault-free export per model, TFLite only."""
    root = tmp_path_factory.mktemp("diag-tflite")
    out = {}
    for name in MODELS:
        made = df.export_base(name, root / name, ["tflite"])
        assert made.ok, made.report()
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def outcomes(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[df.Outcome]:
    """Every weighted layer of every model, seeded and diagnosed."""
    root = tmp_path_factory.mktemp("diag-tflite-faults")
    found: list[df.Outcome] = []
    for name in MODELS:
        for layer in df.MODELS[name]()[3]:
            found += df.seed_and_diagnose(bases[name], name, layer, ["tflite"], root / f"{name}-{layer}")
    return found


def test_an_intact_bundle_agrees_everywhere(bases: dict[str, Path]) -> None:
    import portable_models as pm

    report = pm.diagnose(bases["cnn_bn"], targets=["tflite"])
    res = report.results[0]
    assert not res.get("error"), res
    assert res["first"] is None, report.table()
    compared = {rec["module"] for rec in res["records"] if rec["status"] == "compared"}
    assert "fc" in compared, report.table()  # the signature output, named by the program's output
    fused = {rec["module"] for rec in res["records"] if rec["status"].startswith("fused")}
    assert {"conv1", "bn1"} <= fused, report.table()  # one CONV_2D with its batch norm and relu


@pytest.mark.parametrize(("model", "layer"), [("cnn_bn", "conv2"), ("encoder", "block.fc1"),
                                              ("encoder", "block.norm2")])
def test_a_seeded_fault_is_named_first(outcomes: list[df.Outcome], model: str, layer: str) -> None:
    outcome = next(o for o in outcomes if (o.model, o.layer) == (model, layer))
    assert outcome.hit, outcome


def test_the_hit_rate_over_all_layers(outcomes: list[df.Outcome]) -> None:
    print(df.tally(outcomes))
    for o in outcomes:  # how narrow each hit is: the span the layer was named in
        print(f"  {o.model}/{o.layer}: named {o.named}, span {o.span}")
    hits = sum(o.hit for o in outcomes)
    assert hits >= 0.9 * len(outcomes), df.tally(outcomes)
