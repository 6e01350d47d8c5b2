"""`import portable_models` (and the pytest plugin) must not import heavy frameworks."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "tensorflow", "keras", "tf_keras", "coremltools", "onnxruntime", "executorch",
         "onnx2tf", "tf2onnx", "ai_edge_litert", "litert_torch", "onnx", "jax")

MODULES = [
    "portable_models",
    "portable_models.pytest_plugin",
    "portable_models.testing",
    "portable_models.cli",
    "portable_models.api",
    "portable_models.convert.registry",
    "portable_models.run.registry",
    "portable_models.compare.parity",
    "portable_models.contract.model",
    "portable_models.contract.reports",
    "portable_models.doctor",
]


@pytest.mark.parametrize("module", MODULES)
def test_import_is_light(module: str) -> None:
    code = (f"import sys, {module}; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing {module} pulled in: {out.stdout.strip()}"


def test_public_names_resolve() -> None:
    import portable_models as pm

    for name in pm.__all__:
        assert getattr(pm, name) is not None
    with pytest.raises(AttributeError):
        pm.no_such_name  # noqa: B018


def test_lazy_names_stay_light() -> None:
    code = ("import sys, portable_models as pm; pm.export; pm.verify; pm.load_contract; "
            "pm.TolerancePolicy; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_diagnose_stays_the_function_after_its_package_is_imported() -> None:
    """``pm.diagnose`` is a function; importing the package that holds it (and its taps) must
    not replace it with a module, as a subpackage of the same name would."""
    code = ("import portable_models as pm, importlib; f = pm.diagnose; "
            "importlib.import_module('portable_models.diagnosis.taps'); "
            "assert pm.diagnose is f and callable(pm.diagnose), pm.diagnose")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
