"""Flax NNX: ``nnx.Optimizer(model, rmsprop_jax.rmsprop(...), wrt=nnx.Param)`` in ``nnx.jit`` steps.

Real training on scikit-learn's bundled 8x8 digits: a CNN must reach >= 97 % test
accuracy and a GRU reading each digit row by row (8 steps of 8 pixels) >= 95 %.
Fixed seeds; the whole file takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

nnx = pytest.importorskip("flax.nnx")
pytest.importorskip("sklearn")

import rmsprop_jax  # noqa: E402
from rmsprop_jax import _examples as ex  # noqa: E402

EPOCHS = 15
BATCH = 32


@pytest.fixture(scope="module")
def data() -> ex.Digits:
    # No validation split: train on the 1437 non-test images, report on the 360 test images.
    return ex.digits(split_seed=0, val_fraction=0.0)


def _cosine_rmsprop(data: ex.Digits, peak: float) -> optax.GradientTransformation:
    steps = EPOCHS * (len(data.x_train) // BATCH)
    return rmsprop_jax.rmsprop(optax.cosine_decay_schedule(peak, steps))


def test_cnn_on_digits_reaches_97_percent(data: ex.Digits) -> None:
    model = ex.make_model("cnn", seed=0)
    _, optimizer, history = ex.fit(
        model, _cosine_rmsprop(data, 3e-3), data, epochs=EPOCHS, batch_size=BATCH, seed=0
    )
    print(f"CNN test accuracy per epoch: {np.round(history.test_acc, 4).tolist()}")
    assert history.test_acc[-1] >= 0.97, history.test_acc
    assert history.train_loss[-1] < 0.1 * history.train_loss[0]
    assert isinstance(optimizer.opt_state, rmsprop_jax.RmsPropState)
    assert int(optimizer.opt_state.count[...]) == EPOCHS * (len(data.x_train) // BATCH)


def test_gru_reading_rows_reaches_95_percent(data: ex.Digits) -> None:
    model = ex.make_model("gru", seed=0)
    assert isinstance(model.rnn, nnx.RNN)
    _, _, history = ex.fit(model, _cosine_rmsprop(data, 3e-3), data, epochs=EPOCHS, batch_size=BATCH, seed=0)
    print(f"GRU test accuracy per epoch: {np.round(history.test_acc, 4).tolist()}")
    assert history.test_acc[-1] >= 0.95, history.test_acc
    assert history.train_loss[-1] < 0.1 * history.train_loss[0]


class _MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)  # BatchStats: not a Param, must not be optimized
        self.l2 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.l2(nnx.relu(self.bn(self.l1(x))))


def test_nnx_optimizer_step_equals_functional_optax_step(data: ex.Digits) -> None:
    """Three nnx.jit steps give the params and state of the same steps done by hand with optax.

    Not bit-for-bit: the two programs differ (graph traversal vs. merge inside the
    loss), and XLA may fuse the gradient's arithmetic differently; float32 round-off
    (a few ulp) is the tolerance.
    """
    tx = rmsprop_jax.rmsprop(1e-2, centered=True, momentum=0.9)
    x = jnp.asarray(data.x_train[:64].reshape(64, -1))
    y = jnp.asarray(data.y_train[:64])
    model = _MLP(nnx.Rngs(0))
    model.eval()  # BatchNorm uses its running stats, so the loss is a pure function of the Params
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    twin = _MLP(nnx.Rngs(0))  # the same initial values, independent Variables
    twin.eval()
    graphdef, params, rest = nnx.split(twin, nnx.Param, ...)

    def loss_fn(m: _MLP) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    @nnx.jit
    def nnx_step(m: _MLP, opt: nnx.Optimizer) -> jax.Array:
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    @jax.jit
    def functional_step(p, state):  # type: ignore[no-untyped-def]
        grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest)))(p)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    state = tx.init(params)
    for _ in range(3):
        nnx_step(model, optimizer)
        params, state = functional_step(params, state)

    got = jax.tree.leaves(nnx.state(model, nnx.Param))
    want = jax.tree.leaves(params)
    assert len(got) == len(want) == 6  # l1, l2 kernels+biases, bn scale+bias
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)
    opt_state = optimizer.opt_state
    assert isinstance(opt_state, rmsprop_jax.RmsPropState)
    assert int(opt_state.count[...]) == 3
    for field in ("nu", "mu", "trace"):
        got_acc = jax.tree.leaves(getattr(opt_state, field))
        want_acc = jax.tree.leaves(getattr(state, field))
        assert len(got_acc) == 6  # one accumulator per Param; none for BatchNorm's batch stats
        for g, w in zip(got_acc, want_acc, strict=True):
            np.testing.assert_allclose(np.asarray(g[...]), np.asarray(w), rtol=1e-5, atol=1e-7)
    # The step moved the params (a no-op optimizer would pass the equalities above).
    first = _MLP(nnx.Rngs(0))
    assert not np.array_equal(np.asarray(first.l1.kernel[...]), np.asarray(model.l1.kernel[...]))
