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
from clihelp import cli_env, tagged

from portable_models.contract.bundle import list_files
from portable_models.core.hashing import sha256_path
from portable_models.isolation.sandbox import status
from worker_jobs import CALL

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
    return tagged("PM_CATALOGUE_TAG", tag)


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


def _confined_with_test_jobs(scratch: Path) -> Any:
    """The sandbox a verify of the tiny bundle gets, which may also read the tests' job module."""
    from portable_models.isolation.sandbox import Confinement, confinement

    confine = confinement(TINY, scratch)
    assert confine is not None
    return Confinement(read=(*confine.read, CALL["import_path"]), write=confine.write)


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
    from portable_models.isolation.pool import JobFailed, WorkerLimits, WorkerPool

    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    confine = _confined_with_test_jobs(scratch)
    with WorkerPool(scratch=tmp_path / "pool") as pool:
        view = pool.with_limits(WorkerLimits(timeout_s=60)).confined(confine)
        inside, _ = view.call(kind="call", payload={**CALL, "action": "read", "path": str(TINY / "contract.json")},
                              framework="none", step="test")
        assert inside["read"] > 0
        with pytest.raises(JobFailed, match="Permission denied"):
            view.call(kind="call", payload={**CALL, "action": "read", "path": str(secret)}, framework="none", step="test")


def test_the_payload_is_live_when_the_user_trusts_the_bundle(tmp_path: Path,
                                                              evil_ts: Callable[[Path], Path]) -> None:
    """The control for the two tests above: trusted and unconfined, the same payload does
    write its file (so their "not written" means the boundary stopped it)."""
    mark = tmp_path / "pwned"
    bundle = tampered(tmp_path, lambda b, c: _add_torchscript(b, c, evil_ts(mark)))
    run("verify", str(bundle), "--trust-bundle", env={"PORTABLE_MODELS_SANDBOX": "off"})
    assert mark.exists()


def test_bench_never_follows_or_lists_a_planted_link(tmp_path: Path) -> None:
    """An unlisted link planted in the bundle: bench refuses the bundle before it writes
    anything, and never hashes what the link names (an oracle on other files)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    bundle = tampered(tmp_path, lambda b, c: None)
    (bundle / "notes.txt").symlink_to(secret)
    before = (bundle / "contract.json").read_bytes()
    r = run("bench", str(bundle), "--runs", "2", "--warmup", "0")
    assert r.returncode == 1 and "notes.txt" in r.stderr, r.stdout + r.stderr
    assert (bundle / "contract.json").read_bytes() == before
    r = run("verify", str(bundle))
    assert r.returncode == 1 and "link or special file in the bundle: notes.txt" in r.stdout + r.stderr


def test_bench_seals_nothing_it_did_not_check(tmp_path: Path) -> None:
    """bench rewrites the reports and the contract all or nothing, keeping the file list it
    checked: a file planted beside it stays unlisted, and the bundle still verifies."""
    bundle = tampered(tmp_path, lambda b, c: None)
    (bundle / "evil\u202etxt.md").write_text("x")
    r = run("bench", str(bundle), "--runs", "2", "--warmup", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    listed = {e["path"] for e in json.loads((bundle / "contract.json").read_text())["files"]}
    assert "evil\u202etxt.md" not in listed and "reports/parity.md" in listed
    r = run("verify", str(bundle))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "\u202e" not in r.stderr and "\\u202e" in r.stderr  # the note names it, escaped
    r = run("bench", str(bundle), "--targets", "tflite")
    assert r.returncode == 2 and "not in the bundle: tflite" in r.stderr


def test_golden_data_must_be_listed_and_agree_with_the_contract(tmp_path: Path) -> None:
    def unlist(b: Path, c: dict[str, Any]) -> None:
        c["files"] = [e for e in list_files(b) if not e["path"].startswith("golden/")]
        c["keep_files"] = True
    rc, _, text = verdicts(tampered(tmp_path / "unlisted", unlist))
    assert rc == 1 and "golden inputs golden/inputs.npz is not in the contract's file list" in text, text

    def more_cases(b: Path, c: dict[str, Any]) -> None:
        import numpy as np

        from portable_models.core.golden import load_cases, save_cases
        cases = load_cases(b / "golden" / "inputs.npz")
        save_cases(b / "golden" / "inputs.npz", cases + [{k: np.ones_like(v) for k, v in cases[0].items()}] * 47)
        c["golden"]["cases"] = 51
    r = run("verify", str(tampered(tmp_path / "cases", more_cases)))
    assert r.returncode == 2 and "holds 4 cases, the contract says 51" in r.stderr, r.stdout + r.stderr


def test_a_golden_bomb_is_refused_whatever_dims_the_contract_declares(tmp_path: Path) -> None:
    """Huge declared dims lift the contract's own cap; the caller's absolute one still holds."""
    import zipfile

    import numpy as np

    def bomb(b: Path, c: dict[str, Any]) -> None:
        c["dims"] = {"batch": {"min": 1, "max": 2**31 - 1}}
        c["outputs"][0]["shape"] = ["batch", "batch"]
        header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), np.float32))
        header["shape"] = (2**15, 3 * 2**12)  # 1.5 GiB of float32, under the 2 GiB an array may hold
        with zipfile.ZipFile(b / "golden" / "outputs.npz", "w", zipfile.ZIP_DEFLATED) as zf, \
                zf.open("0/scores.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            chunk = bytes(1 << 20)
            for _ in range(1536):  # ~1.5 MB on disk, 1.5 GiB inflated
                member.write(chunk)
    r = run("verify", str(tampered(tmp_path, bomb)))
    assert r.returncode == 2 and "outputs.npz: member 0/scores.npy declares" in r.stderr, r.stdout + r.stderr


def test_escape_sequences_in_an_error_message_are_shown_escaped(tmp_path: Path) -> None:
    import zipfile

    def evil_member(b: Path, c: dict[str, Any]) -> None:
        with zipfile.ZipFile(b / "golden" / "outputs.npz", "w") as zf:
            zf.writestr("0/\x1b]0;TITLE\x07\x1b[2J\u202eevil", b"not an npy")
    r = run("verify", str(tampered(tmp_path, evil_member)))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "\x1b" not in r.stderr and "\u202e" not in r.stderr and "\\x1b" in r.stderr, repr(r.stderr)


def test_the_plugin_fails_a_bundle_without_artifacts(tmp_path: Path) -> None:
    def empty(b: Path, c: dict[str, Any]) -> None:
        c["artifacts"] = []
    bundle = tampered(tmp_path, empty)
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--pm-bundle", str(bundle)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300, env=cli_env())
    assert r.returncode == 1 and "no artifact" in r.stdout, r.stdout + r.stderr


@needs_sandbox
def test_a_sandboxed_worker_holds_no_secret_of_its_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A confined worker starts with a scrubbed environment (no tokens, no agent sockets, no
    PYTHONPATH), cannot read a folder on the caller's PYTHONPATH, nor write to /dev/shm."""
    from portable_models.isolation.pool import JobFailed, WorkerLimits, WorkerPool

    project = tmp_path / "project"
    project.mkdir()
    (project / "token.txt").write_text("t0ken")
    monkeypatch.setenv("PM_SECRET_TOKEN", "t0ken")
    monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "agent.sock"))
    monkeypatch.setenv("PYTHONPATH", str(project) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    confine = _confined_with_test_jobs(scratch)
    with WorkerPool(scratch=tmp_path / "pool") as pool:
        view = pool.with_limits(WorkerLimits(timeout_s=60)).confined(confine)
        env, _ = view.call(kind="call", payload={**CALL, "action": "env"}, framework="none", step="test")
        assert not {"PM_SECRET_TOKEN", "SSH_AUTH_SOCK"} & set(env["keys"]), env
        assert str(project) not in env["pythonpath"]
        with pytest.raises(JobFailed, match="Permission denied"):
            view.call(kind="call", payload={**CALL, "action": "read", "path": str(project / "token.txt")},
                      framework="none", step="test")
        with pytest.raises(JobFailed, match="Permission denied"):
            view.call(kind="call", payload={**CALL, "action": "write", "path": f"/dev/shm/pm-{uuid.uuid4().hex}"},
                      framework="none", step="test")
