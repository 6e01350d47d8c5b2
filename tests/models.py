"""Small PyTorch models the tests build (seeded, eval mode), with example inputs and the
export options each needs. Imported by tests only (imports torch inside functions)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

#: what checks a Core ML artifact's numbers here: the real runtime on macOS, the MIL
#: reference executor elsewhere.
CORE_ML_CHECKER = "Core ML runtime, macOS" if sys.platform == "darwin" else "MIL reference, numpy"


@dataclass
class Case:
    model: Any
    example: tuple[Any, ...]
    options: dict[str, Any] = field(default_factory=dict)


def cnn() -> Case:
    from portable_models.demo import build_demo_model

    model, example = build_demo_model(seed=1)
    return Case(model, (example,), {"input_names": ["image"], "output_names": ["logits"],
                                    "dynamic_dims": {"image": {0: ("batch", 1, 16)}},
                                    "input_ranges": {"image": (0.0, 1.0)}})


def transformer() -> Case:
    import torch
    from torch import nn

    torch.manual_seed(2)

    class Encoder(nn.Module):
        def __init__(self, vocab: int = 100, dim: int = 32) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.1)
            self.layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=64, dropout=0.0,
                                                    activation="gelu", batch_first=True)
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, 5)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            h = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
            h = self.norm(self.layer(h))
            return self.head(h.mean(dim=1))

    model = Encoder().eval()
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(2))
    return Case(model, (tokens,), {"input_names": ["tokens"], "output_names": ["scores"],
                                   "dynamic_dims": {"tokens": {0: ("batch", 1, 8)}},
                                   "input_ranges": {"tokens": (0, 99)}})


def lstm() -> Case:
    import torch
    from torch import nn

    torch.manual_seed(3)

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(8, 16, batch_first=True)
            self.out = nn.Linear(16, 4)

        def forward(self, seq: torch.Tensor) -> torch.Tensor:
            h, _ = self.rnn(seq)
            return self.out(h[:, -1])

    model = Tagger().eval()
    return Case(model, (torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(3)),),
                {"input_names": ["seq"], "output_names": ["tags"]})


def two_in_dict_out() -> Case:
    import torch
    from torch import nn

    torch.manual_seed(4)

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(4, 8)
            self.cls = nn.Linear(8, 3)
            self.reg = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            h = torch.tanh(self.a(x) + self.b(y))
            return {"label": self.cls(h), "value": self.reg(h) * 2.0}

    model = TwoHeads().eval()
    g = torch.Generator().manual_seed(4)
    return Case(model, (torch.randn(3, 6, generator=g), torch.randn(3, 4, generator=g)),
                {"dynamic_dims": {"x": {0: ("batch", 1, 8)}, "y": {0: ("batch", 1, 8)}}})


ZOO = {"cnn": cnn, "transformer": transformer, "lstm": lstm, "two_in_dict_out": two_in_dict_out}
