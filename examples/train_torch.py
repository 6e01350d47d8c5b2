"""Train a small CNN on synthetic data, then export it and prove parity.

    python examples/train_torch.py --out dist/torch-cnn

At the end of training, one call writes the bundle: every artifact, run in its real
runtime on real samples, against the trained model. A non-zero exit fails the CI job.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import portable_models as pm


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is the quadrant holding the brightest blob."""
    x = torch.rand(n, 3, 32, 32, generator=generator) * 0.2
    y = torch.randint(0, 4, (n,), generator=generator)
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, :, r * 16 + 4: r * 16 + 12, c * 16 + 4: c * 16 + 12] += 0.8
    return x, y


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="dist/torch-cnn")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--targets", nargs="+", default=["all"])
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, 4),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = make_data(512, g)
    for epoch in range(args.epochs):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            loss.backward()
            opt.step()
        print(f"epoch {epoch}: loss {loss.item():.3f}")

    model.eval()
    held_out, _ = make_data(8, g)
    samples = [{"image": held_out[i:i + 2].numpy()} for i in range(0, 8, 2)]  # real data beats random
    bundle = pm.export(model, (held_out[:2],), out=args.out,
                       targets="all" if args.targets == ["all"] else args.targets,
                       input_names=["image"], output_names=["logits"],
                       dynamic_dims={"image": {0: ("batch", 1, 32)}}, input_ranges={"image": (0.0, 1.0)},
                       samples=samples, overwrite=True)
    print(bundle.report())
    return 0 if bundle.ok else 1


if __name__ == "__main__":
    sys.exit(main())
