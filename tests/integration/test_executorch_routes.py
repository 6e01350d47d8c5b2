"""ExecuTorch routes (XNNPACK and portable) and the ExecuTorch runtime, on tiny models.

Each case (``models.ROUTE_MODELS``): ``harness.route_job`` captures it with a bounded dynamic
batch and builds the ConvertJob; convert, ``ensure_artifact``, run the .pte through
ExecuTorchRunner at batch 2, 3 and 64 (the max), judge it against the eager model with the
library's parity engine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch is not installed")
pytest.importorskip("executorch.exir", reason="executorch is not installed")

import torch

from harness import RouteJob, assert_parity, max_abs, route_job
from models import ROUTE_MODELS
from portable_models.convert.base import ConvertJob, ConvertResult, ensure_artifact
from portable_models.convert.executorch import convert_portable, convert_xnnpack
from portable_models.core.iomap import IoMap
from portable_models.errors import RuntimeLoadError, RuntimeRunError
from portable_models.run.executorch import ExecuTorchRunner

BATCH = (1, 64)
ROUTES: dict[str, Callable[[ConvertJob], ConvertResult]] = {
    "executorch-xnnpack": convert_xnnpack,
    "executorch-portable": convert_portable,
}
CASES = ["cnn", "encoder", "lstm", "two_in_two_out", "mixed_dtypes"]


# -- route x model parity ------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("case_name", CASES)
def test_route_parity(tmp_path: Path, case_name: str, route: str) -> None:
    built = route_job(ROUTE_MODELS[case_name](), tmp_path, route=route, batch=BATCH)
    job = built.job
    result, path, convert_s = built.convert(ROUTES[route])
    assert path.name == "model.pte"
    assert result.meta["backend"] == route.split("-")[1]
    assert result.meta["method"] == "forward"
    assert result.meta["positional_inputs"] == job.input_names
    assert result.meta["planned_dims"] == {"batch": BATCH[1]}
    assert all(s.version for s in result.steps)
    with ExecuTorchRunner(path, result.io) as runner:
        # the golden cases (batch 2 and 3), then the largest batch the program is planned for
        parity = [built.check(runner.run), built.check(runner.run, [built.feeds({"batch": BATCH[1]})])]
    print(f"\nRESULT {case_name} {route}: max_abs={max(max_abs(p) for p in parity):.3g} "
          f"convert_s={convert_s:.1f} "
          f"meta={ {k: v for k, v in result.meta.items() if k != 'positional_inputs'} }")


# -- negative cases (portable route: fast) ---------------------------------------------
@pytest.fixture
def two_io(tmp_path: Path) -> tuple[RouteJob, ConvertResult]:
    built = route_job(ROUTE_MODELS["two_in_two_out"](), tmp_path, route="executorch-portable",
                      batch=BATCH)
    return built, convert_portable(built.job)


@pytest.mark.slow
def test_flipped_weights_are_caught(two_io: tuple[RouteJob, ConvertResult]) -> None:
    built, result = two_io
    path = ensure_artifact(built.job, result)
    blob = bytearray(path.read_bytes())
    weight = built.model.fc.weight.detach().numpy().tobytes()
    at = bytes(blob).find(weight)
    assert at >= 0, "the weight's bytes are not stored verbatim in the .pte"
    blob[at:at + len(weight)] = (-built.model.fc.weight.detach().numpy()).tobytes()
    path.write_bytes(bytes(blob))
    feeds = built.feeds({"batch": 3})
    with ExecuTorchRunner(path, result.io) as runner:
        got = runner.run(feeds)
    with pytest.raises(AssertionError, match="score: fail: "):
        assert_parity(got, built.eager(feeds))


@pytest.mark.slow
def test_truncated_pte_fails_to_load(two_io: tuple[RouteJob, ConvertResult]) -> None:
    built, result = two_io
    job = built.job
    path = ensure_artifact(job, result)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(RuntimeLoadError, match=r"could not load model\.pte"):
        ExecuTorchRunner(path, result.io).load()


@pytest.mark.slow
def test_a_runs_thread_count_is_put_back_after_it(two_io: tuple[RouteJob, ConvertResult]) -> None:
    # the threadpool is the worker's: a verify's one-thread run must not leave it at one
    import executorch.extension.pybindings.portable_lib as lib

    from portable_models.run.base import RunnerOptions

    built, result = two_io
    path = ensure_artifact(built.job, result)
    lib._unsafe_reset_threadpool(2)
    with ExecuTorchRunner(path, result.io, RunnerOptions(threads=1)) as runner:
        assert lib._threadpool_get_thread_count() == 1
        runner.run(built.job.sample_inputs)
    assert lib._threadpool_get_thread_count() == 2
    broken = path.with_name("broken.pte")
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeLoadError):
        ExecuTorchRunner(broken, result.io, RunnerOptions(threads=1)).load()
    assert lib._threadpool_get_thread_count() == 2, "a failed load left its thread count"


@pytest.mark.slow
def test_io_map_count_mismatch(two_io: tuple[RouteJob, ConvertResult]) -> None:
    built, result = two_io
    wrong = IoMap.identity(["features", "extra", "more"], ["score", "best"])
    with pytest.raises(RuntimeLoadError, match="takes 2 inputs and returns 2 outputs"):
        ExecuTorchRunner(ensure_artifact(built.job, result), wrong).load()


@pytest.mark.slow
def test_bad_feeds_give_clear_errors(two_io: tuple[RouteJob, ConvertResult]) -> None:
    built, result = two_io
    with ExecuTorchRunner(ensure_artifact(built.job, result), result.io) as runner:
        with pytest.raises(RuntimeRunError, match="above the sizes"):
            runner.run(built.feeds({"batch": BATCH[1] + 1}))
        feeds = built.feeds({"batch": 2})
        with pytest.raises(RuntimeRunError, match="is float64, the program takes float32"):
            runner.run({**feeds, "features": feeds["features"].astype(np.float64)})
        assert runner.run(feeds)["best"].dtype == np.int64


@pytest.mark.slow
def test_execute_failure_becomes_run_error(tmp_path: Path) -> None:
    """A failure inside method.execute() (here a static input fed a smaller shape)
    is a RuntimeRunError carrying ExecuTorch's error code and its name."""
    from executorch.exir import to_edge

    class Double(torch.nn.Module):
        def forward(self, a: Any) -> Any:
            return a * 2

    ep = torch.export.export(Double(), (torch.randn(2, 6),))
    path = tmp_path / "model.pte"
    path.write_bytes(to_edge(ep).to_executorch().buffer)
    with ExecuTorchRunner(path, IoMap.identity(["a"], ["y"])) as runner:
        with pytest.raises(RuntimeRunError, match=r"failed with error 0x10 \(NotSupported\)"):
            runner.run({"a": np.ones((1, 6), np.float32)})
