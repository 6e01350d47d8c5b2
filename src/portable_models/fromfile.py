"""``export_file``: the ``convert`` command's engine — a saved model on disk to a bundle.

The format is detected from the file's bytes; loading is safe unless ``trust=True``.
Example inputs come from ``--samples``, else from ``--input`` specs (seeded draws within
their ranges), else from the file itself (a ``.pt2`` carries its example inputs; a Keras
model declares its input shapes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.core.golden import draw, load_samples
from portable_models.core.spec import DimSpec, TensorSpec
from portable_models.errors import UsageError

__all__ = ["export_file"]


def _to_framework(arrays: list[np.ndarray], framework: str) -> tuple[Any, ...]:
    if framework == "torch":
        import torch

        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    return tuple(arrays)


def _keras_specs(model: Any) -> list[TensorSpec]:
    specs = []
    for t in model.inputs:
        shape = tuple(2 if d is None else int(d) for d in t.shape)
        dtype = str(getattr(t.dtype, "name", t.dtype))
        specs.append(TensorSpec(name=t.name, dtype=dtype, shape=shape))
    return specs


def _example(loaded: Any, framework: str, inputs: Sequence[TensorSpec],
             samples: list[dict[str, np.ndarray]] | None, seed: int) -> tuple[Any, ...]:
    hints = loaded.hints or {}
    if samples:
        names = [s.name for s in inputs] or hints.get("input_names") or list(samples[0])
        missing = [n for n in names if n not in samples[0]]
        if missing:
            raise UsageError(f"samples lack input(s) {missing}", fix=f"the inputs are {', '.join(names)}")
        return _to_framework([samples[0][n] for n in names], framework)
    if inputs:
        rng = np.random.default_rng(seed)
        for s in inputs:
            if any(isinstance(d, str) for d in s.shape):
                raise UsageError(f"--input {s.name}: give concrete sizes (e.g. 2x3x32x32)",
                                 fix="mark dynamic axes with --dynamic NAME:AXIS:LABEL")
        return _to_framework([draw(s, tuple(int(d) for d in s.shape), rng) for s in inputs], framework)
    if "example" in hints:
        return tuple(hints["example"])
    if framework in ("keras", "onnx"):
        rng = np.random.default_rng(seed)
        specs = _keras_specs(loaded.model) if framework == "keras" else [
            TensorSpec(name=s.name, dtype=s.dtype, shape=tuple(2 if isinstance(d, str) else d for d in s.shape))
            for s in hints["input_specs"]]
        if any(s.dtype.startswith(("int", "uint")) for s in specs):
            raise UsageError("the model has integer inputs: their value range is needed",
                             fix="pass --input NAME:SHAPE:DTYPE:LOW..HIGH for each input")
        return tuple(draw(s, tuple(int(d) for d in s.shape), rng) for s in specs)
    raise UsageError("no example inputs: this file does not say what it takes",
                     fix="pass --input NAME:SHAPE:DTYPE[:LOW..HIGH] for each input, or --samples FILE.npz")


def export_file(src: str | Path, *, out: str | Path, inputs: Sequence[TensorSpec] = (),
                dynamic: Sequence[tuple[str, int, DimSpec]] = (), model_class: str | None = None,
                samples: str | Path | None = None, calibration: str | Path | None = None,
                eval_file: str | Path | None = None, trust: bool = False, **options: Any) -> Any:
    """Load a saved model safely and export it like :func:`portable_models.export`."""
    from portable_models.api import export
    from portable_models.capture import framework_of
    from portable_models.capture.files import load_source
    from portable_models.core.paths import user_path

    src, out = user_path(src), user_path(out)
    loaded = load_source(src, trust=trust, model_class=model_class)
    framework = framework_of(loaded.model)
    cases = load_samples(user_path(samples)) if samples else None
    example = _example(loaded, framework, inputs, cases, int(options.get("seed", 0)))
    hints = loaded.hints or {}
    opts: dict[str, Any] = dict(options)
    if inputs:
        opts.setdefault("input_names", [s.name for s in inputs])
        opts.setdefault("input_ranges", {s.name: s.range for s in inputs if s.range is not None})
    elif hints.get("input_names"):
        opts.setdefault("input_names", hints["input_names"])
    if dynamic:
        dims: dict[str, dict[int, Any]] = {}
        for name, axis, dim in dynamic:
            dims.setdefault(name, {})[axis] = (dim.name, dim.min, dim.max)
        opts["dynamic_dims"] = dims
    elif hints.get("dynamic_dims"):
        opts.setdefault("dynamic_dims", hints["dynamic_dims"])
    if cases:
        opts["samples"] = cases
    if calibration:
        opts["calibration"] = load_samples(user_path(calibration))
    if eval_file:  # held-out inputs; an array named "labels" in a case is that case's labels
        held = load_samples(user_path(eval_file))
        labels = [case.pop("labels") for case in held if "labels" in case]
        if labels and len(labels) != len(held):
            raise UsageError(f"{eval_file}: {len(labels)} of its {len(held)} cases have labels",
                             fix="give every eval case a labels array, or none")
        opts["eval_samples"] = held
        if labels:
            opts["eval_labels"] = labels
    opts["source_trust"] = loaded.trust
    opts.setdefault("trust_model", trust)
    return export(loaded.model, example, out=out, **opts)


def tolerance_overrides(values: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """``--atol 1e-3 --atol logits=1e-2`` -> defaults and per-output overrides."""
    defaults: dict[str, float] = {}
    per_output: dict[str, dict[str, float]] = {}
    for key, items in values.items():
        for item in items:
            name, sep, value = item.rpartition("=")
            try:
                number = float(value)
            except ValueError:
                raise UsageError(f"--{key} {item!r} is not a number or NAME=NUMBER",
                                 fix=f"for example --{key} 1e-3 or --{key} logits=1e-3") from None
            if sep:
                per_output.setdefault(name, {})[key] = number
            else:
                defaults[key] = number
    return {"defaults": defaults, "per_output": per_output}
