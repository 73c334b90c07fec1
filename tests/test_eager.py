"""Un-jitted (eager) updates: equal to jitted ones, and to optax's eager ones within optax's own spread.

An eager ``update`` used to compute the bias correction ``1 - decay**t`` op by op, whose
power differs from the compiled one in the last bit; the cancellation in ``1 - decay**t``
then made eager runs 2e-6 .. 6e-4 (relative) off optax's. Now every scalar the update needs
(bias correction, schedules) is computed by a compiled helper, so eager == jitted bit for bit.

Yardstick for the comparison with optax: optax's own eager-vs-jitted difference on the same
configuration (optax evaluates schedules op by op when eager).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from _common import gradient_oracle, make_params

STEPS = 5
SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 0.03, 3, 40, end_value=0.001)
PARAMS = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), make_params())
GRADS = [jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g) for g in gradient_oracle(PARAMS, STEPS)]


def _run(opt, jit: bool):
    update = jax.jit(opt.update) if jit else opt.update
    p, s = PARAMS, opt.init(PARAMS)
    for g in GRADS:
        u, s = update(g, s, p)
        p = optax.apply_updates(p, u)
    return p, s


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _rel(a, b) -> float:
    """Largest |a - b| relative to each leaf's largest |b| (norm-wise float32 round-off)."""
    worst = 0.0
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        if x.size:
            worst = max(worst, float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)))
    return worst


# Every option rmsprop_jax shares with optax.rmsprop, at a decay where bias correction bites.
OPTIONS = list(
    itertools.product(
        [False, True],  # centered
        [(None, False), (0.9, False), (0.9, True)],  # momentum, nesterov
        [True, False],  # eps_in_sqrt
        [False, True],  # bias_correction
        ["const", "schedule"],
    )
)


@pytest.mark.parametrize("centered,mom,eps_in_sqrt,bias_correction,lr", OPTIONS)
def test_eager_equals_jit_and_optax_eager(centered, mom, eps_in_sqrt, bias_correction, lr):
    momentum, nesterov = mom
    # nu0 = 0 with centered + bias correction is ill-conditioned for every implementation (step 1's
    # variance is exactly 0: rounding decides the step); nu0 = 0.1 keeps that option comparable.
    initial_scale = 0.1 if centered and bias_correction else 0.0
    kw = dict(
        learning_rate=0.01 if lr == "const" else SCHEDULE,
        decay=0.999,
        eps=1e-3,
        initial_scale=initial_scale,
        eps_in_sqrt=eps_in_sqrt,
        centered=centered,
        momentum=momentum,
        nesterov=nesterov,
        bias_correction=bias_correction,
    )
    ours_eager, ours_jit = _run(rmsprop_jax.rmsprop(**kw), False), _run(rmsprop_jax.rmsprop(**kw), True)
    # The same compiled leaf kernels; XLA may still fuse across them differently inside one
    # jit (a multiply-add contracted to an FMA): float32 round-off, mostly bit for bit.
    assert _rel(ours_eager, ours_jit) <= 1e-6

    optax_eager, optax_jit = _run(optax.rmsprop(**kw), False), _run(optax.rmsprop(**kw), True)
    spread = _rel(optax_eager[0], optax_jit[0])  # optax's own eager-vs-jit difference
    assert _rel(ours_jit[0], optax_jit[0]) == 0.0  # jitted: bit for bit
    # Eager: within optax's own spread, or float32 round-off where optax's eager is exact.
    assert _rel(ours_eager[0], optax_eager[0]) <= max(2 * spread, 1e-6)


@pytest.mark.parametrize("decay", [0.9, 0.99, 0.999, 0.9999])
@pytest.mark.parametrize("which", ["scale_by_rms", "rmsprop_momentum", "rmsprop_schedule_wd"])
def test_eager_bias_correction_any_decay(decay, which):
    """The two reported cases, up to decay 0.9999: eager == jitted, and == optax (== scale_by_adam(b1=0))."""
    if which == "scale_by_rms":
        make = lambda m: m.scale_by_rms(decay=decay, eps_in_sqrt=False, bias_correction=True)
    elif which == "rmsprop_momentum":
        make = lambda m: m.rmsprop(0.1, decay=decay, momentum=0.9, bias_correction=True)
    else:
        kw = dict(decay=decay, bias_correction=True)
        make = lambda m: (
            optax.chain(optax.add_decayed_weights(1e-2), m.rmsprop(SCHEDULE, **kw))
            if m is optax
            else m.rmsprop(SCHEDULE, **kw, weight_decay=1e-2)
        )
    ours_e, ours_j = _run(make(rmsprop_jax), False)[0], _run(make(rmsprop_jax), True)[0]
    optax_e, optax_j = _run(make(optax), False)[0], _run(make(optax), True)[0]
    assert _rel(ours_e, ours_j) <= 1e-6
    assert _rel(ours_j, optax_j) <= 1e-6
    assert _rel(ours_e, optax_e) <= max(2 * _rel(optax_e, optax_j), 1e-6)
    if which == "scale_by_rms":  # optax documents scale_by_rms(bias_correction) == scale_by_adam(b1=0)
        adam = _run(optax.scale_by_adam(b1=0.0, b2=decay, eps=1e-8), False)[0]
        assert _rel(ours_e, adam) <= 1e-6


def test_op_by_op_bias_correction_would_fail():
    """Mutation check: the old eager path (1 - decay**t op by op) misses optax by far more than allowed."""
    from rmsprop_jax import _transform

    saved = _transform._bias_correction
    _transform._bias_correction = lambda decay, count: 1 - decay**count  # type: ignore[assignment]
    try:
        kw = dict(learning_rate=0.1, decay=0.999, momentum=0.9, bias_correction=True)
        ours_e = _run(rmsprop_jax.rmsprop(**kw), False)[0]
    finally:
        _transform._bias_correction = saved
    optax_e, optax_j = _run(optax.rmsprop(**kw), False)[0], _run(optax.rmsprop(**kw), True)[0]
    allowance = max(2 * _rel(optax_e, optax_j), 1e-6)  # what the tests above allow
    assert _rel(ours_e, optax_e) > 4 * allowance


def test_centered_bias_correction_is_finite_where_optax_is_not():
    """Ill-conditioned for every implementation: step 1's variance estimate is exactly 0 (documented).

    optax returns NaN within a few steps at decay 0.999; rmsprop_jax stays finite (measured difference).
    """
    kw = dict(learning_rate=0.01, decay=0.999, eps=1e-8, centered=True, bias_correction=True)
    ours = _run(rmsprop_jax.rmsprop(**kw), False)[0]
    theirs = _run(optax.rmsprop(**kw), False)[0]
    assert all(np.isfinite(x).all() for x in _leaves(ours))
    assert not all(np.isfinite(x).all() for x in _leaves(theirs))


# --------------------------------------------------------------------------- extra keyword arguments


def _extra_args_opts():
    p = rmsprop_jax.presets
    return [
        rmsprop_jax.rmsprop(1e-2, centered=True, momentum=0.9),
        rmsprop_jax.scale_by_rms(),
        p.pytorch(lr=1e-2),
        p.keras(learning_rate=1e-2),
        p.tensorflow_v1(learning_rate=1e-2),
        p.timm_tf(lr=1e-2),
        p.graves_2013(),
        p.dqn_2015(),
        p.hinton_2012(1e-2),
    ]


@pytest.mark.parametrize("i", range(len(_extra_args_opts())))
def test_update_accepts_and_ignores_extra_keyword_arguments(i):
    opt = _extra_args_opts()[i]
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    state = opt.init(PARAMS)
    plain = opt.update(GRADS[0], state, PARAMS)
    extra = opt.update(GRADS[0], state, PARAMS, value=jnp.float32(1.5), grad=GRADS[0], anything="else")
    jitted = jax.jit(lambda g, s, p, v: opt.update(g, s, p, value=v))(GRADS[0], state, PARAMS, 1.5)
    for a, b, c in zip(_leaves(plain), _leaves(extra), _leaves(jitted), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_chain_with_an_optimizer_that_needs_value():
    """optax.contrib.reduce_on_plateau needs `value`; chained with ours, one call passes it to both."""
    opt = optax.chain(rmsprop_jax.rmsprop(1e-2), optax.contrib.reduce_on_plateau(patience=1, factor=0.5))
    state = opt.init(PARAMS)
    step = jax.jit(lambda g, s, p, v: opt.update(g, s, p, value=v))
    for loss in [1.0, 1.0, 1.0, 1.0]:
        _, state = step(GRADS[0], state, PARAMS, loss)
    assert float(optax.tree.get(state, "scale")) < 1.0  # the plateau was seen: the value reached it


def test_flax_nnx_optimizer_passes_value_through():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, rmsprop_jax.rmsprop(1e-2), wrt=nnx.Param)
    x = jnp.ones((4, 3))
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
    before = np.asarray(model.kernel[...])
    opt.update(model, grads, value=loss)
    assert not np.array_equal(before, np.asarray(model.kernel[...]))
