"""pytest plugin: ``pytest --pm-bundle DIR`` checks every artifact x output of a bundle.

Imported into every pytest run of the environment, so it imports nothing heavy.
"""

from __future__ import annotations

from typing import Any

__all__ = ["pytest_addoption"]


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("portable_models")
    group.addoption("--pm-bundle", action="append", default=[], metavar="DIR",
                    help="verify this portable_models bundle: one test per artifact x output")
