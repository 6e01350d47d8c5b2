"""Every environment variable the library reads, named and parsed here, once, the same way
(STYLE.md: flags parsed inline in many places drift apart). Each function reads the
environment when it is called, so a change made before a call is seen by that call.

| variable | read by | meaning |
|---|---|---|
| ``PORTABLE_MODELS_CACHE`` | the caller | the cache folder (default: ``$XDG_CACHE_HOME/portable_models``) |
| ``PORTABLE_MODELS_CAPTURE`` | the caller | ``inprocess``: capture in the caller, not a forked child |
| ``PORTABLE_MODELS_WORKER_IDLE_S`` | the caller | seconds an idle worker lives on (default 120) |
| ``PORTABLE_MODELS_EXTRA_ROUTES`` | caller and workers | ``module:attr[,…]``: extra route rows |
| ``PORTABLE_MODELS_SANDBOX`` | the caller | ``off``: verify/bench workers run unconfined |
| ``PORTABLE_MODELS_WORKER_CONFINE`` | a worker | the sandbox its caller asked for (set by the library) |
| ``NO_COLOR`` | the CLI | no colour in the live view |
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "CACHE_ENV", "CAPTURE_ENV", "CONFINE_ENV", "EXTRA_ROUTES_ENV", "IDLE_ENV", "SANDBOX_ENV",
    "DEFAULT_IDLE_S", "cache_root", "capture_inprocess", "confine_spec", "extra_routes", "no_color",
    "sandbox_off", "worker_idle_s",
]

CACHE_ENV = "PORTABLE_MODELS_CACHE"
CAPTURE_ENV = "PORTABLE_MODELS_CAPTURE"
IDLE_ENV = "PORTABLE_MODELS_WORKER_IDLE_S"
EXTRA_ROUTES_ENV = "PORTABLE_MODELS_EXTRA_ROUTES"
SANDBOX_ENV = "PORTABLE_MODELS_SANDBOX"
CONFINE_ENV = "PORTABLE_MODELS_WORKER_CONFINE"

#: seconds an idle worker of the shared pool lives on (it holds torch, TensorFlow …)
DEFAULT_IDLE_S = 120.0


def _raw(name: str) -> str:
    return os.environ.get(name, "").strip()


def _is(name: str, word: str) -> bool:
    return _raw(name).lower() == word


def cache_root() -> Path:
    """The cache folder: ``PORTABLE_MODELS_CACHE``, else ``$XDG_CACHE_HOME/portable_models``,
    else ``~/.cache/portable_models``."""
    if _raw(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = _raw("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "portable_models"


def capture_inprocess() -> bool:
    """``PORTABLE_MODELS_CAPTURE=inprocess``: the capture runs in the caller's process."""
    return _is(CAPTURE_ENV, "inprocess")


def worker_idle_s() -> float:
    """``PORTABLE_MODELS_WORKER_IDLE_S`` (>= 0); :data:`DEFAULT_IDLE_S` when unset or not a number."""
    try:
        return max(float(_raw(IDLE_ENV)), 0.0) if _raw(IDLE_ENV) else DEFAULT_IDLE_S
    except ValueError:
        return DEFAULT_IDLE_S


def extra_routes() -> str:
    """``PORTABLE_MODELS_EXTRA_ROUTES``, as given ('' when unset)."""
    return _raw(EXTRA_ROUTES_ENV)


def sandbox_off() -> bool:
    """``PORTABLE_MODELS_SANDBOX=off``: verify/bench workers are not confined."""
    return _is(SANDBOX_ENV, "off")


def confine_spec() -> str:
    """``PORTABLE_MODELS_WORKER_CONFINE`` in a worker ('' where the worker is not confined)."""
    return _raw(CONFINE_ENV)


def no_color() -> bool:
    """``NO_COLOR`` set to anything: no colour (https://no-color.org)."""
    return bool(os.environ.get("NO_COLOR"))
