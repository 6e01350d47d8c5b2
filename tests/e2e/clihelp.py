"""Run the real CLI as a subprocess, with this folder importable (for ``--class nets:…``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cli_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def cli(*args: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "portable_models.cli", *args], capture_output=True,
                          text=True, env=cli_env(), cwd=cwd, timeout=timeout)


def tagged(var: str, tag: str) -> list[int]:
    """Processes whose environment holds ``var=tag`` (a command's workers inherit it)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"{var}={tag}".encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found
