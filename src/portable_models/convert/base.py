"""What a route is: requires -> convert -> ensures.

A route turns the captured source (``source/model.pt2`` or ``source/model.keras``)
into one artifact. It runs inside an isolated worker process; it only produces the
artifact and says how to feed it (its :class:`~portable_models.core.iomap.IoMap`). It
never compares: parity is the compare engine's job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from portable_models.core.imports import package_version
from portable_models.core.iomap import IoMap
from portable_models.core.spec import DimSpec, TensorSpec
from portable_models.errors import ConversionError, DynamicDimsRefused, MissingDependencyError

__all__ = [
    "RouteInfo",
    "ConvertJob",
    "ConvertResult",
    "ConvertFn",
    "Step",
    "check_requires",
    "ensure_artifact",
]


@dataclass(frozen=True, kw_only=True)
class RouteInfo:
    """A row of the route table. ``impl`` is a dotted path ``module:function`` so
    listing routes imports nothing heavy."""

    name: str
    target: str
    source: str
    impl: str
    requires: tuple[str, ...]
    runtime: str
    framework: str = "torch"
    #: the precisions (variants) it makes
    precisions: tuple[str, ...] = ("float32", "float16")
    description: str = ""
    #: converts with fixed shapes when the converter refuses the dynamic dims; the pipeline
    #: may defer that until the later routes had their chance to keep them.
    fixed_fallback: bool = False


@dataclass(kw_only=True)
class ConvertJob:
    """Everything a route gets. Paths are absolute."""

    route: str
    source_file: Path
    out_dir: Path
    work_dir: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: dict[str, DimSpec]
    sample_inputs: dict[str, np.ndarray]
    precision: str = "float32"
    options: dict[str, Any] = field(default_factory=dict)
    prior_artifacts: dict[str, Path] = field(default_factory=dict)
    #: a route with a fixed-shape fallback (:attr:`RouteInfo.fixed_fallback`) may use it;
    #: False: it raises :class:`DynamicDimsRefused` instead.
    fixed_shape_fallback: bool = True

    def fixed_shapes_instead(self, converter: str, reason: str, cause: BaseException) -> str:
        """``converter`` could not keep the dynamic dims (``reason``): refuse, when the job
        asks the route to (:class:`DynamicDimsRefused`, so that later routes are tried first),
        else say why the route goes on at the sample's sizes (the artifact's ``dynamic_note``)."""
        if not self.fixed_shape_fallback:
            raise DynamicDimsRefused(f"{converter} refused the dynamic dims ({reason})"[:400], stage="convert",
                                     fix="the dims stay dynamic in another route; a fixed-shape "
                                         "conversion is tried if none keeps them") from cause
        return f"dynamic dims refused, fixed shape used: {reason}"[:400]

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def calibration_cases(self) -> list[dict[str, np.ndarray]]:
        """The calibration cases the export was given (``int8`` routes), read back."""
        from portable_models.core.golden import load_cases

        calibration = self.options.get("calibration") or {}
        if not calibration.get("file"):
            raise ConversionError("int8 needs calibration data", stage=f"convert:{self.route}",
                                  fix="pass calibration=[{input: array}, …] (--calibration FILE.npz)")
        return list(load_cases(Path(calibration["file"])))


@dataclass(frozen=True, kw_only=True)
class Step:
    """One converter step of a route, as the contract records it."""

    step: str
    version: str
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "version": self.version, **dict(self.detail)}


@dataclass(kw_only=True)
class ConvertResult:
    """What a route hands back: the artifact file (relative to ``out_dir``), its io map,
    the steps that made it, and anything worth recording (opset, deployment target …)."""

    file: str
    io: IoMap
    steps: list[Step]
    precision: str = "float32"
    meta: dict[str, Any] = field(default_factory=dict)


class ConvertFn(Protocol):
    def __call__(self, job: ConvertJob) -> ConvertResult: ...


def check_requires(info: RouteInfo) -> None:
    """``requires``: every package the route needs is installed."""
    missing = [d for d in info.requires if not package_version(d)]
    if missing:
        raise MissingDependencyError(
            f"route {info.name!r} needs {', '.join(missing)}, which is not installed",
            stage=f"convert:{info.target}",
            fix="pip install 'portable-models[all]' (or the extra for this target)",
        )


def ensure_artifact(job: ConvertJob, result: ConvertResult) -> Path:
    """``ensures``: the file exists, is not empty, and the io map names every logical
    input and output."""
    path = job.out_dir / result.file
    if not path.exists():
        raise ConversionError(f"route {job.route!r} reported {result.file} but wrote nothing",
                              stage="convert")
    if path.is_file() and path.stat().st_size == 0:
        raise ConversionError(f"route {job.route!r} wrote an empty {result.file}", stage="convert")
    missing_in = set(job.input_names) - set(result.io.inputs)
    missing_out = set(job.output_names) - set(result.io.outputs)
    if missing_in or missing_out:
        raise ConversionError(
            f"route {job.route!r} io map lacks {sorted(missing_in | missing_out)}",
            stage="convert",
        )
    return path
