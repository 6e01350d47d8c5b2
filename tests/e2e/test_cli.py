"""The real CLI as a subprocess on saved files: exit codes, reports, tampering."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from clihelp import cli, cli_env

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow




@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch
    from nets import make  # type: ignore[import-not-found]

    d = tmp_path_factory.mktemp("saved")
    model = make()
    x = torch.rand(2, 3, 8, 8)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=8)},))
    torch.export.save(ep, str(d / "net.pt2"))
    torch.jit.save(torch.jit.trace(model, (x,)), str(d / "net_ts.pt"))
    torch.save(model.state_dict(), str(d / "weights.pt"))
    torch.save(model, str(d / "whole.pt"))
    return {"pt2": d / "net.pt2", "ts": d / "net_ts.pt", "sd": d / "weights.pt", "whole": d / "whole.pt"}


@pytest.fixture(scope="module")
def pt2_bundle(saved: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("b") / "net"
    r = cli("convert", str(saved["pt2"]), "--out", str(out), "--targets", "onnx", "torchscript")
    assert r.returncode == 0, r.stderr + r.stdout
    return out


def test_convert_pt2_writes_reports(pt2_bundle: Path) -> None:
    data = json.loads((pt2_bundle / "reports" / "parity.json").read_text())
    assert data["ok"] is True and {a["target"] for a in data["artifacts"]} == {"onnx", "torchscript"}
    suite = ET.parse(pt2_bundle / "reports" / "junit.xml").getroot()
    assert suite.get("tests") == "2" and suite.get("failures") == "0"
    assert (pt2_bundle / "reports" / "parity.md").read_text().startswith("### portable_models parity")
    contract = json.loads((pt2_bundle / "contract.json").read_text())
    assert contract["inputs"][0]["shape"][0] == "batch"


def test_verify_formats_and_exit_codes(pt2_bundle: Path, tmp_path: Path) -> None:
    r = cli("verify", str(pt2_bundle), "--format", "junit")
    assert r.returncode == 0, r.stderr
    assert ET.fromstring(r.stdout).get("failures") == "0"
    r = cli("verify", str(pt2_bundle), "--format", "json")
    side_by_side = json.loads(r.stdout)
    assert side_by_side["ok"] is True
    r = cli("verify", str(pt2_bundle), "--format", "json", "--jobs", "1")
    one_by_one = json.loads(r.stdout)
    assert [(a["target"], a["status"]) for a in one_by_one["artifacts"]] == [
        (a["target"], a["status"]) for a in side_by_side["artifacts"]], "two workers at once changed a verdict"
    r = cli("verify", str(pt2_bundle), "--jobs", "0")
    assert r.returncode == 2 and "jobs=0" in r.stderr and "Traceback" not in r.stderr
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(pt2_bundle, bad)
    with open(bad / "artifacts" / "model.onnx", "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 1]))
    r = cli("verify", str(bad))
    assert r.returncode == 1
    assert "changed file: artifacts/model.onnx" in r.stdout


def test_inspect_says_how_to_feed(pt2_bundle: Path) -> None:
    r = cli("inspect", str(pt2_bundle))
    assert (r.returncode == 0 and "feed image as 'image'" not in r.stdout) or "feed" in r.stdout


def test_torchscript_needs_trust(saved: dict[str, Path], tmp_path: Path) -> None:
    r = cli("convert", str(saved["ts"]), "--out", str(tmp_path / "ts"), "--targets", "onnx")
    assert r.returncode == 2 and "--trust-model" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "ts").exists()
    r = cli("convert", str(saved["ts"]), "--out", str(tmp_path / "ts"), "--targets", "onnx",
            "--trust-model", "--input", "image:2x3x8x8:float32:0..1")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "ts" / "contract.json").read_text())["source"]["trust"] == "trusted"


def test_state_dict_with_class(saved: dict[str, Path], tmp_path: Path) -> None:
    r = cli("convert", str(saved["sd"]), "--out", str(tmp_path / "sd"), "--targets", "onnx",
            "--input", "image:2x3x8x8:float32:0..1")
    assert r.returncode == 2 and "--class" in r.stderr
    r = cli("convert", str(saved["sd"]), "--out", str(tmp_path / "sd"), "--targets", "onnx",
            "--class", "nets:TinyNet", "--input", "image:2x3x8x8:float32:0..1",
            "--dynamic", "image:0:batch:1..8")
    assert r.returncode == 0, r.stderr


def test_pickled_module_is_refused(saved: dict[str, Path], tmp_path: Path) -> None:
    r = cli("convert", str(saved["whole"]), "--out", str(tmp_path / "w"), "--targets", "onnx",
            "--input", "image:2x3x8x8:float32")
    assert r.returncode == 2 and "unsafe" in r.stderr and "--trust-model" in r.stderr


def test_bad_inputs_exit_2(tmp_path: Path, saved: dict[str, Path]) -> None:
    html = tmp_path / "model.onnx"
    html.write_text("<!DOCTYPE html><html><body>404</body></html>")
    r = cli("convert", str(html), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "HTML" in r.stderr and str(html.name) in r.stderr
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert cli("convert", str(empty), "--out", str(tmp_path / "o")).returncode == 2
    renamed = tmp_path / "net.onnx"
    renamed.write_bytes(saved["pt2"].read_bytes())
    r = cli("convert", str(renamed), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "content is pt2" in r.stderr
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(saved["sd"].read_bytes()[:200])
    r = cli("convert", str(truncated), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "truncated" in r.stderr
    assert cli("verify", str(tmp_path / "nowhere")).returncode == 2
    assert not (tmp_path / "o").exists()


def test_help_and_version() -> None:
    r = cli("--version")
    assert r.returncode == 0 and "portable-models" in r.stdout
    for sub in ("convert", "verify", "inspect", "doctor", "demo"):
        r = cli(sub, "--help")
        assert r.returncode == 0 and "usage" in r.stdout


def test_doctor_lists_routes() -> None:
    r = cli("doctor")
    assert "torch-onnx" in r.stdout and "onnxruntime" in r.stdout


@pytest.mark.parametrize(("sig", "code"), [(2, 130), (15, 143)])
def test_interrupt_kills_workers_and_leaves_nothing(saved: dict[str, Path], tmp_path: Path,
                                                    sig: int, code: int) -> None:
    import psutil

    env = cli_env()
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "portable_models.cli", "convert", str(saved["pt2"]),
                             "--out", str(out), "--targets", "executorch"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "converting" in line:
            break
    import time

    deadline = time.monotonic() + 60
    workers: list[psutil.Process] = []
    while not workers and time.monotonic() < deadline:  # the worker starts just after the event
        workers = psutil.Process(proc.pid).children(recursive=True)
        time.sleep(0.2)
    assert workers, "a conversion runs in a worker process"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    _gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"orphans survived: {alive}"
    assert list(tmp_path.iterdir()) == [], "staging, lock or bundle left behind"


def test_disk_full_during_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import torch

    import portable_models as pm
    from portable_models import api

    def full(*args: object, **kw: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "reports/parity.json")

    monkeypatch.setattr(api, "write_reports", full)
    from nets import make  # type: ignore[import-not-found]

    with pytest.raises(pm.errors.BundleWriteError) as info:
        pm.export(make(), (torch.rand(2, 3, 8, 8),), out=tmp_path / "b", targets=["torchscript"])
    assert info.value.code == "write_failed" and "No space left" in str(info.value)
    assert "free some disk space" in (info.value.fix or "")
    assert list(tmp_path.iterdir()) == []
