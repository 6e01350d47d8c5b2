"""Import coremltools without the packages it imports for converters this library never calls.

``import coremltools`` imports TensorFlow, scikit-learn, XGBoost, libsvm, Hugging Face
transformers and ``executorch.exir`` when they are installed, only to find out whether to offer
converters for them (``coremltools._deps``): measured here, 6.5-7.7 s for coremltools in a
worker that has torch and ``executorch.exir`` already, 2.9-3.3 s with TensorFlow hidden, ~0.4 s
with scikit-learn and transformers hidden too. A torch program's conversion and the checks of
an ``.mlpackage`` need none of them (the ExecuTorch frontend converts EdgePrograms, which this
library never hands it); only the conversion of a Keras model uses the TensorFlow frontend.
torchao stays: coremltools converts torchao's quantized ops with it.

:func:`import_coremltools` imports coremltools with those packages hidden (those not imported
already), TensorFlow included unless asked for. The packages themselves stay importable: the
hiding lasts for coremltools' own import only. A process that imported coremltools without
TensorFlow cannot convert a TensorFlow model with it later; asked to, :func:`import_coremltools`
raises :class:`~portable_models.errors.WorkerUnfit`, and the worker pool runs that job again in
a fresh worker.
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType

from portable_models.errors import WorkerUnfit

__all__ = ["import_coremltools", "UNUSED_BY_COREMLTOOLS"]

#: what ``coremltools._deps`` imports for converters this library does not use.
UNUSED_BY_COREMLTOOLS = ("sklearn", "xgboost", "libsvm", "transformers", "executorch")

_LOCK = threading.Lock()


def import_coremltools(*, tensorflow: bool = False) -> ModuleType:
    """coremltools, imported (once per process) without :data:`UNUSED_BY_COREMLTOOLS` and,
    unless ``tensorflow``, without TensorFlow; ``tensorflow``: its TensorFlow frontend is
    needed (raises :class:`WorkerUnfit` when this process imported coremltools without it)."""
    with _LOCK:
        if sys.modules.get("coremltools") is None:
            hidden = [name for name in UNUSED_BY_COREMLTOOLS + (() if tensorflow else ("tensorflow",))
                      if name not in sys.modules]
            for name in hidden:
                sys.modules[name] = None  # type: ignore[assignment]  # "import name" raises ImportError
            try:
                import coremltools  # noqa: F401
            finally:
                for name in hidden:
                    if sys.modules.get(name, ...) is None:
                        del sys.modules[name]
        ct = sys.modules["coremltools"]
        if tensorflow and not ct._deps._HAS_TF_2:
            raise WorkerUnfit(
                "coremltools was imported in this process without its TensorFlow frontend "
                "(for a torch program), and this job converts a TensorFlow model",
                stage="import coremltools", fix="run the job in a fresh process")
        return ct
