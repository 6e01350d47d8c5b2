"""What ``verify`` and ``bench`` may run from a bundle, decided before anything of it is
loaded. A bundle is untrusted input: the runtime follows from the target (never from the
contract), every file an artifact loads must be listed, hashed and inside the bundle, the
artifact's own sha256 must agree with its files, and an artifact whose loading can run code
(TorchScript) runs only in the OS sandbox or when the user trusts the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portable_models.contract.bundle import BundleScan, folder_digest, scan_bundle
from portable_models.contract.model import Artifact, Contract
from portable_models.core.paths import bundle_path
from portable_models.core.targets import TARGET_INFO
from portable_models.errors import ContractError

__all__ = ["Admission", "Refusal", "admit", "TRUST_FIX", "refusal"]

TRUST_FIX = "verify on a machine with the sandbox (Linux with Landlock), or pass --trust-bundle " \
            "(trust_bundle=True) for a bundle you made or trust"


@dataclass(frozen=True)
class Refusal:
    """Why an artifact is not run: its verdict (``error`` or ``skipped``), stage and reason."""

    status: str
    stage: str
    reason: str

    def record(self, art: Artifact) -> dict[str, Any]:
        return {"status": self.status, "stage": self.stage, "reason": self.reason,
                "runtime": TARGET_INFO[art.target].runtime if art.target in TARGET_INFO else None,
                "error": {"code": "not_run", "message": self.reason, "stage": self.stage}}


@dataclass
class Admission:
    """What a bundle folder holds against its contract, looked at before anything of it is
    loaded: the folder (:class:`BundleScan`), the file list by path, the problems that fail
    the whole bundle (links or special files, golden data not listed) and what is only worth
    a note (files the contract does not list)."""

    scan: BundleScan
    entries: dict[str, dict[str, Any]]
    problems: list[str]
    notes: list[str]


def admit(root: Path, contract: Contract) -> Admission:
    """Look at ``root`` against ``contract`` (:class:`Admission`)."""
    scan = scan_bundle(root)
    entries = {e["path"]: e for e in contract.files}
    problems = [f"link or special file in the bundle: {p} (never followed)" for p in scan.odd]
    problems += [f"golden {which} {contract.golden[which]} is not in the contract's file list: it cannot be checked"
                 for which in ("inputs", "outputs") if contract.golden[which] not in entries]
    unlisted = sorted(scan.files - set(entries) - {"contract.json"})
    return Admission(scan=scan, entries=entries, problems=problems,
                     notes=[f"not in the contract's file list (not checked): {p}" for p in unlisted])


def refusal(root: Path, art: Artifact, entries: dict[str, dict[str, Any]], scan: BundleScan, *,
            unconfined: str | None, trusted: bool) -> Refusal | None:
    """Why ``art`` must not be loaded (None: it may run). ``entries``: the contract's file
    list by path; ``scan``: what the folder really holds; ``unconfined``: why the artifact
    would run outside the OS sandbox (None: it runs inside)."""
    info = TARGET_INFO.get(art.target)
    if info is None:
        return Refusal("error", "integrity", f"unknown target {art.target!r}")
    if art.runtime is not None and art.runtime != info.runtime:
        return Refusal("error", "integrity", f"the contract says runtime {art.runtime!r}, but {art.target} "
                       f"artifacts run on {info.runtime}: the runtime follows the target")
    if art.file is None or art.io is None:
        return Refusal("error", "verify", f"nothing to run: the bundle keeps no {art.key} artifact "
                       f"(its export ended {art.status!r}); a recorded verdict is never carried over")
    try:
        bundle_path(root, art.file, what=f"{art.key} artifact file")
    except ContractError as exc:
        return Refusal("error", "integrity", exc.message)
    problem = _files_problem(art, art.file, entries, scan)
    if problem is not None:
        return Refusal("error", "integrity", problem)
    if info.runs_code and unconfined is not None and not trusted:
        return Refusal("skipped", "verify", f"needs a sandbox or --trust-bundle: loading a {art.target} "
                       f"artifact runs the code it carries, and there is no OS sandbox here ({unconfined})")
    return None


def _files_problem(art: Artifact, file: str, entries: dict[str, dict[str, Any]], scan: BundleScan) -> str | None:
    """The artifact's files against the contract: listed, hashed as its sha256 says, nothing
    unlisted or linked inside a folder artifact."""
    if file in entries:  # one file
        if art.sha256 != entries[file].get("sha256"):
            return f"{file}: the artifact's sha256 differs from its entry in the file list"
        return None
    inside = file + "/"
    members = [e for p, e in entries.items() if p.startswith(inside)]
    if not members:
        return f"{file} is not in the contract's file list: it cannot be checked"
    odd = [p for p in scan.odd if p.startswith(inside) or p == file]
    if odd:
        return f"{file} holds links or special files ({', '.join(odd[:3])}): never followed"
    unlisted = sorted(p for p in scan.files if p.startswith(inside) and p not in entries)
    if unlisted:
        return f"{file} holds files not in the contract's file list ({', '.join(unlisted[:3])})"
    if art.sha256 != folder_digest(members, file):
        return f"{file}: the artifact's sha256 differs from its files' entries in the file list"
    return None
