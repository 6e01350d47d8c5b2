"""Every environment flag is parsed in one place (core.settings), at call time."""

from __future__ import annotations

from pathlib import Path

import pytest

from portable_models.core import settings


@pytest.mark.parametrize(("raw", "want"), [("", 120.0), ("30", 30.0), (" 0.5 ", 0.5), ("-3", 0.0), ("soon", 120.0)])
def test_worker_idle_seconds(monkeypatch: pytest.MonkeyPatch, raw: str, want: float) -> None:
    monkeypatch.setenv(settings.IDLE_ENV, raw)
    assert settings.worker_idle_s() == want


@pytest.mark.parametrize(("name", "fn", "word"), [(settings.CAPTURE_ENV, settings.capture_inprocess, "inprocess"),
                                                  (settings.SANDBOX_ENV, settings.sandbox_off, "off")])
def test_word_switches_are_case_and_space_blind(monkeypatch: pytest.MonkeyPatch, name: str, fn: object,
                                                word: str) -> None:
    for raw, want in (("", False), (word, True), (f" {word.upper()} ", True), ("1", False)):
        monkeypatch.setenv(name, raw)
        assert fn() is want, raw  # type: ignore[operator]


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(settings.CACHE_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert settings.cache_root() == tmp_path / "mine"
    monkeypatch.delenv(settings.CACHE_ENV)
    assert settings.cache_root() == tmp_path / "xdg" / "portable_models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert settings.cache_root() == tmp_path / ".cache" / "portable_models"


def test_no_other_module_reads_the_environment() -> None:
    """Only settings parses flags; the worker's own environment set-up (process.py, the
    clone in child.py) and the CLI's PYTHONUNBUFFERED write it."""
    src = Path(settings.__file__).resolve().parents[1]
    readers = sorted(str(p.relative_to(src)) for p in src.rglob("*.py")
                     if ("os.environ.get" in p.read_text() or "os.getenv" in p.read_text())
                     and p.name != "settings.py")
    assert readers == []
