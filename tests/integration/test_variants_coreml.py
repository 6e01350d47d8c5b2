"""The Core ML int8-weight variant judged on real data (scikit-learn's bundled digits, no
download): coremltools.optimize quantises the fp32 twin's weights to int8 per channel, the MIL
reference executor runs the result (no Core ML prediction on Linux), it keeps the digits
accuracy within the budget, its truth facts are read from the package, and verify re-judges it.
The reference's dequantisation kernels are checked exactly against coremltools' own helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import portable_models as pm
from digits import ROWS
from digits import digits as load_digits_set
from portable_models.run.mil import kernels_constexpr as kc

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("coremltools")
pytestmark = pytest.mark.slow


RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def digits() -> dict[str, Any]:
    return load_digits_set()


def test_coreml_int8_weight_keeps_the_accuracy_on_real_data(digits: dict[str, Any], tmp_path: Path) -> None:
    bundle = pm.export(digits["model"], (torch.from_numpy(digits["samples"][0]["image"]),), out=tmp_path / "cm",
                       targets=["coreml"], precision=["fp32", "int8-weight"], samples=digits["samples"],
                       labels=digits["labels"], input_names=["image"], output_names=["logits"],
                       dynamic_dims={"image": {0: ("batch", 1, 64)}}, input_ranges={"image": (0.0, 1.0)})
    report = bundle.report()
    assert bundle.ok, report
    arts = {a.key: a for a in bundle.contract.artifacts}
    assert set(arts) == {"coreml", "coreml-int8-weight"}, report
    art = arts["coreml-int8-weight"]
    assert art.route_name == "coreml-optimize" and art.status == "pass" and art.io == arts["coreml"].io, report
    step = art.route[-1]
    assert step["step"] == "coremltools.optimize.coreml.linear_quantize_weights" and step["dtype"] == "int8"
    assert step["granularity"] == "per_channel" and step["weight_threshold"] == 2048, step
    acc = art.parity["accuracy"]
    assert acc["rows"] == 9 * ROWS and acc["drop_points"] <= 1.0 and acc["status"] == "pass", acc
    truth = art.meta["truth"]
    assert truth["format"] == "mlpackage" and truth["int8_share"] > 0.5, truth
    assert truth["quantized_activations"] == truth["dynamic_ops"] == 0, truth
    assert truth["constexpr_ops"] in ({"constexpr_affine_dequantize": 2}, {"constexpr_blockwise_shift_scale": 2})
    assert art.meta["size_ratio_to_fp32"] < 0.6, art.meta
    _dequantised_weights_are_coremltools_own(next((tmp_path / "cm").rglob("model_int8_weight.mlpackage")))
    again = pm.verify(tmp_path / "cm")  # re-judged from the bundle alone: truth, budget, accuracy
    assert again.ok, again.table()
    assert {r.key for r in again.results} >= {"coreml-int8-weight"}


def _dequantised_weights_are_coremltools_own(package: Path) -> None:
    """Every quantised weight of the saved package, as the reference's kernels dequantise it,
    equals coremltools' own decompression of the same op, bit for bit."""
    from portable_models.run.mil import load_executor
    from portable_models.run.mil.executor import iter_ops

    executor = load_executor(package)
    seen = 0
    for op in iter_ops(executor.function):
        if op.op_type in kc.CONSTEXPR_KERNELS:
            args = {name: var.val for name, var in op.inputs.items()}
            ours = kc.CONSTEXPR_KERNELS[op.op_type](op, args)
            assert ours.dtype == op.materialized_val_inference().dtype
            assert np.array_equal(ours, op.materialized_val_inference()), op.name
            seen += 1
    assert seen == 2


# -- the kernels against coremltools' numpy helpers and the spec's formula ------------------------
@pytest.mark.parametrize(("shape", "axis", "dtype", "scale_dtype"), [
    ((32, 16, 3, 3), 0, np.int8, np.float32), ((10, 512), 0, np.int8, np.float16),
    ((4, 6, 5), 1, np.uint8, np.float32), ((4, 6, 5), -1, np.int8, np.float32),
])
def test_affine_dequantize_matches_coremltools(shape: tuple[int, ...], axis: int, dtype: Any,
                                                scale_dtype: Any) -> None:
    from portable_models.core.coremltools_import import import_coremltools

    import_coremltools()
    from coremltools.converters.mil.mil.ops.defs.iOS16.constexpr_ops import (
        constexpr_affine_dequantize,
    )

    info = np.iinfo(dtype)
    data = RNG.integers(info.min, info.max + 1, shape).astype(dtype)
    channels = shape[axis]
    scale = RNG.uniform(1e-4, 1e-1, channels).astype(scale_dtype)
    zero = RNG.integers(info.min // 4, info.max // 4, channels).astype(dtype)
    ours = kc.affine_dequantize(None, {"quantized_data": data, "scale": scale, "zero_point": zero, "axis": axis})
    theirs = constexpr_affine_dequantize.decompress(data, zero, scale, axis)
    assert ours.dtype == theirs.dtype == scale_dtype and np.array_equal(ours, theirs)
    scalar = kc.affine_dequantize(None, {"quantized_data": data, "scale": scale[:1].reshape(()),
                                         "zero_point": zero[:1].reshape(()), "axis": axis})
    assert np.array_equal(scalar, constexpr_affine_dequantize.decompress(data, zero[0], scale[0], axis))


@pytest.mark.parametrize(("shape", "blocks", "offset", "scale_dtype"), [
    ((32, 16, 3, 3), (32, 1, 1, 1), False, np.float32),   # per channel, symmetric
    ((8, 12), (8, 3), True, np.float32),                  # blocks of 4 along the input axis
    ((6, 4, 2), (3, 2, 1), True, np.float16),
])
def test_blockwise_shift_scale_matches_coremltools(shape: tuple[int, ...], blocks: tuple[int, ...], offset: bool,
                                                    scale_dtype: Any) -> None:
    from portable_models.core.coremltools_import import import_coremltools

    import_coremltools()
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import (
        constexpr_blockwise_shift_scale,
    )

    data = RNG.integers(-128, 128, shape).astype(np.int8)
    scale = RNG.uniform(1e-4, 1e-1, blocks).astype(scale_dtype)
    zero = RNG.integers(-8, 8, blocks).astype(np.int8) if offset else None
    ours = kc.blockwise_shift_scale(None, {"data": data, "scale": scale, "offset": zero})
    theirs = constexpr_blockwise_shift_scale.decompress(data, scale, zero)
    assert ours.dtype == theirs.dtype == scale_dtype and np.array_equal(ours, theirs)


def test_blockwise_shift_scale_by_the_spec_formula() -> None:
    """output[i, j] = scale[i // 1, j // 2] * (data[i, j] - offset[i // 1, j // 2]), by hand."""
    data = np.array([[1, -2, 3, 4], [-5, 6, 7, -8]], np.int8)
    scale = np.array([[0.5, 2.0], [0.25, 1.0]], np.float32)
    offset = np.array([[1, 0], [-1, 2]], np.int8)
    expected = np.array([[0.0, -1.5, 6.0, 8.0], [-1.0, 1.75, 5.0, -10.0]], np.float32)
    assert np.array_equal(kc.blockwise_shift_scale(None, {"data": data, "scale": scale, "offset": offset}), expected)
    with pytest.raises(ValueError, match="whole blocks"):
        kc.blockwise_shift_scale(None, {"data": data, "scale": np.ones((2, 3), np.float32)})
