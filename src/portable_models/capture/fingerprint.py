"""A content fingerprint of a live PyTorch model, taken without ``torch.export``.

Re-exporting an unchanged model must not pay for the capture again: ``torch.export``
needs torch's tracing machinery (``torch._dynamo``, sympy: ~1.5 s to import, ~90 MB),
which is most of an otherwise fully cached re-export. The capture cache
(:func:`portable_models.capture.torch.capture_torch`) reuses an earlier ``model.pt2``
when this fingerprint, the golden inputs and the reference outputs just computed, the
options and the versions are all unchanged.

What the fingerprint covers, so that a change to any of it misses:

- every module of the model, by class and by the whole ``__dict__``: parameters and
  buffers by content (dtype, shape, bytes), plain attributes by value, forward hooks;
- the code of every class and function the model's code reaches that is not part of an
  installed library: bytecode, constants, defaults, closure cells, and the module
  globals its names refer to (values by content, functions and classes recursively).
  Installed libraries (site-packages, the standard library) are named with their version;
- the ``torch.fx`` graph of ``forward`` on the example, where it can be traced (the ops
  actually run, with every constant baked in).

Anything it cannot hash by content (an arbitrary library object held by the model, a
quantized or fake tensor, a TorchScript module) makes it refuse with the reason: the
model is then captured every time, which is slower and never wrong.
"""

from __future__ import annotations

import dis
import enum
import functools
import hashlib
import logging
import os
import re
import sys
import sysconfig
import types
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["Unfingerprintable", "model_fingerprint"]

#: module attributes that do not affect what forward() computes.
_SKIPPED_ATTRS = frozenset({
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks", "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook",
    "_compiled_call_impl",
})
#: class attributes that say nothing about behaviour.
_SKIPPED_CLASS_ATTRS = frozenset({"__dict__", "__weakref__", "__module__", "__doc__", "__qualname__",
                                  "__annotations__", "__firstlineno__", "__static_attributes__",
                                  "__parameters__", "__orig_bases__", "__abstractmethods__", "_abc_impl",
                                  "__dataclass_fields__", "__dataclass_params__"})
_MAX_DEPTH = 200
_GLOBAL_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME"})


_UNSET = "<unset slot>"



#: how :meth:`_Hasher.value` feeds a value, by type, first match wins (order matters: a
#: torch.nn.Module before the plain objects, bool among the scalars before anything else).
_Feed = Callable[["_Hasher", Any, str], None]


@functools.cache
def _rules() -> tuple[tuple[type | tuple[type, ...], _Feed], ...]:
    import torch

    return (
        ((type(None), type(Ellipsis), bool, int, float, complex, str, bytes, range, slice), _Hasher.scalar),
        (torch.Tensor, lambda h, v, where: h.tensor(v, where)),
        ((torch.dtype, torch.device, torch.Size, torch.layout, torch.memory_format),
         lambda h, v, where: h.feed(type(v).__name__, v)),
        (np.ndarray, _Hasher.ndarray),
        (np.generic, lambda h, v, where: h.feed("np", v.dtype.str, repr(v))),
        ((list, tuple, dict, set, frozenset), _Hasher.once_container),
        (enum.Enum, lambda h, v, where: h.feed("enum", type(v).__module__, type(v).__qualname__, v.name)),
        # derived state (LSTM keeps weak references to its weights)
        (weakref.ref, lambda h, v, where: h.feed("weakref")),
        (types.ModuleType, lambda h, v, where: h.module_object(v)),
        (torch.nn.Module, lambda h, v, where: h.module(v, where)),
        (type, lambda h, v, where: h.klass(v, where)),
        (types.FunctionType, lambda h, v, where: h.function(v, where)),
        (types.MethodType, _Hasher.method),
        ((staticmethod, classmethod), lambda h, v, where: h.parts(type(v).__name__, v.__func__, where=where)),
        (property, lambda h, v, where: h.parts("property", v.fget, v.fset, v.fdel, where=where)),
        (functools.partial, lambda h, v, where: h.parts("partial", v.func, v.args, v.keywords, where=where)),
        ((types.BuiltinFunctionType, types.MethodWrapperType, types.WrapperDescriptorType,
          types.MethodDescriptorType, types.ClassMethodDescriptorType, types.GetSetDescriptorType,
          types.MemberDescriptorType), _Hasher.builtin),
        (logging.Logger, lambda h, v, where: h.feed("logger", v.name)),
        (re.Pattern, lambda h, v, where: h.feed("pattern", v.pattern, v.flags)),
    )

def _slots(cls: type) -> tuple[str, ...]:
    """The ``__slots__`` names of a class of Python code (C types hold state we cannot see)."""
    if cls.__flags__ & (1 << 9) == 0:  # not Py_TPFLAGS_HEAPTYPE: a C type
        return ()
    names: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else [n for n in slots if n not in ("__dict__", "__weakref__")]
    return tuple(names)


class Unfingerprintable(Exception):
    """The model holds something that cannot be hashed by content (the message says what)."""


_STDLIB = os.path.realpath(sysconfig.get_paths()["stdlib"])


def _library_file(path: str) -> str | None:
    """'stdlib' or 'site' for a file of the standard library or an installed package, else None."""
    if path.startswith("<frozen"):
        return "stdlib"
    real = os.path.realpath(path)
    if "site-packages" in real or "dist-packages" in real:
        return "site"
    return "stdlib" if real.startswith(_STDLIB + os.sep) else None


@functools.cache
def _library(modname: str) -> str | None:
    """A tag naming a module of the standard library or of an installed library (its package
    version, and the size and time of the module's file, which a reinstall changes even where
    the version stays), else None: the module is the user's code, hashed by content. Judged by
    where the module's file lies, so that a user's module named like a stdlib one is user code."""
    top = modname.partition(".")[0]
    module, package = sys.modules.get(modname), sys.modules.get(top)
    # a namespace package (google.protobuf) has no file of its own: its module's, or its path
    file = getattr(module, "__file__", None) or getattr(package, "__file__", None) \
        or next(iter(getattr(package, "__path__", None) or []), None)
    if file is None:
        builtin = modname in sys.builtin_module_names or top in sys.builtin_module_names \
            or (module is not None and top in sys.stdlib_module_names)
        return f"{modname} (built in)" if builtin else None
    kind = _library_file(str(file))
    if kind is None:
        return None
    if kind == "stdlib":
        return f"{modname} (stdlib)"
    try:
        st = os.stat(str(file))
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        stamp = "?"
    return f"{top}=={getattr(package, '__version__', '?')} {modname} {stamp}"


def _user_code(fn: types.FunctionType) -> bool:
    """Whether a function is the user's (hashed by its code): judged by the file its code comes
    from, not ``__module__`` (functools.wraps copies a library function's onto a user's wrapper)."""
    return _library_file(fn.__code__.co_filename) is None


class _Hasher:
    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._seen: dict[int, int] = {}
        self._keep: list[Any] = []  # ids stay unique while the walk runs
        self._depth = 0

    def digest(self) -> str:
        return self._h.hexdigest()

    def feed(self, *parts: Any) -> None:
        for p in parts:
            data = p if isinstance(p, bytes) else str(p).encode()
            self._h.update(len(data).to_bytes(8, "little") + data)

    def buffer(self, arr: np.ndarray) -> None:
        """A contiguous array's bytes, without a copy (weights can be gigabytes)."""
        self._h.update(arr.nbytes.to_bytes(8, "little"))
        self._h.update(arr.reshape(-1).view(np.uint8).data)

    def _once(self, obj: Any) -> bool:
        """True the first time ``obj`` is met; later meetings feed a back-reference."""
        ref = self._seen.get(id(obj))
        if ref is not None:
            self.feed("ref", ref)
            return False
        self._seen[id(obj)] = len(self._seen)
        self._keep.append(obj)
        return True

    def value(self, v: Any, where: str) -> None:
        self._depth += 1
        if self._depth > _MAX_DEPTH:
            raise Unfingerprintable(f"{where}: nested too deeply")
        try:
            self._value(v, where)
        finally:
            self._depth -= 1

    def _value(self, v: Any, where: str) -> None:
        """Feed ``v`` by the first rule of :func:`_rules` its type matches."""
        for kinds, feed in _rules():
            if isinstance(v, kinds):
                feed(self, v, where)
                return
        if hasattr(v, "__dict__") or _slots(type(v)):  # a plain Python object: its class and its state
            self.plain_object(v, where)
            return
        raise Unfingerprintable(f"{where} is a {type(v).__module__}.{type(v).__qualname__}, "
                                "which cannot be hashed by content")

    def scalar(self, v: Any, where: str) -> None:
        self.feed(type(v).__name__, repr(v))

    def ndarray(self, v: np.ndarray, where: str) -> None:
        if v.dtype.hasobject:
            raise Unfingerprintable(f"{where}: a numpy array of Python objects")
        self.feed("ndarray", v.dtype.str, v.shape)
        self.buffer(np.ascontiguousarray(v))

    def once_container(self, v: Any, where: str) -> None:
        if self._once(v):
            self.container(v, where)

    def parts(self, label: str, *values: Any, where: str) -> None:
        """A wrapper: its label, then what it wraps."""
        self.feed(label)
        for part in values:
            self.value(part, where)

    def method(self, v: types.MethodType, where: str) -> None:
        self.parts("method", v.__func__, where=where)
        self.value(v.__self__, f"{where}.__self__")

    def builtin(self, v: Any, where: str) -> None:
        owner = getattr(v, "__module__", None) or type(getattr(v, "__self__", None)).__module__
        self.feed("builtin", owner, getattr(v, "__qualname__", repr(v)), _library(str(owner)) or "")
        self.value(getattr(v, "__self__", None), f"{where}.__self__")  # a bound one: its object's state

    def plain_object(self, v: Any, where: str) -> None:
        if self._once(v):
            self.klass(type(v), where)
            self.value(dict(getattr(v, "__dict__", {})), where)
            for slot in _slots(type(v)):
                self.feed("slot", slot)
                self.value(getattr(v, slot, _UNSET), f"{where}.{slot}")

    def container(self, v: Any, where: str) -> None:
        self.feed("container", type(v).__module__, type(v).__qualname__, len(v))
        if isinstance(v, (set, frozenset)):  # no order of its own: elements by their own digests
            digests = []
            for item in v:
                sub = _Hasher()
                sub.value(item, f"{where} element")
                digests.append(sub.digest())
            self.feed(*sorted(digests))
        elif isinstance(v, dict):
            for k, item in v.items():
                self.value(k, f"{where} key")
                self.value(item, f"{where}[{k!r}]")
            self.value(getattr(v, "default_factory", None), f"{where} default_factory")
        else:
            for i, item in enumerate(v):
                self.value(item, f"{where}[{i}]")
        if type(v) not in (list, tuple, dict, set, frozenset):  # a subclass: its own state too
            self.value(dict(getattr(v, "__dict__", {})), where)

    def module_object(self, mod: types.ModuleType) -> None:
        """A module: a library's by name and version; the user's by its source file's bytes."""
        lib = _library(mod.__name__)
        self.feed("module", mod.__name__, lib or "")
        if lib is not None or not self._once(mod):
            return
        file = getattr(mod, "__file__", None)
        if file and os.path.isfile(file):
            with open(file, "rb") as fh:
                self.feed(fh.read())

    def tensor(self, t: Any, where: str) -> None:
        import torch

        if not self._once(t):  # shared (tied) weights: hashed once
            return

        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided \
                or t.is_quantized or t.device.type == "meta":
            raise Unfingerprintable(f"{where} is a {type(t).__name__} ({t.layout}, {t.device.type})")
        data = t.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
        self.feed("tensor", t.dtype, tuple(t.shape), t.requires_grad)
        self.buffer(data.view(torch.uint8).numpy() if data.numel() else np.zeros(0, np.uint8))

    def module(self, m: Any, where: str) -> None:
        if not self._once(m):
            return
        self.klass(type(m), where)
        for key, v in m.__dict__.items():
            if key in _SKIPPED_ATTRS:
                continue
            self.feed(key)
            if key == "_modules":
                for name, sub in v.items():
                    self.feed(name)
                    self.value(sub, f"{where}.{name}" if where else name)
            elif "hooks" in key and isinstance(v, dict):  # keyed by a process-wide counter: values only
                self.value(list(v.values()), f"{where}.{key}" if where else key)
            else:
                self.value(v, f"{where}.{key}" if where else key)

    def klass(self, cls: type, where: str) -> None:
        lib = _library(cls.__module__)
        if lib is not None or cls.__module__ == "builtins":
            self.feed("class", cls.__module__, cls.__qualname__, lib or "")
            for base in cls.__mro__:  # a library class patched with the user's code (nn.ReLU.forward = f)
                for name, attr in list(vars(base).items()):
                    fn = getattr(attr, "__func__", attr)
                    if isinstance(fn, types.FunctionType) and _user_code(fn):
                        self.feed("patched", base.__qualname__, name)
                        self.value(fn, f"{base.__qualname__}.{name}")
            return
        if not self._once(cls):
            return
        self.feed("user class", cls.__qualname__)
        for base in cls.__bases__:
            self.klass(base, where)
        for name in sorted(cls.__dict__):
            if name not in _SKIPPED_CLASS_ATTRS:
                self.feed(name)
                self.value(cls.__dict__[name], f"{cls.__qualname__}.{name}")

    def function(self, fn: types.FunctionType, where: str) -> None:
        if not _user_code(fn):
            self.feed("function", fn.__module__, fn.__qualname__, _library(fn.__module__ or "") or fn.__code__.co_filename)
            return
        if not self._once(fn):
            return
        self.feed("user function", fn.__qualname__)
        label = f"{fn.__module__}.{fn.__qualname__}"
        self.code(fn.__code__, fn.__globals__, label)
        self.value(fn.__defaults__, f"{label} defaults")
        self.value(fn.__kwdefaults__, f"{label} defaults")
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
            self.feed(name)
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                self.feed("empty cell")
                continue
            self.value(contents, f"{label} closure {name!r}")

    def code(self, code: types.CodeType, globs: dict[str, Any], label: str) -> None:
        self.feed("code", code.co_code, code.co_names, code.co_varnames, code.co_freevars,
                  code.co_argcount, code.co_kwonlyargcount, code.co_flags)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                self.code(const, globs, label)
            else:
                self.value(const, f"{label} constant")
        instructions = list(dis.get_instructions(code))
        for name in sorted({str(i.argval) for i in instructions if i.opname == "IMPORT_NAME"}):
            imported = sys.modules.get(name)  # `from helpers import act` inside a function
            if imported is not None:
                self.module_object(imported)
        used = sorted({i.argval for i in instructions if i.opname in _GLOBAL_LOADS})
        for name in used:
            if name not in globs:
                continue  # a builtin, or not defined yet
            value = globs[name]
            self.feed("global", name)
            self.value(value, f"{label}: global {name!r}")
            if isinstance(value, types.ModuleType) and _library(value.__name__) is None:
                # the user's own module: what the code may read from it (mymodels.helper)
                for attr in sorted(set(code.co_names) & set(vars(value))):
                    self.feed("attribute", attr)
                    self.value(vars(value)[attr], f"{label}: {name}.{attr}")


def model_fingerprint(model: Any) -> str:
    """The fingerprint of ``model`` (see the module's doc); raises :class:`Unfingerprintable`."""
    import torch

    if isinstance(model, torch.jit.ScriptModule):
        raise Unfingerprintable("a TorchScript module's code is not Python")
    h = _Hasher()
    try:
        h.feed("python", sys.version_info[:2])
        h.module(model, "")
        from torch.nn.modules import module as nn_module

        for hooks in ("_global_forward_hooks", "_global_forward_pre_hooks"):
            h.value(list(getattr(nn_module, hooks, {}).values()), hooks)
        h.feed("torch settings", *_torch_settings())
        h.feed("fx", _fx_code(model, h))
    except RecursionError:
        raise Unfingerprintable("the model's objects are nested too deeply") from None
    except Unfingerprintable:
        raise
    except Exception as exc:  # an object that breaks the walk: capture every time, saying why
        raise Unfingerprintable(f"{type(exc).__name__} while hashing the model: {exc}") from exc
    return h.digest()


#: torch's configuration modules that change what torch.export makes of the same code.
_CONFIGS = ("torch._dynamo.config", "torch.fx.experimental._config", "torch._export.config",
            "torch._functorch.config")


def _torch_settings() -> list[str]:
    """Global torch settings an export depends on. Configuration modules count only once
    imported: one that is not was never changed, so its defaults hold."""
    import torch

    settings = [f"grad={torch.is_grad_enabled()}", f"dtype={torch.get_default_dtype()}",
                f"mha_fastpath={torch.backends.mha.get_fastpath_enabled()}"]
    for name in _CONFIGS:
        config = sys.modules.get(name)
        copy = getattr(config, "get_config_copy", None)
        settings.append(f"{name}: {sorted((k, _stable_repr(v)) for k, v in copy().items()) if copy else 'defaults'}")
    return settings


def _stable_repr(v: Any) -> str:
    """repr with sets and dicts in a sorted order (string hashing varies between processes)."""
    if isinstance(v, (set, frozenset)):
        return "{" + ", ".join(sorted(_stable_repr(x) for x in v)) + "}"
    if isinstance(v, dict):
        return "{" + ", ".join(sorted(f"{_stable_repr(k)}: {_stable_repr(x)}" for k, x in v.items())) + "}"
    if isinstance(v, (list, tuple)):
        return type(v).__name__ + "(" + ", ".join(_stable_repr(x) for x in v) + ")"
    return repr(v)


def _fx_code(model: Any, h: _Hasher) -> str:
    """The fx graph of forward() as code (constants baked in), or why it has none."""
    import torch

    # forward() runs on fx proxies: what it stores on the modules is put back afterwards
    saved = [(m, dict(m.__dict__)) for m in model.modules()]
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # data-dependent control flow and the like: the other parts still hold
        return f"untraceable: {type(exc).__name__}"
    finally:
        for m, state in saved:
            m.__dict__.clear()
            m.__dict__.update(state)
    for name, v in vars(gm).items():
        if name.startswith("_tensor_constant"):
            h.tensor(v, f"fx constant {name}")
    return str(gm.code)
