"""The errors users can catch.

Every error carries a stable ``code`` (it also goes into the contract and the
reports), the ``file`` it concerns, the ``stage`` it happened at and a ``fix``
line that tells the user what to do about it::

    PortableModelsError                      code "error"
     ├── UsageError                          bad arguments to the API or the CLI
     ├── InputError                          a bad model file, sample file or bundle
     │    ├── UnsafeModelError               loading would run code; needs --trust-model
     │    └── FormatError                    the bytes are not what the name says
     ├── CaptureError                        the source model could not be captured
     │    └── GoldenSetError                 the golden set proves nothing
     ├── ContractError                       contract.json is missing, invalid or lies
     │    └── IntegrityError                 a bundle file is missing or changed
     ├── ConversionError                     a converter failed (one target only)
     │    └── DynamicDimsRefused             refused the dynamic dims (fixed shape deferred)
     ├── RuntimeLoadError / RuntimeRunError  an artifact failed to load or to run
     ├── WorkerError                         an isolated job died
     │    ├── WorkerCrashed                  killed by a signal (SIGSEGV, SIGABRT …)
     │    ├── WorkerTimeout                  ran past its time limit
     │    └── WorkerOutOfMemory              killed at its memory limit
     ├── UnverifiedError                     converted and checked structurally, but
     │                                        no runtime here can execute it
     ├── NetworkRequiredError                a converter tried to reach the network
     ├── MissingDependencyError              a converter or runtime is not installed
     └── BundleWriteError                    the bundle could not be written

The CLI maps :class:`UsageError` and :class:`InputError` (and their children) to exit
code 2; the others make a target fail (exit 1) and never stop the other targets.
"""

from __future__ import annotations

__all__ = [
    "PortableModelsError",
    "UsageError",
    "InputError",
    "UnsafeModelError",
    "FormatError",
    "CaptureError",
    "GoldenSetError",
    "ContractError",
    "IntegrityError",
    "ConversionError",
    "DynamicDimsRefused",
    "RuntimeLoadError",
    "RuntimeRunError",
    "WorkerError",
    "WorkerCrashed",
    "WorkerTimeout",
    "WorkerOutOfMemory",
    "WorkerUnfit",
    "UnverifiedError",
    "NetworkRequiredError",
    "MissingDependencyError",
    "BundleWriteError",
    "error_from_dict",
]


class PortableModelsError(Exception):
    """Root of every error this library raises on purpose."""

    code = "error"
    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        stage: str | None = None,
        fix: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.stage = stage
        self.fix = fix

    def __str__(self) -> str:
        parts = [self.message]
        if self.file:
            parts.append(f"file: {self.file}")
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return "\n".join(parts)

    def to_dict(self) -> dict[str, str | None]:
        return {
            "code": self.code,
            "message": self.message,
            "file": self.file,
            "stage": self.stage,
            "fix": self.fix,
        }


class UsageError(PortableModelsError):
    code = "usage"
    exit_code = 2


class InputError(PortableModelsError):
    code = "bad_input"
    exit_code = 2


class UnsafeModelError(InputError):
    code = "unsafe_model"


class FormatError(InputError):
    code = "bad_format"


class CaptureError(PortableModelsError):
    code = "capture_failed"
    exit_code = 2


class GoldenSetError(CaptureError):
    code = "degenerate_golden"


class ContractError(PortableModelsError):
    code = "bad_contract"
    exit_code = 2


class IntegrityError(ContractError):
    code = "integrity"
    exit_code = 1


class ConversionError(PortableModelsError):
    code = "convert_failed"


class DynamicDimsRefused(ConversionError):
    """The converter refused the dynamic dims and was asked not to fall back to fixed
    shapes yet: a later route may keep them (the fixed-shape conversion comes after)."""

    code = "dynamic_dims_refused"


class RuntimeLoadError(PortableModelsError):
    code = "load_failed"


class RuntimeRunError(PortableModelsError):
    code = "run_failed"


class WorkerError(PortableModelsError):
    code = "worker_failed"


class WorkerCrashed(WorkerError):
    code = "crashed"


class WorkerTimeout(WorkerError):
    code = "timeout"


class WorkerOutOfMemory(WorkerError):
    code = "out_of_memory"


class WorkerUnfit(WorkerError):
    """What an earlier job left in the worker's process keeps it from running this one
    (coremltools imported without TensorFlow, asked to convert a Keras model): the pool
    runs the job once more in a fresh worker."""

    code = "worker_unfit"


class UnverifiedError(PortableModelsError):
    """Raised by a runner that loaded and checked an artifact but cannot execute it on
    this machine (Core ML off macOS). ``checked`` lists what *was* checked."""

    code = "unverified"

    def __init__(self, message: str, *, checked: list[str] | None = None, **kw: str | None) -> None:
        super().__init__(message, **kw)
        self.checked = list(checked or [])

    def to_dict(self) -> dict[str, str | None]:
        out = super().to_dict()
        out["checked"] = "; ".join(self.checked)
        return out


class NetworkRequiredError(PortableModelsError):
    code = "network_required"


class MissingDependencyError(PortableModelsError):
    code = "missing_dependency"


class BundleWriteError(PortableModelsError):
    code = "write_failed"


def _all_error_types() -> dict[str, type[PortableModelsError]]:
    found: dict[str, type[PortableModelsError]] = {}
    stack: list[type[PortableModelsError]] = [PortableModelsError]
    while stack:
        cls = stack.pop()
        found[cls.code] = cls
        stack.extend(cls.__subclasses__())
    return found


def error_from_dict(data: dict[str, str | None]) -> PortableModelsError:
    """Rebuild an error that crossed a process boundary as a dict."""
    cls = _all_error_types().get(str(data.get("code")), PortableModelsError)
    if cls is UnverifiedError:
        checked = [c for c in str(data.get("checked") or "").split("; ") if c]
        return UnverifiedError(str(data.get("message")), checked=checked, file=data.get("file"),
                               stage=data.get("stage"), fix=data.get("fix"))
    return cls(
        str(data.get("message") or "unknown error"),
        file=data.get("file"),
        stage=data.get("stage"),
        fix=data.get("fix"),
    )
