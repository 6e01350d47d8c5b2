"""diagnose on seeded faults, every target at once: three models of different shape (a CNN
with batch norm, a transformer encoder block, a GRU tagger; ``tests/diagnose_faults.py``),
each exported to all five targets (ExecuTorch with portable kernels, whose instructions can
each be seen; the XNNPACK delegate is checked apart). An intact bundle agrees everywhere; a
weight scaled by 1.05 inside each finished artifact (the bundle resealed, so only parity can
tell) is named first — the module itself or the span of modules a runtime fused into one op —
on at least 90% of the faults that could be seeded, per target.

The faults here are a fixed sample of layers (two per model); ``make diagnose-sweep``
(``PM_DIAGNOSE_SWEEP=all``) seeds every layer with weights and writes the tally to
``docs/diagnose_sweep.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("executorch.runtime")
pytest.importorskip("coremltools")
pytest.importorskip("ai_edge_litert")
import diagnose_faults as df

pytestmark = pytest.mark.slow

TARGETS = ("onnx", "tflite", "coreml", "torchscript", "executorch")
PORTABLE = {"executorch": "executorch-portable"}
#: the layers seeded in `make test` (every layer with weights under PM_DIAGNOSE_SWEEP=all)
SAMPLE = {"cnn_bn": ("conv2", "bn1"), "encoder": ("block.qkv", "block.fc1"), "gru": ("rnn", "out")}
SWEEP = os.environ.get("PM_DIAGNOSE_SWEEP") == "all"


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diagnose-faults")
    made = {}
    for name in df.MODELS:
        result = df.export_base(name, root / name, TARGETS, routes=PORTABLE)
        assert result.ok, result.report()
        made[name] = root / name
    return made


@pytest.fixture(scope="module")
def outcomes(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[df.Outcome]:
    work = tmp_path_factory.mktemp("seeded")
    found = []
    for name, base in bases.items():
        for layer in df.MODELS[name]()[3] if SWEEP else SAMPLE[name]:
            found += df.seed_and_diagnose(base, name, layer, TARGETS, work / f"{name}-{layer}")
    text = df.tally(found)
    print(text)
    if SWEEP:
        out = Path(__file__).resolve().parents[2] / "docs" / "diagnose_sweep.md"
        out.write_text("# diagnose: seeded faults, every layer with weights (`make diagnose-sweep`)\n\n"
                       "Per target: faults named first (the module, or the span of modules fused into one op "
                       "with it) among those that could be seeded, and how many named the module on its own.\n\n"
                       "```\n" + text + "\n```\n")
    return found


def test_an_intact_bundle_agrees_everywhere(bases: dict[str, Path]) -> None:
    import portable_models as pm

    for name, base in bases.items():
        report = pm.diagnose(base)
        assert {r["target"] for r in report.results} == set(TARGETS)
        for res in report.results:
            assert not res.get("error"), (name, res)
            assert res["first"] is None, (name, res["target"], res["records"])
            assert any(r["status"] == "compared" for r in res["records"]), (name, res["target"])


@pytest.mark.parametrize("target", TARGETS)
def test_the_seeded_faults_are_named_first(outcomes: list[df.Outcome], target: str) -> None:
    mine = [o for o in outcomes if o.target == target]
    assert mine and df.hit_rate(mine) >= 0.9, df.tally(mine)


def test_an_xnnpack_delegate_is_named_as_the_span_it_holds(tmp_path: Path) -> None:
    """With XNNPACK, the modules a delegate call runs are reported as one unit, and a fault
    inside it is named as that span."""
    import portable_models as pm

    base = tmp_path / "encoder"
    assert df.export_base("encoder", base, ["executorch"]).ok
    (res,) = pm.diagnose(base).results
    held = {r["module"]: r["status"] for r in res["records"] if r["status"].startswith("held")}
    assert "block.fc1" in held and "delegate call" in held["block.fc1"], held
    (outcome,) = df.seed_and_diagnose(base, "encoder", "block.fc1", ["executorch"], tmp_path / "fc1")
    assert outcome.hit and len(outcome.span) > 1, outcome
