from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))


def pytest_configure(config: object) -> None:
    """Every test session starts with an empty attempt cache of its own (a machine's
    cache from earlier runs must not stand in for the converters)."""
    if "PORTABLE_MODELS_CACHE" not in os.environ:
        os.environ["PORTABLE_MODELS_CACHE"] = tempfile.mkdtemp(prefix="pm-test-cache-")
