"""Real data for the variant tests: scikit-learn's bundled digits (no download), split, and a
small CNN trained on the first 1400 in a few seconds. Imported by tests only."""

from __future__ import annotations

from typing import Any

import numpy as np

ROWS = 40  # rows per golden case
CASES = 9  # held-out golden cases (360 rows)


def digits_cnn(relu6: bool = False) -> Any:
    """Two convolutions and a linear head; ``relu6``: hardtanh activations (XNNPACK's dynamic
    quantizer leaves a conv that feeds a plain relu in float)."""
    import torch

    class Digits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = torch.nn.functional.relu6 if relu6 else torch.relu
            self.c1 = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.c2 = torch.nn.Conv2d(16, 32, 3, padding=1)
            self.fc = torch.nn.Linear(32 * 4 * 4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.act(self.c1(x))
            x = torch.max_pool2d(self.act(self.c2(x)), 2)
            return self.fc(torch.flatten(x, 1))

    return Digits()


def digits(relu6: bool = False) -> dict[str, Any]:
    """The trained model, the held-out samples and their labels (CASES cases of ROWS rows), and
    calibration cases from the training split."""
    import torch
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    y = data.target.astype(np.int64)
    torch.manual_seed(0)
    model = digits_cnn(relu6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x[:1400]), torch.from_numpy(y[:1400])
    for _ in range(80):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()
    test_x, test_y = x[1400:1400 + CASES * ROWS], y[1400:1400 + CASES * ROWS]
    with torch.no_grad():
        acc = float((model(torch.from_numpy(test_x)).argmax(1).numpy() == test_y).mean())
    assert acc > 0.9, acc
    return {"model": model, "x": x, "y": y,
            "samples": [{"image": test_x[i:i + ROWS]} for i in range(0, len(test_x), ROWS)],
            "labels": [test_y[i:i + ROWS] for i in range(0, len(test_y), ROWS)],
            "calibration": [{"image": x[i:i + 20]} for i in range(0, 400, 20)]}
