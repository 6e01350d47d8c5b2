"""The command line: ``portable-models convert|verify|inspect|doctor|demo``.

Exit codes: 0 all requested targets converted and passed; 1 some target failed parity
or conversion; 2 bad usage or bad input (the message names the file and the fix).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO

from portable_models._version import __version__
from portable_models.errors import PortableModelsError

__all__ = ["main", "build_parser"]

EPILOG = """examples:
  portable-models demo --out dist/demo
  portable-models verify dist/demo --format junit > parity.xml
  portable-models inspect dist/demo
  portable-models doctor
"""


class Progress:
    """One line per target state change (waiting / converting / running / pass / fail),
    with elapsed time. Thread-safe; quiet mode prints nothing."""

    def __init__(self, stream: TextIO, quiet: bool = False) -> None:
        self.stream, self.quiet = stream, quiet
        self.start: dict[str, float] = {}
        self.lock = threading.Lock()

    def __call__(self, key: str, state: str, detail: str) -> None:
        if self.quiet:
            return
        with self.lock:
            now = time.monotonic()
            if state == "waiting":
                self.start.setdefault(key, now)
                return
            if state == "converting" and key not in self.start:
                self.start[key] = now
            elapsed = now - self.start.get(key, now)
            extra = f" ({detail})" if detail else ""
            print(f"  {key:<14} {state:<11}{extra:<26} {elapsed:6.1f} s", file=self.stream, flush=True)


def _report(obj: Any, fmt: str, problems: list[str] | None = None) -> str:
    from portable_models.reports import render

    return render(obj.contract, fmt, problems=problems)


def cmd_demo(args: argparse.Namespace) -> int:
    from portable_models.api import verify
    from portable_models.demo import run_demo

    out = args.out
    print(f"portable_models {__version__} demo: a small CNN (batch norm, dynamic batch) -> {out}",
          file=sys.stderr)
    bundle = run_demo(out, progress=Progress(sys.stderr, args.quiet), jobs=args.jobs)
    print(f"\nexported {out}; verifying from the bundle alone …", file=sys.stderr)
    report = verify(out)
    sys.stdout.write(_report(report, args.format, report.problems))
    return 0 if bundle.ok and report.ok else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from portable_models.api import verify

    report = verify(args.bundle, targets=args.targets or None, allow_unverified=args.allow_unverified or (),
                    timeout_s=args.timeout)
    sys.stdout.write(_report(report, args.format, report.problems))
    return 0 if report.ok else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from portable_models.contract import load_contract

    c = load_contract(args.bundle)
    print(f"{c.name}: {c.source['framework']} {c.source['version']}, {c.golden['cases']} golden cases")
    for label, specs in (("inputs", c.inputs), ("outputs", c.outputs)):
        print(f"{label}:")
        for s in specs:
            rng = f" range {list(s.range)}" if s.range else ""
            print(f"  {s.name}: {s.dtype} {list(s.shape)} {s.layout or ''}{rng}".rstrip())
    for a in c.artifacts:
        print(f"\n[{a.key}] {a.status} via {a.route_name or '-'}: {a.file or 'no artifact kept'}")
        if a.io:
            for kind, binds in (("feed", a.io.inputs), ("read", a.io.outputs)):
                for logical, b in binds.items():
                    perm = f" perm {list(b.perm)}" if b.perm else ""
                    layout = f" layout {b.layout}" if b.layout else ""
                    print(f"  {kind} {logical} as {b.name!r}{layout}{perm}")
        for att in a.attempts:
            msg = (att.error or {}).get("message", "")
            print(f"  attempt {att.route}: {att.status}{' at ' + att.stage if att.stage else ''}"
                  f"{': ' + msg.splitlines()[0][:160] if msg else ''}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from portable_models.doctor import render_doctor

    text, ok = render_doctor()
    print(text)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="portable-models", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Export models to ONNX, TFLite, Core ML, TorchScript and "
                                "ExecuTorch, run each artifact in its real runtime, prove parity.")
    p.add_argument("--version", action="version", version=f"portable-models {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the result")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of errors")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = {"choices": ("table", "json", "junit", "md"), "default": "table", "help": "report format"}

    d = sub.add_parser("demo", help="the built-in example, end to end",
                       epilog="example:\n  portable-models demo --out dist/demo",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--out", default="dist/demo", help="bundle folder (replaced if it exists)")
    d.add_argument("--jobs", type=int, default=1, help="targets converted at once")
    d.add_argument("--format", **fmt)  # type: ignore[arg-type]
    d.set_defaults(func=cmd_demo)

    v = sub.add_parser("verify", help="re-run every artifact of a bundle and check parity",
                       epilog="examples:\n  portable-models verify dist/mynet\n"
                       "  portable-models verify dist/mynet --format junit > parity.xml",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("bundle")
    v.add_argument("--targets", nargs="+", help="only these targets")
    v.add_argument("--allow-unverified", nargs="+", metavar="TARGET",
                   help="let these targets pass the gate while unverified (e.g. coreml)")
    v.add_argument("--timeout", type=float, default=600.0, help="seconds per artifact run")
    v.add_argument("--format", **fmt)  # type: ignore[arg-type]
    v.set_defaults(func=cmd_verify)

    i = sub.add_parser("inspect", help="what the contract says, per artifact")
    i.add_argument("bundle")
    i.set_defaults(func=cmd_inspect)

    doc = sub.add_parser("doctor", help="which converters and runtimes are installed")
    doc.set_defaults(func=cmd_doctor)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PortableModelsError as exc:
        if args.verbose:
            import traceback

            traceback.print_exc()
        stage = f" [{exc.stage}]" if exc.stage else ""
        print(f"error{stage}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
