"""pytest plugin: ``pytest --pm-bundle DIR`` turns every artifact x output of a bundle into
its own test (``test_parity[tflite-logits]``), pass/fail with the metrics in the message.

Imported into every pytest run of the environment, so it imports nothing heavy: the
contract is read at collection, the artifacts run (in worker processes) at the first test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["pytest_addoption", "pytest_collection_modifyitems", "BundleCollector", "ParityItem"]


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("portable_models")
    group.addoption("--pm-bundle", action="append", default=[], metavar="DIR",
                    help="verify this portable_models bundle: one test per artifact x output")
    group.addoption("--pm-allow-unverified", action="append", default=[], metavar="TARGET",
                    help="let TARGET pass while unverified or skipped (e.g. coreml off macOS)")
    group.addoption("--pm-trust-bundle", action="store_true", default=False,
                    help="run artifacts whose loading runs code (TorchScript) even without an OS sandbox")


class ParityFailure(Exception):
    """An artifact x output did not pass."""


class BundleCollector(pytest.Collector):
    """All parity tests of one bundle; runs ``verify`` once, at the first test."""

    def __init__(self, *, bundle: Path, **kw: Any) -> None:
        super().__init__(**kw)
        self.bundle = bundle
        self._report: Any = None

    def report(self) -> Any:
        if self._report is None:
            from portable_models.core.text import escape
            from portable_models.errors import PortableModelsError
            from portable_models.rerun import verify

            try:
                self._report = verify(self.bundle, trust_bundle=bool(self.config.getoption("pm_trust_bundle")))
            except PortableModelsError as exc:  # shown as the tests' failure, escaped
                raise ParityFailure("\n".join(escape(line) for line in str(exc).split("\n"))) from None
        return self._report

    def collect(self) -> Iterator[pytest.Item]:
        from portable_models.contract.model import load_contract

        contract = load_contract(self.bundle)
        yield ParityItem.from_parent(self, name="test_integrity", key=None, output=None)
        for art in contract.artifacts:
            for out in contract.outputs:
                yield ParityItem.from_parent(self, name=f"test_parity[{art.key}-{out.name}]",
                                             key=art.key, output=out.name)


class ParityItem(pytest.Item):
    def __init__(self, *, key: str | None, output: str | None, **kw: Any) -> None:
        super().__init__(**kw)
        self.key, self.output = key, output

    def runtest(self) -> None:
        from portable_models.core.text import escape

        assert isinstance(self.parent, BundleCollector)
        report = self.parent.report()
        if self.key is None:
            if report.problems:
                raise ParityFailure(escape("; ".join(report.problems)))
            if not report.contract.artifacts:
                raise ParityFailure("the bundle has no artifact: nothing was checked")
            return
        art = report.contract.artifact(self.key)
        allowed = self.config.getoption("pm_allow_unverified") or []
        if art is None:
            raise ParityFailure(f"{self.key}: not in the bundle")
        res = (art.parity.get("outputs") or {}).get(self.output)
        if art.status in ("unverified", "skipped"):
            why = (art.parity.get("error") or {}).get("message", "no runtime here")
            if art.target in allowed:
                pytest.skip(f"{art.status} (allowed): {why}")
            raise ParityFailure(f"{self.key}: {art.status} — {escape(why)} (allow with --pm-allow-unverified {art.target})")
        if res is None:
            reason = art.parity.get("reason") or (art.parity.get("error") or {}).get("message") or art.status
            raise ParityFailure(f"{self.key}: {art.status}: {escape(reason)}")
        if res.get("status") != "pass":
            raise ParityFailure(f"{self.key}/{escape(self.output)}: {escape(res.get('reason'))} {_metrics(res)}")

    def repr_failure(self, excinfo: Any, style: Any = None) -> str:
        if isinstance(excinfo.value, ParityFailure):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        assert isinstance(self.parent, BundleCollector)
        return self.parent.bundle, 0, self.name


def _metrics(res: dict[str, Any]) -> str:
    keys = ("max_abs", "max_rel", "cosine", "mismatch_ratio")
    return "(" + ", ".join(f"{k}={res.get(k)}" for k in keys if res.get(k) is not None) + ")"


def pytest_collection_modifyitems(session: pytest.Session, config: Any, items: list[pytest.Item]) -> None:
    from portable_models.core.paths import user_path

    here = Path(config.invocation_params.dir)  # relative to where pytest was started
    for folder in config.getoption("pm_bundle") or []:
        bundle = user_path(folder if Path(folder).is_absolute() else here / folder)
        collector = BundleCollector.from_parent(session, name=str(folder), bundle=bundle)
        items.extend(collector.collect())
