"""ExecuTorch routes (XNNPACK and portable) and the ExecuTorch runtime, on tiny models.

Each case: torch.export with a bounded dynamic batch, save the .pt2, build a
ConvertJob by hand, convert, ``ensure_artifact``, run the .pte through
ExecuTorchRunner at batch 2, 3 and 64 (the max), compare with the eager model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch is not installed")
pytest.importorskip("executorch.exir", reason="executorch is not installed")

import torch

from portable_models.convert.base import ConvertJob, ConvertResult, ensure_artifact
from portable_models.convert.executorch import convert_portable, convert_xnnpack
from portable_models.core.iomap import IoMap
from portable_models.core.spec import DimSpec, TensorSpec
from portable_models.errors import RuntimeLoadError, RuntimeRunError
from portable_models.run.executorch import ExecuTorchRunner

ATOL, RTOL = 1e-4, 1e-3
BATCH = DimSpec(name="batch", min=1, max=64)
ROUTES: dict[str, Callable[[ConvertJob], ConvertResult]] = {
    "executorch-xnnpack": convert_xnnpack,
    "executorch-portable": convert_portable,
}


# -- models --------------------------------------------------------------------------
class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 5)
        mean, var = self.bn.running_mean, self.bn.running_var
        assert mean is not None and var is not None
        with torch.no_grad():
            mean.uniform_(-0.5, 0.5)
            var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)

    def forward(self, x: Any) -> Any:
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean(dim=(2, 3)))


class TinyEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.enc = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0,
                                                    activation="gelu", batch_first=True)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, ids: Any) -> Any:
        return self.head(self.norm(self.enc(self.emb(ids))))


class TinyLSTM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(8, 16, batch_first=True)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: Any) -> Any:
        y, _ = self.lstm(x)
        return self.head(y[:, -1])


class TwoInTwoOut(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, a: Any, b: Any) -> Any:
        h = self.fc(a) + b
        return {"score": h, "label": h.argmax(-1)}


class Dtypes(torch.nn.Module):
    """float16, bool and int32 inputs; float32, int64 and float16 outputs."""

    def forward(self, h: Any, m: Any, i: Any) -> Any:
        y = h.float() * m.float() + i.float()
        return y, (y > 0).to(torch.int64).sum(-1), h * 2


@dataclass
class Case:
    model: Callable[[], torch.nn.Module]
    make_inputs: Callable[[int], list[Any]]  # batch -> positional inputs
    input_names: list[str]
    output_names: list[str]


CASES: dict[str, Case] = {
    "cnn_bn": Case(SmallCNN, lambda b: [torch.randn(b, 3, 8, 8)], ["image"], ["logits"]),
    "encoder": Case(TinyEncoder, lambda b: [torch.randint(0, 50, (b, 7))], ["tokens"],
                    ["hidden"]),
    "lstm": Case(TinyLSTM, lambda b: [torch.randn(b, 5, 8)], ["seq"], ["out"]),
    "two_io": Case(TwoInTwoOut, lambda b: [torch.randn(b, 6), torch.randn(b, 4)],
                   ["feat", "offset"], ["score", "label"]),
    "dtypes": Case(Dtypes, lambda b: [torch.randn(b, 5).half(), torch.rand(b, 5) > 0.5,
                                      torch.randint(-3, 3, (b, 5), dtype=torch.int32)],
                   ["half_in", "mask", "ints"], ["mixed", "count", "half_out"]),
}


# -- helpers -------------------------------------------------------------------------
def _flat(out: Any) -> list[Any]:
    if isinstance(out, dict):
        return list(out.values())
    if isinstance(out, (tuple, list)):
        return list(out)
    return [out]


def make_job(tmp_path: Path, route: str, model: torch.nn.Module, args: list[Any],
             input_names: list[str], output_names: list[str]) -> ConvertJob:
    """Export ``model`` with a dynamic batch (axis 0 of every input), save the .pt2
    and build the ConvertJob the pipeline would build."""
    batch = torch.export.Dim(BATCH.name, min=BATCH.min, max=BATCH.max)
    ep = torch.export.export(model, tuple(args),
                             dynamic_shapes=tuple({0: batch} for _ in args))
    source = tmp_path / "source" / "model.pt2"
    source.parent.mkdir(parents=True)
    torch.export.save(ep, str(source))
    with torch.no_grad():
        outs = _flat(model(*args))
    inputs = [TensorSpec(name=n, dtype=str(a.numpy().dtype), shape=("batch", *a.shape[1:]))
              for n, a in zip(input_names, args, strict=True)]
    outputs = [TensorSpec(name=n, dtype=str(o.numpy().dtype), shape=("batch", *o.shape[1:]))
               for n, o in zip(output_names, outs, strict=True)]
    return ConvertJob(route=route, source_file=source, out_dir=tmp_path / "artifacts",
                      work_dir=tmp_path / "work", inputs=inputs, outputs=outputs,
                      dims={"batch": BATCH},
                      sample_inputs={n: a.numpy() for n, a in zip(input_names, args,
                                                                  strict=True)})


def compare(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """Assert parity output by output; return the largest abs error of float outputs."""
    assert list(got) == list(want)
    worst = 0.0
    for name, ref in want.items():
        out = got[name]
        assert out.shape == ref.shape and out.dtype == ref.dtype, name
        if ref.dtype.kind in "biu":
            np.testing.assert_array_equal(out, ref, err_msg=name)
            continue
        np.testing.assert_allclose(out.astype(np.float64), ref.astype(np.float64),
                                   atol=ATOL, rtol=RTOL, err_msg=name)
        worst = max(worst, float(np.max(np.abs(out.astype(np.float64) - ref))))
    return worst


def eager(model: torch.nn.Module, args: list[Any], names: list[str]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {n: o.numpy() for n, o in zip(names, _flat(model(*args)), strict=True)}


# -- route x model parity ------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("case_name", list(CASES))
def test_route_parity(tmp_path: Path, case_name: str, route: str) -> None:
    torch.manual_seed(0)
    case = CASES[case_name]
    model = case.model().eval()
    job = make_job(tmp_path, route, model, case.make_inputs(2), case.input_names,
                   case.output_names)
    start = time.perf_counter()
    result = ROUTES[route](job)
    convert_s = time.perf_counter() - start
    path = ensure_artifact(job, result)
    assert path.name == "model.pte"
    assert result.meta["backend"] == route.split("-")[1]
    assert result.meta["method"] == "forward"
    assert result.meta["positional_inputs"] == case.input_names
    assert result.meta["planned_dims"] == {"batch": BATCH.max}
    assert all(s.version for s in result.steps)
    errors = []
    with ExecuTorchRunner(path, result.io) as runner:
        for b in (2, 3, BATCH.max):
            args = case.make_inputs(b)
            got = runner.run({n: a.numpy() for n, a in zip(case.input_names, args,
                                                            strict=True)})
            errors.append(compare(got, eager(model, args, case.output_names)))
    print(f"\nRESULT {case_name} {route}: max_abs={max(errors):.3g} convert_s={convert_s:.1f} "
          f"meta={ {k: v for k, v in result.meta.items() if k != 'positional_inputs'} }")


# -- negative cases (portable route: fast) ---------------------------------------------
@pytest.fixture
def two_io(tmp_path: Path) -> tuple[torch.nn.Module, ConvertJob, ConvertResult]:
    torch.manual_seed(0)
    case = CASES["two_io"]
    model = case.model().eval()
    job = make_job(tmp_path, "executorch-portable", model, case.make_inputs(2),
                   case.input_names, case.output_names)
    return model, job, convert_portable(job)


def _feeds(batch: int) -> tuple[list[Any], dict[str, np.ndarray]]:
    args = CASES["two_io"].make_inputs(batch)
    return args, {n: a.numpy() for n, a in zip(CASES["two_io"].input_names, args, strict=True)}


@pytest.mark.slow
def test_flipped_weights_are_caught(two_io: tuple[Any, ConvertJob, ConvertResult]) -> None:
    model, job, result = two_io
    path = ensure_artifact(job, result)
    blob = bytearray(path.read_bytes())
    weight = model.fc.weight.detach().numpy().tobytes()
    at = bytes(blob).find(weight)
    assert at >= 0, "the weight's bytes are not stored verbatim in the .pte"
    blob[at:at + len(weight)] = (-model.fc.weight.detach().numpy()).tobytes()
    path.write_bytes(bytes(blob))
    args, feeds = _feeds(3)
    with ExecuTorchRunner(path, result.io) as runner:
        got = runner.run(feeds)
    with pytest.raises(AssertionError):
        compare(got, eager(model, args, CASES["two_io"].output_names))


@pytest.mark.slow
def test_truncated_pte_fails_to_load(two_io: tuple[Any, ConvertJob, ConvertResult]) -> None:
    _, job, result = two_io
    path = ensure_artifact(job, result)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(RuntimeLoadError, match=r"could not load model\.pte"):
        ExecuTorchRunner(path, result.io).load()


@pytest.mark.slow
def test_a_runs_thread_count_is_put_back_after_it(two_io: tuple[Any, ConvertJob, ConvertResult]) -> None:
    # the threadpool is the worker's: a verify's one-thread run must not leave it at one
    import executorch.extension.pybindings.portable_lib as lib

    from portable_models.run.base import RunnerOptions

    _, job, result = two_io
    path = ensure_artifact(job, result)
    lib._unsafe_reset_threadpool(2)
    with ExecuTorchRunner(path, result.io, RunnerOptions(threads=1)) as runner:
        assert lib._threadpool_get_thread_count() == 1
        runner.run(_feeds(2)[1])
    assert lib._threadpool_get_thread_count() == 2
    broken = path.with_name("broken.pte")
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeLoadError):
        ExecuTorchRunner(broken, result.io, RunnerOptions(threads=1)).load()
    assert lib._threadpool_get_thread_count() == 2, "a failed load left its thread count"


@pytest.mark.slow
def test_io_map_count_mismatch(two_io: tuple[Any, ConvertJob, ConvertResult]) -> None:
    _, job, result = two_io
    wrong = IoMap.identity(["feat", "offset", "extra"], ["score", "label"])
    with pytest.raises(RuntimeLoadError, match="takes 2 inputs and returns 2 outputs"):
        ExecuTorchRunner(ensure_artifact(job, result), wrong).load()


@pytest.mark.slow
def test_bad_feeds_give_clear_errors(two_io: tuple[Any, ConvertJob, ConvertResult]) -> None:
    _, job, result = two_io
    with ExecuTorchRunner(ensure_artifact(job, result), result.io) as runner:
        _, feeds = _feeds(65)
        with pytest.raises(RuntimeRunError, match="above the sizes"):
            runner.run(feeds)
        _, feeds = _feeds(2)
        with pytest.raises(RuntimeRunError, match="is float64, the program takes float32"):
            runner.run({**feeds, "feat": feeds["feat"].astype(np.float64)})
        assert runner.run(feeds)["label"].dtype == np.int64


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
