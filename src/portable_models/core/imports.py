"""Facts about installed packages and lazy imports by dotted path, which every stage needs:
a package's version without importing it, and ``module:attr`` loaded only when used."""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

from portable_models.errors import ConversionError

__all__ = ["load_impl", "package_version"]


def package_version(dist: str) -> str:
    """Installed version of a distribution, without importing it ('' if absent)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def load_impl(dotted: str) -> Any:
    """Import ``module:attr`` lazily."""
    module, _, attr = dotted.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConversionError(f"cannot load {dotted}: {exc}") from exc
