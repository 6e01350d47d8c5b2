"""`make bench`: what portable_models adds on top of the converters, as ratios measured in
one run on this machine. Results: bench/results/bench.json and bench.md.

1. cold `import portable_models` (target < 100 ms, no heavy module imported);
2. export + verify of the demo to all five targets, sequential (first exports: cold cache,
   cold workers), against the same converter and runtime calls replayed directly in one
   process (bench/direct.py) (target <= 1.15x);
3. --jobs 2 against sequential (target <= 0.75x);
   2 and 3 are measured in ROUNDS rounds of three runs (a sequential export, the replay, a
   jobs=2 export): the gate is the median of the rounds' ratios. The first round's sequential
   export is the bench's first (it makes the bundle the rest of the bench uses, and reads the
   converters from disk if nothing has yet: a cost only that round's ratio carries); from the
   second round on it runs in the middle, the other two on either side, flipping from one
   round to the next;
4. re-export of the unchanged model against the first export (cache; target <= 5%);
5. verify against the runtimes' own load + run time (target <= 1.2x): warm (bench/direct.py
   runs a `pm.verify` with warm workers and a direct pass loading and running the same
   artifacts back to back, WARM_PAIRS times: the median of the pairs' ratios) for the demo and
   for a larger CNN (onnx, torchscript), and as a cold `portable-models verify` against a
   fresh process importing, loading and running them. The verify is the default one: on this
   2-core machine two workers run the artifacts side by side, one thread each, while the direct
   pass runs them one after another on the runtimes' own thread counts; the demo's verify with
   --jobs 1 (one worker, one artifact at a time; its own workers, after the default's pairs)
   is shown, not gated. The cold verify and its floor are timed as whole processes,
   COLD_PAIRS pairs back to back (the order flipping): the median of the pairs' ratios;
6. the caller's peak RSS growth during an export (target < 100 MB);
7. `portable-models diagnose` of the demo (all five targets) against `portable-models verify`,
   both fresh processes, DIAGNOSE_PAIRS pairs (target <= 3x; the median of the pairs);
8. the demo's quantised variants (ONNX, TFLite, ExecuTorch; int8-weight, int8-dynamic, int8)
   against its fp32 artifacts: size ratio and p50 latency ratio, same runtime, same run (shown).

It prints each step's seconds as it goes (the whole run took 6-9 min here, with the VM's speed,
most of it the converters' own time: nine first exports of the demo or their direct replays at
13-45 s each; PM_BENCH_ROUNDS=1 saves two thirds of that part and gives single-round export
ratios).

Ratios of runs made back to back are the gate because this VM's speed drifts by +-30 % within
seconds (the same pure-Python loop, alone, takes 3.9-5.8 s): the two runs of a pair meet the
same speed, while the best of each side can come from different moments. The best against the
best is printed beside each paired ratio.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HEAVY = ("torch", "tensorflow", "keras", "coremltools", "onnxruntime", "executorch")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
#: warm verifies right after the export (the export + verify row): the best one counts.
VERIFY_TRIES = 3
#: warm verify / direct pass pairs: at ~0.1 s a pass, single runs on this VM vary by +-30 %, and
#: the median of 25 pairs still moved by +-0.05 from one run to the next (~0.5 s a pair).
WARM_PAIRS = 60
#: rounds of (sequential export, direct replay, jobs=2 export), each export a first one (fresh
#: cache, cold workers). A round costs two demo exports and a replay (1-2 min here). One
#: round's export ratio moves by +-0.09 (sd) from run to run on this VM for the same code, and
#: one slow moment can put a single round's jobs=2 ratio at 0.88: the median of three keeps it
#: out. PM_BENCH_ROUNDS=1 is quicker and noisier.
ROUNDS = max(1, int(os.environ.get("PM_BENCH_ROUNDS", "3")))
#: cold verify / cold floor pairs (whole processes, ~12-15 s each side here)
COLD_PAIRS = 3
#: cold diagnose / cold verify pairs of the demo bundle (whole processes)
DIAGNOSE_PAIRS = 2
#: timed runs per artifact for the variant rows
VARIANT_RUNS = 50


def cold_import_ms(runs: int = 7) -> tuple[float, list[str]]:
    code = ("import sys,time;t=time.perf_counter();import portable_models;"
            "print((time.perf_counter()-t)*1000);"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    times, heavy = [], []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        lines = [*out.stdout.splitlines(), ""]
        times.append(float(lines[0]))
        heavy = [m for m in lines[1].split(",") if m]
    return statistics.median(times), heavy


class RssSampler(threading.Thread):
    """Peak resident memory of this process while running, sampled every 20 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.start_rss = self.peak = self.proc.memory_info().rss
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def growth_mb(self) -> float:
        self.stopped.set()
        self.join()
        return (self.peak - self.start_rss) / 2**20


def larger_model() -> tuple[Any, Any]:
    """A CNN with real work per run (~2 G multiply-adds on 3x224x224, 0.5 M parameters), so that
    the warm verify is also compared where the runtimes' time is not a few milliseconds."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 4, stride=4), nn.ReLU()]  # 56x56 from here on
    for cin, cout in ((64, 128), (128, 128), (128, 128), (128, 128)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 100)).eval()
    return model, torch.rand(1, 3, 224, 224)


def best_verify_s(bundle: Path) -> tuple[float, bool]:
    """The best of VERIFY_TRIES warm verifies, and whether they passed."""
    import portable_models as pm

    times, ok = [], True
    for _ in range(VERIFY_TRIES):
        start = time.perf_counter()
        ok = pm.verify(bundle).ok and ok
        times.append(time.perf_counter() - start)
    return min(times), ok


def timed_export(out: Path, *, jobs: int = 1, cache_dir: Path | None = None) -> tuple[Any, float]:
    """Export the demo; ``cache_dir``: a fresh (cold) cache for this run, else the current one."""
    from portable_models.demo import run_demo

    if cache_dir is not None:
        os.environ["PORTABLE_MODELS_CACHE"] = str(cache_dir)
    start = time.perf_counter()
    bundle = run_demo(out, jobs=jobs)
    return bundle, time.perf_counter() - start


def breakdown(contract: Any) -> list[dict[str, Any]]:
    rows = []
    for a in contract.artifacts:
        rows.append({"target": a.key, "route": a.route_name, "status": a.status,
                     "attempts": [f"{t.route}:{t.status}" for t in a.attempts],
                     "seconds": round(sum(t.seconds for t in a.attempts), 2),
                     "convert_s": a.timings.get("convert_s"), "load_s": a.timings.get("load_s")})
    return rows


def _direct(bundle: Path, *flags: str) -> Any:
    out = subprocess.run([sys.executable, str(HERE / "direct.py"), str(bundle), *flags],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _process_s(*args: str) -> float:
    """A fresh process, start to exit."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True)
    return time.perf_counter() - start


def cold_verify_pairs(bundle: Path) -> tuple[list[float], list[float]]:
    """`portable-models verify` in a fresh process, as CI runs it (imports included), and its
    floor, a fresh process importing each runtime and loading and running the same artifacts
    (bench/direct.py --runtimes), back to back COLD_PAIRS times, the order flipping."""
    cli = ("-m", "portable_models.cli", "verify", str(bundle), "-q")
    floor = (str(HERE / "direct.py"), str(bundle), "--runtimes")
    verify, direct = [], []
    for n in range(COLD_PAIRS):
        if n % 2 == 0:
            verify.append(_process_s(*cli))
            direct.append(_process_s(*floor))
        else:
            direct.append(_process_s(*floor))
            verify.append(_process_s(*cli))
    return verify, direct


def variant_rows(work: Path) -> list[dict[str, Any]]:
    """The demo model's quantised variants against its fp32 artifact, same runtime, same run:
    size ratio and latency ratio (the bench's p50, VARIANT_RUNS runs) per (target, variant)."""
    import torch

    import portable_models as pm
    from portable_models.benchmark import bench
    from portable_models.demo import build_demo_model

    model, example = build_demo_model()
    g = torch.Generator().manual_seed(1)
    calibration = [{"image": torch.rand(2, 3, 32, 32, generator=g).numpy()} for _ in range(16)]
    made = pm.export(model, (example,), out=work / "variants", targets=["onnx", "tflite", "executorch"],
                     precision=["fp32", "int8-weight", "int8-dynamic", "int8"], calibration=calibration,
                     input_names=["image"], input_ranges={"image": (0.0, 1.0)}, name="demo-variants")
    contract = bench(made.path, runs=VARIANT_RUNS)
    arts = {a.key: a for a in contract.artifacts}
    rows = []
    for art in contract.artifacts:
        twin = arts.get(art.target)
        if art.precision == "float32" or twin is None:
            continue
        row: dict[str, Any] = {"target": art.target, "variant": art.precision, "status": art.status}
        if art.status != "pass" and art.attempts:
            row["why"] = str((art.attempts[-1].error or {}).get("message", ""))[:160]
        mine, base = art.timings.get("bench") or {}, twin.timings.get("bench") or {}
        if art.bytes and twin.bytes:
            row["size_ratio"] = round(art.bytes / twin.bytes, 3)
        if mine.get("p50_ms") and base.get("p50_ms"):
            row.update(p50_ms=mine["p50_ms"], fp32_p50_ms=base["p50_ms"],
                       latency_ratio=round(mine["p50_ms"] / base["p50_ms"], 3), runtime=mine.get("runtime"))
        rows.append(row)
    for key in (contract.options or {}).get("not_built") or []:
        rows.append({"target": key["target"], "variant": key["precision"], "status": "not built"})
    return rows


def diagnose_pairs(bundle: Path) -> tuple[list[float], list[float]]:
    """`portable-models diagnose` (every artifact, case 0) and `portable-models verify`, each a
    fresh process, back to back DIAGNOSE_PAIRS times, the order flipping."""
    verify = ("-m", "portable_models.cli", "verify", str(bundle), "-q")
    diagnose = ("-m", "portable_models.cli", "diagnose", str(bundle), "-q")
    d, v = [], []
    for n in range(DIAGNOSE_PAIRS):
        for which in ((diagnose, verify) if n % 2 == 0 else (verify, diagnose)):
            (d if which is diagnose else v).append(_process_s(*which))
    return d, v


class Steps:
    """Each step's seconds, printed to stderr as the bench goes."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self.last, 1)
        print(f"[{now - self.start:6.0f} s] {name}: {now - self.last:.1f} s", file=sys.stderr, flush=True)
        self.last = now


def _runs(values: list[float], digits: int = 1) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def _warm(w: dict[str, Any]) -> str:
    """The best of each side and the medians, and the spread of the pairs' ratios."""
    ratios = sorted(w["pair_ratios"])
    return (f"best {w['verify_s']:.3f} s vs runtimes {w['runtimes_warm_s']:.3f} s, medians "
            f"{statistics.median(w['verify_runs_s']):.3f} s vs {statistics.median(w['runtimes_warm_runs_s']):.3f} s, "
            f"pairs' ratios {ratios[0]:.2f}-{ratios[-1]:.2f}")


def main() -> int:
    import portable_models as pm
    from portable_models.isolation.pool import shutdown_workers

    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pm-bench-"))
    os.environ["PORTABLE_MODELS_CACHE"] = str(work / "cache")
    r: dict[str, Any] = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpus": os.cpu_count(),
                         "rounds": ROUNDS}
    steps = Steps()
    try:
        r["import_ms"], r["heavy_modules_imported"] = cold_import_ms()
        steps.done("cold import")
        import torch  # the caller has torch and its model in memory before exporting

        from portable_models.demo import build_demo_model

        build_demo_model()
        seq: list[float] = []
        par: list[float] = []
        replays: list[dict[str, Any]] = []
        bundle = None

        def sequential(n: int) -> None:
            nonlocal bundle
            shutdown_workers()  # a first export in a fresh process: no warm worker
            sampler = RssSampler() if n == 0 else None
            if sampler:
                sampler.start()
            made, seconds = timed_export(work / f"seq{n}", cache_dir=work / f"cache-seq{n}")
            seq.append(seconds)
            if sampler:
                bundle = made
                r["caller_rss_growth_mb"] = round(sampler.growth_mb(), 1)
            steps.done("sequential export")
            if n == 0:
                # the same script verifies (the workers are warm); best of 3, like the floor's
                r["verify_s"], r["verify_ok"] = best_verify_s(made.path)
                _, r["export_cached_s"] = timed_export(work / "cached")
                # the same re-export with the capture in this process: torch's export
                # machinery stays imported here after the first such capture
                os.environ["PORTABLE_MODELS_CAPTURE"] = "inprocess"
                timed_export(work / "cached-inprocess-warm")
                _, r["export_cached_inprocess_s"] = timed_export(work / "cached-inprocess")
                del os.environ["PORTABLE_MODELS_CAPTURE"]
                steps.done("warm verify, cached re-exports")

        def replay(n: int) -> None:
            shutdown_workers()
            assert bundle is not None
            replays.append(_direct(bundle.path))
            steps.done("direct replay")

        def jobs2(n: int) -> None:
            shutdown_workers()
            par.append(timed_export(work / f"par{n}", jobs=2, cache_dir=work / f"cache-par{n}")[1])
            steps.done("jobs=2 export")

        # the sequential export next to the replay it is compared with in every round; the
        # replay's side of it flips from one round to the next
        for n in range(ROUNDS):
            order = ((sequential, replay, jobs2) if n == 0 else
                     (replay, sequential, jobs2) if n % 2 else (jobs2, sequential, replay))
            for step in order:
                step(n)
        shutdown_workers()
        assert bundle is not None
        r["bundle_ok"] = bundle.ok
        r["breakdown"] = breakdown(bundle.contract)
        r["export_seq_runs_s"], r["export_jobs2_runs_s"] = seq, par
        r["export_jobs2_s"], r["export_seq_best_s"] = min(par), min(seq)
        r["direct_runs_total_s"] = [d["total_s"] for d in replays]
        r["direct"] = direct = min(replays, key=lambda d: float(d["total_s"]))
        r["export_vs_direct_rounds"] = [(s + r["verify_s"]) / (d["total_s"] + d["runtime_s"])
                                        for s, d in zip(seq, replays, strict=True)]
        r["jobs2_vs_seq_rounds"] = [p / s for p, s in zip(par, seq, strict=True)]
        # the default verify, then one with one worker, one artifact at a time (shown, not a
        # gate: what the two workers side by side save)
        r["warm"], r["warm_jobs1"] = _direct(bundle.path, "--verify-warm", str(WARM_PAIRS), "--jobs", "default,1")
        steps.done("warm verify pairs, demo")
        r["verify_cold_runs_s"], r["runtimes_cold_runs_s"] = cold_verify_pairs(bundle.path)
        r["verify_cold_pair_ratios"] = [v / d for v, d in zip(r["verify_cold_runs_s"], r["runtimes_cold_runs_s"],
                                                              strict=True)]
        steps.done("cold verify pairs")
        r["diagnose_cold_runs_s"], r["diagnose_verify_runs_s"] = diagnose_pairs(bundle.path)
        r["diagnose_pair_ratios"] = [d / v for d, v in zip(r["diagnose_cold_runs_s"], r["diagnose_verify_runs_s"],
                                                           strict=True)]
        steps.done("diagnose / verify pairs")
        r["variants"] = variant_rows(work)
        steps.done("quantised variants: export, bench")
        # warm verify where the runtimes have real work: the fixed cost per artifact matters less
        big, big_example = larger_model()
        larger = pm.export(big, (big_example,), out=work / "larger", targets=["onnx", "torchscript"],
                           input_names=["image"], input_ranges={"image": (0.0, 1.0)})
        r["larger_bundle_ok"] = larger.ok
        (r["larger_warm"],) = _direct(larger.path, "--verify-warm", str(WARM_PAIRS))
        steps.done("larger CNN: export, warm verify pairs")
        del torch
    finally:
        shutil.rmtree(work, ignore_errors=True)
    r["steps_s"] = steps.seconds
    r["total_s"] = round(time.perf_counter() - steps.start, 1)
    best = {  # the best run of each side against the other's (printed, not the gate)
        "export+verify / direct calls": (r["export_seq_best_s"] + r["verify_s"])
        / (direct["total_s"] + direct["runtime_s"]),
        "jobs=2 / sequential": r["export_jobs2_s"] / r["export_seq_best_s"],
        "verify / runtimes' load+run (warm)": r["warm"]["verify_s"] / r["warm"]["runtimes_warm_s"],
        "verify / runtimes' load+run (warm), larger CNN (onnx, torchscript)":
            r["larger_warm"]["verify_s"] / r["larger_warm"]["runtimes_warm_s"],
        "verify CLI / runtimes' import+load+run (cold)": min(r["verify_cold_runs_s"]) / min(r["runtimes_cold_runs_s"]),
        "diagnose CLI (all targets) / verify CLI (cold)": min(r["diagnose_cold_runs_s"])
        / min(r["diagnose_verify_runs_s"]),
    }
    med = statistics.median
    ratios = {
        "export+verify / direct calls": (med(r["export_vs_direct_rounds"]), 1.15),
        "jobs=2 / sequential": (med(r["jobs2_vs_seq_rounds"]), 0.75),
        "cached re-export / first export": (r["export_cached_s"] / r["export_seq_best_s"], 0.05),
        "cached re-export, in-process capture / first export": (r["export_cached_inprocess_s"]
                                                                / r["export_seq_best_s"], 0.05),
        "verify / runtimes' load+run (warm)": (med(r["warm"]["pair_ratios"]), 1.2),
        "verify / runtimes' load+run (warm), larger CNN (onnx, torchscript)": (
            med(r["larger_warm"]["pair_ratios"]), 1.2),
        "verify CLI / runtimes' import+load+run (cold)": (med(r["verify_cold_pair_ratios"]), 1.2),
        "diagnose CLI (all targets) / verify CLI (cold)": (med(r["diagnose_pair_ratios"]), 3.0),
    }
    r["ratios"] = {k: {"value": round(v, 3), "target": t, "met": v <= t,
                       **({"best_vs_best": round(best[k], 3)} if k in best else {})}
                   for k, (v, t) in ratios.items()}
    shown = {"verify --jobs 1 / runtimes' load+run (warm)": (med(r["warm_jobs1"]["pair_ratios"]),
                                                             r["warm_jobs1"]["verify_s"]
                                                             / r["warm_jobs1"]["runtimes_warm_s"])}
    r["shown"] = {k: {"value": round(v, 3), "best_vs_best": round(b, 3)} for k, (v, b) in shown.items()}
    (RESULTS / "bench.json").write_text(json.dumps(r, indent=2, default=str) + "\n")
    table = ["| measure | value | target | met | best vs best |", "|---|---|---|---|---|",
             f"| cold `import portable_models` | {r['import_ms']:.1f} ms | < 100 ms | {r['import_ms'] < 100} | |",
             f"| heavy modules imported | {', '.join(r['heavy_modules_imported']) or 'none'} | none | "
             f"{not r['heavy_modules_imported']} | |",
             f"| caller RSS growth during export | {r['caller_rss_growth_mb']} MB | < 100 MB | "
             f"{r['caller_rss_growth_mb'] < 100} | |"]
    table += [f"| {k} | {v['value']:.3f} | <= {v['target']} | {v['met']} | "
              f"{'' if 'best_vs_best' not in v else format(v['best_vs_best'], '.3f')} |" for k, v in r["ratios"].items()]
    table += [f"| {k} | {v['value']:.3f} | (shown) | | {v['best_vs_best']:.3f} |" for k, v in r["shown"].items()]
    table += ["", f"export {r['export_seq_best_s']:.1f} s, verify {r['verify_s']:.2f} s (CLI, cold: "
              f"{_runs(r['verify_cold_runs_s'])} s), jobs=2 {r['export_jobs2_s']:.1f} s, cached {r['export_cached_s']:.2f} s "
              f"(in-process capture: {r['export_cached_inprocess_s']:.2f} s); "
              f"direct: capture {direct['capture_s']:.1f} s, convert {direct['convert_s']:.1f} s, runtimes "
              f"{direct['runtime_s']:.2f} s (cold process, with imports: {_runs(r['runtimes_cold_runs_s'])} s); "
              f"warm verify {_warm(r['warm'])}; with --jobs 1: {_warm(r['warm_jobs1'])}; "
              f"larger CNN: warm verify {_warm(r['larger_warm'])}; "
              f"runs (s): sequential {_runs(r['export_seq_runs_s'])}, "
              f"jobs=2 {_runs(r['export_jobs2_runs_s'])}, direct {_runs(r['direct_runs_total_s'])}; rounds' ratios: "
              f"export+verify/direct {_runs(r['export_vs_direct_rounds'], 3)}, jobs=2/sequential "
              f"{_runs(r['jobs2_vs_seq_rounds'], 3)}; cold verify/floor pairs {_runs(r['verify_cold_pair_ratios'], 3)}; "
              f"diagnose {_runs(r['diagnose_cold_runs_s'])} s against verify {_runs(r['diagnose_verify_runs_s'])} s",
              "", f"bench: {r['total_s']:.0f} s, {ROUNDS} round(s): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in r["steps_s"].items())]
    table += ["", "| variant (demo) | size / fp32 | p50 latency / fp32 (same runtime, same run) | status |",
              "|---|---|---|---|"]
    table += [f"| {v['target']} {v['variant']} | {v.get('size_ratio', 'n/a')} | "
              f"{v.get('latency_ratio', 'n/a')}"
              + (f" ({v['p50_ms']:.3f} vs {v['fp32_p50_ms']:.3f} ms)" if "p50_ms" in v else "")
              + f" | {v['status']}{': ' + v['why'] if v.get('why') else ''} |" for v in r["variants"]]
    (RESULTS / "bench.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
