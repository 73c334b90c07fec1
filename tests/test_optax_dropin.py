"""Drop-in equivalence: rmsprop_jax vs optax on every combination of the options they share."""

from __future__ import annotations

import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from _common import gradient_oracle, make_params

STEPS = 50
SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 0.03, 5, STEPS, end_value=0.001)


def _run_both(ours, theirs, steps=STEPS, dtype=jnp.float32):
    """Both optimizers on the same gradient sequence inside one jit; returns both trajectories + states."""
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), make_params())
    grads = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs), dtype), *gradient_oracle(params, steps))

    @jax.jit
    def run(p, gs):
        def body(carry, g):
            (p1, s1), (p2, s2) = carry
            u1, s1 = ours.update(g, s1, p1)
            u2, s2 = theirs.update(g, s2, p2)
            p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
            return ((p1, s1), (p2, s2)), (p1, p2)

        carry = ((p, ours.init(p)), (p, theirs.init(p)))
        return jax.lax.scan(body, carry, gs)

    ((_, s1), (_, s2)), (t1, t2) = run(params, grads)
    return t1, t2, s1, s2


def _max_diff(a, b):
    return max(
        (
            float(jnp.max(jnp.abs(x - y), initial=0.0))
            for x, y in zip(*map(jax.tree.leaves, (a, b)), strict=True)
        )
    )


OPTIONS = list(
    itertools.product(
        [False, True],  # centered
        [(None, False), (0.9, False), (0.9, True), (0.0, False)],  # momentum, nesterov
        [True, False],  # eps_in_sqrt
        [False, True],  # bias_correction
        [0.0, 0.1],  # initial_scale
        ["const", "schedule"],
    )
)


@pytest.mark.parametrize("centered,mom,eps_in_sqrt,bias_correction,initial_scale,lr", OPTIONS)
def test_rmsprop_equals_optax(centered, mom, eps_in_sqrt, bias_correction, initial_scale, lr):
    momentum, nesterov = mom
    kw = dict(
        learning_rate=0.01 if lr == "const" else SCHEDULE,
        decay=0.9,
        eps=1e-8,
        initial_scale=initial_scale,
        eps_in_sqrt=eps_in_sqrt,
        centered=centered,
        momentum=momentum,
        nesterov=nesterov,
        bias_correction=bias_correction,
    )
    t1, t2, s1, s2 = _run_both(rmsprop_jax.rmsprop(**kw), optax.rmsprop(**kw))
    # Float32 round-off is the allowance; today the two agree bit for bit.
    assert _max_diff(t1, t2) <= 1e-6
    assert _max_diff(s1.nu, optax.tree.get(s2, "nu")) <= 1e-6
    if centered:
        assert _max_diff(s1.mu, optax.tree.get(s2, "mu")) <= 1e-6
    if momentum is not None:
        assert _max_diff(s1.trace, optax.tree.get(s2, "trace")) <= 1e-6


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize(
    "eps_in_sqrt,bias_correction,initial_scale", [(True, False, 0.0), (False, True, 0.3)]
)
def test_scale_by_rms_equals_optax(centered, eps_in_sqrt, bias_correction, initial_scale):
    kw = dict(
        decay=0.8,
        eps=1e-6,
        initial_scale=initial_scale,
        eps_in_sqrt=eps_in_sqrt,
        bias_correction=bias_correction,
    )
    theirs = optax.scale_by_stddev(**kw) if centered else optax.scale_by_rms(**kw)
    ours = rmsprop_jax.scale_by_rms(**kw, centered=centered)
    lr = optax.scale_by_learning_rate(0.01)
    t1, t2, _, _ = _run_both(optax.chain(ours, lr), optax.chain(theirs, lr))
    assert _max_diff(t1, t2) <= 1e-6


def test_a_different_optimizer_is_detected():
    """The comparison above can fail: a changed decay is far outside its allowance."""
    t1, t2, _, _ = _run_both(rmsprop_jax.rmsprop(0.01, decay=0.9), optax.rmsprop(0.01, decay=0.95))
    assert _max_diff(t1, t2) > 1e-3


def test_signature_is_optax_compatible():
    """Same positional names, order and defaults as optax; our extras are keyword-only."""
    for ours, theirs in [
        (rmsprop_jax.rmsprop, optax.rmsprop),
        (rmsprop_jax.scale_by_rms, optax.scale_by_rms),
    ]:
        p_ours = inspect.signature(ours).parameters
        p_theirs = inspect.signature(theirs).parameters
        shared = list(p_theirs)
        assert list(p_ours)[: len(shared)] == shared
        for name in shared:
            assert p_ours[name].default == p_theirs[name].default, name
        for name in list(p_ours)[len(shared) :]:
            assert p_ours[name].kind is inspect.Parameter.KEYWORD_ONLY, name
