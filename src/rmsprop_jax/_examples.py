"""Shared pieces of the demo, the notebooks and the integration tests (private).

Needs the ``examples`` extra (flax, scikit-learn); the core package never
imports this module. One implementation of the data split, the two models and
the training loop, so the demo, the notebooks and the tests measure the same
thing.

* :func:`digits`: scikit-learn's bundled 8x8 digits (1797 images, real data,
  no download), pixels scaled to [0, 1], a stratified train/validation/test
  split that depends only on ``split_seed``.
* :class:`CNN`: two 3x3 convolutions, 2x2 max pooling, two dense layers.
* :class:`RowRNN`: a GRU or LSTM (``nnx.RNN``) that reads each digit row by row,
  an 8-step sequence of 8 pixels, and classifies its last hidden state.
* :func:`fit`: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` driven by one
  ``nnx.jit``-compiled train step (model and optimizer donated), minibatches
  in a seeded order, per-step losses and per-epoch test metrics recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = ["CNN", "Digits", "History", "RowRNN", "digits", "evaluate", "fit", "make_model"]


class Digits(NamedTuple):
    """Images ``(n, 8, 8, 1)`` float32 in [0, 1] and integer labels ``(n,)``, per split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits(split_seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.15) -> Digits:
    """scikit-learn's 8x8 digits, split stratified into train / validation / test.

    With the defaults: 1167 train, 270 validation, 360 test images. The split
    depends only on ``split_seed``, not on any training seed.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    for name, frac in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0 <= frac < 1:
            raise ValueError(f"{name}={frac!r} is out of range; allowed: 0 <= {name} < 1.")
    if test_fraction + val_fraction >= 1:
        raise ValueError(
            f"test_fraction + val_fraction = {test_fraction + val_fraction!r} leaves no training data; "
            "allowed: a sum below 1."
        )
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int32)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=split_seed
    )
    if val_fraction == 0:
        return Digits(x_rest, y_rest, x_rest[:0], y_rest[:0], x_test, y_test)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction / (1 - test_fraction), stratify=y_rest, random_state=split_seed
    )
    return Digits(x_train, y_train, x_val, y_val, x_test, y_test)


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


class RowRNN(nnx.Module):
    """A GRU or LSTM reading an 8x8 image row by row (8 steps of 8 pixels); dense(10) on the last state."""

    def __init__(self, *, rngs: nnx.Rngs, cell: str = "gru", hidden: int = 64):
        cells = {"gru": nnx.GRUCell, "lstm": nnx.OptimizedLSTMCell}
        if cell not in cells:
            raise ValueError(f"cell={cell!r} is not supported; allowed: {sorted(cells)}.")
        self.rnn = nnx.RNN(cells[cell](8, hidden, rngs=rngs))
        self.head = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        seq = x.reshape(x.shape[0], 8, 8)  # (batch, time = rows, features = pixels of a row)
        return self.head(self.rnn(seq)[:, -1])


def make_model(kind: str, seed: int = 0, param_dtype: Any = None) -> nnx.Module:
    """``"cnn"``, ``"gru"`` or ``"lstm"``, initialised from ``seed``.

    ``param_dtype`` (e.g. ``jnp.bfloat16``) casts every ``nnx.Param`` after the
    float32 initialisation, so a low-precision model starts from the float32
    model's weights rounded to nearest. Activations follow JAX's promotion
    (float32 inputs keep the arithmetic in float32); the gradients, and so the
    optimizer's accumulators, come in the parameters' dtype.
    """
    rngs = nnx.Rngs(seed)
    model: nnx.Module
    if kind == "cnn":
        model = CNN(rngs=rngs)
    elif kind in ("gru", "lstm"):
        model = RowRNN(rngs=rngs, cell=kind)
    else:
        raise ValueError(f"kind={kind!r} is not a model; allowed: 'cnn', 'gru', 'lstm'.")
    if param_dtype is not None:
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda x: x.astype(param_dtype), params))
    return model


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


def evaluate(model: nnx.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``(x, y)``, in one jitted call."""
    loss, acc = _eval_step(model, jnp.asarray(x), jnp.asarray(y))
    return float(loss), float(acc)


@dataclass
class History:
    """What :func:`fit` records. ``step_loss`` has one entry per optimizer step."""

    step_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # mean over each epoch's steps
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)  # the first includes compilation

    @property
    def seconds_per_epoch(self) -> float:
        """Median wall time of an epoch after the first (the first compiles); the first if alone."""
        rest = self.epoch_seconds[1:] or self.epoch_seconds
        return float(np.median(rest)) if rest else float("nan")


def fit(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    data: Digits,
    *,
    epochs: int,
    batch_size: int = 32,
    seed: int = 0,
    eval_on: str = "test",
    hyperparams: Mapping[str, float] | None = None,
    on_epoch: Callable[[int, nnx.Module, nnx.Optimizer, History], Any] | None = None,
) -> tuple[nnx.Module, nnx.Optimizer, History]:
    """Train ``model`` with ``tx`` for ``epochs`` passes over ``data``'s training split.

    Minibatches of ``batch_size`` in an order drawn from ``seed`` (the last
    partial batch is dropped, so every step has one shape and one compile).
    After each epoch the model is evaluated on ``eval_on`` (``"test"`` or
    ``"val"``; stored as ``test_*`` in the history) and ``on_epoch(epoch,
    model, optimizer, history)`` is called if given.

    ``hyperparams`` sets values in the state of an ``optax.inject_hyperparams``
    transformation before training (e.g. ``{"learning_rate": 3e-3}``). Reusing
    one such ``tx`` for a learning-rate sweep reuses one compiled train step,
    where a fresh ``tx`` per value would compile again for every value.

    Returns the trained model, its ``nnx.Optimizer`` and the :class:`History`.
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs!r} is out of range; allowed: epochs >= 1.")
    if batch_size < 1 or batch_size > len(data.x_train):
        raise ValueError(f"batch_size={batch_size!r} is out of range; allowed: 1..{len(data.x_train)}.")
    if eval_on not in ("test", "val"):
        raise ValueError(f"eval_on={eval_on!r} is invalid; allowed: 'test', 'val'.")
    x_eval, y_eval = (data.x_test, data.y_test) if eval_on == "test" else (data.x_val, data.y_val)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    if hyperparams:
        injected = getattr(optimizer.opt_state, "hyperparams", None)
        if injected is None:
            raise ValueError(
                f"hyperparams={dict(hyperparams)!r} needs a tx made with optax.inject_hyperparams; "
                f"got state {type(optimizer.opt_state).__name__}."
            )
        for name, value in hyperparams.items():
            if name not in injected:
                raise ValueError(f"hyperparams: {name!r} is not injected; allowed: {sorted(injected)}.")
            injected[name][...] = value
    order = np.random.default_rng(seed)
    n_steps = len(data.x_train) // batch_size
    history = History()
    for epoch in range(epochs):
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
        loss, acc = evaluate(model, x_eval, y_eval)
        history.test_loss.append(loss)
        history.test_acc.append(acc)
        if on_epoch is not None:
            on_epoch(epoch, model, optimizer, history)
    return model, optimizer, history
