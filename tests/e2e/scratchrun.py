"""Run shell commands as a user would type them: bash, in a scratch folder, the project's
venv first on PATH, offline.

Offline means a network namespace of its own (``unshare -rn``, only loopback) where the
kernel allows one; elsewhere the libraries' offline switches only (the workers close the
network to converters in any case). ``OFFLINE`` says which one this machine got.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
#: the project's venv (the interpreter running the tests), as ``make`` sets it up
VENV_BIN = Path(sys.executable).parent

#: environment switches that keep well-behaved libraries from downloading anything
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PIP_NO_INDEX": "1"}

#: in the new namespace only loopback exists, and it starts down: bring it up, then run
_NETNS = ["unshare", "-rn", "sh", "-c", 'ip link set lo up 2>/dev/null; exec "$0" "$@"']


def _netns_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run([*_NETNS, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


NETNS = _netns_works()
OFFLINE = "network namespace (unshare -rn)" if NETNS else "offline env switches only (no netns here)"


def user_env() -> dict[str, str]:
    """The environment of a user whose shell has the project's venv activated."""
    env = dict(os.environ, **OFFLINE_ENV)
    env["PATH"] = str(VENV_BIN) + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    env.pop("PYTHONHOME", None)
    return env


@dataclass
class Ran:
    command: str
    cwd: Path
    returncode: int
    output: str
    seconds: float

    def tail(self, chars: int = 4000) -> str:
        return self.output[-chars:]

    def describe(self) -> str:
        text = (f"command: {self.command}\nexit code: {self.returncode} after {self.seconds:.1f} s "
                f"({OFFLINE})\n--- output (tail) ---\n{self.tail()}")
        for name in re.findall(r">\s*([^\s;&|<>]+)", self.command):  # what went to a file instead
            written = self.cwd / name
            if written.is_file():
                text += f"\n--- {name} (tail) ---\n{written.read_text(errors='replace')[-4000:]}"
        return text


def run_bash(command: str, cwd: Path, env: dict[str, str], *, flags: tuple[str, ...] = ("-o", "pipefail"),
             timeout: float = 1200) -> Ran:
    """``bash -c command`` in ``cwd``, stdout and stderr together, offline."""
    argv = ["bash", "--noprofile", "--norc", *flags, "-c", command]
    if NETNS:
        argv = [*_NETNS, *argv]
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the command's whole process group, nothing else
        out, _ = proc.communicate()
        out += f"\n[killed: still running after {timeout:.0f} s]"
        code = -signal.SIGKILL
    return Ran(command, cwd, code, out, time.monotonic() - start)


def tracked_files() -> list[str]:
    """The project's git-tracked files (what a fresh clone holds)."""
    r = subprocess.run(["git", "ls-files", "-z"], cwd=PROJECT, capture_output=True, text=True, check=True)
    return [p for p in r.stdout.split("\0") if p]


def copy_project(dest: Path) -> Path:
    """A scratch copy of the project root: the tracked files as they are in the working tree."""
    for rel in tracked_files():
        src = PROJECT / rel
        if not src.is_file():  # deleted in the working tree, or a submodule
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return dest
