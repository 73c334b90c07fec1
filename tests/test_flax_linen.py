"""Flax Linen: ``TrainState.create(..., tx=rmsprop_jax.rmsprop(...))`` trains a real model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

nn = pytest.importorskip("flax.linen")
train_state = pytest.importorskip("flax.training.train_state")
pytest.importorskip("sklearn")

import rmsprop_jax  # noqa: E402
from rmsprop_jax import _examples as ex  # noqa: E402


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def _loss(params, apply_fn, x, y):  # type: ignore[no-untyped-def]
    logits = apply_fn({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


@jax.jit
def _train_step(state: train_state.TrainState, x: jax.Array, y: jax.Array):  # type: ignore[no-untyped-def]
    (loss, _), grads = jax.value_and_grad(_loss, has_aux=True)(state.params, state.apply_fn, x, y)
    return state.apply_gradients(grads=grads), loss


def test_linen_train_state_trains_an_mlp_on_digits() -> None:
    data = ex.digits(val_fraction=0.0)
    model = _MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    tx = rmsprop_jax.rmsprop(3e-3, momentum=0.5, centered=True)
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    assert isinstance(state.opt_state, rmsprop_jax.RmsPropState)
    assert jax.tree.structure(state.opt_state.nu) == jax.tree.structure(params)

    order = np.random.default_rng(0)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    first_loss = None
    for _ in range(10):
        for idx in order.permutation(len(x))[: len(x) // 32 * 32].reshape(-1, 32):
            state, loss = _train_step(state, x[idx], y[idx])
            first_loss = float(loss) if first_loss is None else first_loss
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    test_loss, logits = _loss(state.params, state.apply_fn, x_test, y_test)
    acc = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
    steps = 10 * (len(x) // 32)
    assert int(state.step) == steps
    assert int(state.opt_state.count) == steps
    assert float(test_loss) < 0.1 * first_loss
    assert acc >= 0.95, acc
