"""The bad-input catalogue, corrupt and hostile files, through the real CLI: each is
refused with exit code 2, a message naming the file and a fix, no traceback, and nothing
written."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from clihelp import cli, cli_env

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow




def refused(tmp_path: Path, src: Path, *words: str, extra: tuple[str, ...] = ()) -> str:
    out = tmp_path / "out"
    r = cli("convert", str(src), "--out", str(out), "--targets", "onnx", *extra)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "fix:" in r.stderr
    assert src.name in r.stderr
    for w in words:
        assert w in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    return r.stderr


def test_pickle_payload_never_runs(tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    src = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2), "evil": Payload()}, str(src))
    refused(tmp_path, src, "unsafe", "--trust-model", extra=("--class", "nets:TinyNet"))
    assert not marker.exists(), "the pickle payload ran"


def test_onnx_renamed_pt(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    src = tmp_path / "model.pt"
    onnx.save(helper.make_model(graph), str(src))
    refused(tmp_path, src, "content is onnx", "rename")


def test_external_data_pointing_outside_is_refused(tmp_path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside").write_bytes(np.ones(16, np.float32).tobytes())
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../outside"), ("offset", "0"), ("length", "64")):
        w.external_data.add(key=k, value=v)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    src = folder / "model.onnx"
    src.write_bytes(helper.make_model(graph).SerializeToString())
    refused(tmp_path, src, "outside the model's folder", "../outside")
    assert onnx  # the check ran before onnx/onnxruntime read any tensor


def test_keras_renamed_h5_and_lambda(tmp_path: Path) -> None:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    inp = keras.Input((4,), name="x")
    plain = keras.Model(inp, keras.layers.Dense(2, name="y")(inp))
    renamed = tmp_path / "model.h5"
    plain.save(str(tmp_path / "plain.keras"))
    renamed.write_bytes((tmp_path / "plain.keras").read_bytes())
    refused(tmp_path, renamed, "content is keras")
    lam = keras.Model(inp, keras.layers.Lambda(lambda t: t * 2.0)(inp))
    lam.save(str(tmp_path / "lambda.keras"))
    refused(tmp_path, tmp_path / "lambda.keras", "unsafe deserialisation", "--trust-model")


def test_directory_and_file_mixed_up(tmp_path: Path) -> None:
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    refused(tmp_path, folder, "not a TensorFlow SavedModel")
    f = tmp_path / "bundle.txt"
    f.write_text("hello")
    r = cli("verify", str(f))
    assert r.returncode == 2 and "is a file, not a bundle folder" in r.stderr


def test_npz_samples_with_objects_is_refused(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from nets import make  # type: ignore[import-not-found]

    x = torch.rand(2, 3, 8, 8)
    ep = torch.export.export(make(), (x,))
    torch.export.save(ep, str(tmp_path / "net.pt2"))
    evil = tmp_path / "samples.npz"
    np.savez(evil, image=np.array([object()], dtype=object))
    r = cli("convert", str(tmp_path / "net.pt2"), "--out", str(tmp_path / "o"), "--samples", str(evil))
    assert r.returncode == 2 and "pickle" in r.stderr and not (tmp_path / "o").exists()


def test_two_exports_racing_for_one_destination(tmp_path: Path) -> None:
    import torch
    from nets import make  # type: ignore[import-not-found]

    ep = torch.export.export(make(), (torch.rand(2, 3, 8, 8),))
    torch.export.save(ep, str(tmp_path / "net.pt2"))
    env = cli_env()
    cmd = [sys.executable, "-m", "portable_models.cli", "convert", str(tmp_path / "net.pt2"), "--out",
           str(tmp_path / "same"), "--targets", "torchscript", "--no-cache"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] in (1, 2), results
    loser = next(err for code, err in results if code != 0)
    # The lock says who holds it ("pid N", or "another process" when the loser looks between the
    # winner's lock and its writing its pid); if the loser came late, the bundle exists already.
    assert "is being written by " in loser or "exists and is not empty" in loser, loser
    with zipfile.ZipFile(tmp_path / "same" / "artifacts" / "model.torchscript.pt"):
        pass  # the winner's bundle is whole
