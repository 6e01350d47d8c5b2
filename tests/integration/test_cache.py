"""Re-exporting an unchanged model reuses every attempt; a changed weight, option or
converter version misses the cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import portable_models as pm
from models import ZOO

pytestmark = pytest.mark.slow
TARGETS = ["onnx", "torchscript"]


def _export(tmp_path: Path, name: str, model: object = None, **kw: object) -> tuple[pm.Bundle, float]:
    case = ZOO["cnn"]()
    start = time.perf_counter()
    bundle = pm.export(model or case.model, case.example, out=tmp_path / name, targets=TARGETS,
                       **{**case.options, **kw})
    return bundle, time.perf_counter() - start


def test_unchanged_export_hits_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv("PORTABLE_MODELS_CACHE", str(tmp_path / "cache"))
    first, t1 = _export(tmp_path, "a")
    again, t2 = _export(tmp_path, "b")
    assert first.ok and again.ok
    # the capture itself is reused: the fingerprint, golden inputs and outputs are unchanged
    assert first.contract.source["capture_cache"] == "miss"
    assert again.contract.source["capture_cache"] == "hit"
    assert again.contract.source["sha256"] == first.contract.source["sha256"]
    assert all(a.meta.get("cache") == "hit" for a in again.contract.artifacts)
    assert [a.sha256 for a in first.contract.artifacts] == [a.sha256 for a in again.contract.artifacts]
    assert t2 < t1 / 3, (t1, t2)
    assert "(cached)" in again.report()
    assert pm.verify(again.path).ok

    model = ZOO["cnn"]().model
    with torch.no_grad():
        model.head.bias.add_(0.01)
    changed, _ = _export(tmp_path, "c", model=model)
    assert changed.contract.source["capture_cache"] == "miss"
    assert not any(a.meta.get("cache") == "hit" for a in changed.contract.artifacts)

    option, _ = _export(tmp_path, "d", tolerance={"logits": {"atol": 1e-3}})
    assert not any(a.meta.get("cache") == "hit" for a in option.contract.artifacts)

    off, _ = _export(tmp_path, "e", cache=False)
    assert off.contract.source["capture_cache"] == "off"
    assert not any(a.meta.get("cache") == "hit" for a in off.contract.artifacts)


_HIT_SCRIPT = """
import sys
import portable_models as pm
from models import ZOO
case = ZOO["cnn"]()
b = pm.export(case.model, case.example, out=sys.argv[1], targets=["onnx", "torchscript"], **case.options)
assert b.ok and b.contract.source["capture_cache"] == sys.argv[2], b.contract.source
print("tracing machinery imported:", "torch._dynamo" in sys.modules)
"""


def test_a_cached_capture_skips_torch_export_and_a_damaged_one_is_redone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked in the caller's own process (PORTABLE_MODELS_CAPTURE=inprocess): a hit never
    imports torch's tracing machinery, which is what a cached re-export would pay for."""
    import subprocess
    import sys

    monkeypatch.setenv("PORTABLE_MODELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PORTABLE_MODELS_CAPTURE", "inprocess")
    tests = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": str(tests)}

    def run(name: str, expect: str) -> str:
        done = subprocess.run([sys.executable, "-c", _HIT_SCRIPT, str(tmp_path / name), expect], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    assert "imported: True" in run("a", "miss")
    assert "imported: False" in run("b", "hit")
    stored = [p for p in (tmp_path / "cache").rglob("model.pt2") if "artifact" in p.parts]
    assert len(stored) == 1
    stored[0].write_bytes(stored[0].read_bytes()[:-10])  # damaged: the capture is redone
    assert "imported: True" in run("c", "miss")
    assert "imported: False" in run("d", "hit")


def test_converter_version_is_part_of_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from portable_models.core import cache

    key = cache.attempt_key(parts={"x": 1}, packages=("torch",))
    monkeypatch.setattr(cache, "package_version", lambda d: "9.9.9" if d == "torch" else "1")
    assert cache.attempt_key(parts={"x": 1}, packages=("torch",)) != key
