"""Seeded fault for ExecuTorch artifacts: scale a module's weight constant inside the .pte.

The tensor is found through the program, not guessed: the instructions the diagnose tap maps
to the module (:func:`portable_models.diagnosis.executorch.program_map`) are read from the
execution plan (``exir._serialize``), and the constant among their arguments that holds the
source's ``<module>.weight`` (byte for byte, same sizes) is the one scaled. A constant buffer
that other values share (two LayerNorms with equal weights are stored once) is copied, and
only this module's value pointed at the copy. Inside an XNNPACK delegate the weights live in
the program's named data, keyed by the SHA-256 of their bytes: the entry with the key of the
module's weight is scaled, when a delegate call the module runs in is there to read it."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any


def corrupt(artifact: Path, module: str, factor: float, bundle: Path, art: dict[str, Any]) -> None:
    import numpy as np
    import torch
    from executorch.exir._serialize._program import deserialize_pte_binary, serialize_pte_binary

    from portable_models.diagnosis.executorch import METHOD, program_map

    source = bundle / "source" / "model.pt2"
    state = torch.export.load(str(source)).state_dict
    name = next((f"{module}.{w}" for w in ("weight", "weight_ih_l0") if f"{module}.{w}" in state), None)
    if name is None:
        raise LookupError(f"the source has no weight for {module!r}")
    raw = state[name].detach().contiguous().numpy().astype(np.float32).tobytes()
    scaled = (np.frombuffer(raw, dtype=np.float32) * np.float32(factor)).astype(np.float32).tobytes()
    pte = deserialize_pte_binary(artifact.read_bytes())
    plan = next(p for p in pte.program.execution_plan if p.name == METHOD)
    steps = [s for s in program_map(artifact, source, art["route_name"]).steps if module in s.modules]
    if not steps:
        raise LookupError(f"no instruction of {artifact.name} runs {module!r}")
    if not _scale_constant(pte.program, plan, steps, raw, scaled, list(state[name].shape)):
        _scale_named(pte, steps, raw, scaled, module)
    artifact.write_bytes(bytes(serialize_pte_binary(pte, extract_delegate_segments=True)))


def _scale_constant(program: Any, plan: Any, steps: list[Any], raw: bytes, scaled: bytes,
                    sizes: list[int]) -> bool:
    from executorch.exir.schema import Buffer

    for step in (s for s in steps if s.delegate is None):
        for arg in plan.chains[0].instructions[step.index].instr_args.args:
            val = plan.values[arg].val
            if type(val).__name__ != "Tensor" or val.data_buffer_idx <= 0 or list(val.sizes) != sizes:
                continue
            storage = bytes(program.constant_buffer[val.data_buffer_idx].storage)
            if storage[:len(raw)] != raw:
                continue
            new = Buffer(storage=scaled + storage[len(raw):])
            shared = sum(type(v.val).__name__ == "Tensor" and v.val.data_buffer_idx == val.data_buffer_idx
                         for v in plan.values) > 1
            if shared:  # give this value its own copy
                program.constant_buffer.append(new)
                plan.values[arg] = dataclasses.replace(plan.values[arg], val=dataclasses.replace(
                    val, data_buffer_idx=len(program.constant_buffer) - 1))
            else:
                program.constant_buffer[val.data_buffer_idx] = new
            return True
    return False


def _scale_named(pte: Any, steps: list[Any], raw: bytes, scaled: bytes, module: str) -> None:
    key = hashlib.sha256(raw).hexdigest()
    named = pte.named_data
    delegated = [s for s in steps if s.delegate is not None]
    if not delegated:
        raise LookupError(f"no constant of {module!r}'s instructions holds its weight")
    if named is None or key not in named.pte_data:
        raise LookupError(f"the {delegated[0].delegate} delegate holding {module!r} has no named data entry "
                          f"with its weight's bytes (folded into another constant, e.g. a batch norm "
                          f"fused into its convolution)")
    entry = named.pte_data[key]
    named.buffers[entry.buffer_index] = dataclasses.replace(named.buffers[entry.buffer_index], buffer=scaled) \
        if dataclasses.is_dataclass(named.buffers[entry.buffer_index]) else scaled
    for k, e in list(named.pte_data.items()):
        named.pte_data[k] = dataclasses.replace(e, alignment=max(e.alignment, 64))
