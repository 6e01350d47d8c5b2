"""What a runtime is: load -> run -> close, behind a context manager.

A runner executes one artifact with its real runtime. It is fed *logical* inputs;
the io map renames and permutes them into the artifact's physical inputs, and turns
the physical outputs back into logical ones, keyed by logical output name. Subclasses
fill the ``_load_impl`` / ``_run_impl`` / ``_close_impl`` hooks; the public methods
check state, time the calls and translate errors.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from portable_models.core.iomap import IoMap
from portable_models.errors import PortableModelsError, RuntimeLoadError, RuntimeRunError

__all__ = ["COMPUTE_UNITS", "RuntimeInfo", "Runner", "RunnerOptions"]

#: what the real Core ML runtime (macOS only) may be told to run on.
COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")


@dataclass(frozen=True, kw_only=True)
class RuntimeInfo:
    """A row of the runtime table (``impl`` is ``module:Class``)."""

    name: str
    impl: str
    requires: tuple[str, ...]
    framework: str = "none"
    description: str = ""


@dataclass(frozen=True, kw_only=True)
class RunnerOptions:
    threads: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


class Runner:
    """Base class of every runtime's runner."""

    #: distribution whose version names the runtime in reports ("onnxruntime 1.31.0").
    distribution = ""
    #: how the verdict names what checked it.
    label = ""

    def __init__(self, artifact: Path, io: IoMap, options: RunnerOptions | None = None) -> None:
        self.artifact = Path(artifact)
        self.io = io
        self.options = options or RunnerOptions()
        self.loaded = False
        self.load_s = 0.0

    # -- lifecycle ---------------------------------------------------------------
    def __enter__(self) -> Runner:
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _translated(self, error: type[PortableModelsError], doing: str, stage: str) -> Iterator[None]:
        """The runtime's own exceptions become ``error`` (with ``from exc``); ours and
        programming errors (TypeError, AssertionError …) pass through unchanged."""
        try:
            yield
        except (PortableModelsError, TypeError, AssertionError, NameError, AttributeError):
            raise
        except Exception as exc:
            raise error(f"{self.runtime_name()} {doing} {self.artifact.name}: {exc}",
                        file=str(self.artifact), stage=f"{stage}:{self.runtime_name()}") from exc

    def load(self) -> None:
        start = time.perf_counter()
        with self._translated(RuntimeLoadError, "could not load", "load"):
            try:
                self._load_impl()
            except BaseException:
                self._close_impl()  # what a failed load took (a thread count it set …) goes back
                raise
        self.load_s = time.perf_counter() - start
        self.loaded = True

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on logical inputs; return logical outputs."""
        if not self.loaded:
            raise RuntimeRunError("run() before load()", stage=f"run:{self.runtime_name()}")
        missing = [k for k in self.io.inputs if k not in inputs]
        if missing:
            raise RuntimeRunError(f"inputs missing: {missing}", stage=f"run:{self.runtime_name()}")
        feeds = self.io.feeds(inputs)
        with self._translated(RuntimeRunError, "failed to run", "run"):
            physical = self._run_impl(feeds)
        return self.io.results(physical)

    def close(self) -> None:
        if self.loaded:
            self._close_impl()
            self.loaded = False

    # -- naming ------------------------------------------------------------------
    @classmethod
    def version(cls) -> str:
        return _distribution_version(cls.distribution) if cls.distribution else ""

    @classmethod
    def runtime_name(cls) -> str:
        v = cls.version()
        base = cls.distribution or cls.__name__
        return f"{base} {v}".strip()

    # -- hooks -------------------------------------------------------------------
    def _load_impl(self) -> None:
        raise NotImplementedError

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Physical feeds (by physical name) -> physical outputs (by physical name)."""
        raise NotImplementedError

    def _close_impl(self) -> None:
        """Release what ``_load_impl`` took."""


@functools.cache
def _distribution_version(dist: str) -> str:
    """A runtime's version, read once per process: the worker that imported the runtime
    keeps running that version whatever is installed later (reading package metadata
    costs milliseconds on every run job otherwise)."""
    from portable_models.core.imports import package_version

    return package_version(dist)
