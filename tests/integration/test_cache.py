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
    assert all(a.meta.get("cache") == "hit" for a in again.contract.artifacts)
    assert [a.sha256 for a in first.contract.artifacts] == [a.sha256 for a in again.contract.artifacts]
    assert t2 < t1 / 3, (t1, t2)
    assert "(cached)" in again.report()
    assert pm.verify(again.path).ok

    model = ZOO["cnn"]().model
    with torch.no_grad():
        model.head.bias.add_(0.01)
    changed, _ = _export(tmp_path, "c", model=model)
    assert not any(a.meta.get("cache") == "hit" for a in changed.contract.artifacts)

    option, _ = _export(tmp_path, "d", tolerance={"logits": {"atol": 1e-3}})
    assert not any(a.meta.get("cache") == "hit" for a in option.contract.artifacts)

    off, _ = _export(tmp_path, "e", cache=False)
    assert not any(a.meta.get("cache") == "hit" for a in off.contract.artifacts)


def test_converter_version_is_part_of_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from portable_models import cache

    key = cache.attempt_key(parts={"x": 1}, packages=("torch",))
    monkeypatch.setattr(cache, "package_version", lambda d: "9.9.9" if d == "torch" else "1")
    assert cache.attempt_key(parts={"x": 1}, packages=("torch",)) != key
