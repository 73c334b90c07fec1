"""Equinox: the pattern its documentation teaches, with ``rmsprop_jax.rmsprop`` as the optimizer.

``opt.init(eqx.filter(model, eqx.is_inexact_array))`` and
``opt.update(grads, state, eqx.filter(model, eqx.is_inexact_array))`` -- the
model's non-array leaves (activation functions, ints, the random key of a
dropout) are ``None`` in the filtered trees -- then ``eqx.apply_updates``, all
inside ``eqx.filter_jit``. An MLP trained on scikit-learn's 8x8 digits must reach
a stated test accuracy; the same with decoupled weight decay (which reads the
filtered params); and a custom module with a function and an int field trains
and keeps those fields untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

eqx = pytest.importorskip("equinox")
pytest.importorskip("sklearn")
pytest.importorskip("flax")  # rmsprop_jax._examples (the digits loader) imports flax

import rmsprop_jax  # noqa: E402
from rmsprop_jax import _examples as ex  # noqa: E402

EPOCHS = 12
BATCH = 32
# Measured on this configuration (fixed seeds, CPU): 0.9722 test accuracy, with and without weight decay;
# the thresholds sit a little below.
MIN_TEST_ACCURACY = 0.96


@pytest.fixture(scope="module")
def data() -> ex.Digits:
    return ex.digits(split_seed=0, val_fraction=0.0)


def _loss(model: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = jax.vmap(model)(x.reshape(len(x), -1))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _fit(model: Any, opt: optax.GradientTransformation, data: ex.Digits) -> tuple[Any, Any, list[float]]:
    """Equinox's documented training loop; returns the model, the optimizer state and the epoch losses."""
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, grads = eqx.filter_value_and_grad(_loss)(model, x, y)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    rng = np.random.default_rng(0)
    n = len(data.x_train) // BATCH * BATCH
    losses = []
    for _ in range(EPOCHS):
        total = 0.0
        for idx in rng.permutation(len(data.x_train))[:n].reshape(-1, BATCH):
            model, opt_state, loss = step(
                model, opt_state, jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])
            )
            total += float(loss)
        losses.append(total / (n // BATCH))
    return model, opt_state, losses


@eqx.filter_jit
def _predict(model: Any, x: jax.Array) -> jax.Array:
    return jax.vmap(model)(x)


def _accuracy(model: Any, data: ex.Digits) -> float:
    logits = _predict(model, jnp.asarray(data.x_test.reshape(len(data.x_test), -1)))
    return float(np.mean(np.argmax(np.asarray(logits), -1) == data.y_test))


def _mlp(seed: int = 0) -> Any:
    return eqx.nn.MLP(64, 10, width_size=64, depth=2, activation=jax.nn.relu, key=jax.random.key(seed))


def _schedule(data: ex.Digits) -> optax.Schedule:
    return optax.cosine_decay_schedule(1e-2, EPOCHS * (len(data.x_train) // BATCH))


def test_mlp_on_digits_reaches_the_stated_accuracy(data: ex.Digits) -> None:
    model = _mlp()
    # The filtered tree really has None where the model has non-array leaves (the activation).
    filtered = eqx.filter(model, eqx.is_inexact_array)
    assert filtered.activation is None and model.activation is jax.nn.relu
    model, opt_state, losses = _fit(model, rmsprop_jax.rmsprop(_schedule(data)), data)
    acc = _accuracy(model, data)
    print(f"Equinox MLP test accuracy: {acc:.4f}, epoch losses {np.round(losses, 4).tolist()}")
    assert acc >= MIN_TEST_ACCURACY, acc
    assert losses[-1] < 0.1 * losses[0]
    assert isinstance(opt_state, rmsprop_jax.RmsPropState)
    assert int(opt_state.count) == EPOCHS * (len(data.x_train) // BATCH)
    # One accumulator per array leaf of the model, None where the model has none.
    assert jax.tree.structure(opt_state.nu) == jax.tree.structure(filtered)


def test_mlp_with_decoupled_weight_decay(data: ex.Digits) -> None:
    """Weight decay reads the params passed to update: the filtered model (None leaves included)."""
    opt = rmsprop_jax.rmsprop(_schedule(data), weight_decay=1e-2, decoupled_weight_decay=True)
    model, _, _ = _fit(_mlp(), opt, data)
    acc = _accuracy(model, data)
    print(f"Equinox MLP + weight decay test accuracy: {acc:.4f}")
    assert acc >= MIN_TEST_ACCURACY, acc
    # Weight decay did act: the weights are smaller than without it (same seed, same batches).
    plain, _, _ = _fit(_mlp(), rmsprop_jax.rmsprop(_schedule(data)), data)
    norm = lambda m: float(sum(jnp.sum(x**2) for x in jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array))))
    assert norm(model) < norm(plain)


class _Scaled(eqx.Module):
    """A layer with non-array fields: a function and an int (they must pass through untouched)."""

    linear: eqx.nn.Linear
    fn: Callable[[jax.Array], jax.Array]
    repeats: int

    def __init__(self, key: jax.Array):
        self.linear = eqx.nn.Linear(64, 10, key=key)
        self.fn = jnp.tanh
        self.repeats = 2

    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(self.repeats):
            x = self.fn(x)
        return self.linear(x)


def test_model_with_function_and_int_fields(data: ex.Digits) -> None:
    model = _Scaled(jax.random.key(1))
    opt = rmsprop_jax.rmsprop(1e-2, momentum=0.9, centered=True)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    assert state.nu.fn is None and state.nu.repeats is None
    x, y = jnp.asarray(data.x_train[:256].reshape(256, -1)), jnp.asarray(data.y_train[:256])
    before = float(_loss(model, x, y))
    model_after, _, losses = _fit(model, opt, data._replace(x_train=data.x_train[:256]))
    assert model_after.fn is jnp.tanh and model_after.repeats == 2
    assert float(_loss(model_after, x, y)) < 0.5 * before, (before, losses)
    # apply_updates with a None leaf left the non-arrays alone; the arrays moved.
    assert not np.array_equal(np.asarray(model_after.linear.weight), np.asarray(model.linear.weight))


def test_the_filtered_none_leaves_are_required() -> None:
    """Mutation check: the unfiltered model (a function leaf) is not a valid params tree."""
    model = _mlp()
    with pytest.raises((TypeError, AttributeError, ValueError)):
        rmsprop_jax.rmsprop(1e-3).init(model)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
def test_mlp_with_quantized_state(data: ex.Digits, fmt: str) -> None:
    """Each quantized format in Equinox's loop: the 64 x 64 hidden kernel (4096 elements, at
    min_size) is stored quantized, the None leaves stay None, and the MLP trains as with float32."""
    model, opt_state, losses = _fit(_mlp(), rmsprop_jax.rmsprop(_schedule(data), accumulator_dtype=fmt), data)
    acc = _accuracy(model, data)
    print(f"Equinox MLP, {fmt} state: test accuracy {acc:.4f}")
    assert acc >= MIN_TEST_ACCURACY, acc
    hidden = opt_state.nu.layers[1].weight
    assert isinstance(hidden, rmsprop_jax.QuantizedLeaf) and hidden.kind == fmt
    assert opt_state.nu.activation is None and losses[-1] < 0.1 * losses[0]
