"""`make bench`: measure what portable_models adds on top of the converters.

For now: the cold import time of ``portable_models`` (target: under 100 ms, with no heavy
framework imported). Results go to bench/results/ as JSON and Markdown.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("torch", "tensorflow", "keras", "coremltools", "onnxruntime", "executorch")
RESULTS = Path(__file__).resolve().parent / "results"


def cold_import_ms(runs: int = 7) -> tuple[float, list[str]]:
    code = ("import sys,time;t=time.perf_counter();import portable_models;"
            "print((time.perf_counter()-t)*1000);"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    times, heavy = [], []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        lines = [*out.stdout.splitlines(), ""]
        ms, mods = lines[0], lines[1]
        times.append(float(ms))
        heavy = [m for m in mods.split(",") if m]
    return statistics.median(times), heavy


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    ms, heavy = cold_import_ms()
    results = {"import_ms": round(ms, 1), "import_target_ms": 100, "heavy_modules_imported": heavy,
               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (RESULTS / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    table = ["| measure | value | target |", "|---|---|---|",
             f"| cold `import portable_models` | {ms:.1f} ms | < 100 ms |",
             f"| heavy modules imported | {', '.join(heavy) or 'none'} | none |"]
    (RESULTS / "bench.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0 if ms < 100 and not heavy else 1


if __name__ == "__main__":
    sys.exit(main())
