"""Bad contracts and bad golden archives, built the way an attacker would (a copy of the
tiny bundle, edited, hashes recomputed): each is a ContractError naming the file, exit
code 2 through the real CLI, never a traceback; golden archives are read under a cap
derived from the contract, before anything is inflated."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from portable_models.contract.bundle import list_files
from portable_models.contract.model import MAX_CONTRACT_BYTES, MAX_DEPTH, load_contract
from portable_models.core import golden
from portable_models.core.hashing import sha256_path
from portable_models.core.spec import DimSpec, TensorSpec
from portable_models.core.tolerance import TolerancePolicy
from portable_models.errors import ContractError

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny_bundle"

Edit = Callable[[dict[str, Any]], None]


def _copy(tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(TINY, bundle)
    return bundle


def _rehash(bundle: Path, data: dict[str, Any]) -> None:
    """What an attacker does after changing a file: the contract's hashes made to match."""
    data["files"] = list_files(bundle)
    for art in data["artifacts"]:
        if art.get("file") and (bundle / art["file"]).exists():
            art["sha256"] = sha256_path(bundle / art["file"])
            art["bytes"] = (bundle / art["file"]).stat().st_size


def _edited(tmp_path: Path, edit: Edit) -> Path:
    bundle = _copy(tmp_path)
    data = json.loads((bundle / "contract.json").read_text())
    _rehash(bundle, data)
    edit(data)
    (bundle / "contract.json").write_text(json.dumps(data, indent=2))
    return bundle


def _text(tmp_path: Path, text: str | bytes) -> Path:
    bundle = _copy(tmp_path)
    path = bundle / "contract.json"
    path.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    return bundle


def _tiny_text() -> str:
    return (TINY / "contract.json").read_text()


def _art(d: dict[str, Any]) -> dict[str, Any]:
    return dict(d["artifacts"][0])


def _set(path: str, value: Any) -> Edit:
    """An edit setting ``a/b/0/c`` to ``value``."""
    def edit(d: dict[str, Any]) -> None:
        keys: list[Any] = [int(k) if k.isdigit() else k for k in path.split("/")]
        node: Any = d
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return edit


# -- cases: (id, how to build the bundle from tmp_path, a word the message must hold) --

def _big(tmp: Path) -> Path:
    return _text(tmp, _tiny_text()[:-2] + " " * (MAX_CONTRACT_BYTES + 10) + "}\n")


def _deep_array(tmp: Path) -> Path:
    text = _tiny_text().rstrip()[:-1] + ', "options": ' + "[" * 100_000 + "]" * 100_000 + "}"
    return _text(tmp, text.replace('"options": {', '"options_was": {', 1))


def _deep_object(tmp: Path) -> Path:
    return _text(tmp, '{"a": ' * 100_000 + "1" + "}" * 100_000)


def _deep_under_recursion_limit(tmp: Path) -> Path:
    return _edited(tmp, _set("options/x", json.loads("[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5))))


def _duplicate_key(tmp: Path) -> Path:
    return _text(tmp, _tiny_text().replace('"name": "tiny",', '"name": "tiny",\n  "name": "evil",', 1))


def _nan(tmp: Path) -> Path:
    return _text(tmp, _tiny_text().replace('"atol": 0.0001', '"atol": NaN', 1))


def _infinity(tmp: Path) -> Path:
    return _text(tmp, _tiny_text().replace('"atol": 0.0001', '"atol": -Infinity', 1))


def _overflowing_float(tmp: Path) -> Path:
    return _text(tmp, _tiny_text().replace('"atol": 0.0001', '"atol": 1e999', 1))


def _huge_int(tmp: Path) -> Path:
    return _text(tmp, _tiny_text().replace('"bytes": 4508', '"bytes": ' + "9" * 30, 1))


def _many_digits(tmp: Path) -> Path:
    return _text(tmp, _tiny_text().replace('"seed": 0', '"seed": ' + "9" * 5000, 1))


def _lone_surrogate(tmp: Path) -> Path:
    return _text(tmp, _tiny_text().replace('"name": "tiny"', '"name": "ti\\ud800ny"', 1))


def _not_utf8(tmp: Path) -> Path:
    return _text(tmp, _tiny_text().encode().replace(b'"tiny"', b'"ti\xffny"', 1))


CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    ("too-big", _big, "more than"),
    ("deep-array-100000", _deep_array, "nests deeper"),
    ("deep-object-100000", _deep_object, "nests deeper"),
    ("deep-under-recursion-limit", _deep_under_recursion_limit, "nests deeper"),
    ("duplicate-key", _duplicate_key, "appears twice"),
    ("nan", _nan, "NaN"),
    ("infinity", _infinity, "Infinity"),
    ("float-overflow", _overflowing_float, "out of range"),
    ("int-out-of-int64", _huge_int, "out of range"),
    ("int-5000-digits", _many_digits, "out of range"),
    ("lone-surrogate", _lone_surrogate, "surrogate"),
    ("not-utf8", _not_utf8, "UTF-8"),
    ("empty", lambda t: _text(t, ""), "not valid JSON"),
    ("top-level-array", lambda t: _text(t, "[1, 2]"), "JSON object"),
    ("unknown-top-level", lambda t: _edited(t, _set("extra", 1)), "extra"),
    ("extra-field-in-artifact", lambda t: _edited(t, _set("artifacts/0/evil", "x")), "evil"),
    ("extra-field-in-source", lambda t: _edited(t, _set("source/url", "http://x")), "url"),
    ("extra-field-in-golden", lambda t: _edited(t, _set("golden/loader", "pickle")), "loader"),
    ("extra-field-in-io", lambda t: _edited(t, _set("artifacts/0/io/inputs/features/x", 1)), "io"),
    ("absolute-artifact", lambda t: _edited(t, _set("artifacts/0/file", "/etc/passwd")), "artifacts/0/file"),
    ("dotdot-artifact", lambda t: _edited(t, _set("artifacts/0/file", "artifacts/../../x.onnx")), "file"),
    ("backslash-artifact", lambda t: _edited(t, _set("artifacts/0/file", "artifacts\\model.onnx")), "file"),
    ("empty-segment", lambda t: _edited(t, _set("artifacts/0/file", "artifacts//model.onnx")), "file"),
    ("dot-segment", lambda t: _edited(t, _set("artifacts/0/file", "./artifacts/model.onnx")), "file"),
    ("newline-path", lambda t: _edited(t, _set("artifacts/0/file", "artifacts/model.onnx\n")), "file"),
    ("control-char-path", lambda t: _edited(t, _set("artifacts/0/file", "artifacts/m\x1b[2J.onnx")), "file"),
    ("absolute-files-entry", lambda t: _edited(t, _set("files/0/path", "/etc/shadow")), "files/0/path"),
    ("dotdot-files-entry", lambda t: _edited(t, _set("files/0/path", "../outside")), "files/0/path"),
    ("absolute-source", lambda t: _edited(t, _set("source/file", "/root/model.pt2")), "source/file"),
    ("dotdot-golden", lambda t: _edited(t, _set("golden/outputs", "../outputs.npz")), "golden/outputs"),
    ("bad-sha", lambda t: _edited(t, _set("artifacts/0/sha256", "z" * 64)), "sha256"),
    ("uppercase-sha", lambda t: _edited(t, _set("files/0/sha256", "A" * 64)), "sha256"),
    ("sha-with-newline", lambda t: _edited(t, _set("source/sha256", "a" * 64 + "\n")), "sha256"),
    ("negative-bytes", lambda t: _edited(t, _set("files/0/bytes", -1)), "bytes"),
    ("string-tolerance", lambda t: _edited(t, _set("tolerance/float32/atol", "0.1")), "atol"),
    ("negative-atol", lambda t: _edited(t, _set("tolerance/float32/atol", -1e-3)), "atol"),
    ("unknown-tolerance-key", lambda t: _edited(t, _set("tolerance/float32/slack", 1)), "slack"),
    ("tolerance-without-atol", lambda t: _edited(t, _set("tolerance/int8", {"rtol": 0.1})), "atol"),
    ("override-string", lambda t: _edited(t, _set("tolerance/outputs", {"scores": {"atol": "big"}})), "atol"),
    ("cosine-above-one", lambda t: _edited(t, _set("tolerance/float16/cosine_min", 2)), "cosine_min"),
    ("wrong-target", lambda t: _edited(t, _set("artifacts/0/target", "tensorrt")), "target"),
    ("wrong-status", lambda t: _edited(t, _set("artifacts/0/status", "passed")), "status"),
    ("long-name", lambda t: _edited(t, _set("name", "n" * 10_000)), "name"),
    ("long-route-name", lambda t: _edited(t, _set("artifacts/0/route_name", "r" * 10_000)), "route_name"),
    ("tensor-name-newline", lambda t: _edited(t, _set("inputs/0/name", "features\n")), "name"),
    ("convert-s-string", lambda t: _edited(t, _set("artifacts/0/timings/convert_s", "fast")), "convert_s"),
    ("metric-string", lambda t: _edited(t, _set("artifacts/0/parity/outputs/scores/max_abs", "x")), "max_abs"),
    ("error-message-number", lambda t: _edited(t, _set("artifacts/0/attempts/0/error", {"message": 3})),
     "message"),
    ("dims-extra-key", lambda t: _edited(t, _set("dims/batch/step", 2)), "step"),
    ("cases-zero", lambda t: _edited(t, _set("golden/cases", 0)), "cases"),
    ("wrong-schema", lambda t: _edited(t, _set("schema", "portable-models/contract/v9\x1b[2J")), "schema"),
    # schema-valid, but not a usable contract
    ("duplicate-input", lambda t: _edited(t, lambda d: d["inputs"].append(dict(d["inputs"][0]))), "twice"),
    ("dims-min-above-max", lambda t: _edited(t, _set("dims/batch", {"min": 9, "max": 2})), "min"),
    ("perm-not-permutation", lambda t: _edited(t, _set("artifacts/0/io/inputs/features/perm", [0, 0])),
     "permutation"),
    ("quant-zero-scale", lambda t: _edited(t, _set("artifacts/0/io/inputs/features/quant",
                                                   {"dtype": "int8", "scale": 0, "zero_point": 0})), "scale"),
    ("quant-float-dtype", lambda t: _edited(t, _set("artifacts/0/io/inputs/features/quant",
                                                    {"dtype": "float64", "scale": 1.0, "zero_point": 0})), "dtype"),
    ("io-unknown-tensor", lambda t: _edited(t, _set("artifacts/0/io/outputs/ghost", {"name": "g"})), "ghost"),
    ("cases-checked-past-end", lambda t: _edited(t, _set("artifacts/0/meta/cases_checked", [0, 99])),
     "cases_checked"),
    ("duplicate-artifact", lambda t: _edited(t, lambda d: d["artifacts"].append(_art(d))), "same target"),
    ("duplicate-file-entry", lambda t: _edited(t, lambda d: d["files"].append(dict(d["files"][0]))), "twice"),
]
#: the cases also run through the real CLI (a subprocess each): those the brief of the
#: bad-input catalogue names, and the ones that used to raise something else.
CLI_CASES = {"too-big", "deep-array-100000", "deep-object-100000", "duplicate-key", "nan", "unknown-top-level",
             "extra-field-in-artifact", "absolute-artifact", "dotdot-artifact", "backslash-artifact",
             "absolute-files-entry", "bad-sha", "negative-bytes", "string-tolerance", "negative-atol",
             "wrong-target", "lone-surrogate", "int-5000-digits", "perm-not-permutation", "wrong-schema",
             "tensor-name-newline"}


@pytest.mark.parametrize(("make", "word"), [(m, w) for _, m, w in CASES], ids=[c for c, _, _ in CASES])
def test_bad_contract_is_a_contract_error_naming_the_file(tmp_path: Path, make: Callable[[Path], Path],
                                                          word: str) -> None:
    bundle = make(tmp_path)
    with pytest.raises(ContractError) as info:
        load_contract(bundle)
    err = info.value
    assert type(err) is ContractError and err.exit_code == 2
    assert err.file == str(bundle / "contract.json")
    assert word in err.message, err.message
    assert err.fix
    assert "\x1b" not in str(err) and "\n" not in err.message


@pytest.mark.parametrize("make", [m for c, m, _ in CASES if c in CLI_CASES],
                         ids=[c for c, _, _ in CASES if c in CLI_CASES])
def test_bad_contract_through_the_cli_exits_2_without_a_traceback(tmp_path: Path,
                                                                  make: Callable[[Path], Path]) -> None:
    bundle = make(tmp_path)
    r = subprocess.run([sys.executable, "-m", "portable_models.cli", "inspect", str(bundle)],
                       capture_output=True, text=True, timeout=120, errors="replace")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error [load]: contract"), r.stderr
    assert str(bundle / "contract.json") in r.stderr
    assert "\x1b" not in r.stderr


def test_the_tiny_bundle_and_what_the_library_writes_still_validate(tmp_path: Path) -> None:
    contract = load_contract(TINY)
    TolerancePolicy.from_dict(contract.tolerance)
    text = contract.to_json()  # validates on write
    (tmp_path / "contract.json").write_text(text)
    again = load_contract(tmp_path)
    assert again.to_dict() == contract.to_dict()


def test_a_remembered_text_still_goes_through_the_bounded_parse(tmp_path: Path) -> None:
    load_contract(TINY)  # remembered as valid
    bundle = _duplicate_key(tmp_path)
    with pytest.raises(ContractError, match="twice"):
        load_contract(bundle)


# -- golden archives under a cap derived from the contract ------------------------------------

def test_golden_cap_follows_the_declared_shapes() -> None:
    contract = load_contract(TINY)
    cap_in, cap_out = contract.golden_max_bytes("inputs"), contract.golden_max_bytes("outputs")
    assert cap_in < 32 * 2**20 and cap_out < 32 * 2**20
    for which, cap in (("inputs", cap_in), ("outputs", cap_out)):
        cases = golden.load_cases(TINY / contract.golden[which], max_bytes=cap)
        assert len(cases) == contract.golden["cases"]
        assert golden.read_only_cases(TINY / contract.golden[which], max_bytes=cap)
    dims = {"batch": DimSpec(name="batch", min=1, max=1000), "seq": DimSpec(name="seq", min=1, max=10)}
    spec = TensorSpec(name="y", dtype="float32", shape=("batch", "2*seq + 1", 4))
    assert golden.golden_max_bytes([spec], dims, 2) >= 2 * 1000 * 21 * 4 * 8
    odd = TensorSpec(name="z", dtype="float32", shape=("Max(1, batch)", "((((", "__import__('os')"))
    assert golden.golden_max_bytes([odd], dims, 1) > 0  # unreadable dims get a bound, nothing runs


def _raw_zip(path: Path, name: str, data: bytes, *, method: int, file_size: int, crc: int) -> None:
    """A one-member zip written byte by byte: the directory says what the caller says,
    whatever ``data`` inflates to (no zip64: sizes under 4 GiB)."""
    raw_name = name.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data), file_size,
                        len(raw_name), 0)
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(data),
                          file_size, len(raw_name), 0, 0, 0, 0, 0, 0)
    body = local + raw_name + data
    directory = central + raw_name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(directory), len(body), 0)
    path.write_bytes(body + directory + end)


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _deflate(header: bytes, zero_mib: int, tail: bytes = b"") -> bytes:
    """``header`` then ``zero_mib`` MiB of zeros then ``tail``, deflated without compressing
    the zeros again and again (after a full flush, each MiB deflates to the same bytes)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH) if zero_mib else b""
    return head + block * zero_mib + c.compress(tail) + c.flush(zlib.Z_FINISH)


BOMB_MIB = 1536  # 1.5 GiB inflated


def _bomb(path: Path) -> None:
    """1.5 MB on disk, a float64 array of 1.5 GiB once inflated (the CRC does not matter:
    the zip module checks it only after inflating everything)."""
    header = _npy_header((BOMB_MIB * 2**20 // 8,))
    data = _deflate(header, BOMB_MIB)
    assert len(data) < 2 * 2**20
    _raw_zip(path, "0/scores.npy", data, method=zipfile.ZIP_DEFLATED,
             file_size=len(header) + BOMB_MIB * 2**20, crc=0)


def test_golden_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    bundle = _copy(tmp_path)
    _bomb(bundle / "golden" / "outputs.npz")
    data = json.loads((bundle / "contract.json").read_text())
    _rehash(bundle, data)  # the attacker's contract lists the bomb with its hash
    (bundle / "contract.json").write_text(json.dumps(data))
    script = textwrap.dedent(f"""
        import resource, sys
        from pathlib import Path
        from portable_models.core import golden
        from portable_models.contract.model import load_contract
        from portable_models.errors import ContractError
        bundle = Path({str(bundle)!r})
        contract = load_contract(bundle)
        cap = contract.golden_max_bytes("outputs")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for read in (golden.load_cases, golden.read_only_cases):
            try:
                read(bundle / contract.golden["outputs"], max_bytes=cap)
            except ContractError as exc:
                assert exc.file and exc.file.endswith("outputs.npz"), exc.file
                print("refused:", exc.message)
            else:
                sys.exit("the bomb was read")
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print("grown_kib", grown)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "refused:" in r.stdout and "declares" in r.stdout
    grown_kib = int(r.stdout.split("grown_kib")[1])
    assert grown_kib < 64 * 1024, f"peak RSS grew by {grown_kib} KiB"


def _small_member(tmp_path: Path, *, stream_extra_mib: int = 0, crc_of: bytes | None = None,
                  declared_extra: int = 0, stored: bool = False) -> Path:
    """A member whose directory declares 10 float64s; its stream may hold more, its CRC may
    be forged to match the declared prefix."""
    header = _npy_header((10,))
    declared = header + bytes(80)
    if stored:
        data = declared + bytes(stream_extra_mib)
        method = zipfile.ZIP_STORED
    else:
        data = _deflate(header, stream_extra_mib, bytes(80))
        method = zipfile.ZIP_DEFLATED
    path = tmp_path / "golden.npz"
    _raw_zip(path, "0/scores.npy", data, method=method, file_size=len(declared) + declared_extra,
             crc=zlib.crc32(crc_of if crc_of is not None else declared))
    return path


def test_a_stream_longer_than_its_declared_size_is_caught(tmp_path: Path) -> None:
    header = _npy_header((10,))
    # forged CRC of the declared prefix: the zip module alone would stop there and accept it
    path = _small_member(tmp_path, stream_extra_mib=64, crc_of=header + bytes(80))
    with pytest.raises(ContractError, match="does not end where"):
        golden.load_cases(path, max_bytes=2**30)


def test_a_member_that_fails_its_crc_or_ends_early_is_refused(tmp_path: Path) -> None:
    ok = _small_member(tmp_path)
    assert golden.load_cases(ok, max_bytes=2**20)[0]["scores"].shape == (10,)
    bad_crc = _small_member(tmp_path, crc_of=b"something else")
    with pytest.raises(ContractError, match="CRC"):
        golden.load_cases(bad_crc, max_bytes=2**20)
    longer_directory = _small_member(tmp_path, declared_extra=8)
    with pytest.raises(ContractError, match="longer than its header"):
        golden.load_cases(longer_directory, max_bytes=2**20)


def test_golden_members_that_are_not_plain_numbers_are_refused_under_a_cap(tmp_path: Path) -> None:
    path = tmp_path / "strings.npz"
    np.savez(path, **{"0/x": np.array(["ab", "c"])})
    with pytest.raises(ContractError, match="not a numeric one"):
        golden.load_cases(path, max_bytes=2**20)
    evil = tmp_path / "evil.npz"
    np.savez(evil, **{"0/x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ContractError, match="pickle"):
        golden.load_cases(evil, max_bytes=2**20)
    big = tmp_path / "big.npz"
    np.savez_compressed(big, **{"0/x": np.zeros(2**18)})  # 2 MiB (small on disk) against a 1 MiB cap
    with pytest.raises(ContractError, match="declares"):
        golden.load_cases(big, max_bytes=2**20)
    golden.load_cases(big)  # no cap: the general limits


def test_a_remembered_read_is_not_handed_out_past_a_smaller_cap(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(golden, "_SETTLED_NS", 0)
    path = tmp_path / "g.npz"
    golden.save_cases(path, [{"x": np.arange(2**17, dtype=np.float64)}])  # 1 MiB
    golden.read_only_cases(path)  # remembered, no cap
    with pytest.raises(ContractError):
        golden.read_only_cases(path, max_bytes=2**19)


def test_a_contract_that_is_a_fifo_or_a_device_is_refused_without_blocking(tmp_path: Path) -> None:
    import os

    bundle = _copy(tmp_path)
    (bundle / "contract.json").unlink()
    os.mkfifo(bundle / "contract.json")  # an open() for reading would wait for a writer
    with pytest.raises(ContractError, match="no contract") as info:
        load_contract(bundle)
    assert info.value.file == str(bundle / "contract.json")
    (bundle / "contract.json").unlink()
    (bundle / "contract.json").symlink_to("/dev/zero")
    with pytest.raises(ContractError, match="is a symlink"):  # never followed, whatever it names
        load_contract(bundle)
    (bundle / "contract.json").unlink()
    (bundle / "contract.json").symlink_to(TINY / "contract.json")  # a valid contract elsewhere
    with pytest.raises(ContractError, match="is a symlink"):
        load_contract(bundle)


def test_deep_nesting_is_refused_before_the_decoder_even_with_a_raised_recursion_limit() -> None:
    """Libraries raise the recursion limit (torch's compiler does); json's C scanner then
    overflows the C stack on a deep text instead of raising RecursionError. The nesting is
    counted before the decoder runs: a clean ContractError, never a crash."""
    code = ("import sys; sys.setrecursionlimit(10**7)\n"
            "from portable_models.contract.model import parse_contract_text\n"
            "from portable_models.errors import ContractError\n"
            "try:\n    parse_contract_text('{\"a\": ' + '[' * 2_000_000 + ']' * 2_000_000 + '}')\n"
            "except ContractError as exc:\n    print(exc.message)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "nests deeper than 64 levels" in r.stdout, (r.returncode, r.stderr[-500:])
