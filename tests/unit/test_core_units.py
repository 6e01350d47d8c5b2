"""Specs, golden sets, contract round trip, bundles and reports: no heavy dependency."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from portable_models.compare.parity import compare_outputs
from portable_models.contract.bundle import Staging, check_files, list_files
from portable_models.contract.model import Artifact, Attempt, Contract, load_contract
from portable_models.contract.reports import render, to_junit
from portable_models.core import golden
from portable_models.core.iomap import Binding, IoMap
from portable_models.core.spec import DimSpec, TensorSpec, parse_dynamic_option, parse_input_option
from portable_models.core.tolerance import TolerancePolicy
from portable_models.errors import (
    BundleWriteError,
    ContractError,
    GoldenSetError,
    InputError,
    UsageError,
)


def test_parse_input_option() -> None:
    spec = parse_input_option("ids:batch,16:int64:0..999")
    assert spec.shape == ("batch", 16) and spec.dtype == "int64" and spec.range == (0.0, 999.0)
    assert parse_input_option("image:1x3x32x32:float32").shape == (1, 3, 32, 32)
    for bad in ("image:1x3", "image:1x?:float32", "x:1:complex64", "x:1:float32:a..b"):
        with pytest.raises(UsageError):
            parse_input_option(bad)


def test_parse_dynamic_option() -> None:
    name, axis, dim = parse_dynamic_option("image:0:batch:1..32")
    assert (name, axis, dim) == ("image", 0, DimSpec(name="batch", min=1, max=32))
    with pytest.raises(UsageError):
        parse_dynamic_option("image:x:batch")


def test_golden_inputs_are_seeded_and_cover_two_sizes() -> None:
    specs = [TensorSpec(name="x", dtype="float32", shape=("batch", 3), range=(0, 1)),
             TensorSpec(name="ids", dtype="int64", shape=("batch", 5), range=(0, 9)),
             TensorSpec(name="mask", dtype="bool", shape=("batch", 5))]
    dims = {"batch": DimSpec(name="batch", min=1, max=4)}
    example = {"x": np.zeros((2, 3), np.float32), "ids": np.zeros((2, 5), np.int64),
               "mask": np.ones((2, 5), bool)}
    a = golden.make_inputs(specs, dims, example, cases=4, seed=0)
    b = golden.make_inputs(specs, dims, example, cases=4, seed=0)
    assert [c["x"].shape[0] for c in a] == [2, 3, 2, 3]
    for ca, cb in zip(a, b, strict=True):
        for k in ca:
            np.testing.assert_array_equal(ca[k], cb[k])
    assert all(0 <= c["ids"].min() and c["ids"].max() <= 9 for c in a)
    assert all(c["mask"].dtype == bool and c["ids"].dtype == np.int64 for c in a)
    assert all((0 <= c["x"]).all() and (c["x"] <= 1).all() for c in a[1:])


def test_integer_input_without_range_is_refused() -> None:
    spec = TensorSpec(name="ids", dtype="int64", shape=(2, 3))
    with pytest.raises(UsageError, match="no value range"):
        golden.make_inputs([spec], {}, {"ids": np.zeros((2, 3), np.int64)}, cases=2)


@pytest.mark.parametrize(("outputs", "message"), [
    ([{"y": np.ones(3)}, {"y": np.ones(3)}], "identical for every golden case"),
    ([{"y": np.array([1.0, np.nan])}, {"y": np.ones(2)}], "NaN or Inf"),
    ([{"y": np.zeros((0,))}, {"y": np.zeros((0,))}], "empty"),
    ([{"y": np.zeros((2, 3))}, {"y": np.zeros((3, 3))}], "identical for every golden case"),
])
def test_degenerate_golden_outputs_are_refused(outputs: list, message: str) -> None:
    with pytest.raises(GoldenSetError, match=message):
        golden.check_outputs(outputs, ["y"])


def test_cases_round_trip_without_pickle(tmp_path: Path) -> None:
    cases = [{"x": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([True, False])},
             {"x": np.ones((3, 3), np.float32), "b": np.array([False, False])}]
    golden.save_cases(tmp_path / "g.npz", cases)
    back = golden.load_cases(tmp_path / "g.npz")
    assert len(back) == 2 and back[1]["x"].shape == (3, 3) and back[0]["b"].dtype == bool


def test_npz_members_of_every_layout_read_back_exactly(tmp_path: Path) -> None:
    arrays = {"0/be": np.arange(12, dtype=">f4").reshape(3, 4),
              "0/fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
              "0/scalar": np.array(3.5), "0/empty": np.zeros((0, 3), np.float32),
              "1/be": np.array([True, False]), "1/fortran": np.zeros(3, dtype=[("x", "<i4"), ("y", "<f8")]),
              "1/scalar": np.array(["ab", "c"]), "1/empty": np.arange(5, dtype=np.int64)}
    for write in (np.savez, np.savez_compressed):
        path = tmp_path / f"{write.__name__}.npz"
        write(path, **arrays)
        back = golden.load_cases(path)
        for key, want in arrays.items():
            case, name = key.split("/")
            got = back[int(case)][name]
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), key
            assert got.flags.writeable


def test_npz_truncated_or_foreign_members_are_refused(tmp_path: Path) -> None:
    import io
    import zipfile

    buf = io.BytesIO()
    np.save(buf, np.arange(100, dtype=np.float64))
    cut = tmp_path / "cut.npz"
    with zipfile.ZipFile(cut, "w") as zf:
        zf.writestr("0/x.npy", buf.getvalue()[:-8])
    with pytest.raises(InputError, match="shorter than its header declares"):
        golden.load_cases(cut)
    foreign = tmp_path / "foreign.npz"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("0/x.npy", b"PK not an array")
    with pytest.raises(InputError, match=r"not a \.npy array"):
        golden.load_cases(foreign)
    (tmp_path / "plain.npz").write_bytes(b"no zip here")
    with pytest.raises(InputError, match=r"not an \.npz archive"):
        golden.load_cases(tmp_path / "plain.npz")


def test_scratch_files_round_trip_and_refuse_other_files(tmp_path: Path) -> None:
    cases = [{"y": np.arange(6, dtype=np.float32).reshape(2, 3), "k": np.array([3], np.int64)},
             {"y": np.ones((1, 3), np.float16), "k": np.array([4], np.int64)}]
    golden.save_scratch(tmp_path / "out.bin", cases)
    back = golden.load_scratch(tmp_path / "out.bin")
    assert [list(c) for c in back] == [["y", "k"], ["y", "k"]]
    for want, got in zip(cases, back, strict=True):
        for name in want:
            assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name])
    golden.save_cases(tmp_path / "g.npz", cases)
    with pytest.raises(InputError, match="not a scratch file"):
        golden.load_scratch(tmp_path / "g.npz")


def test_small_run_outputs_travel_in_the_answer_and_large_ones_through_a_file(tmp_path: Path) -> None:
    small = [{"y": np.arange(6, dtype=np.float32).reshape(2, 3), "k": np.array([3], np.int64)},
             {"y": np.zeros((0, 3), np.float16), "k": np.array([True])}]
    packed = golden.pack_outputs(small, tmp_path / "small.bin")
    assert set(packed) == {"outputs"} and not (tmp_path / "small.bin").exists()
    back = golden.unpack_outputs(json.loads(json.dumps(packed)), tmp_path / "small.bin")
    for want, got in zip(small, back, strict=True):
        for name in want:
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
            assert np.array_equal(got[name], want[name])
    back[0]["y"][0, 0] = 7.0  # writable, like any array the comparison gets
    large = [{"y": np.ones(golden.INLINE_OUTPUTS_MAX // 4 + 1, np.float32)}]
    assert golden.pack_outputs(large, tmp_path / "large.bin") == {}
    assert np.array_equal(golden.unpack_outputs({}, tmp_path / "large.bin")[0]["y"], large[0]["y"])
    with pytest.raises(InputError, match="dtype object"):
        golden.unpack_outputs({"outputs": [{"y": ["|O", [1], ""]}]}, tmp_path / "none.bin")


def test_worker_reads_golden_inputs_once_while_unchanged_and_hands_out_copies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from portable_models.run import job as jobs

    path = tmp_path / "inputs.npz"
    golden.save_cases(path, [{"x": np.arange(4, dtype=np.float32)}])
    golden.read_only_cases(path)
    assert all(key[1] != path.stat().st_ino for key in golden._READ), "a file changed just now was remembered"
    monkeypatch.setattr(golden, "_SETTLED_NS", 0)  # as if written long ago
    first = jobs.golden_inputs(path)
    assert any(key[1] == path.stat().st_ino for key in golden._READ)
    first[0]["x"][:] = -1  # a runtime writing into its feeds
    again = jobs.golden_inputs(path)
    assert again[0]["x"].tolist() == [0, 1, 2, 3]
    shared = golden.read_only_cases(path)  # what the caller's verify compares against
    with pytest.raises(ValueError, match="read-only"):
        shared[0]["x"][0] = 7
    golden.save_cases(path, [{"x": np.arange(5, dtype=np.float32)}])  # a new file: read again
    assert jobs.golden_inputs(path)[0]["x"].tolist() == [0, 1, 2, 3, 4]
    assert golden.read_only_cases(path)[0]["x"].tolist() == [0, 1, 2, 3, 4]


def test_npz_with_object_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, **{"0/x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(InputError, match="pickle"):
        golden.load_cases(path)


def test_npz_declaring_a_huge_array_is_refused_before_allocation(tmp_path: Path) -> None:
    import zipfile

    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (100000, 1000000), }"
    header += " " * (118 - len(header)) + "\n"
    blob = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 64
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("0/x.npy", blob)
    with pytest.raises(InputError, match="745 GiB"):
        golden.load_cases(path)


def _contract(tmp: Path) -> Contract:
    io = IoMap(inputs={"image": Binding(name="input_1", layout="NHWC", perm=(0, 2, 3, 1))},
               outputs={"logits": Binding(name="Identity")})
    art = Artifact(target="tflite", status="pass", route_name="onnx2tf", file="artifacts/model.tflite",
                   sha256="0" * 64, bytes=10, runtime="litert", io=io,
                   route=[{"step": "onnx2tf", "version": "1.28.8"}],
                   parity={"status": "pass", "outputs": {}},
                   attempts=[Attempt(route="litert-torch", status="error", stage="convert",
                                     error={"message": "boom"}), Attempt(route="onnx2tf", status="pass")])
    return Contract(name="net", source={"framework": "torch", "version": "2.13.0", "file": "source/model.pt2",
                                        "sha256": "1" * 64},
                    inputs=[TensorSpec(name="image", dtype="float32", shape=("batch", 3, 8, 8), layout="NCHW")],
                    outputs=[TensorSpec(name="logits", dtype="float32", shape=("batch", 10))],
                    dims={"batch": DimSpec(name="batch", min=1, max=8)},
                    golden={"inputs": "golden/inputs.npz", "outputs": "golden/outputs.npz", "cases": 4, "seed": 0},
                    tolerance=TolerancePolicy().to_dict(), artifacts=[art])


def test_contract_round_trip_and_schema(tmp_path: Path) -> None:
    c = _contract(tmp_path)
    (tmp_path / "contract.json").write_text(c.to_json())
    back = load_contract(tmp_path)
    assert back.to_dict() == c.to_dict()
    assert back.artifacts[0].io is not None
    assert back.artifacts[0].io.inputs["image"].perm == (0, 2, 3, 1)


def test_invalid_contract_names_the_place(tmp_path: Path) -> None:
    data = _contract(tmp_path).to_dict()
    data["artifacts"][0]["status"] = "passed"
    (tmp_path / "contract.json").write_text(json.dumps(data))
    with pytest.raises(ContractError, match="artifacts/0/status"):
        load_contract(tmp_path)
    (tmp_path / "contract.json").write_text("{not json")
    with pytest.raises(ContractError, match="not valid JSON"):
        load_contract(tmp_path)


def test_a_contract_once_valid_is_still_checked_after_an_edit(tmp_path: Path) -> None:
    """Texts that passed the schema are remembered by digest; an edit is a new text."""
    text = _contract(tmp_path).to_json()
    (tmp_path / "contract.json").write_text(text)
    load_contract(tmp_path)
    load_contract(tmp_path)  # remembered
    (tmp_path / "contract.json").write_text(text.replace('"status": "pass"', '"status": "passed"', 1))
    with pytest.raises(ContractError, match="status"):
        load_contract(tmp_path)


def test_io_map_undoes_layout() -> None:
    b = Binding(name="x", perm=(0, 2, 3, 1))
    nchw = np.arange(24).reshape(1, 2, 3, 4)
    assert b.to_physical(nchw).shape == (1, 3, 4, 2)
    np.testing.assert_array_equal(b.to_logical(b.to_physical(nchw)), nchw)


def test_io_map_quantises_a_fully_integer_tensor_and_reads_it_back() -> None:
    """An int8 io tensor: fed as round(x / scale) + zero_point (clipped), read back as
    (q - zero_point) * scale; within half a step of the float value where it is in range."""
    b = Binding(name="x", perm=(0, 2, 3, 1), quant={"dtype": "int8", "scale": 0.01, "zero_point": -5})
    x = np.linspace(-1.5, 1.5, 24, dtype=np.float32).reshape(1, 2, 3, 4)
    q = b.to_physical(x)
    assert q.dtype == np.int8 and q.shape == (1, 3, 4, 2) and q.min() == -128 and q.max() == 127
    back = b.to_logical(q)
    inside = (x >= (-128 + 5) * 0.01) & (x <= (127 + 5) * 0.01)
    assert back.dtype == np.float32 and np.all(np.abs(back - x)[inside] <= 0.005 + 1e-6)
    assert Binding.from_dict(b.to_dict()) == b


def test_nhwc_output_undone_by_io_map_passes_parity() -> None:
    ref = np.random.default_rng(0).standard_normal((1, 3, 4, 5)).astype(np.float32)
    io = IoMap(outputs={"y": Binding(name="Y", perm=(0, 2, 3, 1))})
    physical = {"Y": np.transpose(ref, (0, 2, 3, 1))}
    res = compare_outputs([{"y": ref}], [io.results(physical)], precision="float32", policy=TolerancePolicy())
    assert res[0].status == "pass"
    raw = compare_outputs([{"y": ref}], [{"y": physical["Y"]}], precision="float32", policy=TolerancePolicy())
    assert raw[0].status == "fail"


def test_staging_commits_atomically_and_refuses_overwrite(tmp_path: Path) -> None:
    dest = tmp_path / "bundle"
    with Staging(dest) as st:
        st.write_text("a.txt", "one")
        assert not dest.exists()
        st.commit()
    assert (dest / "a.txt").read_text() == "one"
    with pytest.raises(UsageError, match="overwrite"):
        with Staging(dest):
            pass
    with pytest.raises(RuntimeError):
        with Staging(dest, overwrite=True) as st:
            st.write_text("a.txt", "two")
            raise RuntimeError("crash before commit")
    assert (dest / "a.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_concurrent_writer_is_refused_naming_holder(tmp_path: Path) -> None:
    dest = tmp_path / "bundle"
    with Staging(dest):
        with pytest.raises(BundleWriteError, match=f"pid {os.getpid()}"):
            with Staging(dest):
                pass


def test_output_path_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageError, match="existing file"):
        with Staging(f):
            pass


def test_file_list_detects_changes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"abc")
    files = list_files(tmp_path)
    assert check_files(tmp_path, files) == []
    (tmp_path / "a" / "x.bin").write_bytes(b"abd")
    assert check_files(tmp_path, files) == ["changed file: a/x.bin (sha256 differs from the contract)"]
    (tmp_path / "a" / "x.bin").unlink()
    assert check_files(tmp_path, files) == ["missing file: a/x.bin"]


def test_a_file_larger_than_one_read_hashes_the_same_in_chunks(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from portable_models.core import hashing

    data = os.urandom(10_000)
    (tmp_path / "x.bin").write_bytes(data)
    whole = hashing.sha256_path(tmp_path / "x.bin")
    monkeypatch.setattr(hashing, "_WHOLE", 4096)  # three chunks, the last a short one
    assert hashing.sha256_path(tmp_path / "x.bin") == whole == hashlib.sha256(data).hexdigest()


def test_error_histogram_counts_each_decade_from_its_power_of_ten() -> None:
    from portable_models.compare.check import error_histogram

    errors = np.array([0.0, 1e-13, 1e-12, 9.9e-12, 1e-5, 0.5, 1.0, 99.0, 100.0, 5e3, np.nan, np.inf])
    hist = error_histogram([{"y": np.zeros(errors.size)}], [{"y": errors}], "y")
    assert hist is not None and hist["decades"][0] == -12.0 and hist["decades"][-1] == 2.0
    counts = dict(zip(hist["decades"], hist["counts"], strict=True))
    # below 1e-12 counts in the first decade, 1e2 and above in the last; 0 apart, NaN/Inf left out
    assert hist["zeros"] == 1 and sum(hist["counts"]) == 9
    assert counts[-12.0] == 3 and counts[-5.0] == 1 and counts[-1.0] == 1 and counts[0.0] == 1
    assert counts[1.0] == 1 and counts[2.0] == 2
    assert error_histogram([{"y": np.zeros(3)}], [{"y": np.zeros(4)}], "y") is None
    assert error_histogram([{"y": np.zeros(3, np.int32)}], [{"y": np.zeros(3)}], "y") is None


def test_reports_render(tmp_path: Path) -> None:
    c = _contract(tmp_path)
    table = render(c, "table")
    assert "onnx2tf" in table and "litert-torch error at convert: boom" in table
    parsed = json.loads(render(c, "json"))
    assert parsed["ok"] is True and parsed["artifacts"][0]["route"] == "onnx2tf"
    from xml.etree import ElementTree as ET

    root = ET.fromstring(to_junit(c))
    assert root.tag == "testsuite" and root.get("tests") == "1"
    assert "| tflite |" in render(c, "md")


# -- lanes for jobs > 1 --------------------------------------------------------------------
def test_lanes_keep_families_together_and_balance() -> None:
    from portable_models.api import lanes

    every = ["onnx", "torchscript", "executorch", "tflite", "coreml"]
    assert lanes(every, 2) == [[0, 3], [1, 2, 4]]  # onnx before tflite, in one lane
    assert lanes(every, 1) == [[0, 1, 2, 3, 4]]
    assert lanes(["onnx", "tflite"], 2) == [[1], [0]]  # one family would leave a lane idle
    assert lanes(["coreml"], 4) == [[0]]
    plan = lanes([*every, "tflite", "coreml"], 3)  # fp16 twins join their family
    assert sorted(i for lane in plan for i in lane) == list(range(7))
    assert all(lane == sorted(lane) for lane in plan)
