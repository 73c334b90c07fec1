"""The digits models of the quality section: a copy of notebook 02's data split, CNN, GRU and loop.

scikit-learn's bundled 8x8 digits (1797 images, no download), a stratified train / validation / test
split fixed by ``split_seed``; the CNN (two 3x3 convolutions, 2x2 max pooling, two dense layers) and
the GRU that reads each image row by row; ``fit`` trains with ``nnx.Optimizer(model, tx,
wrt=nnx.Param)`` in one ``nnx.jit`` train step (model and optimizer donated), minibatches in a
seeded order, and records per-step losses and per-epoch test metrics. Kept here (not imported from
the package's private example module) so the suite depends on the public API only; needs flax and
scikit-learn (the ``examples`` extra).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class Digits(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits(split_seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.15) -> Digits:
    """1167 train and 360 test images (the 270 validation images of the notebook's split are unused)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int32)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=split_seed
    )
    x_train, _, y_train, _ = train_test_split(
        x_rest, y_rest, test_size=val_fraction / (1 - test_fraction), stratify=y_rest, random_state=split_seed
    )
    return Digits(x_train, y_train, x_test, y_test)


class CNN(nnx.Module):
    """conv3x3(32) - relu - conv3x3(64) - relu - maxpool2x2 - dense(128) - relu - dense(10)."""

    def __init__(self, *, rngs: nnx.Rngs, width: int = 32, hidden: int = 128):
        self.conv1 = nnx.Conv(1, width, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), rngs=rngs)
        self.dense1 = nnx.Linear(4 * 4 * 2 * width, hidden, rngs=rngs)
        self.dense2 = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        x = nnx.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        return self.dense2(nnx.relu(self.dense1(x)))


class RowGRU(nnx.Module):
    """A GRU reading an 8x8 image row by row (8 steps of 8 pixels); dense(10) on the last state."""

    def __init__(self, *, rngs: nnx.Rngs, hidden: int = 64):
        self.rnn = nnx.RNN(nnx.GRUCell(8, hidden, rngs=rngs))
        self.head = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.rnn(x.reshape(x.shape[0], 8, 8))[:, -1])


def make_model(kind: str, seed: int = 0) -> nnx.Module:
    rngs = nnx.Rngs(seed)
    return CNN(rngs=rngs) if kind == "cnn" else RowGRU(rngs=rngs)


def _loss(model: nnx.Module, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


@nnx.jit(donate_argnums=(0, 1))
def _train_step(model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    (loss, _), grads = nnx.value_and_grad(_loss, has_aux=True)(model, x, y)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def _eval_step(model: nnx.Module, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    loss, logits = _loss(model, x, y)
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)


@dataclass
class History:
    step_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)


def fit(
    model: nnx.Module, tx: optax.GradientTransformation, data: Digits, *, epochs: int, seed: int = 0
) -> tuple[nnx.Module, Any, History]:
    """``epochs`` passes in batches of 32 (the last partial batch dropped); the model, its
    ``nnx.Optimizer`` and the history."""
    batch_size = 32
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    order = np.random.default_rng(seed)
    n_steps = len(data.x_train) // batch_size
    history = History()
    for _ in range(epochs):
        start = time.perf_counter()
        perm = order.permutation(len(data.x_train))[: n_steps * batch_size].reshape(n_steps, batch_size)
        losses = [
            _train_step(model, optimizer, jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx]))
            for idx in perm
        ]
        step_loss = np.asarray(jax.device_get(losses), dtype=np.float64)
        history.epoch_seconds.append(time.perf_counter() - start)
        history.step_loss.extend(step_loss.tolist())
        history.train_loss.append(float(step_loss.mean()))
        loss, acc = _eval_step(model, jnp.asarray(data.x_test), jnp.asarray(data.y_test))
        history.test_loss.append(float(loss))
        history.test_acc.append(float(acc))
    return model, optimizer, history
