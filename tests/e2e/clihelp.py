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
