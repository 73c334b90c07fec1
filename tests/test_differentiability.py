"""Differentiating through the optimizer (meta-learning, hyperparameter optimization).

``jax.grad`` of the loss after k unrolled steps with respect to the learning rate,
decay and momentum (passed as traced arguments: ``rmsprop()`` validates only concrete
values) matches central finite differences in float64; ``jax.vmap`` over a batch of
hyperparameters trains several at once and equals separate runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from _common import enable_x64

K = 8
A = np.diag([3.0, 1.0, 0.3, 2.0]) + 0.2  # SPD-ish curvature, coupled coordinates
B = np.array([1.0, -2.0, 0.5, 0.0])
X0 = np.array([0.3, -0.7, 1.1, 2.0])


def inner_loss(x):
    return 0.5 * x @ (jnp.asarray(A, x.dtype) @ x) - jnp.asarray(B, x.dtype) @ x + 0.1 * jnp.sum(jnp.sin(x))


def unrolled_loss(lr, decay, momentum, *, steps=K, **options):
    """The loss after ``steps`` RMSProp steps on ``inner_loss`` (gradients recomputed each step)."""
    opt = rmsprop_jax.rmsprop(lr, decay=decay, momentum=momentum, **options)
    x = jnp.asarray(X0, jnp.result_type(lr))
    state = opt.init(x)

    def body(carry, _):
        x, state = carry
        u, state = opt.update(jax.grad(inner_loss)(x), state, x)
        return (optax.apply_updates(x, u), state), None

    (x, _), _ = jax.lax.scan(body, (x, state), length=steps)
    return inner_loss(x)


OPTIONS = {
    "plain": {},
    "centered": {"centered": True, "eps": 1e-4},
    "nesterov_bias_corrected": {"nesterov": True, "bias_correction": True},
    "torch_like": {"lr_in_momentum": False, "eps_in_sqrt": False, "initial_scale": 0.1},
    "weight_decay": {"weight_decay": 1e-2, "decoupled_weight_decay": True},
}
POINT = (0.05, 0.9, 0.5)  # (lr, decay, momentum)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_grad_wrt_lr_decay_momentum_matches_central_differences_float64(name):
    options = OPTIONS[name]
    with enable_x64():
        f = jax.jit(lambda lr, d, m: unrolled_loss(lr, d, m, **options))
        point = tuple(jnp.float64(v) for v in POINT)
        grads = jax.grad(f, argnums=(0, 1, 2))(*point)
        for i, g in enumerate(grads):
            h = 1e-6
            up = list(point)
            dn = list(point)
            up[i] = point[i] + h
            dn[i] = point[i] - h
            fd = (float(f(*up)) - float(f(*dn))) / (2 * h)
            assert np.isfinite(float(g)) and float(g) != 0.0
            np.testing.assert_allclose(float(g), fd, rtol=1e-8, atol=1e-12, err_msg=f"{name} arg {i}")


def test_finite_difference_check_can_fail():
    # A wrong derivative (the gradient w.r.t. decay reported for momentum) is caught.
    with enable_x64():
        f = jax.jit(lambda lr, d, m: unrolled_loss(lr, d, m))
        point = tuple(jnp.float64(v) for v in POINT)
        g_decay = float(jax.grad(f, argnums=1)(*point))
        h = 1e-6
        fd_m = (float(f(point[0], point[1], point[2] + h)) - float(f(point[0], point[1], point[2] - h))) / (
            2 * h
        )
        assert not np.isclose(g_decay, fd_m, rtol=1e-6, atol=1e-9)


def test_grad_flows_through_a_traced_schedule_value():
    # An injected (traced) learning rate: optax.inject_hyperparams-style meta-gradients.
    with enable_x64():

        def f(lr):
            return unrolled_loss(lr, jnp.float64(0.9), None)

        g = jax.grad(f)(jnp.float64(0.05))
        fd = (f(0.05 + 1e-6) - f(0.05 - 1e-6)) / 2e-6
        np.testing.assert_allclose(float(g), float(fd), rtol=1e-6)


def separable_loss(x):
    a = jnp.asarray([3.0, 1.0, 0.3, 2.0], x.dtype)
    return jnp.sum(0.5 * a * x * x - jnp.asarray(B, x.dtype) * x + 0.1 * jnp.sin(x))


def train(lr, decay, momentum, steps, loss=separable_loss, **options):
    opt = rmsprop_jax.rmsprop(lr, decay=decay, momentum=momentum, **options)
    x = jnp.asarray(X0, jnp.result_type(lr))

    def body(carry, _):
        x, state = carry
        u, state = opt.update(jax.grad(loss)(x), state, x)
        return (optax.apply_updates(x, u), state), None

    (x, state), _ = jax.lax.scan(body, (x, opt.init(x)), length=steps)
    return x, state


# vmap and separate runs compile to different fusions (per-example hyperparameters become
# broadcast vectors), so they agree to round-off, not bit for bit; RMSProp's normalized
# steps near the optimum then amplify last-bit differences over many steps (float32,
# measured: 2.4e-7 relative after 20 steps, up to 2e-3 after 100 centered). float64 keeps
# the comparison tight.
VMAP_OPTIONS = [{}, {"centered": True}, {"bias_correction": True, "nesterov": True}]


@pytest.mark.parametrize("options", VMAP_OPTIONS, ids=["plain", "centered", "nesterov_bias"])
def test_vmap_over_hyperparameters_equals_separate_runs(options):
    with enable_x64():
        lrs = jnp.asarray([1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
        decays = jnp.asarray([0.9, 0.99, 0.5, 0.7, 0.95])
        moms = jnp.asarray([0.0, 0.5, 0.9, 0.3, 0.1])
        run = jax.jit(lambda lr, d, m: train(lr, d, m, 50, **options))
        xs, states = jax.vmap(run)(lrs, decays, moms)
        assert xs.shape == (5, 4) and states.count.shape == (5,)
        for i in range(5):
            x_i, s_i = run(lrs[i], decays[i], moms[i])
            np.testing.assert_allclose(np.asarray(xs[i]), np.asarray(x_i), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(np.asarray(states.nu[i]), np.asarray(s_i.nu), rtol=1e-9, atol=1e-15)
        assert len({tuple(np.asarray(x).tolist()) for x in xs}) == 5  # five trainings, not one


def test_vmap_over_learning_rates_trains_them_all_at_once_float32():
    lrs = jnp.asarray([1e-3, 3e-3, 1e-2, 3e-2], jnp.float32)
    run = jax.jit(lambda lr: train(lr, jnp.float32(0.9), None, 20))
    xs, _ = jax.vmap(run)(lrs)
    for i, lr in enumerate(lrs):
        np.testing.assert_allclose(np.asarray(xs[i]), np.asarray(run(lr)[0]), rtol=2e-6, atol=1e-7)
    losses = [float(separable_loss(x)) for x in xs]
    assert losses == sorted(losses, reverse=True)  # larger steps got further in 20 steps
