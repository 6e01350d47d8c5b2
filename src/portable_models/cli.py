"""The command line: ``portable-models convert|verify|inspect|doctor|demo``.

Exit codes: 0 all requested targets converted and passed; 1 some target failed parity
or conversion; 2 bad usage or bad input (the message names the file and the fix).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any, TextIO

from portable_models._version import __version__
from portable_models.errors import PortableModelsError
from portable_models.progress import Progress

__all__ = ["main", "build_parser"]

EPILOG = """examples:
  portable-models demo --out dist/demo
  portable-models convert model.pt2 --out dist/net
  portable-models verify dist/demo --format junit > parity.xml
  portable-models inspect dist/demo
  portable-models bench dist/demo
  portable-models diagnose dist/demo
  portable-models doctor
"""


def _show_logs(bundle_dir: Any, stream: TextIO) -> None:
    """-v: everything the converters printed (it is in the bundle's logs/ as well)."""
    from pathlib import Path

    for log in sorted(Path(bundle_dir, "logs").glob("*.log")):
        print(f"----- {log.name} -----", file=stream)
        stream.write(log.read_text(errors="replace"))


def _report(obj: Any, fmt: str, problems: list[str] | None = None) -> str:
    from portable_models.contract.reports import render

    return render(obj.contract, fmt, problems=problems)


def cmd_demo(args: argparse.Namespace) -> int:
    from portable_models.demo import run_demo
    from portable_models.rerun import verify

    out, shown = args.out, args.out_given
    print(f"portable_models {__version__} demo: a small CNN (batch norm, dynamic batch) -> {shown}",
          file=sys.stderr)
    progress = Progress(sys.stderr, args.quiet)
    try:
        bundle = run_demo(out, progress=progress, jobs=args.jobs)
    finally:
        progress.close()
    if getattr(args, "verbose", False):
        _show_logs(out, sys.stderr)
    print(f"\nexported {shown}; verifying from the bundle alone …", file=sys.stderr)
    report = verify(out, allow_unverified=args.allow_unverified or ())
    sys.stdout.write(_report(report, args.format, report.problems))
    _verify_summary(report, args)
    return 0 if bundle.passed(args.allow_unverified or ()) and report.ok else 1


def cmd_convert(args: argparse.Namespace) -> int:
    from portable_models.core.tolerance import DEFAULT_TOLERANCES
    from portable_models.fromfile import tolerance_overrides

    tol = tolerance_overrides({"atol": args.atol or [], "rtol": args.rtol or []})
    defaults = dict(DEFAULT_TOLERANCES)
    if tol["defaults"]:
        import dataclasses

        defaults["float32"] = dataclasses.replace(defaults["float32"], **tol["defaults"])
    routes = {}
    for item in args.route or []:
        target, sep, route = item.partition("=")
        if not sep:
            from portable_models.errors import UsageError

            raise UsageError(f"--route {item!r} is not TARGET=ROUTE", fix="for example --route tflite=onnx2tf")
        routes[target] = route
    progress = Progress(sys.stderr, args.quiet)
    try:
        bundle = _export_file(args, tol, defaults, routes, progress)
    finally:
        progress.close()
    if getattr(args, "verbose", False):
        _show_logs(args.out, sys.stderr)
    sys.stdout.write(_report(bundle, args.format))
    if bundle.diagnosis:  # where each failing artifact first diverges (reports/diagnose.json)
        from portable_models.diagnosis import summary

        (sys.stdout if args.format == "table" else sys.stderr).write("\n" + summary(bundle.diagnosis))
    return 0 if bundle.passed(args.allow_unverified or ()) else 1


def _export_file(args: argparse.Namespace, tol: dict[str, Any], defaults: dict[str, Any],
                 routes: dict[str, str], progress: Progress) -> Any:
    from portable_models.core.spec import parse_dynamic_option, parse_input_option
    from portable_models.core.tolerance import TolerancePolicy
    from portable_models.fromfile import export_file

    return export_file(
        args.src, out=args.out, inputs=[parse_input_option(t) for t in args.input or []],
        dynamic=[parse_dynamic_option(t) for t in args.dynamic or []], model_class=args.model_class,
        samples=args.samples, calibration=args.calibration, eval_file=args.eval, trust=args.trust_model,
        targets=args.targets or "all",
        cases=args.cases, precision=args.precision, timeout_s=args.timeout, jobs=args.jobs,
        memory_mb=args.memory_limit, overwrite=args.overwrite, routes=routes,
        tolerance=TolerancePolicy(defaults=defaults, per_output=tol["per_output"]),
        progress=progress, name=args.name, cache=not args.no_cache, diagnose=not args.no_diagnose,
    )


def cmd_verify(args: argparse.Namespace) -> int:
    from portable_models.rerun import verify

    report = verify(args.bundle, targets=args.targets or None, allow_unverified=args.allow_unverified or (),
                    timeout_s=args.timeout, compute_units=args.compute_units, jobs=args.jobs,
                    trust_bundle=args.trust_bundle)
    sys.stdout.write(_report(report, args.format, report.problems))
    _verify_summary(report, args)
    return 0 if report.ok else 1


def _verify_summary(report: Any, args: argparse.Namespace) -> None:
    """How many artifacts ran, where, and what fails nothing but is worth knowing (stderr:
    stdout may be a report file)."""
    from portable_models.core.text import escape

    if getattr(args, "quiet", False):
        return
    print(f"\n{report.summary()}", file=sys.stderr)
    for note in report.notes[:20]:
        print(f"note: {escape(note)}", file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> int:
    from portable_models.benchmark import bench
    from portable_models.compare.check import checking_runtime
    from portable_models.core.targets import TARGET_INFO
    from portable_models.core.text import escape

    contract = bench(args.bundle, runs=args.runs, warmup=args.warmup, threads=args.threads,
                     targets=args.targets, write=not args.no_write, timeout_s=args.timeout,
                     trust_bundle=args.trust_bundle)
    print(f"{'target':<14} {'runtime':<28} {'load':>9} {'p50':>10} {'p90':>10} {'min':>10} threads")
    failed = False
    for a in contract.artifacts:
        b = a.timings.get("bench")
        runtime = TARGET_INFO[a.target].runtime
        if not b and a.file is not None and checking_runtime(runtime) != runtime:
            print(f"{escape(a.key):<14} {runtime:<28} n/a off macOS (the MIL reference executor's time "
                  "says nothing about Apple's runtime)")
            continue
        if not b:
            continue
        if "error" in b:
            failed = True
            print(f"{escape(a.key):<14} {escape(b['runtime']):<28} error: {escape(b['error'], limit=500)}")
            continue
        print(f"{escape(a.key):<14} {escape(b['runtime']):<28} {b['load_s'] * 1000:7.1f} ms {b['p50_ms']:7.3f} ms "
              f"{b['p90_ms']:7.3f} ms {b['min_ms']:7.3f} ms {b['threads']}")
    return 1 if failed else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from portable_models.contract.model import load_contract
    from portable_models.core.text import escape as e

    c = load_contract(args.bundle)
    print(f"{e(c.name)}: {e(c.source['framework'])} {e(c.source['version'])}, {c.golden['cases']} golden cases")
    for label, specs in (("inputs", c.inputs), ("outputs", c.outputs)):
        print(f"{label}:")
        for s in specs:
            rng = f" range {list(s.range)}" if s.range else ""
            print(f"  {e(s.name)}: {s.dtype} {e(str(list(s.shape)))} {s.layout or ''}{rng}".rstrip())
    for a in c.artifacts:
        print(f"\n[{e(a.key)}] {e(a.status)} via {e(a.route_name or '-')}: {e(a.file or 'no artifact kept')}")
        if a.io:
            for kind, binds in (("feed", a.io.inputs), ("read", a.io.outputs)):
                for logical, b in binds.items():
                    perm = f" perm {list(b.perm)}" if b.perm else ""
                    layout = f" layout {e(b.layout)}" if b.layout else ""
                    print(f"  {kind} {e(logical)} as '{e(b.name)}'{layout}{perm}")
        for att in a.attempts:
            msg = str((att.error or {}).get("message", ""))
            print(f"  attempt {e(att.route)}: {e(att.status)}{' at ' + e(att.stage) if att.stage else ''}"
                  f"{': ' + e(msg.splitlines()[0][:160]) if msg else ''}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    import json

    from portable_models.diagnosis import diagnose

    report = diagnose(args.bundle, targets=args.targets, case=args.case, timeout_s=args.timeout,
                      trust_bundle=args.trust_bundle)
    if args.format == "json":
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(report.table())
    return 1 if report.diverged else 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from portable_models.doctor import render_doctor

    text, ok = render_doctor()
    print(text)
    return 0 if ok else 1


_ALLOW_HELP = ("let these targets pass the gate while 'unverified' (converted and checked "
               "structurally, but not run here), e.g. coreml; by default unverified fails")
_TRUST_HELP = ("run artifacts whose loading runs code (TorchScript) even where no OS sandbox "
               "confines them: only for a bundle you made or trust (SECURITY.md)")
_LIST_HELP = " (space- or comma-separated: 'onnx tflite' or 'onnx,tflite')"


class _ListAction(argparse.Action):
    """A list option that takes what users type: ``--targets onnx tflite``,
    ``--targets onnx,tflite`` or both mixed; each item checked against ``items``."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, items: Sequence[str] | None = None,
                 **kwargs: Any) -> None:
        self.items = tuple(items) if items else None
        kwargs.setdefault("nargs", "+")
        kwargs["help"] = (kwargs.get("help") or "") + _LIST_HELP
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        out = [v.strip() for value in values for v in str(value).split(",") if v.strip()]
        if not out:
            parser.error(f"{option_string}: give at least one value")
        bad = [v for v in out if self.items is not None and v not in self.items]
        if bad:
            parser.error(f"{option_string}: invalid choice(s) {', '.join(map(repr, bad))} "
                         f"(choose from {', '.join(self.items or ())})")
        setattr(namespace, self.dest, out)


def build_parser() -> argparse.ArgumentParser:
    from portable_models.run.base import COMPUTE_UNITS

    p = argparse.ArgumentParser(prog="portable-models", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Export models to ONNX, TFLite, Core ML, TorchScript and "
                                "ExecuTorch, run each artifact in its real runtime, prove parity.")
    p.add_argument("--version", action="version", version=f"portable-models {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the result")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of errors")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="print only the result")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks of errors")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = {"choices": ("table", "json", "junit", "md", "html"), "default": "table", "help": "report format"}

    d = sub.add_parser("demo", parents=[common], help="the built-in example, end to end",
                       epilog="example:\n  portable-models demo --out dist/demo",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--out", default="dist/demo", help="bundle folder (replaced if it exists)")
    d.add_argument("--jobs", type=int, default=1, help="targets converted at once")
    d.add_argument("--format", **fmt)  # type: ignore[arg-type]
    d.add_argument("--allow-unverified", action=_ListAction, metavar="TARGET", help=_ALLOW_HELP)
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("convert", parents=[common], help="convert a saved model to every target and prove parity",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  portable-models convert model.pt2 --out dist/net\n"
        "  portable-models convert weights.pt --class mypkg.nets:TinyNet \\\n"
        "      --input image:2x3x32x32:float32:0..1 --dynamic image:0:batch:1..32 --out dist/net\n"
        "  portable-models convert model.keras --out dist/k --targets tflite onnx --precision fp16\n"
        "  portable-models convert ids.pt2 --input ids:2x16:int64:0..999 --atol logits=1e-3 --out d")
    c.add_argument("src", help=".pt2, TorchScript .pt, state dict (.pt/.pth/.safetensors) with --class, "
                   ".keras, .h5, SavedModel folder (format detected from content)")
    c.add_argument("--out", required=True, help="bundle folder")
    c.add_argument("--targets", action=_ListAction, metavar="TARGET",
                   help="default: all (onnx torchscript executorch tflite coreml)")
    c.add_argument("--input", action="append", metavar="NAME:SHAPE:DTYPE[:LOW..HIGH]",
                   help="an input and its value range, e.g. image:2x3x32x32:float32:0..1 (repeatable)")
    c.add_argument("--dynamic", action="append", metavar="NAME:AXIS:LABEL[:MIN..MAX]",
                   help="a dynamic axis, e.g. image:0:batch:1..32 (repeatable)")
    c.add_argument("--class", dest="model_class", metavar="MODULE:CLASS",
                   help="the model class for a state dict (constructed with no arguments)")
    c.add_argument("--samples", metavar="FILE.npz", help="real sample inputs (better than random data)")
    c.add_argument("--cases", type=int, default=4, help="golden cases (default 4)")
    c.add_argument("--atol", action="append", metavar="[NAME=]VALUE",
                   help="float32 atol, or per output with NAME=VALUE (repeatable)")
    c.add_argument("--rtol", action="append", metavar="[NAME=]VALUE", help="likewise for rtol")
    c.add_argument("--precision", action=_ListAction, default=["fp32"],
                   items=("fp32", "fp16", "int8-weight", "int8-dynamic", "int8"), metavar="PRECISION",
                   help="fp32 (always built), fp16 (TFLite, Core ML), int8-weight (TFLite, Core ML), "
                        "int8-dynamic and int8 (ONNX, TFLite, ExecuTorch; int8 needs --calibration), each "
                        "made by the converter's own quantiser and judged by its own tolerance or budget")
    c.add_argument("--calibration", metavar="FILE.npz",
                   help="real inputs that calibrate the int8 variant (same form as --samples)")
    c.add_argument("--eval", metavar="FILE.npz",
                   help="held-out real inputs (same form as --samples; an array 'labels' per case: its class "
                        "indices): every artifact is judged on them beside the random cases, a quantised "
                        "variant by them")
    c.add_argument("--route", action="append", metavar="TARGET=ROUTE", help="force one route")
    c.add_argument("--timeout", type=float, default=600.0, help="seconds per conversion job")
    c.add_argument("--memory-limit", type=int, default=8192, metavar="MB", help="per worker")
    c.add_argument("--jobs", type=int, default=1, help="targets converted at once")
    c.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    c.add_argument("--trust-model", action="store_true",
                   help="allow loading that can run code (TorchScript, pickles, SavedModel, Lambda)")
    c.add_argument("--name", help="bundle name in the contract (default: the folder name)")
    c.add_argument("--no-cache", action="store_true",
                   help="convert everything again (default: reuse unchanged attempts)")
    c.add_argument("--no-diagnose", action="store_true",
                   help="do not localise a parity failure (default: name the first source module "
                        "whose output drifts, in reports/diagnose.json; nothing runs when all pass)")
    c.add_argument("--format", **fmt)  # type: ignore[arg-type]
    c.add_argument("--allow-unverified", action=_ListAction, metavar="TARGET", help=_ALLOW_HELP)
    c.set_defaults(func=cmd_convert)

    v = sub.add_parser("verify", parents=[common], help="re-run every artifact of a bundle and check parity",
                       epilog="examples:\n  portable-models verify dist/mynet\n"
                       "  portable-models verify dist/mynet --format junit > parity.xml",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("bundle")
    v.add_argument("--targets", action=_ListAction, metavar="TARGET", help="only these targets")
    v.add_argument("--allow-unverified", action=_ListAction, metavar="TARGET", help=_ALLOW_HELP)
    v.add_argument("--timeout", type=float, default=600.0, help="seconds per artifact run")
    v.add_argument("--compute-units", default="CPU_ONLY",
                   choices=COMPUTE_UNITS,
                   help="what the real Core ML runtime runs on, macOS only (default CPU_ONLY); "
                   "elsewhere Core ML is checked by the MIL reference executor")
    v.add_argument("--jobs", type=int, default=None,
                   help="artifacts run at once, each in a worker of its own on one thread "
                   "(default: 2 on a machine with 2 cores or more)")
    v.add_argument("--format", **fmt)  # type: ignore[arg-type]
    v.add_argument("--trust-bundle", action="store_true", help=_TRUST_HELP)
    v.set_defaults(func=cmd_verify)

    b = sub.add_parser("bench", parents=[common], help="load time and latency per runtime",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  portable-models bench dist/mynet\n"
                       "  portable-models bench dist/mynet --runs 100 --threads 1 --targets tflite")
    b.add_argument("bundle")
    b.add_argument("--runs", type=int, default=20, help="timed runs after warm-up (default 20)")
    b.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    b.add_argument("--threads", type=int, help="runtime threads (default: the runtime's own)")
    b.add_argument("--targets", action=_ListAction, metavar="TARGET", help="only these targets")
    b.add_argument("--timeout", type=float, default=600.0, help="seconds per artifact")
    b.add_argument("--no-write", action="store_true", help="print only; leave the bundle as it is")
    b.add_argument("--trust-bundle", action="store_true", help=_TRUST_HELP)
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("inspect", parents=[common], help="what the contract says, per artifact")
    i.add_argument("bundle")
    i.set_defaults(func=cmd_inspect)

    g = sub.add_parser("diagnose", parents=[common], help="where an artifact first diverges, per source module",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  portable-models diagnose dist/mynet\n"
                       "  portable-models diagnose dist/mynet --targets onnx --case 1 --format json\n"
                       "exit codes: 0 every module agrees, 1 an artifact diverges, 2 bad input")
    g.add_argument("bundle")
    g.add_argument("--targets", action=_ListAction, metavar="TARGET", help="only these targets")
    g.add_argument("--case", type=int, default=0, help="the golden case to run (default 0)")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per artifact")
    g.add_argument("--format", choices=("table", "json"), default="table", help="report format")
    g.add_argument("--trust-bundle", action="store_true", help=_TRUST_HELP)
    g.set_defaults(func=cmd_diagnose)

    doc = sub.add_parser("doctor", parents=[common], help="which converters and runtimes are installed")
    doc.set_defaults(func=cmd_doctor)
    return p


#: the path arguments, made absolute before anything else happens (a worker runs in a
#: folder of its own: a relative path reaching it would name another file).
_PATH_ARGS = ("src", "out", "bundle", "samples", "calibration")


def _absolute_paths(args: argparse.Namespace) -> None:
    from portable_models.core.paths import user_path

    for name in _PATH_ARGS:
        value = getattr(args, name, None)
        if value is not None:
            setattr(args, f"{name}_given", value)  # as typed, for messages
            setattr(args, name, str(user_path(value)))
    if getattr(args, "model_class", None) and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # --class MODULE:CLASS from the current folder, as `python -m` would


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C so that every ``with``/``finally`` cleans up: workers
    killed, staging removed, lock released."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    import signal

    parser = build_parser()
    args = parser.parse_args(argv)
    _absolute_paths(args)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
        # Ctrl-C must clean up even when started from a shell that ignored SIGINT for its
        # background jobs (Python keeps an inherited SIG_IGN otherwise).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return int(args.func(args))
    except PortableModelsError as exc:
        if args.verbose:
            import traceback

            traceback.print_exc()
        from portable_models.core.text import escape

        stage = f" [{escape(exc.stage)}]" if exc.stage else ""
        # one escaped line per line: a message may quote a bundle's names (escape sequences)
        text = "\n".join(escape(line) for line in str(exc).split("\n"))
        print(f"error{stage}: {text}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: workers stopped, nothing written", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated: workers stopped, nothing written", file=sys.stderr)
        return 143
    finally:
        workers = sys.modules.get("portable_models.isolation.pool")
        if workers is not None:  # the command is over: its warm workers go now, not at exit
            workers.shutdown_workers()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
