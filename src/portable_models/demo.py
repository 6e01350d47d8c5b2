"""The built-in demo: a small CNN with batch norm and a dynamic batch dim, exported to
every target, verified from the bundle, and printed as a parity table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["build_demo_model", "run_demo"]


def build_demo_model(seed: int = 0) -> tuple[Any, Any]:
    """A seeded, eval-mode CNN (conv, batch norm with non-trivial statistics, pooling,
    linear) for 3x32x32 images and 10 classes, with an example batch of 2."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class DemoNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
            )
            self.head = nn.Linear(32, 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.head(torch.flatten(self.features(image), 1))

    model = DemoNet()
    with torch.no_grad():  # give batch norm real running statistics, as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    example = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return model, example


def run_demo(out: str | Path = "dist/demo", *, targets: Any = "all", progress: Any = None,
             jobs: int = 1) -> Any:
    """Export the demo model and return the verified report."""
    from portable_models.api import export

    model, example = build_demo_model()
    return export(
        model, (example,), out=out, targets=targets, overwrite=True, name="demo",
        input_names=["image"], output_names=["logits"],
        dynamic_dims={"image": {0: ("batch", 1, 32)}}, input_ranges={"image": (0.0, 1.0)},
        progress=progress, jobs=jobs,
    )
