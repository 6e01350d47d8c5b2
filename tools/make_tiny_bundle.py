"""Rebuild tests/data/tiny_bundle: a tiny MLP exported to ONNX, used by the plugin and
report tests so they need no conversion. Run after a contract schema change:
    .venv/bin/python tools/make_tiny_bundle.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import portable_models as pm

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "tiny_bundle"


def main() -> int:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    bundle = pm.export(model, (torch.rand(2, 4),), out=OUT, targets=["onnx"], overwrite=True,
                       input_names=["features"], output_names=["scores"], name="tiny",
                       dynamic_dims={"features": {0: ("batch", 1, 8)}})
    print(bundle.report())
    return 0 if bundle.ok else 1


if __name__ == "__main__":
    sys.exit(main())
