"""portable_models: train once, export anywhere, prove it.

Importing this package is light: it imports no torch, TensorFlow, Keras, coremltools,
onnxruntime or ExecuTorch. Public names load on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from portable_models._version import __version__

if TYPE_CHECKING:
    from portable_models.api import Bundle, ExportOptions, export
    from portable_models.contract.model import Contract, load_contract
    from portable_models.core.spec import DimSpec, TensorSpec
    from portable_models.core.tolerance import Tolerance, TolerancePolicy
    from portable_models.diagnosis import diagnose
    from portable_models.errors import PortableModelsError
    from portable_models.isolation.pool import shutdown_workers
    from portable_models.rerun import VerifyReport, verify

__all__ = [
    "__version__",
    "export",
    "verify",
    "load_contract",
    "Bundle",
    "VerifyReport",
    "ExportOptions",
    "Contract",
    "Tolerance",
    "TolerancePolicy",
    "TensorSpec",
    "DimSpec",
    "PortableModelsError",
    "errors",
    "shutdown_workers",
    "diagnose",
]

_LAZY = {
    "export": "portable_models.api",
    "verify": "portable_models.api",
    "Bundle": "portable_models.api",
    "VerifyReport": "portable_models.api",
    "ExportOptions": "portable_models.api",
    "load_contract": "portable_models.contract.model",
    "Contract": "portable_models.contract.model",
    "Tolerance": "portable_models.core.tolerance",
    "TolerancePolicy": "portable_models.core.tolerance",
    "TensorSpec": "portable_models.core.spec",
    "DimSpec": "portable_models.core.spec",
    "PortableModelsError": "portable_models.errors",
    "shutdown_workers": "portable_models.isolation.pool",
    "diagnose": "portable_models.diagnosis",
}


def __getattr__(name: str) -> Any:
    if name == "errors":
        return importlib.import_module("portable_models.errors")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'portable_models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
