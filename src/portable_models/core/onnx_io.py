"""Reading an ONNX file safely, what capture and the ONNX routes both need: its graph
without its weights, and its external data files, each checked to stay in the model's folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from portable_models.errors import InputError, UnsafeModelError

__all__ = ["check_external_data", "load_graph"]


def load_graph(path: Path) -> Any:
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InputError(f"{path.name} is not a readable ONNX model: {exc}", file=str(path),
                         stage="load", fix="re-export the ONNX file") from exc


def check_external_data(path: Path) -> list[str]:
    """The external data files of ``path`` (relative), after checking each stays inside
    the model's folder."""
    from onnx.external_data_helper import uses_external_data

    model = load_graph(path)
    folder = path.parent.resolve()
    found: list[str] = []
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (path.parent / location)
        resolved = target.resolve()
        if Path(location).is_absolute() or ".." in Path(location).parts or not resolved.is_relative_to(folder):
            raise UnsafeModelError(
                f"{path.name}: external data of {tensor.name!r} points outside the model's folder "
                f"({location})", file=str(path), stage="load",
                fix="keep external data files next to the model (relative paths, no '..')")
        if not resolved.is_file():
            raise InputError(f"{path.name}: external data file {location} is missing", file=str(path),
                             stage="load", fix="copy the external data next to the model")
        found.append(location)
    return sorted(set(found))
