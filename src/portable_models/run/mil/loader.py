"""Load a saved ``.mlpackage`` (ML program) into coremltools' own MIL objects.

Core ML predicts only on macOS, but the program inside a package is plain protobuf
plus a weight blob. coremltools' MIL loader (``milproto.load``) turns it back into a
``Program`` of ``Operation``/``Var`` objects with the weights materialised, which is
what the reference executor walks. Nothing here computes anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.errors import FormatError, UnverifiedError

__all__ = ["LoadedProgram", "TensorDecl", "load_mlpackage", "numpy_dtype", "WEIGHTS_SUBDIR"]

#: where a package keeps its weight blobs, relative to the package folder.
WEIGHTS_SUBDIR = Path("Data") / "com.apple.CoreML" / "weights"


@dataclass(frozen=True)
class TensorDecl:
    """One input or output of the program: name, numpy dtype and shape (``None`` for a
    dimension that is only known at run time)."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]


@dataclass
class LoadedProgram:
    """A package's spec, its MIL program and the function the executor runs."""

    path: Path
    spec: Any
    program: Any
    function: Any
    function_name: str
    inputs: dict[str, TensorDecl] = field(default_factory=dict)
    outputs: dict[str, TensorDecl] = field(default_factory=dict)
    spec_version: int = 0


def numpy_dtype(builtin: Any) -> np.dtype[Any]:
    """The numpy dtype of a MIL builtin scalar type (``types.fp16`` -> float16)."""
    from coremltools.converters.mil.mil import types

    return np.dtype(types.nptype_from_builtin(builtin))


def _decl(var: Any) -> TensorDecl:
    from coremltools.converters.mil.mil import types

    if not types.is_tensor(var.sym_type) and not types.is_scalar(var.sym_type):
        return TensorDecl(var.name, np.dtype(object), ())
    shape = tuple(int(d) if isinstance(d, (int, np.integer)) else None for d in var.shape)
    return TensorDecl(var.name, numpy_dtype(var.dtype), shape)


def _model_kind(spec: Any) -> str:
    return str(spec.WhichOneof("Type"))


def _read_spec(path: Path) -> Any:
    import coremltools as ct

    if not path.is_dir():
        raise FormatError(
            f"{path.name} is not an .mlpackage folder",
            file=str(path),
            fix="pass the model.mlpackage folder that coremltools saved",
        )
    return ct.utils.load_spec(str(path))


def _function_name(spec: Any) -> str:
    name = str(spec.description.defaultFunctionName or "")
    return name or "main"


def load_mlpackage(path: Path | str) -> LoadedProgram:
    """Read ``path`` (an ``.mlpackage``) and return its MIL program.

    Raises :class:`UnverifiedError` for a package that holds something other than an
    ML program (a neural network, a pipeline): this executor runs ML programs only.
    """
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    path = Path(path)
    spec = _read_spec(path)
    kind = _model_kind(spec)
    if kind != "mlProgram":
        raise UnverifiedError(
            f"{path.name} holds a Core ML '{kind}' model; the MIL reference executor runs ML programs only",
            checked=["package spec read"],
            file=str(path),
        )
    weights = path / WEIGHTS_SUBDIR
    program = milproto_load(spec, spec.specificationVersion, str(weights))
    name = _function_name(spec)
    if name not in program.functions:
        raise FormatError(
            f"{path.name} has no MIL function '{name}' (it has {sorted(program.functions)})",
            file=str(path),
        )
    function = program.functions[name]
    loaded = LoadedProgram(
        path=path, spec=spec, program=program, function=function, function_name=name,
        spec_version=int(spec.specificationVersion),
    )
    loaded.inputs = {n: _decl(v) for n, v in function.inputs.items()}
    loaded.outputs = _output_decls(spec, function, path)
    return loaded


def _output_decls(spec: Any, function: Any, path: Path) -> dict[str, TensorDecl]:
    """The model's outputs, in the order the model description declares them."""
    by_name = {v.name: v for v in function.outputs}
    out: dict[str, TensorDecl] = {}
    for feature in spec.description.output:
        var = by_name.get(feature.name)
        if var is None:
            raise FormatError(
                f"{path.name} declares output '{feature.name}' but its program has no such "
                f"output (program outputs: {sorted(by_name)})",
                file=str(path),
            )
        out[feature.name] = _decl(var)
    return out
