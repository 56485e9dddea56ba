"""The Keras example's model and functions: a small CNN on scikit-learn's 8×8 digits.

``make_model`` is the config's ``model_fn``; ``train``, ``validate`` and ``test`` follow
IntegratedClient's contracts. Data are ``(x, y)`` pairs: x float32 N×8×8×1 in [0, 1], y int N.
"""

from __future__ import annotations

import logging
import os
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter

import keras
import numpy as np

# Every round trains a fresh copy of the model, which TensorFlow reports as "retracing".
logging.getLogger("tensorflow").setLevel(logging.ERROR)

Array = np.ndarray[Any, Any]
Data = tuple[Array, Array]
SEED = 0


def make_model() -> keras.Model:
    """The base model (every process builds the same initial weights).

    Left uncompiled: the client hands out copies of it (``copy.deepcopy``), and a compiled
    model's optimizer state does not survive that; the functions below compile their copy.
    """
    keras.utils.set_random_seed(SEED)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ],
        name="digits_cnn",
    )


def compile_for_training(model: keras.Model, learning_rate: float = 0.05) -> keras.Model:
    """SGD with momentum (a fresh optimizer every round), cross-entropy on logits, accuracy."""
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def load_digits_shard(index: int, count: int, test_fraction: float = 0.25) -> tuple[Data, Data]:
    """Agent ``index`` of ``count``: its share of the training split (shares 1 : 1.5 : 2 ...,
    so the weighting shows) and the whole test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=SEED, stratify=y
    )
    order = np.random.default_rng(SEED).permutation(len(y_tr))
    shares = np.array([1.0 + 0.5 * i for i in range(count)])
    bounds = np.concatenate([[0], np.cumsum(shares / shares.sum() * len(order))]).astype(int)
    mine = order[bounds[index] : bounds[index + 1]]
    return (x_tr[mine], y_tr[mine]), (x_te, y_te)


def train(model: keras.Model, data: Data, **kwargs: Any) -> tuple[keras.Model, float]:
    """``epochs`` (1) epochs of ``fit`` at ``lr`` (0.05); returns the model and the last
    epoch's mean loss."""
    x, y = data
    compile_for_training(model, float(kwargs.get("lr", 0.05)))
    history = model.fit(
        x,
        y,
        epochs=int(kwargs.get("epochs", 1)),
        batch_size=int(kwargs.get("batch_size", 32)),
        shuffle=True,
        verbose=0,
    )
    return model, float(history.history["loss"][-1])


def validate(model: keras.Model, data: Data, **kwargs: Any) -> tuple[float, float]:
    """Accuracy (0-1) and mean loss on ``data``."""
    x, y = data
    if not model.compiled:
        compile_for_training(model)
    loss, accuracy = model.evaluate(x, y, batch_size=256, verbose=0)
    return float(accuracy), float(loss)


test = validate
