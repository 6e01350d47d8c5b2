"""Paths at the two boundaries: the user's, made absolute once where they come in, and a
contract's, confined to its bundle.

A worker runs in a private working directory, so a relative path that reached one would
name another file: every path a user gives is made absolute by :func:`user_path` in the
public function or command that received it. A contract is untrusted input, so every path it
names goes through :func:`bundle_path`, which refuses anything that could leave the bundle.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from portable_models.errors import ContractError

__all__ = ["CONTRACT_PATH_RE", "bundle_path", "contract_path_problem", "user_path"]


def user_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as the user meant it from the current working directory, absolute (``~``
    expanded). ``..`` is resolved the way the OS would (through symlinks), so that
    ``../x`` names the same file in a worker as in the caller."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if ".." in p.parts:
        return Path(os.path.realpath(p))
    return p.absolute()


#: what a contract may name: a relative POSIX path of plain segments (no ``..``, ``.``, empty
#: segment, backslash or control character). The schema carries the same pattern.
CONTRACT_PATH_RE = re.compile(r"^(?!.*(?:^|/)\.\.?(?:/|$))[^/\\\x00-\x1f\x7f]+(?:/[^/\\\x00-\x1f\x7f]+)*$")


def contract_path_problem(rel: object) -> str | None:
    """Why ``rel`` cannot be a path in a bundle (None: it can, lexically)."""
    if not isinstance(rel, str) or not rel:
        return "not a non-empty string"
    if len(rel) > 1024:
        return "longer than 1024 characters"
    if rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        return "an absolute path"
    if "\\" in rel:
        return "contains a backslash"
    if any(seg in ("..", ".") for seg in rel.split("/")):
        return "contains a '..' or '.' segment"
    if not CONTRACT_PATH_RE.match(rel):
        return "contains an empty segment or a control character"
    return None


def bundle_path(root: Path, rel: object, *, what: str = "path") -> Path:
    """The file or folder a contract's ``rel`` names inside the bundle ``root`` (absolute).
    Refused with a :class:`ContractError`: a path that is not relative and plain (see
    :func:`contract_path_problem`), or a symlink at any step below ``root`` (a link could
    point anywhere, and the file it names would be read as the bundle's). A path that does
    not exist is returned as is: the caller reports it missing."""
    problem = contract_path_problem(rel)
    if problem is not None:
        raise ContractError(f"the contract's {what} {str(rel)[:200]!r} is {problem}",
                            file=str(root / "contract.json"), stage="integrity",
                            fix="a bundle names only files inside itself: re-export it")
    assert isinstance(rel, str)
    path = root
    for seg in rel.split("/"):
        path = path / seg
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return path
        except OSError as exc:
            raise ContractError(f"cannot look at {rel}: {exc.strerror}", file=str(path), stage="integrity",
                                fix="check the bundle's permissions") from exc
        if stat.S_ISLNK(mode):
            raise ContractError(f"{rel} passes through a symlink ({path.relative_to(root).as_posix()}); "
                                "a bundle's files are never read through links",
                                file=str(path), stage="integrity",
                                fix="replace the link by the file itself, or re-export the bundle")
    return path
