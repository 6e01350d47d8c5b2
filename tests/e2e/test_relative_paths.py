"""Every public entry point takes relative paths the way a user types them: from a working
directory that is not the bundle's parent, with ``../x`` forms, spaces and a non-ASCII name.

A worker runs in a private working directory, so a relative path that reached one named
another file (`make demo` failed on every fresh clone): these tests run the real CLI, the
API in a second process and the pytest plugin, never with an absolute path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from clihelp import cli

pytestmark = pytest.mark.slow

#: a model class that only the working directory makes importable (not on PYTHONPATH): the
#: tests' own small net under another module name
_NETS = (Path(__file__).resolve().parent / "nets.py").read_text()


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``top/wörk dir/sub`` is the working directory; the model files are in
    ``top/in puts``, the bundles go to ``top/out ü``."""
    import numpy as np
    import torch

    top = tmp_path_factory.mktemp("rel")
    cwd = top / "wörk dir" / "sub"
    inputs = top / "in puts"
    cwd.mkdir(parents=True)
    inputs.mkdir()
    (cwd / "relnets.py").write_text(_NETS)
    sys.path.insert(0, str(cwd))
    try:
        import relnets  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(cwd))
    torch.manual_seed(0)
    torch.save(relnets.TinyNet().state_dict(), inputs / "wéights.pt")
    rng = np.random.default_rng(0)
    np.savez(inputs / "samples.npz", image=rng.random((2, 3, 8, 8), dtype=np.float32))
    return {"top": top, "cwd": cwd}


@pytest.fixture(scope="module")
def bundle(layout: dict[str, Path]) -> str:
    """Converted by the CLI with relative paths for the source, the samples, the class
    module (from the working directory) and the output, and a comma-separated target list."""
    rel = "../../out ü/net"
    r = cli("convert", "../../in puts/wéights.pt", "--class", "relnets:TinyNet", "--samples",
            "../../in puts/samples.npz", "--input", "image:2x3x8x8:float32:0..1",
            "--targets", "onnx,torchscript", "--out", rel, cwd=layout["cwd"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert (layout["top"] / "out ü" / "net" / "contract.json").is_file()
    return rel


def test_cli_verify_bench_inspect_take_relative_paths(layout: dict[str, Path], bundle: str) -> None:
    r = cli("verify", bundle, "--format", "junit", cwd=layout["cwd"])
    assert r.returncode == 0, r.stdout + r.stderr
    suite = ET.fromstring(r.stdout)
    assert suite.get("tests") == "2" and suite.get("failures") == "0" and suite.get("errors") == "0"
    r = cli("verify", bundle, "--targets", "onnx", "torchscript", "--format", "json", cwd=layout["cwd"])
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True, r.stdout + r.stderr
    r = cli("bench", bundle, "--runs", "3", "--warmup", "1", cwd=layout["cwd"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "onnxruntime" in r.stdout
    r = cli("inspect", bundle, cwd=layout["cwd"])
    assert r.returncode == 0 and "[onnx] pass" in r.stdout, r.stdout + r.stderr


def test_api_in_a_second_process_takes_relative_paths(layout: dict[str, Path], bundle: str) -> None:
    """export(out=), verify, load_contract and assert_parity, each with a relative path."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, ".")
        import torch
        import portable_models as pm
        from portable_models.testing import assert_parity
        from relnets import TinyNet

        torch.manual_seed(1)
        made = pm.export(TinyNet().eval(), (torch.rand(2, 3, 8, 8),), out="../api ü/x",
                         targets=["onnx"], input_names=["image"])
        assert made.ok, made.report()
        for rel in ("../api ü/x", {bundle!r}):
            report = pm.verify(rel)
            assert report.ok, report.table()
            assert pm.load_contract(rel).artifacts
            assert_parity(rel)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=layout["cwd"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
    assert (layout["cwd"].parent / "api ü" / "x" / "contract.json").is_file()


def test_pytest_plugin_takes_a_relative_bundle(layout: dict[str, Path], bundle: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--pm-bundle", bundle, "-v"],
                       cwd=layout["cwd"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test_integrity PASSED" in r.stdout, r.stdout
    assert r.stdout.count("PASSED") == 3, r.stdout  # integrity, onnx and torchscript
