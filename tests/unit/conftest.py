"""The unit tier means what it says: it starts no worker and imports no heavy framework.
Starting a worker fails the test that tried; a unit run that ends with a heavy framework
imported fails the session, naming what was imported."""

from __future__ import annotations

import sys
from typing import Any

import pytest

HEAVY = ("torch", "tensorflow", "keras", "tf_keras", "coremltools", "onnxruntime", "onnx", "executorch",
         "onnx2tf", "tf2onnx", "ai_edge_litert", "litert_torch", "jax")


@pytest.fixture(autouse=True)
def _no_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from portable_models.isolation import process

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a unit test started a worker: it belongs in tests/integration")

    monkeypatch.setattr(process.Worker, "__init__", refuse)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    only_unit = all("tests/unit/" in str(item.path).replace("\\", "/") for item in session.items)
    loaded = [m for m in HEAVY if m in sys.modules]
    if only_unit and session.items and loaded:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nunit tier imported {', '.join(loaded)}: such tests belong in tests/integration", file=sys.stderr)
