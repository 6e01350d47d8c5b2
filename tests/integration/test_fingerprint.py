"""The model fingerprint behind the capture cache: equal for an unchanged model, different
after any change forward() could see — weights, attributes, code, globals, hooks — and
refused (never guessed) for what it cannot hash by content."""

from __future__ import annotations

import dataclasses
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import pytest

from models import ZOO

torch = pytest.importorskip("torch")
nn = torch.nn

from portable_models.capture.fingerprint import Unfingerprintable, model_fingerprint  # noqa: E402

SCALE = 2.0


def _helper(x: Any) -> Any:
    return x * SCALE


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.offset = 0.5

    def forward(self, x: Any) -> Any:
        return _helper(self.norm(self.lin(x))) + self.offset


def _fp(model: Any) -> str:
    return model_fingerprint(model)


@pytest.fixture
def code_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the fx graph (which bakes in the constants of the path the example takes),
    so that the code hash alone must see the change."""
    from portable_models.capture import fingerprint

    monkeypatch.setattr(fingerprint, "_fx_code", lambda model, h: "")


def _changed(change: Callable[[Scaled], object]) -> bool:
    base = _fp(Scaled().eval())
    model = Scaled().eval()
    change(model)
    return _fp(model) != base


def test_an_unchanged_model_has_the_same_fingerprint() -> None:
    assert _fp(Scaled().eval()) == _fp(Scaled().eval())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_can_be_fingerprinted(name: str) -> None:
    case = ZOO[name]()
    assert _fp(case.model) == _fp(ZOO[name]().model)


def test_weights_buffers_and_attributes_are_covered() -> None:
    def bump_weight(m: Scaled) -> None:
        with torch.no_grad():
            m.lin.weight[0, 0] += 1e-6

    assert _changed(bump_weight)
    assert _changed(lambda m: m.norm.register_buffer("extra", torch.zeros(1)))
    assert _changed(lambda m: setattr(m.norm, "eps", 1e-3))  # a torch layer's own setting
    assert _changed(lambda m: setattr(m, "offset", 0.25))  # the user's attribute
    assert _changed(lambda m: m.train())
    assert _changed(lambda m: m.lin.register_forward_hook(lambda mod, inp, out: out * 2))


@pytest.mark.usefixtures("code_only")
def test_globals_the_code_reads_are_covered(monkeypatch: pytest.MonkeyPatch) -> None:
    base = _fp(Scaled().eval())
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 3.0)
    assert _fp(Scaled().eval()) != base  # read by _helper, a global function of forward()
    monkeypatch.undo()
    monkeypatch.setattr(sys.modules[__name__], "_helper", lambda x: x)
    assert _fp(Scaled().eval()) != base


def _define(body: str, namespace: dict[str, Any] | None = None) -> type:
    """A class named Net defined from source, as a notebook cell re-run would."""
    ns: dict[str, Any] = {"nn": nn, "torch": torch, "__name__": "notebook", **(namespace or {})}
    exec(
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        torch.manual_seed(0)\n"
        "        self.lin = nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        f"        {body}\n", ns)
    return ns["Net"]  # type: ignore[no-any-return]


@pytest.mark.usefixtures("code_only")
def test_a_redefined_class_with_other_code_differs() -> None:
    same = [_fp(_define("return self.lin(x) * 2")().eval()) for _ in range(2)]
    assert same[0] == same[1]
    assert _fp(_define("return self.lin(x) * 3")().eval()) != same[0]
    # a branch that the example does not take (fx cannot see it) still counts
    branchy = "return self.lin(x) if not torch.compiler.is_exporting() else self.lin(x) * {}"
    assert _fp(_define(branchy.format(2))().eval()) != _fp(_define(branchy.format(3))().eval())


@pytest.mark.usefixtures("code_only")
def test_a_users_module_and_closures_are_followed() -> None:
    helpers = types.ModuleType("helpers")  # a module of the user's, not an installed library
    exec("def act(x):\n    return x.clamp(min=0)\n", helpers.__dict__)
    body = "return helpers.act(self.lin(x))"
    base = _fp(_define(body, {"helpers": helpers})().eval())
    exec("def act(x):\n    return x.clamp(min=-1)\n", helpers.__dict__)
    assert _fp(_define(body, {"helpers": helpers})().eval()) != base

    def make(factor: float) -> type:
        def scale(x: Any) -> Any:
            return x * factor
        return _define("return scale(self.lin(x))", {"scale": scale})

    assert _fp(make(2.0)().eval()) == _fp(make(2.0)().eval())
    assert _fp(make(2.0)().eval()) != _fp(make(3.0)().eval())


@dataclasses.dataclass
class Config:
    width: int = 4
    act: str = "relu"


@pytest.mark.usefixtures("code_only")
def test_a_config_object_is_hashed_by_its_fields() -> None:
    net = _define("return self.lin(x) * self.cfg.width")
    a, b = net().eval(), net().eval()
    a.cfg, b.cfg = Config(), Config(width=5)
    assert _fp(a) != _fp(b)
    b.cfg = Config()
    assert _fp(a) == _fp(b)


def test_what_cannot_be_hashed_is_refused_by_name() -> None:
    model = Scaled().eval()
    model.lock = threading.Lock()
    with pytest.raises(Unfingerprintable, match=r"lock is a _thread.lock"):
        _fp(model)
    scripted = torch.jit.script(nn.Linear(2, 2).eval())
    with pytest.raises(Unfingerprintable, match="TorchScript"):
        _fp(scripted)


def test_the_fx_graph_sees_what_the_example_path_computes() -> None:
    from portable_models.capture import fingerprint

    h = fingerprint._Hasher()
    assert "mul" in fingerprint._fx_code(Scaled().eval(), h) or "2.0" in fingerprint._fx_code(Scaled().eval(), h)
    assert fingerprint._fx_code(_define("return self.lin(x) if x.sum() > 0 else x")().eval(), h) \
        .startswith("untraceable")


def test_tied_weights_and_shared_modules_hash_once() -> None:
    model = Scaled().eval()
    model.again = model.lin  # the same module twice: a back-reference, not a second walk
    assert _fp(model) == _fp(model)


def test_library_code_patched_with_the_users_is_hashed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch layer's method replaced by the user's function (fx sees only the layer's call)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    base = _fp(model)
    monkeypatch.setattr(nn.ReLU, "forward", lambda self, x: torch.clamp(x, min=0))
    assert _fp(model) != base


@pytest.mark.usefixtures("code_only")
def test_a_wrapper_posing_as_a_library_function_is_hashed() -> None:
    """functools.wraps copies torch's __module__ onto the user's wrapper: judged by its file."""
    import functools

    def make(factor: float) -> type:
        @functools.wraps(torch.nn.functional.gelu)
        def act(x: Any) -> Any:
            return torch.nn.functional.gelu(x) * factor
        return _define("return act(self.lin(x))", {"act": act})

    assert _fp(make(2.0)().eval()) != _fp(make(3.0)().eval())


@pytest.mark.usefixtures("code_only")
def test_a_module_imported_inside_forward_is_hashed_by_its_source(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pm_fp_helpers.py").write_text("def act(x):\n    return x.clamp(min=0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import pm_fp_helpers  # noqa: F401 - in sys.modules, as after the first forward()

    net = _define("from pm_fp_helpers import act\n        return act(self.lin(x))")
    base = _fp(net().eval())
    (tmp_path / "pm_fp_helpers.py").write_text("def act(x):\n    return x.clamp(min=-1)\n")
    assert _fp(net().eval()) != base
    monkeypatch.delitem(sys.modules, "pm_fp_helpers")


def test_rebuilt_models_with_hooks_hash_alike() -> None:
    """Hook dicts are keyed by a process-wide counter: only their functions count."""
    def hook(mod: Any, inp: Any, out: Any) -> Any:
        return out

    a, b = Scaled().eval(), Scaled().eval()
    a.lin.register_forward_hook(hook)
    b.lin.register_forward_hook(hook)
    assert _fp(a) == _fp(b)


def test_odd_state_is_hashed_or_refused_never_crashes() -> None:
    model = Scaled().eval()
    model.register_buffer("z", torch.randn(3, dtype=torch.cfloat).conj())
    base = _fp(model)
    with torch.no_grad():
        model.z.imag.neg_()
    assert _fp(model) != base  # the conjugate view's bytes, resolved

    @dataclasses.dataclass
    class Partial:
        n: int = dataclasses.field(init=False)

    model.cfg = Partial()
    _fp(model)  # an unset field is an unset attribute: hashed as absent
    model.cfg.extra = 1  # set on the instance, not a declared field
    first = _fp(model)
    model.cfg.extra = 2
    assert _fp(model) != first


def test_the_fx_trace_leaves_the_model_as_it_was() -> None:
    net = _define("self.last = x.sum()\n        return self.lin(x)")().eval()
    _fp(net)
    assert "last" not in vars(net)


def test_torch_settings_are_part_of_it() -> None:
    model = Scaled().eval()
    base = _fp(model)
    torch.set_default_dtype(torch.float64)
    try:
        assert _fp(model) != base
    finally:
        torch.set_default_dtype(torch.float32)
