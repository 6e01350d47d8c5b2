"""Landlock confinement, checked from outside: each case confines a fresh interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from portable_models.isolation.sandbox import SandboxError, confine, status

STATE = status()
needs_landlock = pytest.mark.skipif(not STATE.available, reason=f"no sandbox: {STATE.reason}")

# Runs in the child: confine to bundle (read) + scratch (write) + the defaults, then run
# the case's body, which records outcomes with attempt(); prints them as JSON.
PRELUDE = """
import json, os, subprocess, sys
from portable_models.isolation import sandbox
bundle, scratch, outside = sys.argv[1:4]
sandbox.confine(read=[bundle, *sandbox.default_read_paths()],
                write=[scratch, *sandbox.default_write_paths()],
                execute=sandbox.default_execute_paths())
results = {}
def attempt(name, fn):
    try:
        fn()
        results[name] = "ok"
    except Exception as exc:
        results[name] = type(exc).__name__
"""


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    bundle, scratch, outside = (tmp_path / n for n in ("bundle", "scratch", "outside"))
    for d in (bundle, scratch, outside):
        d.mkdir()
    (bundle / "model.txt").write_text("weights")
    (outside / "secret.txt").write_text("secret")
    (bundle / "link.txt").symlink_to(outside / "secret.txt")
    return {"bundle": bundle, "scratch": scratch, "outside": outside}


def run_confined(dirs: dict[str, Path], body: str, *args: str) -> dict[str, str]:
    script = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(results))\n"
    env = {k: v for k, v in os.environ.items() if k != "PORTABLE_MODELS_SANDBOX"}
    env.update(HOME=str(dirs["scratch"]), TMPDIR=str(dirs["scratch"]))
    argv = [sys.executable, "-c", script, *(str(dirs[k]) for k in ("bundle", "scratch", "outside"))]
    out = subprocess.run([*argv, *args], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@needs_landlock
def test_bundle_is_read_only_and_scratch_writable(dirs: dict[str, Path]) -> None:
    got = run_confined(dirs, """
        attempt("read_bundle", lambda: open(os.path.join(bundle, "model.txt")).read())
        attempt("list_bundle", lambda: os.listdir(bundle))
        attempt("write_bundle", lambda: open(os.path.join(bundle, "new.txt"), "w"))
        attempt("overwrite_bundle", lambda: open(os.path.join(bundle, "model.txt"), "a"))
        attempt("write_scratch", lambda: open(os.path.join(scratch, "out.txt"), "w").write("x"))
        attempt("rename_scratch", lambda: os.rename(os.path.join(scratch, "out.txt"),
                                                    os.path.join(scratch, "moved.txt")))
    """)
    assert got == {"read_bundle": "ok", "list_bundle": "ok", "write_bundle": "PermissionError",
                   "overwrite_bundle": "PermissionError", "write_scratch": "ok",
                   "rename_scratch": "ok"}
    assert (dirs["scratch"] / "moved.txt").read_text() == "x"
    assert sorted(p.name for p in dirs["bundle"].iterdir()) == ["link.txt", "model.txt"]


@needs_landlock
def test_nothing_else_is_readable(dirs: dict[str, Path]) -> None:
    got = run_confined(dirs, """
        attempt("outside", lambda: open(os.path.join(outside, "secret.txt")).read())
        attempt("symlink_out", lambda: open(os.path.join(bundle, "link.txt")).read())
        attempt("shadow", lambda: open("/etc/shadow").read())
        attempt("etc", lambda: os.listdir("/etc"))
        attempt("root_home", lambda: os.listdir("/root"))
        attempt("user_home", lambda: os.listdir(sys.argv[4]))
        attempt("pid1_environ", lambda: open("/proc/1/environ").read())
        attempt("write_outside", lambda: open(os.path.join(outside, "new.txt"), "w"))
    """, str(Path.home()))
    assert set(got.values()) == {"PermissionError"}, got
    assert not (dirs["outside"] / "new.txt").exists()


@needs_landlock
@pytest.mark.skipif(STATE.abi < 4, reason="Landlock ABI < 4 does not restrict TCP")
def test_tcp_connect_is_denied(dirs: dict[str, Path]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        got = run_confined(dirs, """
            import socket
            attempt("connect", lambda: socket.create_connection(("127.0.0.1", int(sys.argv[4])), 5))
            attempt("bind", lambda: socket.create_server(("127.0.0.1", 0)))
        """, str(port))
    assert got == {"connect": "PermissionError", "bind": "PermissionError"}


@needs_landlock
def test_children_inherit_and_signals_stay_inside(dirs: dict[str, Path]) -> None:
    got = run_confined(dirs, """
        import signal
        def child(path):
            code = f"open({path!r}).read()"
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if run.returncode:
                raise PermissionError(run.stderr) if "PermissionError" in run.stderr else OSError()
        attempt("child_reads_bundle", lambda: child(os.path.join(bundle, "model.txt")))
        attempt("child_reads_outside", lambda: child(os.path.join(outside, "secret.txt")))
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        attempt("signal_child", lambda: (os.kill(sleeper.pid, signal.SIGTERM), sleeper.wait()))
        attempt("signal_self", lambda: os.kill(os.getpid(), 0))
        attempt("signal_parent", lambda: os.kill(os.getppid(), 0))
    """)
    parent = "PermissionError" if STATE.abi >= 6 else "ok"
    assert got == {"child_reads_bundle": "ok", "child_reads_outside": "PermissionError",
                   "signal_child": "ok", "signal_self": "ok", "signal_parent": parent}


@needs_landlock
@pytest.mark.skipif(importlib.util.find_spec("numpy") is None, reason="numpy not installed")
def test_numpy_imports_and_runs_after_confine(dirs: dict[str, Path]) -> None:
    got = run_confined(dirs, """
        def use_numpy():
            import numpy
            assert numpy.ones(3).sum() == 3.0
        attempt("numpy", use_numpy)
    """)
    assert got == {"numpy": "ok"}


@needs_landlock
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_torch_imports_and_runs_after_confine(dirs: dict[str, Path]) -> None:
    got = run_confined(dirs, """
        def use_torch():
            import torch
            assert (torch.ones(2) + 1).tolist() == [2.0, 2.0]
        attempt("torch", use_torch)
    """)
    assert got == {"torch": "ok"}


@needs_landlock
def test_every_capability_is_dropped(dirs: dict[str, Path]) -> None:
    got = run_confined(dirs, """
        import socket
        status = dict(line.split(":\t") for line in open("/proc/self/status").read().splitlines()
                      if line.startswith("Cap"))
        for name in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
            results[name] = status[name]
        attempt("raw_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW,
                                                    socket.IPPROTO_ICMP).close())
        path = os.path.join(scratch, "owned.txt")
        open(path, "w").close()
        attempt("chown", lambda: os.chown(path, 12345, 12345))
        attempt("setuid", lambda: os.setuid(12345))
    """)
    if os.geteuid() != 0:
        del got["CapBnd"]  # emptying the bounding set needs CAP_SETPCAP: root only
    zero = "0" * 16
    assert got == {"CapEff": zero, "CapPrm": zero, "CapInh": zero, "CapAmb": zero,
                   "raw_socket": "PermissionError", "chown": "PermissionError",
                   "setuid": "PermissionError"} | ({"CapBnd": zero} if os.geteuid() == 0 else {})
    assert os.stat(dirs["scratch"] / "owned.txt").st_uid == os.geteuid()


@needs_landlock
def test_refuses_a_multithreaded_process(dirs: dict[str, Path]) -> None:
    code = ("import threading, time; threading.Thread(target=time.sleep, args=(5,), daemon=True)"
            ".start()\nfrom portable_models.isolation import sandbox\ntry:\n    sandbox.confine()\n"
            "except sandbox.SandboxError as exc:\n    print(exc.code)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "sandbox_failed", out.stderr


def test_switched_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORTABLE_MODELS_SANDBOX", "off")
    state = status()
    assert not state.available
    assert "PORTABLE_MODELS_SANDBOX=off" in state.reason
    with pytest.raises(SandboxError, match="PORTABLE_MODELS_SANDBOX=off") as info:
        confine(read=["/"])  # raises before touching this process
    assert info.value.code == "sandbox_failed"


def test_import_is_light() -> None:
    heavy = ("numpy", "torch", "tensorflow", "onnxruntime", "onnx", "coremltools", "jax")
    code = (f"import sys, portable_models.isolation.sandbox; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
