"""Seeded fault for Core ML artifacts: scale a module's weight tensor where the package keeps
it, in ``Data/com.apple.CoreML/weights/weight.bin``. The blob is found through the MIL
program's const ops (``blobFileValue``: the offset of a 64-byte record, sentinel
``0xDEADBEEF``, data type, size, data offset) and recognised by value against the captured
program's parameter ``<module>.weight``: equal, or row by row proportional to it (a
convolution with its batch norm folded in by coremltools, whose scale is that of the
module's weight times the norm's). A batch norm's own weight, folded away, and a GRU's
weights, split per gate, are not found (``LookupError``)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

_DTYPES = {1: np.float16, 2: np.float32}  # the blob's data types used by float programs


def corrupt(artifact: Path, module: str, factor: float, bundle: Path, art: dict[str, Any]) -> None:
    import torch

    contract = json.loads((bundle / "contract.json").read_text())
    state = torch.export.load(str(bundle / contract["source"]["file"])).state_dict
    name = next((n for n in (f"{module}.weight", f"{module}.weight_ih_l0") if n in state), None)
    if name is None:
        raise LookupError(f"the captured program has no weight for {module}")
    want = state[name].detach().numpy().astype(np.float64)
    blob = artifact / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(blob.read_bytes())
    for offset in _blob_offsets(artifact):
        _, dtype_code, size, start = struct.unpack_from("<IIQQ", data, offset)
        dtype = _DTYPES.get(dtype_code)
        if dtype is None or size != want.size * np.dtype(dtype).itemsize:
            continue
        values = np.frombuffer(bytes(data[start:start + size]), dtype=dtype).astype(np.float64)
        if _matches(values.reshape(want.shape[0], -1), want.reshape(want.shape[0], -1)):
            data[start:start + size] = (values * factor).astype(dtype).tobytes()
            blob.write_bytes(bytes(data))
            return
    raise LookupError(f"no weight blob in {artifact.name} holds {name} (or a per-channel rescaling of it)")


def _blob_offsets(artifact: Path) -> list[int]:
    from portable_models.run.mil.loader import _read_spec

    spec = _read_spec(artifact)
    offsets = []
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                val = op.attributes.get("val") if op.type == "const" else None
                if val is not None and val.HasField("blobFileValue"):
                    offsets.append(int(val.blobFileValue.offset))
    return offsets


def _matches(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal, or each row (output channel) a multiple of the weight's row."""
    if np.allclose(got, want, rtol=1e-5, atol=1e-7):
        return True
    if want.shape[1] == 1:  # a vector: every one is "proportional" row by row
        return False
    scale = np.sum(got * want, axis=1) / np.maximum(np.sum(want * want, axis=1), 1e-30)
    return bool(np.allclose(got, want * scale[:, None], rtol=1e-4, atol=1e-6))
