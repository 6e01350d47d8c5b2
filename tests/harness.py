"""The one harness of the tests that drive routes and runtimes directly.

- :func:`route_job`: a test model (:class:`models.Case`, or ``Case(model, example, options)``)
  -> the :class:`ConvertJob` the pipeline hands a route. It captures the model with the
  library's own capture (``torch.export`` -> ``source/model.pt2``, specs with symbolic dims,
  the golden inputs: the example, then another size of every dynamic dim) and keeps the
  eager model and its outputs.
- :func:`assert_parity`: every parity judgement of the tests, through the library's parity
  engine (:func:`portable_models.compare.parity.compare_outputs` and ``verdict``) at the
  library's default tolerance for the precision. A test that needs another tolerance states
  it as a :class:`Tolerance` with the reason. Raises :class:`ParityMismatch` (an
  ``AssertionError``) with every output's metrics.

Imports no framework at module level (torch inside functions): unit tests may use it.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from models import Case
from portable_models.compare.parity import (
    OutputParity,
    Tolerance,
    TolerancePolicy,
    compare_outputs,
    format_float,
    verdict,
)
from portable_models.convert.base import ConvertJob, ConvertResult, ensure_artifact
from portable_models.core.golden import Cases, draw
from portable_models.core.spec import concrete_shape

__all__ = ["Case", "ParityMismatch", "RouteJob", "Tolerance", "assert_parity", "max_abs",
           "route_job"]

Arrays = Mapping[str, np.ndarray]


class ParityMismatch(AssertionError):
    """Outputs the parity engine failed; the message lists every output's metrics."""


def assert_parity(actual: Arrays | Sequence[Arrays], reference: Arrays | Sequence[Arrays], *,
                  precision: str = "float32", tolerance: Tolerance | None = None,
                  why: str | None = None, exact_dtypes: bool = True) -> list[OutputParity]:
    """Judge ``actual`` against ``reference`` (one case or a list of cases, by output name)
    with the library's parity engine; return its per-output results.

    The outputs must be the reference's, in its order, in every case (``exact_dtypes``: with
    the reference's dtypes too; the engine itself asks only for the same kind). The
    tolerance is the library's default for ``precision`` unless ``tolerance`` is given,
    and then ``why`` must say why.
    """
    got = [actual] if isinstance(actual, Mapping) else list(actual)
    want = [reference] if isinstance(reference, Mapping) else list(reference)
    assert len(got) == len(want), f"{len(got)} case(s) to judge, {len(want)} reference case(s)"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert list(g) == list(w), f"case {i}: outputs {list(g)}, reference {list(w)}"
        if exact_dtypes:
            dtypes = {n: (str(np.asarray(g[n]).dtype), str(np.asarray(w[n]).dtype)) for n in w}
            assert all(a == b for a, b in dtypes.values()), f"case {i}: dtypes (got, want) {dtypes}"
    if tolerance is not None:
        assert why, "an explicit tolerance needs its reason (why=...)"
        policy = TolerancePolicy(defaults={precision: tolerance})
    else:
        policy = TolerancePolicy()
    results = compare_outputs(want, got, precision=precision, policy=policy)
    if verdict(results) != "pass":
        raise ParityMismatch(f"parity {verdict(results)} at {precision}:\n{_table(results)}")
    return results


def _table(results: Sequence[OutputParity]) -> str:
    rows = []
    for r in results:
        metrics = ", ".join(f"{k} {format_float(getattr(r, k))}"
                            for k in ("max_abs", "max_rel", "cosine", "mismatch_ratio", "min_atol"))
        tol = ", ".join(f"{k} {v}" for k, v in r.tolerance.to_dict().items())
        rows.append(f"  {r.name}: {r.status}: {r.reason or 'ok'}\n    {metrics}\n    tolerance {tol}")
    return "\n".join(rows)


def max_abs(results: Sequence[OutputParity]) -> float:
    """The largest absolute error over the outputs (for the tests' printed summaries)."""
    return max((r.max_abs or 0.0 for r in results), default=0.0)


@dataclass
class RouteJob:
    """A job as the pipeline builds it, with what a test judges its artifact against."""

    job: ConvertJob
    model: Any
    #: golden inputs: the example (``job.sample_inputs``), then other sizes of the dynamic dims
    cases: Cases
    #: the eager model's outputs for :attr:`cases`
    reference: Cases

    def convert(self, route: Callable[[ConvertJob], ConvertResult]
                ) -> tuple[ConvertResult, Path, float]:
        """Run a route's convert function on the job: its result, the artifact (checked by
        ``ensure_artifact``) and the seconds the conversion took."""
        start = time.perf_counter()
        result = route(self.job)
        seconds = time.perf_counter() - start
        return result, ensure_artifact(self.job, result), seconds

    def feeds(self, sizes: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded inputs with the dynamic dims at ``sizes`` (drawn as the golden set is)."""
        rng = np.random.default_rng(seed)
        return {s.name: draw(s, concrete_shape(s, sizes), rng) for s in self.job.inputs}

    def eager(self, feeds: Arrays) -> dict[str, np.ndarray]:
        """The eager model's outputs for ``feeds``, by output name."""
        import torch

        from portable_models.capture.torch import flatten_outputs
        from portable_models.core.arrays import to_numpy

        args = [torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in self.job.inputs]
        with torch.no_grad():
            names, tensors = flatten_outputs(self.model(*args), self.job.output_names)
        return {n: to_numpy(t) for n, t in zip(names, tensors, strict=True)}

    def check(self, run: Callable[[dict[str, np.ndarray]], Arrays],
              feeds: Sequence[dict[str, np.ndarray]] | None = None, *, precision: str | None = None,
              tolerance: Tolerance | None = None, why: str | None = None,
              exact_dtypes: bool = True) -> list[OutputParity]:
        """Run ``run`` (a runner's ``run``) on ``feeds`` (default: the golden cases) and
        judge it against the eager model with :func:`assert_parity` at the job's precision."""
        cases = list(self.cases if feeds is None else feeds)
        want = self.reference if feeds is None else [self.eager(f) for f in cases]
        got = [dict(run(dict(f))) for f in cases]
        return assert_parity(got, want, precision=precision or self.job.precision,
                             tolerance=tolerance, why=why, exact_dtypes=exact_dtypes)


def _input_names(case: Case) -> list[str]:
    given = case.options.get("input_names")
    if given is not None:
        return list(given)
    params = list(inspect.signature(case.model.forward).parameters)
    return params[: len(case.example)]


def route_job(case: Case, root: Path, *, route: str = "", precision: str = "float32",
              options: Mapping[str, Any] | None = None, batch: tuple[int, int] | None = None,
              dynamic_dims: Mapping[str, Mapping[int, Any]] | None = None,
              cases: int = 2, seed: int = 0) -> RouteJob:
    """Capture ``case`` into ``root/source/model.pt2`` and build the job a route gets
    (``root/artifacts`` out, ``root/work`` scratch).

    The dynamic dims are the case's own, or ``dynamic_dims`` (``{}``: all fixed), or with
    ``batch=(low, high)``: axis 0 of every input is ``batch`` within those bounds.
    ``options`` are the route options (``ConvertJob.options``); ``cases`` golden cases are
    drawn with ``seed``.
    """
    from portable_models.capture import CaptureOptions
    from portable_models.capture.torch import capture_torch
    from portable_models.core.settings import CAPTURE_ENV

    capture = {k: v for k, v in case.options.items()
               if k in ("input_names", "output_names", "dynamic_dims", "input_ranges", "layouts")}
    if batch is not None:
        capture["dynamic_dims"] = {n: {0: ("batch", *batch)} for n in _input_names(case)}
    if dynamic_dims is not None:
        capture["dynamic_dims"] = dict(dynamic_dims)
    # in this process, as the route tests always did: it runs converters itself (TensorFlow,
    # JAX, XNNPACK threads), after which a fork is unsafe; the fork has its own tests
    # (test_forked.py)
    with mock.patch.dict(os.environ, {CAPTURE_ENV: "inprocess"}):
        captured = capture_torch(case.model, case.example,
                                 CaptureOptions(**capture, cases=cases, seed=seed, cache=False),
                                 root / "source")
    (root / "work").mkdir(parents=True, exist_ok=True)
    job = ConvertJob(route=route, source_file=captured.source_file, out_dir=root / "artifacts",
                     work_dir=root / "work", inputs=captured.inputs, outputs=captured.outputs,
                     dims=captured.dims, sample_inputs=captured.golden_inputs[0],
                     precision=precision, options=dict(options or {}))
    return RouteJob(job, case.model, captured.golden_inputs, captured.golden_outputs)
