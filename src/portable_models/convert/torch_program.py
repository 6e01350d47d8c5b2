"""The captured torch program as the torch routes read it: loaded from ``source/model.pt2``,
and its sample inputs moved to other sizes of their dynamic dims (to check a converter kept
them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from portable_models.convert.base import ConvertJob
from portable_models.core.torch_io import import_torch
from portable_models.errors import ConversionError

if TYPE_CHECKING:
    from torch.export import ExportedProgram

__all__ = ["calibration_batches", "load_eager_trace", "load_program", "resized_inputs"]


#: the compatibility passes the last :func:`load_program` of this worker applied, with the
#: nodes each rewrote (the convert job records them as steps of the route).
APPLIED: dict[str, int] = {}


def load_program(job: ConvertJob) -> ExportedProgram:
    """The captured program, loaded with ``torch.export.load``, with the compatibility passes
    the job asks for (``options["compat_passes"]``) applied to this copy."""
    from portable_models.convert import compat

    torch = import_torch(f"convert:{job.route}")
    try:
        program = torch.export.load(str(job.source_file))
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise ConversionError(
            f"cannot load the captured program: {exc}", file=str(job.source_file),
            stage=f"convert:{job.route}",
            fix="re-capture the model; the .pt2 must come from torch.export.save",
        ) from exc
    APPLIED.clear()
    APPLIED.update(compat.apply(program, list(job.options.get("compat_passes") or [])))
    return program


def load_eager_trace(job: ConvertJob) -> Any:
    """The eager model's TorchScript trace the capture made (``options["eager_trace"]``), for
    the routes whose converter reads TorchScript. It is the export's own scratch file, made
    in this export from the caller's model: never a file from a bundle."""
    torch = import_torch(f"convert:{job.route}")
    trace = job.options.get("eager_trace") or {}
    if not trace.get("file"):
        raise ConversionError(
            "no trace of the eager model: " + str(trace.get("error") or "the capture made none"),
            stage=f"convert:{job.route}",
            fix="this route needs a model that torch.jit.trace accepts; the other routes do not")
    try:
        return torch.jit.load(str(trace["file"]), map_location="cpu").eval()
    except (OSError, RuntimeError) as exc:
        raise ConversionError(f"cannot load the eager model's trace: {exc}", file=str(trace["file"]),
                              stage=f"convert:{job.route}") from exc


def _other_size(size: int, lo: int, hi: int) -> int | None:
    for candidate in (size + 1, size - 1, size + 2):
        if lo <= candidate <= hi and candidate != size:
            return candidate
    return None


def resized_inputs(job: ConvertJob) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The sample inputs with every dynamic dim moved to another size within its
    bounds (rows repeated or dropped, so token ids stay valid). Returns the arrays and
    the new size per dim label; an empty size dict means there is nothing dynamic."""
    current: dict[str, int] = {}
    for spec in job.inputs:
        arr = np.asarray(job.sample_inputs[spec.name])
        for axis, label in spec.dynamic_axes.items():
            if axis < arr.ndim:
                current.setdefault(label, int(arr.shape[axis]))
    sizes: dict[str, int] = {}
    for label, size in current.items():
        dim = job.dims.get(label)
        new = _other_size(size, dim.min if dim else 1, dim.max if dim else size + 1)
        if new is not None:
            sizes[label] = new
    out: dict[str, np.ndarray] = {}
    for spec in job.inputs:
        arr = np.asarray(job.sample_inputs[spec.name])
        for axis, label in spec.dynamic_axes.items():
            if label in sizes and axis < arr.ndim:
                idx = np.arange(sizes[label]) % max(arr.shape[axis], 1)
                arr = np.take(arr, idx, axis=axis)
        out[spec.name] = arr
    return out, sizes


def calibration_batches(job: ConvertJob, names: list[str], sample: dict[str, Any]) -> Any:
    """The calibration data in the sample's shape (the artifact's fixed shape): all cases'
    rows, in order, cut into batches of the sample's size (a last, short batch is dropped)."""
    import torch

    cases = job.calibration_cases()
    rows = {n: np.concatenate([np.asarray(c[n]) for c in cases]) for n in job.input_names}
    batch = int(sample[names[0]].shape[0]) if sample[names[0]].ndim else 1
    total = len(rows[job.input_names[0]])
    if total < batch:
        raise ConversionError(f"{total} calibration rows do not fill one batch of {batch} (the example's)",
                              stage=f"convert:{job.route}",
                              fix="give at least as many calibration rows as the example input's batch")
    for start in range(0, total - batch + 1, batch):
        yield {p: torch.from_numpy(np.ascontiguousarray(rows[n][start:start + batch]))
               for n, p in zip(job.input_names, names, strict=True)}
