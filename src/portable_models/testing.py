"""Parity assertions for ordinary tests: ``assert_parity(bundle, targets=…)``.

Light to import: the heavy work happens in worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["ParityAssertionError", "assert_parity"]


class ParityAssertionError(AssertionError):
    """A bundle failed verification; the message is the parity table."""


def assert_parity(bundle: str | Path, *, targets: Sequence[str] | None = None,
                  allow_unverified: Sequence[str] = (), trust_bundle: bool = False) -> None:
    """Re-verify ``bundle`` (a relative path is taken from the current working directory)
    and raise :class:`ParityAssertionError` unless every chosen artifact passes
    (``unverified``/``skipped`` only pass for targets in ``allow_unverified``).
    ``trust_bundle``: as for :func:`portable_models.verify`."""
    from portable_models.rerun import verify

    report = verify(bundle, targets=targets, allow_unverified=allow_unverified, trust_bundle=trust_bundle)
    if not report.ok:
        raise ParityAssertionError(f"parity failed for {bundle}:\n{report.table()}")
