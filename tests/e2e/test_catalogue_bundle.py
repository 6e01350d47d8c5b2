"""The bad-input catalogue, hostile bundles: each attack is built the way an attacker would
(the artifact swapped or the contract edited, then every hash recomputed so that only a real
boundary stops it) and run through the real CLI. Each asserts the exit code, the message,
that nothing outside the bundle was written, and that no worker is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest
from clihelp import cli_env

from portable_models.contract.bundle import list_files
from portable_models.core.hashing import sha256_path
from portable_models.isolation.sandbox import status

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny_bundle"
pytestmark = pytest.mark.slow
needs_sandbox = pytest.mark.skipif(not status().available, reason=f"no sandbox here: {status().reason}")

#: a TorchScript module whose forward() creates a file wherever it is told (torch.from_file
#: with shared=True creates it): code that runs when the artifact runs.
_EVIL = '''
import torch
from torch import nn


class Evil(nn.Module):
    def __init__(self, mark: str) -> None:
        super().__init__()
        self.weight = torch.ones(4, 3)
        self.mark = mark

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        written = torch.from_file(self.mark, shared=True, size=16)
        return features @ self.weight + written.sum() * 0
'''


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own, tagged so that its workers can be found afterwards."""
    tag = uuid.uuid4().hex
    full = {**cli_env(), **(env or {}), "PM_CATALOGUE_TAG": tag}
    r = subprocess.run([sys.executable, "-m", "portable_models.cli", *args], capture_output=True, text=True,
                       env=full, cwd=cwd, timeout=600)
    assert not _tagged(tag), "a worker outlived the command"
    assert "Traceback" not in r.stderr, r.stderr
    return r


def verdicts(bundle: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    """``verify`` as a person reads it: exit code, each row's status, and all it printed."""
    r = run("verify", str(bundle), *args, env=env)
    rows = {line.split()[0]: line.split()[3] for line in r.stdout.splitlines()
            if line.split()[:1] and line.split()[0] in ("onnx", "torchscript", "executorch", "tflite", "coreml")}
    return r.returncode, rows, r.stdout + r.stderr


def _tagged(tag: str) -> list[int]:
    """Processes whose environment holds ``tag``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"PM_CATALOGUE_TAG={tag}".encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


def tampered(tmp_path: Path, edit: Callable[[Path, dict[str, Any]], None]) -> Path:
    """A copy of the tiny bundle, edited by ``edit(bundle, contract)``, then resealed as an
    attacker would: each artifact's sha256 and size, and the file list, recomputed."""
    bundle = tmp_path / "bundle"
    shutil.copytree(TINY, bundle, symlinks=True)
    contract = json.loads((bundle / "contract.json").read_text())
    edit(bundle, contract)
    for art in contract["artifacts"]:
        path = bundle / art["file"] if isinstance(art.get("file"), str) else None
        if path is not None and not art["file"].startswith("/") and ".." not in art["file"] and path.exists():
            art["sha256"], art["bytes"] = sha256_path(path), path.stat().st_size
    if contract.get("files") is not None and not contract.pop("keep_files", False):
        contract["files"] = list_files(bundle)
    (bundle / "contract.json").write_text(json.dumps(contract, indent=2))
    return bundle


@pytest.fixture(scope="module")
def evil_ts(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], Path]:
    """Writes a TorchScript payload that creates the file it is given when it runs."""
    import torch

    src = tmp_path_factory.mktemp("evil")
    (src / "evil_mod.py").write_text(textwrap.dedent(_EVIL))
    sys.path.insert(0, str(src))
    try:
        from evil_mod import Evil  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(src))

    def make(mark: Path) -> Path:
        out = mark.parent / f"evil-{uuid.uuid4().hex[:6]}.pt"
        torch.jit.script(Evil(str(mark))).save(str(out))
        return out

    return make


def _add_torchscript(bundle: Path, contract: dict[str, Any], payload: Path, *, target: str = "torchscript",
                     runtime: str | None = "torchscript", name: str = "model.torchscript.pt") -> None:
    shutil.copy(payload, bundle / "artifacts" / name)
    onnx = contract["artifacts"][0]
    contract["artifacts"].append({**json.loads(json.dumps(onnx)), "target": target, "runtime": runtime,
                                  "route_name": "torch-jit-trace", "file": f"artifacts/{name}"})


@needs_sandbox
def test_torchscript_payload_cannot_write_outside(tmp_path: Path, evil_ts: Callable[[Path], Path]) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    mark = outside / "pwned"
    bundle = tampered(tmp_path, lambda b, c: _add_torchscript(b, c, evil_ts(mark)))
    r = run("verify", str(bundle), "--format", "json")
    assert r.returncode == 1, r.stdout + r.stderr
    ts = next(a for a in json.loads(r.stdout)["artifacts"] if a["target"] == "torchscript")
    assert ts["status"] == "error", ts
    assert not mark.exists(), "the artifact's code wrote outside the bundle"
    assert "in the Landlock sandbox" in r.stderr


def test_torchscript_without_a_sandbox_is_skipped_unless_trusted(tmp_path: Path,
                                                                 evil_ts: Callable[[Path], Path]) -> None:
    mark = tmp_path / "pwned"
    bundle = tampered(tmp_path, lambda b, c: _add_torchscript(b, c, evil_ts(mark)))
    off = {"PORTABLE_MODELS_SANDBOX": "off"}
    r = run("verify", str(bundle), "--format", "json", env=off)
    assert r.returncode == 1, r.stdout + r.stderr
    ts = next(a for a in json.loads(r.stdout)["artifacts"] if a["target"] == "torchscript")
    assert ts["status"] == "skipped"
    r = run("verify", str(bundle), env=off)
    assert "needs a sandbox or --trust-bundle" in r.stdout + r.stderr
    assert "without an OS sandbox" in r.stderr
    r = run("verify", str(bundle), "--allow-unverified", "torchscript", env=off)
    assert r.returncode == 0, r.stdout + r.stderr  # the user let it through, knowingly
    assert not mark.exists()


@needs_sandbox
def test_runtime_follows_the_target_not_the_contract(tmp_path: Path, evil_ts: Callable[[Path], Path]) -> None:
    """The payload labelled ``onnx``: with ``runtime: torchscript`` it is refused as a
    mismatch; with ``runtime: onnxruntime`` its bytes are refused as not ONNX."""
    mark = tmp_path / "pwned"
    payload = evil_ts(mark)
    for runtime, words in (("torchscript", "the runtime follows the target"), ("onnxruntime", "not an ONNX model"),
                           (None, "not an ONNX model")):
        def edit(b: Path, c: dict[str, Any], runtime: str | None = runtime) -> None:
            shutil.copy(payload, b / "artifacts" / "model.onnx")
            c["artifacts"][0]["runtime"] = runtime
        bundle = tampered(tmp_path / str(runtime), edit)
        rc, rows, text = verdicts(bundle, "--targets", "onnx", env={"PORTABLE_MODELS_SANDBOX": "off"})
        assert rc == 1 and rows == {"onnx": "error"} and words in text, text
        assert not mark.exists()


def test_recorded_verdicts_are_never_carried_over(tmp_path: Path) -> None:
    def edit(b: Path, c: dict[str, Any]) -> None:
        (b / "artifacts" / "model.onnx").write_bytes(os.urandom(4096))
        for a in c["artifacts"]:
            a["runtime"] = None
    bundle = tampered(tmp_path, edit)
    r = run("verify", str(bundle), "--format", "junit")
    assert r.returncode == 1, r.stdout + r.stderr
    suite = ET.fromstring(r.stdout)
    assert int(suite.get("failures", 0)) + int(suite.get("errors", 0)) >= 1, r.stdout

    def no_file(b: Path, c: dict[str, Any]) -> None:
        c["artifacts"][0]["file"] = None  # "nothing was kept", but the verdict says pass
    rc, rows, text = verdicts(tampered(tmp_path / "nofile", no_file))
    assert rc == 1 and rows == {"onnx": "error"} and "never carried over" in text, text


def test_a_symlinked_artifact_is_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(TINY / "artifacts" / "model.onnx", outside / "model.onnx")  # a valid model

    def edit(b: Path, c: dict[str, Any]) -> None:
        (b / "artifacts" / "model.onnx").unlink()
        (b / "artifacts" / "model.onnx").symlink_to(outside / "model.onnx")
    rc, rows, text = verdicts(tampered(tmp_path, edit))
    assert rc == 1 and rows == {"onnx": "error"} and "symlink" in text, text


@pytest.mark.parametrize("path", ["/tmp/model.onnx", "../outside/model.onnx", "artifacts/../../x.onnx",
                                  "artifacts\\model.onnx"])
def test_an_artifact_path_that_leaves_the_bundle_is_refused(tmp_path: Path, path: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(TINY / "artifacts" / "model.onnx", outside / "model.onnx")

    def edit(b: Path, c: dict[str, Any]) -> None:
        c["artifacts"][0]["file"] = path
    bundle = tampered(tmp_path, edit)
    r = run("verify", str(bundle))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "contract.json" in r.stderr and "fix:" in r.stderr


def test_files_entries_cannot_name_other_files(tmp_path: Path) -> None:
    """A ``files`` entry such as /etc/shadow would make verify an oracle for other files."""
    def edit(b: Path, c: dict[str, Any]) -> None:
        c["files"].append({"path": "/etc/shadow", "bytes": 1, "sha256": "0" * 64})
        c["keep_files"] = True
    r = run("verify", str(tampered(tmp_path, edit)))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "/etc/shadow" in r.stderr and "contract.json" in r.stderr


def test_an_artifact_dropped_from_the_file_list_is_not_trusted(tmp_path: Path) -> None:
    """The integrity check cannot depend on the list it checks: a changed model whose entry
    was dropped from ``files`` fails, and so does one whose own sha256 disagrees."""
    def drop(b: Path, c: dict[str, Any]) -> None:
        with open(b / "artifacts" / "model.onnx", "ab") as fh:
            fh.write(b"\0")
        c["files"] = [e for e in list_files(b) if e["path"] != "artifacts/model.onnx"]
        c["keep_files"] = True
    rc, rows, text = verdicts(tampered(tmp_path / "drop", drop))
    assert rc == 1 and rows == {"onnx": "error"} and "not in the contract's file list" in text, text

    def lie(b: Path, c: dict[str, Any]) -> None:
        c["artifacts"][0]["sha256"] = "0" * 64
    bundle = tampered(tmp_path / "lie", lie)
    contract = json.loads((bundle / "contract.json").read_text())
    contract["artifacts"][0]["sha256"] = "0" * 64  # resealing put the true one back
    (bundle / "contract.json").write_text(json.dumps(contract))
    rc, rows, text = verdicts(bundle)
    assert rc == 1 and rows == {"onnx": "error"} and "sha256 differs" in text, text


def test_unlisted_files_are_reported(tmp_path: Path) -> None:
    bundle = tampered(tmp_path, lambda b, c: None)
    (bundle / "stray.bin").write_bytes(b"x")
    r = run("verify", str(bundle))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not in the contract's file list (not checked): stray.bin" in r.stderr


def test_bench_never_writes_through_a_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim.md"
    victim.write_text("precious\n")

    def edit(b: Path, c: dict[str, Any]) -> None:
        (b / "reports" / "parity.md").unlink()
        (b / "reports" / "parity.md").symlink_to(victim)
    bundle = tampered(tmp_path, edit)
    r = run("bench", str(bundle), "--runs", "2", "--warmup", "0")
    assert victim.read_text() == "precious\n", "bench wrote through the link"
    assert r.returncode in (1, 2), r.stdout + r.stderr
    assert "parity.md" in r.stderr


@needs_sandbox
def test_a_sandboxed_worker_cannot_read_outside_the_bundle(tmp_path: Path) -> None:
    """What the sandbox promises, asked of a real verify worker: the process that loads the
    artifacts cannot read a file outside the bundle and the Python installation."""
    from portable_models.contract.trust import confinement
    from portable_models.isolation.pool import JobFailed, WorkerLimits, WorkerPool

    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    confine = confinement(TINY, scratch)
    assert confine is not None
    with WorkerPool(scratch=tmp_path / "pool") as pool:
        view = pool.with_limits(WorkerLimits(timeout_s=60)).confined(confine)
        inside, _ = view.call(kind="test", payload={"action": "read", "path": str(TINY / "contract.json")},
                              framework="none", step="test")
        assert inside["read"] > 0
        with pytest.raises(JobFailed, match="Permission denied"):
            view.call(kind="test", payload={"action": "read", "path": str(secret)}, framework="none", step="test")


def test_the_payload_is_live_when_the_user_trusts_the_bundle(tmp_path: Path,
                                                              evil_ts: Callable[[Path], Path]) -> None:
    """The control for the two tests above: trusted and unconfined, the same payload does
    write its file (so their "not written" means the boundary stopped it)."""
    mark = tmp_path / "pwned"
    bundle = tampered(tmp_path, lambda b, c: _add_torchscript(b, c, evil_ts(mark)))
    run("verify", str(bundle), "--trust-bundle", env={"PORTABLE_MODELS_SANDBOX": "off"})
    assert mark.exists()
