"""The ``convert`` job: one route turns the captured source into one artifact. Runs inside a
worker only (:mod:`portable_models.isolation.jobs` names it by dotted path)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from portable_models._version import __version__
from portable_models.core.golden import load_cases
from portable_models.core.spec import DimSpec, TensorSpec

__all__ = ["convert_job"]


def convert_job(payload: dict[str, Any]) -> dict[str, Any]:
    from portable_models.convert.base import ConvertJob, check_requires, ensure_artifact
    from portable_models.convert.registry import route_by_name
    from portable_models.core.imports import load_impl

    info = route_by_name(payload["route"])
    check_requires(info)
    samples = load_cases(Path(payload["samples"]))[0]
    job = ConvertJob(
        route=info.name,
        source_file=Path(payload["source_file"]),
        out_dir=Path(payload["out_dir"]),
        work_dir=Path(payload["work_dir"]),
        inputs=[TensorSpec.from_dict(d) for d in payload["inputs"]],
        outputs=[TensorSpec.from_dict(d) for d in payload["outputs"]],
        dims={k: DimSpec(name=k, **v) for k, v in payload["dims"].items()},
        sample_inputs=samples,
        precision=payload.get("precision", "float32"),
        options=dict(payload.get("options") or {}),
        prior_artifacts={k: Path(v) for k, v in (payload.get("prior") or {}).items()},
        fixed_shape_fallback=bool(payload.get("fixed_shape_fallback", True)),
    )
    job.out_dir.mkdir(parents=True, exist_ok=True)
    job.work_dir.mkdir(parents=True, exist_ok=True)
    fn = load_impl(info.impl)
    start = time.perf_counter()
    result = fn(job)
    seconds = time.perf_counter() - start
    ensure_artifact(job, result)
    steps = [*_pass_steps(job), *result.steps]
    if job.precision.startswith("int8"):
        result.meta.update(_truth(job, job.out_dir / result.file))
    return {
        "file": result.file,
        "io": result.io.to_dict(),
        "steps": [s.to_dict() for s in steps],
        "precision": result.precision,
        "meta": result.meta,
        "convert_s": seconds,
    }


def _pass_steps(job: Any) -> list[Any]:
    """The compatibility passes the route's program went through, as the route's first steps."""
    from portable_models.convert.base import Step
    from portable_models.convert.torch_program import APPLIED

    if not job.options.get("compat_passes"):
        return []
    return [Step(step=f"compat:{name}", version=__version__, detail={"nodes_rewritten": n})
            for name, n in APPLIED.items()]


def _truth(job: Any, artifact: Path) -> dict[str, Any]:
    """A quantised variant, whichever route made it, must be what its label says before it is
    checked (:mod:`portable_models.run.truth`): its facts, and its size against its fp32 twin."""
    from portable_models.core.hashing import path_bytes
    from portable_models.core.targets import TARGET_INFO
    from portable_models.run import check_truth, facts_of

    target = next((t for t, info in TARGET_INFO.items() if artifact.suffix == "." + info.file_format), "")
    twin = job.prior_artifacts.get(target)  # its fp32 twin (the target consumes its own float32 artifact)
    fp32_bytes = path_bytes(twin) if twin is not None else None
    facts = facts_of(artifact)
    check_truth(job.precision, facts, fp32_bytes)
    return {"truth": facts, **({"size_ratio_to_fp32": round(facts["bytes"] / fp32_bytes, 4)} if fp32_bytes else {})}
