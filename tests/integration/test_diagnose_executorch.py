"""diagnose on ExecuTorch artifacts: the .pte run with the event tracer's debug buffer, each
instruction's output tied to its source module through the program's debug handles. An intact
bundle agrees everywhere; with portable kernels a weight scaled inside the .pte is named
first for (nearly) every layer of three models; with XNNPACK the report says which modules a
delegate call held as one unit, and a fault inside one is named as that span."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("executorch.runtime")
pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diagnose_faults as df  # noqa: E402

PORTABLE = {"executorch": "executorch-portable"}


@pytest.fixture(scope="module")
def portable(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("et-portable")
    made = {}
    for name in df.MODELS:
        result = df.export_base(name, root / name, ["executorch"], routes=PORTABLE)
        assert result.ok, result.report()
        made[name] = root / name
    return made


@pytest.fixture(scope="module")
def xnnpack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("et-xnnpack") / "encoder"
    result = df.export_base("encoder", out, ["executorch"])
    assert result.ok, result.report()
    return out


def _result(bundle: Path) -> dict:
    import portable_models as pm

    (res,) = pm.diagnose(bundle, targets=["executorch"]).results
    assert not res.get("error"), res["error"]
    return res


def test_an_intact_bundle_agrees_everywhere(portable: dict[str, Path], xnnpack: Path) -> None:
    for bundle in [*portable.values(), xnnpack]:
        res = _result(bundle)
        assert res["first"] is None, res["records"]
        assert any(r["status"] == "compared" for r in res["records"])


def test_portable_faults_are_named_first(portable: dict[str, Path], tmp_path: Path) -> None:
    outcomes = []
    for name, bundle in portable.items():
        for layer in df.MODELS[name]()[3]:
            outcomes += df.seed_and_diagnose(bundle, name, layer, ["executorch"], tmp_path / f"{name}-{layer}")
    print(df.tally(outcomes))
    assert sum(o.hit for o in outcomes) >= 0.9 * len(outcomes), df.tally(outcomes)


def test_xnnpack_delegate_spans(xnnpack: Path, tmp_path: Path) -> None:
    held = {r["module"]: r["status"] for r in _result(xnnpack)["records"] if r["status"].startswith("held")}
    assert "block.fc1" in held and "delegate call" in held["block.fc1"], held
    (outcome,) = df.seed_and_diagnose(xnnpack, "encoder", "block.fc1", ["executorch"], tmp_path / "fc1")
    print(df.tally([outcome]))
    assert outcome.hit and len(outcome.span) > 1, outcome  # named as the delegate's span
