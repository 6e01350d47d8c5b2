"""The small PyTorch models every test builds (seeded, eval mode), with example inputs and the
export options each needs: one set for the pipeline tests (:data:`ZOO`), the route tests
(:data:`ROUTE_MODELS`, through ``harness.route_job``) and the MIL reference tests. Imported
by tests only (imports torch inside functions)."""

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


def _batch(*names: str, high: int = 64) -> dict[str, dict[int, tuple[str, int, int]]]:
    """Axis 0 of every named input is the dynamic ``batch``."""
    return {n: {0: ("batch", 1, high)} for n in names}


def small_cnn() -> Case:
    """Conv + batch norm (non-trivial statistics), max pool, a strided conv, then a flatten
    whose size is computed from the input (``view(y.size(0), -1)``: a trace would bake the
    batch in) and a linear head."""
    import torch
    from torch import nn

    torch.manual_seed(5)

    class SmallCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
            self.fc = nn.Linear(8 * 3 * 3, 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            # the stride spelled out: coremltools' torch.export frontend (9.0) refuses a
            # max_pool2d node without it ("got 2 input(s), expected minimum 3")
            y = nn.functional.max_pool2d(torch.relu(self.bn(self.conv1(image))), 2, 2)
            y = self.conv2(y)
            return self.fc(y.view(y.size(0), -1))

    model = SmallCNN()
    with torch.no_grad():  # batch norm with real running statistics, as after training
        model.bn.running_mean.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
        model.bn.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
        model.bn.weight.uniform_(0.5, 1.5)
    image = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    return Case(model.eval(), (image,), {"output_names": ["logits"],
                                         "dynamic_dims": _batch("image")})


def encoder(layers: int = 1) -> Case:
    """Token embedding, ``layers`` transformer encoder layers (multi-head attention, GELU),
    layer norm and a per-token head: int64 ids in, ``(batch, seq, 4)`` scores out."""
    import torch
    from torch import nn

    torch.manual_seed(6)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation="gelu",
                                               batch_first=True)
            self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(16)
            self.head = nn.Linear(16, 4)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.enc(self.emb(tokens))))

    model = Encoder().eval()
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(6))
    return Case(model, (tokens,), {"output_names": ["scores"], "dynamic_dims": _batch("tokens"),
                                   "input_ranges": {"tokens": (0, 49)}})


def two_in_two_out() -> Case:
    """Two inputs; a dict of a float and an int64 (argmax) output, in insertion order (not
    sorted order)."""
    import torch
    from torch import nn

    torch.manual_seed(7)

    class TwoInTwoOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 4)

        def forward(self, features: torch.Tensor, extra: torch.Tensor) -> dict[str, torch.Tensor]:
            h = self.fc(features) + extra
            return {"score": h, "best": h.argmax(-1)}

    g = torch.Generator().manual_seed(7)
    return Case(TwoInTwoOut().eval(), (torch.randn(2, 6, generator=g), torch.randn(2, 4, generator=g)),
                {"dynamic_dims": _batch("features", "extra")})


def mixed_dtypes() -> Case:
    """float16, bool and int32 inputs; float32, int64 and float16 outputs."""
    import torch
    from torch import nn

    class MixedDtypes(nn.Module):
        def forward(self, x: torch.Tensor, mask: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, ...]:
            value = torch.where(mask, x.float(), torch.zeros_like(x, dtype=torch.float32))
            return value + n.float(), n.long() * 3 + mask.long(), x * 2

    g = torch.Generator().manual_seed(8)
    example = (torch.randn(2, 4, generator=g).half(), torch.rand(2, 4, generator=g) > 0.5,
               torch.randint(-5, 5, (2, 4), generator=g, dtype=torch.int32))
    return Case(MixedDtypes().eval(), example,
                {"output_names": ["value", "count", "half"], "dynamic_dims": _batch("x", "mask", "n"),
                 "input_ranges": {"n": (-5, 4)}})


def two_heads() -> Case:
    """One NCHW input, two outputs of the same shape (a position-matching bug swaps them),
    one named with a dot (not an identifier)."""
    import torch
    from torch import nn

    torch.manual_seed(9)

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 3, 1)
            self.b = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.tanh(self.a(x)), torch.sigmoid(self.b(x))

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(9))
    return Case(TwoHeads().eval(), (x,), {"output_names": ["head.a", "head_b"],
                                          "dynamic_dims": _batch("x")})


def upsample_depthwise() -> Case:
    """Bilinear upsampling, a depthwise and a pointwise conv; the input's logical name is
    not an identifier (converters sanitise it; the io map keeps it)."""
    import torch
    from torch import nn

    torch.manual_seed(10)

    class UpsampleDepthwise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.pw = nn.Conv2d(4, 2, 1)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.pw(torch.relu(self.dw(self.up(image))))

    image = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(10))
    return Case(UpsampleDepthwise().eval(), (image,),
                {"input_names": ["pixel.values"], "output_names": ["out"],
                 "dynamic_dims": _batch("pixel.values")})


def slice_ones_diff() -> Case:
    """``new_ones`` and ``diff`` (no coremltools converter for either) and a slice whose end
    depends on a dynamic size."""
    import torch
    from torch import nn

    class SliceOnesDiff(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            head = x[:, : x.shape[0] + 1]
            mask = x.new_ones(x.shape[0], x.shape[0] + 1)
            return torch.diff(head * mask, dim=1), head.flip(1)

    x = torch.randn(2, 10, generator=torch.Generator().manual_seed(11))
    return Case(SliceOnesDiff().eval(), (x,), {"output_names": ["d", "f"],
                                               "dynamic_dims": _batch("x", high=8)})


#: the models the route tests convert route by route (``lstm`` is the zoo's)
ROUTE_MODELS = {"cnn": small_cnn, "encoder": encoder, "lstm": lstm, "two_in_two_out": two_in_two_out,
                "mixed_dtypes": mixed_dtypes, "two_heads": two_heads,
                "upsample_depthwise": upsample_depthwise, "slice_ones_diff": slice_ones_diff}


# -- the MIL reference executor's models (converted by coremltools from a trace) ------------
def _rand(*shape: int) -> Any:
    import numpy as np
    import torch

    return torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))


def kernel_cnn() -> Case:
    """Conv + batch norm (folded into the conv by the converter) and a batch norm after
    pooling (kept as batch_norm), grouped/strided conv, pooling, SiLU, softmax."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(0)

    class ConvNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.c2 = nn.Conv2d(8, 8, 3, stride=2, groups=2, dilation=1)
            self.bn2 = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8 * 3 * 3, 10)
            with torch.no_grad():
                for bn in (self.bn1, self.bn2):
                    bn.running_mean.uniform_(-1, 1)  # type: ignore[union-attr]
                    bn.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
                    bn.weight.uniform_(0.5, 1.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.relu(self.bn1(self.c1(x)))
            x = F.max_pool2d(F.silu(self.c2(x)), 2)
            x = self.bn2(F.avg_pool2d(x, 3, 1, padding=1, count_include_pad=False))
            return torch.softmax(self.fc(x.flatten(1)), -1)

    return Case(ConvNet().eval(), (_rand(2, 3, 16, 16),))


def recurrent() -> Case:
    """A 2-layer bidirectional LSTM, then a GRU (which coremltools lowers to a while_loop)."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True)
            self.gru = nn.GRU(16, 5, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, _ = self.lstm(x)
            z, _ = self.gru(y)
            return z

    return Case(Recurrent().eval(), (_rand(2, 5, 6),))


def resize() -> Case:
    """Nearest and bilinear upsampling (scale and size, align_corners both ways), pixel shuffle."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Resize(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            a = F.interpolate(x, scale_factor=2, mode="nearest")
            b = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            c = F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=True)
            d = F.pixel_shuffle(torch.cat([x, x * 2, -x, x + 1], 1), 2)
            return a + b + d, c

    return Case(Resize().eval(), (_rand(1, 2, 4, 5),))
