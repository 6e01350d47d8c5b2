"""A model class importable by ``--class tests_e2e_nets:TinyNet`` in the CLI tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(image)).mean(dim=(2, 3)))


def make(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().eval()
