"""What is installed: converters and runtimes, their versions, and whether they match the
tested matrix. Looks up versions without importing the heavy packages."""

from __future__ import annotations

from portable_models.convert.registry import ROUTES
from portable_models.core.imports import package_version
from portable_models.run.registry import RUNTIMES

__all__ = ["TESTED", "render_doctor"]

#: the versions the test suite runs against (constraints.txt holds the full set).
TESTED = {
    "torch": "2.13.0", "onnx": "1.23.2", "onnxruntime": "1.31.1", "onnxscript": "0.7.2",
    "executorch": "1.5.1", "ai-edge-litert": "2.3.0", "litert-torch": "0.10.0",
    "onnx2tf": "1.28.8", "tensorflow": "2.21.0", "tf-keras": "2.21.0", "keras": "3.15.1",
    "coremltools": "9.0", "tf2onnx": "1.17.0", "numpy": "2.3.5",
}


def render_doctor() -> tuple[str, bool]:
    lines = ["package          installed      tested"]
    for dist, tested in TESTED.items():
        have = package_version(dist)
        mark = "ok" if have.split("+")[0] == tested else ("missing" if not have else "untested")
        lines.append(f"{dist:<16} {have or '-':<14} {tested:<9} {mark}")
    lines.append("\nroutes:")
    ok = True
    for r in ROUTES:
        missing = [d for d in r.requires if not package_version(d)]
        ok = ok and not missing
        state = "ready" if not missing else f"missing {', '.join(missing)}"
        lines.append(f"  {r.target:<12} {r.name:<22} {state}")
    lines.append("\nruntimes:")
    for name, info in RUNTIMES.items():
        missing = [d for d in info.requires if not package_version(d)]
        lines.append(f"  {name:<14} {'ready' if not missing else 'missing ' + ', '.join(missing)}")
    from portable_models.isolation.sandbox import status

    sandbox = status()
    lines.append("\nsandbox for verify/bench: " + (f"active ({sandbox.reason})" if sandbox.available else
                 f"not available ({sandbox.reason}): TorchScript artifacts are skipped unless "
                 "--trust-bundle, other artifacts run unconfined"))
    return "\n".join(lines), ok
