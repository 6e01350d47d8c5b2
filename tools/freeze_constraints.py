"""Print constraints.txt from the running environment: exact versions of everything
installed, torch without its local '+cpu' label (the local wheel still satisfies it)."""

from __future__ import annotations

import subprocess
import sys

HEADER = """\
# The exact set the test suite runs against, installed together on Linux x86_64, Python 3.11.
# Regenerate with `make constraints` after a deliberate upgrade. Never let torch float:
# torch 2.13.0 is a local CPU wheel; an unpinned torch pulls gigabytes of CUDA packages.
# Notes: xdsl (via litert-torch) pins typing-extensions<4.13; cattrs 25.2 (coremltools) accepts
# that, newer cattrs does not. tf_keras depends on 'tensorflow' (same version and files as
# tensorflow-cpu). numpy stays below 2.4 (coremltools 9.0 breaks on 2.4).
"""


def main() -> int:
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                            check=True, capture_output=True, text=True).stdout.splitlines()
    lines = [ln.replace("+cpu", "") for ln in frozen if ln and not ln.startswith(("portable", "-e"))]
    sys.stdout.write(HEADER + "\n".join(sorted(lines, key=str.lower)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
