"""Train a small Keras CNN on synthetic data, then export it and prove parity.

    python examples/train_keras.py --out dist/keras-cnn
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import portable_models as pm


def make_data(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """NHWC images whose class is the quadrant holding the brightest blob."""
    x = rng.random((n, 32, 32, 3), dtype=np.float32) * 0.2
    y = rng.integers(0, 4, n)
    for i, label in enumerate(y):
        r, c = divmod(int(label), 2)
        x[i, r * 16 + 4: r * 16 + 12, c * 16 + 4: c * 16 + 12, :] += 0.8
    return x, y


def main() -> int:
    import keras

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="dist/keras-cnn")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--targets", nargs="+", default=["all"])
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = keras.Sequential([
        keras.Input((32, 32, 3), name="image"),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(4, name="logits"),
    ])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = make_data(512, rng)
    model.fit(x, y, epochs=args.epochs, batch_size=64, verbose=2)

    held_out, _ = make_data(8, rng)
    samples = [{"image": held_out[i:i + 2]} for i in range(0, 8, 2)]
    bundle = pm.export(model, (held_out[:2],), out=args.out,
                       targets="all" if args.targets == ["all"] else args.targets,
                       samples=samples, input_ranges={"image": (0.0, 1.0)}, overwrite=True)
    print(bundle.report())
    return 0 if bundle.ok else 1


if __name__ == "__main__":
    sys.exit(main())
