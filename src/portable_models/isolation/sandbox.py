"""Confine the calling process with Landlock (Linux ≥ 5.13), by direct syscalls.

:func:`confine` is irreversible and inherited by every child: call it in a worker
*before* it starts threads (before importing numpy/torch), because Landlock confines only
the calling thread and the threads it starts afterwards. Only the rights the running
kernel's Landlock ABI knows are handled; older kernels confine less (ABI < 4: TCP is not
restricted; ABI < 6: abstract UNIX sockets and signals are not scoped).

What Landlock does *not* cover (see the uapi docs): UDP, raw and named UNIX sockets;
reading metadata (``stat``) and path traversal; anything a process with capabilities can
do outside the file system, which is why :func:`confine` also drops every capability.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import glob
import json
import os
import platform
import site
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from portable_models.core.settings import CONFINE_ENV, SANDBOX_ENV, sandbox_off
from portable_models.errors import PortableModelsError

__all__ = [
    "CONFINE_ENV",
    "Confinement",
    "confine_or_why",
    "confinement",
    "sandbox_reason",
    "SandboxError",
    "SandboxStatus",
    "confine",
    "default_execute_paths",
    "default_read_paths",
    "default_write_paths",
    "status",
]


# Syscall numbers: one table for every Linux architecture since 5.x (not alpha).
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}  # elsewhere: libc's capset()

# Filesystem rights (uapi/linux/landlock.h): bits 0-12 are ABI 1.
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_MAKE_CHAR, _MAKE_BLOCK = 1 << 6, 1 << 11
_TRUNCATE, _IOCTL_DEV = 1 << 14, 1 << 15  # ABI 3, ABI 5 (REFER = 1 << 13 is ABI 2)
_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

_READ = _READ_FILE | _READ_DIR
_RUN = _READ | _EXECUTE
# Everything but executing and creating device nodes (a root process could mknod the disk).
_WRITE = ((1 << 16) - 1) & ~(_EXECUTE | _MAKE_CHAR | _MAKE_BLOCK)


class SandboxError(PortableModelsError):
    """The OS sandbox is unavailable or could not be applied."""

    code = "sandbox_failed"


@dataclass(frozen=True)
class SandboxStatus:
    available: bool
    abi: int
    reason: str


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64),
                ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel struct is __attribute__((packed)): 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):  # one per 32-bit word of the capability sets
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _syscall(number: int, *args: object) -> int:
    """Run one syscall; raise OSError with the errno text when it fails."""
    wrapped = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]  # varargs: full width
    result = int(_libc().syscall(ctypes.c_long(number), *wrapped))
    if result < 0:
        _raise_errno()
    return result


def _raise_errno() -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


@functools.cache
def _probe() -> SandboxStatus:
    if not sys.platform.startswith("linux"):
        return SandboxStatus(False, 0, f"Landlock is Linux-only (this is {sys.platform})")
    try:
        abi = _syscall(_SYS_CREATE_RULESET, ctypes.c_void_p(None), 0, _CREATE_RULESET_VERSION)
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            return SandboxStatus(False, 0, "Landlock is not supported by this kernel")
        if exc.errno == errno.EOPNOTSUPP:
            return SandboxStatus(False, 0, "Landlock is not enabled in this kernel (lsm= boot option)")
        return SandboxStatus(False, 0, f"Landlock probe failed: {exc.strerror}")
    if abi < 1:
        return SandboxStatus(False, abi, f"Landlock ABI {abi} is unusable")
    scope = ("filesystem, TCP, scopes" if abi >= 6 else "filesystem, TCP" if abi >= 4
             else "filesystem only; network not restricted by Landlock")
    return SandboxStatus(True, abi, f"Landlock ABI {abi} ({scope})")


def status() -> SandboxStatus:
    """Whether :func:`confine` can work here, and why not (the kernel probe is cached)."""
    if sandbox_off():
        return SandboxStatus(False, 0, f"sandbox turned off by {SANDBOX_ENV}=off")
    return _probe()


def _handled(abi: int) -> tuple[int, int, int]:
    """(fs, net, scoped) masks this ABI knows; deny-network parts filled in later."""
    fs_bits = 13 + (abi >= 2) + (abi >= 3) + (abi >= 5)
    net = _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0
    scoped = _SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL if abi >= 6 else 0
    return (1 << fs_bits) - 1, net, scoped


def _add_path_rule(ruleset_fd: int, path: str | Path, access: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return  # documented: paths that do not exist are skipped
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= _FILE_RIGHTS  # directory rights on a file are EINVAL
        if access:
            attr = _PathBeneathAttr(access, fd)
            _syscall(_SYS_ADD_RULE, ruleset_fd, _RULE_PATH_BENEATH, ctypes.byref(attr), 0)
    except OSError as exc:
        raise SandboxError(f"Landlock refused a rule for {path}: {exc.strerror}",
                           file=str(path), stage="sandbox") from exc
    finally:
        os.close(fd)


def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) <= 1
    except OSError:
        return True  # cannot tell; Landlock itself will still confine this thread


def confine(*, read: Sequence[str | Path] = (), write: Sequence[str | Path] = (),
            execute: Sequence[str | Path] = (), deny_network: bool = True) -> int:
    """Confine this process (and its future children) for good; return the ABI used.

    ``read``: read files and list directories beneath; ``write``: also create, write,
    truncate, rename and remove beneath (no device nodes); ``execute``: read and run.
    Everything else in the file system is denied. ``deny_network`` denies TCP bind and
    connect (ABI ≥ 4) and scopes abstract UNIX sockets and signals to this process and
    its children (ABI ≥ 6). Paths that do not exist are skipped. Then every capability
    is dropped (effective, permitted, inheritable, ambient, and the bounding set when this
    process may change it, i.e. holds CAP_SETPCAP), so a root worker keeps no privileges.
    """
    state = status()
    if not state.available:
        raise SandboxError(f"cannot sandbox: {state.reason}", stage="sandbox",
                           fix=f"run on Linux ≥ 5.13 with Landlock enabled, or unset {SANDBOX_ENV}")
    if not _single_threaded():
        raise SandboxError("cannot sandbox a process that already runs several threads: "
                           "Landlock would confine only the calling one", stage="sandbox",
                           fix="call confine() before importing numpy/torch or starting threads")
    last_cap = _last_cap()  # read now: /proc may be out of reach once confined
    fs, net, scoped = _handled(state.abi)
    attr = _RulesetAttr(fs, net if deny_network else 0, scoped if deny_network else 0)
    size = 8 if state.abi < 4 else 16 if state.abi < 6 else 24
    try:
        ruleset_fd = _syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), size, 0)
    except OSError as exc:
        raise SandboxError(f"landlock_create_ruleset failed: {exc.strerror}", stage="sandbox") from exc
    try:
        for paths, access in ((read, _READ), (write, _WRITE), (execute, _RUN)):
            for path in paths:
                _add_path_rule(ruleset_fd, path, access & fs)
        _restrict(ruleset_fd)
    finally:
        os.close(ruleset_fd)
    _drop_capabilities(last_cap)
    return state.abi


def _restrict(ruleset_fd: int) -> None:
    try:
        args = (ctypes.c_ulong(v) for v in (_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        if _libc().prctl(*args) != 0:
            _raise_errno()
        _syscall(_SYS_RESTRICT_SELF, ruleset_fd, 0)
    except OSError as exc:
        raise SandboxError(f"landlock_restrict_self failed: {exc.strerror}", stage="sandbox") from exc


def _last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 63  # unknown: drop until the kernel answers EINVAL


def _drop_capabilities(last_cap: int) -> None:
    """Empty the bounding set (needs CAP_SETPCAP: skipped without it), ambient, then the rest."""
    try:
        for cap in range(last_cap + 1):
            if _libc().prctl(*(ctypes.c_ulong(v) for v in (_PR_CAPBSET_DROP, cap, 0, 0, 0))):
                if ctypes.get_errno() in (errno.EPERM, errno.EINVAL):
                    break  # EPERM: not privileged (capset suffices); EINVAL: past the last cap
                _raise_errno()
        args = (_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        if _libc().prctl(*(ctypes.c_ulong(v) for v in args)) != 0:
            _raise_errno()
        header, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()  # all zero
        number = _SYS_CAPSET.get(platform.machine())
        if number is not None:
            _syscall(number, ctypes.byref(header), ctypes.byref(data))
        elif not hasattr(_libc(), "capset"):
            raise OSError(errno.ENOSYS, f"no capset syscall known for {platform.machine()}")
        elif _libc().capset(ctypes.byref(header), ctypes.byref(data)) != 0:
            _raise_errno()
    except OSError as exc:
        raise SandboxError(f"dropping capabilities failed: {exc.strerror}", stage="sandbox") from exc


# What a Python worker needs to import numpy/torch/onnxruntime/tensorflow and run.
_SYSTEM_READ = (
    "/usr/lib", "/usr/lib64", "/lib", "/lib64",  # shared libraries, locales, gconv
    "/usr/share/zoneinfo",                       # zoneinfo / time zones
    "/proc", "/sys",                             # CPU, memory and thread introspection
    "/dev/urandom", "/dev/random", "/dev/zero",  # os.urandom fallback, numpy/torch seeding
    # Single /etc files, never /etc itself (/etc/shadow, keys): dynamic loader, time zone,
    # user lookups (getpass/getpwuid; passwords live in shadow, not passwd), locale.
    "/etc/ld.so.cache", "/etc/localtime", "/etc/nsswitch.conf", "/etc/passwd",
    "/etc/group", "/etc/locale.alias",
)
_SYSTEM_EXECUTE = ("/usr/lib", "/usr/lib64", "/lib", "/lib64")  # the ELF loader (ld.so)
_SYSTEM_WRITE = ("/dev/null",)  # subprocess.DEVNULL
# GPU device nodes (CUDA, DRM) need open + ioctl; only the nodes, never their directories.
_GPU_DEVICES = ("/dev/nvidia*", "/dev/nvidia-caps/*", "/dev/dri/*")


def _unique_existing(paths: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for path in paths:
        if path and os.path.isabs(path) and os.path.exists(path):
            seen.setdefault(os.path.realpath(path), None)
    return list(seen)


def default_read_paths() -> list[str]:
    """The Python installation (its prefixes and site-packages), the folder holding this
    package (editable installs) and the system files above. Not the rest of ``sys.path``: a
    ``PYTHONPATH`` naming a project folder would open it to a bundle's runtime."""
    package_root = str(Path(__file__).resolve().parents[2])
    python = (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
    sites = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    return _unique_existing([*python, *sites, package_root, *_SYSTEM_READ])


def default_execute_paths() -> list[str]:
    """The real interpreter binary (to start child interpreters) and the ELF loader."""
    return _unique_existing([sys.executable, *_SYSTEM_EXECUTE])


def default_write_paths() -> list[str]:
    """``/dev/null`` and the GPU device nodes that exist here (not ``/dev/shm``: it is shared
    by every process of the machine)."""
    gpu = [hit for pattern in _GPU_DEVICES for hit in glob.glob(pattern)
           if stat.S_ISCHR(os.stat(hit).st_mode)]
    return _unique_existing([*_SYSTEM_WRITE, *gpu])


def sandbox_reason() -> str | None:
    """None where verify's workers can be sandboxed here, else why not."""
    st = status()
    return None if st.available else st.reason


def confinement(root: Path, *writable: Path) -> Confinement | None:
    """The sandbox for a verify or bench of ``root`` (reads of the bundle, writes to the
    caller's scratch folders), or None where there is none here."""
    if sandbox_reason() is not None:
        return None
    return Confinement(read=(str(root.resolve()),), write=tuple(str(p.resolve()) for p in writable))


def confine_or_why(root: Path, *writable: Path) -> tuple[Confinement | None, str | None]:
    """:func:`confinement`, and why the workers run outside the sandbox where it is None
    (what a refusal of a code-bearing artifact names)."""
    confine = confinement(root, *writable)
    return confine, None if confine is not None else sandbox_reason() or "the sandbox is off"




@dataclass(frozen=True, kw_only=True)
class Confinement:
    """What a confined worker may touch besides the Python installation
    (:func:`portable_models.isolation.sandbox.default_read_paths`) and its own scratch folder:
    ``read`` (a bundle), ``write`` (the caller's scratch folders). Workers are reused only
    for jobs of the same confinement."""

    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()

    def to_env(self) -> str:
        return json.dumps({"read": list(self.read), "write": list(self.write)})
