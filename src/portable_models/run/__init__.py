"""Run: each artifact in its real runtime. One runner per runtime (load -> run -> close,
:mod:`.base`), one row per runtime in :mod:`.registry`, the file formats checked before
loading (:mod:`.formats`), the MIL reference executor for Core ML off macOS (:mod:`.mil`).
Other stages use the names below, never the modules inside."""

from typing import Any

from portable_models.run.base import RuntimeInfo
from portable_models.run.registry import RUNTIMES, runtime_info

__all__ = ["RUNTIMES", "LiteRTRunner", "RuntimeInfo", "check_truth", "facts_of", "onnx_facts", "runtime_info", "shape_fits",
           "signature_details"]

#: what the routes use to check their artifact the way it will be checked here (the TFLite
#: signature, a quantised variant's truth), loaded on first use
_LAZY = {"LiteRTRunner": "portable_models.run.litert", "shape_fits": "portable_models.run.litert",
         "signature_details": "portable_models.run.litert", "check_truth": "portable_models.run.truth",
         "facts_of": "portable_models.run.truth",
         "onnx_facts": "portable_models.run.truth"}


def __getattr__(name: str) -> Any:
    import importlib

    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'portable_models.run' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
