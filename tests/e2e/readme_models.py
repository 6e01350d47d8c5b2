"""The model files a README reader has at hand, made the way a reader makes them.

    python readme_models.py torch ROOT   # ROOT/mypkg/nets.py, weights.pt, model.pt2, model.onnx
    python readme_models.py keras ROOT   # ROOT/model.keras

Run by ``test_readme.py`` with the project's venv, in a subprocess (torch and TensorFlow stay
out of the test process). The models are tiny (one conv, one linear) so that the README's
conversions stay quick.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: ``mypkg/nets.py`` as a reader would write it (the tests' own small net, ``nets.py``);
#: ``--class mypkg.nets:TinyNet`` names it.
NETS_PY = (Path(__file__).resolve().parent / "nets.py").read_text()

#: Prepended to the README's Python quickstart, which uses ``MyNet`` without defining it: the
#: same small net under the quickstart's name.
MYNET_PY = NETS_PY.replace("TinyNet", "MyNet") + "\n\n"


def make_torch(root: Path) -> None:
    import torch

    pkg = root / "mypkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(NETS_PY)
    sys.path.insert(0, str(root))
    from mypkg.nets import TinyNet  # type: ignore[import-not-found]

    torch.manual_seed(0)
    model = TinyNet().eval()
    example = torch.rand(2, 3, 32, 32)
    torch.save(model.state_dict(), root / "weights.pt")
    batch = torch.export.Dim("batch", min=1, max=32)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(root / "model.pt2"))
    torch.onnx.export(model, (example,), str(root / "model.onnx"), dynamo=True,
                      input_names=["image"], output_names=["logits"],
                      dynamic_shapes=({0: batch},))


def make_keras(root: Path) -> None:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((32, 32, 3), name="image"),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    model.save(root / "model.keras")


def main(argv: list[str]) -> int:
    kind, root = argv[0], Path(argv[1]).resolve()
    {"torch": make_torch, "keras": make_keras}[kind](root)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
