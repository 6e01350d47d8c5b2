"""Reloading a captured Keras model and calling it, the one way capture checks its save and
the Keras routes use it in their workers (imports Keras inside the functions only)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from portable_models.core.spec import TensorSpec
from portable_models.errors import (
    CaptureError,
    ConversionError,
    MissingDependencyError,
    UnsafeModelError,
)

__all__ = ["TRUST_FIX", "first_line", "flat_outputs", "load_saved", "pack_inputs", "require_backend"]

#: the stage a reload error belongs to when the capture itself reloads the model
_STAGE = "capture"


TRUST_FIX = ("the model holds Python code (e.g. a Lambda layer's function) that Keras runs "
             "when it loads; if you trust it, pass trust_model=True (CLI: --trust-model), "
             "or replace the Lambda with a registered custom layer")


def _is_unsafe(exc: BaseException) -> bool:
    text = str(exc)
    return "safe_mode" in text or "unsafe_deserialization" in text


def load_saved(path: Path, *, trust: bool = False, stage: str = "convert",
               modules: Sequence[str] = ()) -> Any:
    """``keras.saving.load_model(path, safe_mode=not trust)``, errors translated. The
    ``modules`` that register the model's own classes are imported first."""
    import importlib

    import keras

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise _reload_error(exc, path, stage) from exc
    try:
        return keras.saving.load_model(str(path), safe_mode=not trust)
    except ValueError as exc:
        if _is_unsafe(exc) and not trust:
            raise UnsafeModelError(f"{path.name} needs unsafe deserialisation: {first_line(exc)}",
                                   file=str(path), stage=stage, fix=TRUST_FIX) from exc
        raise _reload_error(exc, path, stage) from exc
    except (TypeError, KeyError, OSError, AttributeError) as exc:
        raise _reload_error(exc, path, stage) from exc


def _reload_error(exc: BaseException, path: Path, stage: str) -> CaptureError | ConversionError:
    cls = CaptureError if stage == _STAGE else ConversionError
    return cls(f"the Keras model in {path.name} does not reload: {type(exc).__name__}: "
               f"{first_line(exc)}", file=str(path), stage=stage,
               fix="custom layers and models must be registered with "
                   "@keras.saving.register_keras_serializable and implement get_config()")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:400] if text else type(exc).__name__


def pack_inputs(model: Any, flat: Sequence[Any], specs: Sequence[TensorSpec] = ()) -> Any:
    """The structure ``model(...)`` takes, from flat inputs in the logical order: a
    functional model's own input structure (tensor, list or dict), one tensor, a dict
    when the specs record keys (``meta["keras_key"]``), else a list."""
    import keras

    struct = getattr(model, "_inputs_struct", None)
    if struct is not None:
        return keras.tree.pack_sequence_as(struct, list(flat))
    keys = [s.meta.get("keras_key") for s in specs]
    if specs and all(keys):
        return {str(k): v for k, v in zip(keys, flat, strict=True)}
    return flat[0] if len(flat) == 1 else list(flat)


def flat_outputs(out: Any) -> list[Any]:
    """Output leaves in Keras's flattening order (dicts by sorted key)."""
    import keras

    return list(keras.tree.flatten(out))


def require_backend(route: str, backend: str, framework: str, extra: str) -> None:
    """A Keras route runs only where Keras and ``backend`` import and Keras uses ``backend``
    (the worker's KERAS_BACKEND, chosen by the route table's ``framework``)."""
    import importlib

    try:
        import keras

        importlib.import_module(backend)
    except ImportError as exc:
        raise MissingDependencyError(f"keras / {backend} not importable: {exc}", stage=f"convert:{route}",
                                     fix=f"pip install 'portable-models[{extra}]'") from exc
    have = keras.backend.backend()
    if have != backend:
        raise ConversionError(f"route {route!r} needs KERAS_BACKEND={backend}, this worker runs {have!r}",
                              stage=f"convert:{route}",
                              fix=f"the route table must give this route framework={framework!r}")
