"""rmsprop_jax against the independent float64 reference (tests/reference.py).

Every option combination runs 50 steps on a mixed pytree. In float64 (x64
enabled) the match is to ~1e-12; in float32 to float32 round-off accumulated
over the run. Deliberately wrong variants must fail the same comparison.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from _common import enable_x64, gradient_oracle, make_params, max_rel_err, run_scanned
from reference import RefConfig, run_reference

STEPS = 50
TOL64 = 1e-10
TOL32 = 1e-5  # norm-wise per leaf: float32 round-off accumulated over 50 steps


def lr_schedule(t):
    """Changes at every step, so lr placement relative to momentum matters."""
    xp = jnp if isinstance(t, jax.Array) else np
    return 0.02 * (1.0 + 0.5 * xp.cos(0.7 * t)) / (1.0 + 0.05 * t)


def wd_schedule(t):
    return 0.05 / (1.0 + 0.1 * t)


def _jax_sched(f):
    """The same schedule on the JAX side, evaluated in the run's float precision."""
    return lambda count: f(count.astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32))


def _compare(ref_kw: dict, jax_kw: dict, dtype, mask_fn=None, steps: int = STEPS, per_leaf: bool = False):
    # Both sides start from the same values: the inputs rounded to the run's dtype.
    params = jax.tree.map(lambda x: np.asarray(x, dtype).astype(np.float64), make_params())
    grads = [
        jax.tree.map(lambda x: np.asarray(x, dtype).astype(np.float64), g)
        for g in gradient_oracle(params, steps)
    ]
    leaves, treedef = jax.tree.flatten(params)
    # Schedules too: the reference uses the values the JAX side computes (in float32 they
    # differ from float64 ones by ~1e-6, from cos of a large argument).
    ref_kw = dict(ref_kw)
    for ref_name, jax_name in [("lr", "learning_rate"), ("weight_decay", "weight_decay")]:
        if callable(jax_kw.get(jax_name)):
            ref_kw[ref_name] = lambda t, f=jax_kw[jax_name]: float(f(jnp.asarray(t, jnp.int32)))
    decay_mask = None
    if mask_fn is not None:
        decay_mask = jax.tree.leaves(mask_fn(params))
    ref = run_reference(leaves, [jax.tree.leaves(g) for g in grads], RefConfig(**ref_kw), decay_mask)
    ref = [treedef.unflatten(r) for r in ref]
    got = run_scanned(rmsprop_jax.rmsprop(**jax_kw), params, grads, dtype)
    # float32: norm-wise per leaf, with the leaf scale floored at 0.1 (params are O(1); a
    # 0-d leaf passing near zero would otherwise turn absolute round-off into a large ratio).
    floor = 0.1 if per_leaf else 1e-3
    return max(max_rel_err(g, r, floor=floor, per_leaf=per_leaf) for g, r in zip(got, ref, strict=True))


def _kwargs(
    centered, momentum, nesterov, eps_in_sqrt, bias_correction, initial_scale, sched, wd=0.0, **extra
):
    ref = dict(
        lr=lr_schedule if sched else 0.01,
        decay=0.9,
        eps=1e-3,  # large enough that its placement changes the result measurably
        initial_scale=initial_scale,
        eps_in_sqrt=eps_in_sqrt,
        centered=centered,
        momentum=momentum,
        nesterov=nesterov,
        bias_correction=bias_correction,
        weight_decay=wd,
        **extra,
    )
    jax_kw = dict(ref)
    jax_kw["learning_rate"] = _jax_sched(lr_schedule) if sched else 0.01
    del jax_kw["lr"]
    if callable(wd):
        jax_kw["weight_decay"] = _jax_sched(wd)
    return ref, jax_kw


MOMENTA = [(None, False), (0.9, False), (0.9, True)]
CORE = [
    (c, m, n, e, b, i, s)
    for c, (m, n), e, b, i, s in itertools.product(
        [False, True], MOMENTA, [True, False], [False, True], [0.0, 0.5], [False, True]
    )
]


@pytest.mark.parametrize("centered,momentum,nesterov,eps_in_sqrt,bias_correction,initial_scale,sched", CORE)
def test_optax_options_match_reference_float64(
    centered, momentum, nesterov, eps_in_sqrt, bias_correction, initial_scale, sched
):
    ref_kw, jax_kw = _kwargs(centered, momentum, nesterov, eps_in_sqrt, bias_correction, initial_scale, sched)
    with enable_x64():
        err = _compare(ref_kw, jax_kw, jnp.float64)
    # Centered + bias correction from nu_0 = 0: at step 1 the variance is exactly 0 and
    # both sides hold rounding noise (~1e-16 g^2). With eps outside the root, sqrt of that
    # noise (~1e-8 |g|) is compared against eps = 1e-3: an ill-conditioned step, not a bug.
    degenerate = centered and bias_correction and initial_scale == 0 and not eps_in_sqrt
    assert err < (1e-4 if degenerate else TOL64), err


# The extras: weight decay (none / coupled / decoupled, constant or scheduled, masked or not),
# lr placement and maximize, crossed with momentum and centering; lr always changes per step.
def _mask(params):
    return jax.tree.map(lambda p: np.ndim(p) > 1, params)  # decay matrices only, as for biases/norms


EXTRAS = [
    (c, m, n, wd, dec, mask, lim, mx)
    for c, (m, n), (wd, dec, mask), lim, mx in itertools.product(
        [False, True],
        MOMENTA,
        [
            (0.0, False, False),
            (0.05, False, False),
            (0.05, True, True),
            ("sched", False, True),
            ("sched", True, False),
        ],
        [True, False],
        [False, True],
    )
    if m is not None or lim  # lr placement only matters with momentum
]


@pytest.mark.parametrize("centered,momentum,nesterov,wd,decoupled,masked,lr_in_momentum,maximize", EXTRAS)
def test_extras_match_reference_float64(
    centered, momentum, nesterov, wd, decoupled, masked, lr_in_momentum, maximize
):
    wd_val = wd_schedule if wd == "sched" else wd
    ref_kw, jax_kw = _kwargs(
        centered,
        momentum,
        nesterov,
        True,
        False,
        0.0,
        True,
        wd=wd_val,
        decoupled_weight_decay=decoupled,
        lr_in_momentum=lr_in_momentum,
        maximize=maximize,
    )
    if masked:
        jax_kw["weight_decay_mask"] = _mask
    with enable_x64():
        err = _compare(ref_kw, jax_kw, jnp.float64, mask_fn=_mask if masked else None)
    assert err < TOL64, err


@pytest.mark.parametrize(
    "centered,momentum,nesterov,lr_in_momentum,decoupled",
    [(False, None, False, True, False), (True, 0.9, False, False, True), (True, 0.9, True, True, False)],
)
def test_float32_matches_reference_to_roundoff(centered, momentum, nesterov, lr_in_momentum, decoupled):
    ref_kw, jax_kw = _kwargs(
        centered,
        momentum,
        nesterov,
        True,
        not centered,  # centered + bias correction is ill-conditioned at step 1 (see above)
        0.0,
        True,
        wd=0.01,
        decoupled_weight_decay=decoupled,
        lr_in_momentum=lr_in_momentum,
    )
    err = _compare(ref_kw, jax_kw, jnp.float32, per_leaf=True)
    assert err < TOL32, err


# ------------------------------------------------------------------ the comparison can fail

WRONG = {
    "eps on the wrong side of the root": dict(eps_in_sqrt=False),
    "accumulator starting at 1, not 0": dict(initial_scale=1.0),
    "lr outside momentum instead of inside": dict(lr_in_momentum=False),
    "no bias correction": dict(bias_correction=False),
    "uncentered": dict(centered=False),
    "coupled instead of decoupled decay": dict(decoupled_weight_decay=False),
    "nesterov dropped": dict(nesterov=False),
}


@pytest.mark.parametrize("what", list(WRONG))
def test_wrong_variants_fail_the_comparison(what):
    ref_kw, jax_kw = _kwargs(
        True, 0.9, True, True, True, 0.0, True, wd=0.05, decoupled_weight_decay=True, lr_in_momentum=True
    )
    with enable_x64():
        assert _compare(ref_kw, jax_kw, jnp.float64) < TOL64
        jax_kw.update(WRONG[what])
        err = _compare(ref_kw, jax_kw, jnp.float64)
    assert err > 1e3 * TOL64, f"{what}: the comparison did not notice (err={err})"


def test_complex_params_use_squared_modulus():
    rng = np.random.default_rng(3)
    p = rng.normal(size=(4, 3)) + 1j * rng.normal(size=(4, 3))
    grads = [rng.normal(size=(4, 3)) + 1j * rng.normal(size=(4, 3)) for _ in range(STEPS)]
    cfg = RefConfig(lr=0.01, centered=True, momentum=0.5, eps=1e-3)
    ref = run_reference([p], [[g] for g in grads], cfg)
    opt = rmsprop_jax.rmsprop(0.01, centered=True, momentum=0.5, eps=1e-3)
    with enable_x64():
        got = run_scanned(opt, p, grads, jnp.complex128)
        assert opt.init(jnp.asarray(p)).nu.dtype == jnp.float64  # |g|^2 is real
    assert max(max_rel_err(g, r[0]) for g, r in zip(got, ref, strict=True)) < TOL64


def test_graves_2013_equations_verbatim():
    """Centered + momentum with Graves' constants reproduces eqs. 38-41 written out by hand."""
    from reference import graves_2013_step

    rng = np.random.default_rng(4)
    w = rng.normal(size=7)
    n, g, d = np.zeros(7), np.zeros(7), np.zeros(7)
    opt = rmsprop_jax.rmsprop(1e-4, decay=0.95, eps=1e-4, centered=True, momentum=0.9)
    with enable_x64():
        pw, state = jnp.asarray(w), opt.init(jnp.asarray(w))
        update = jax.jit(opt.update)
        for _ in range(STEPS):
            e = rng.normal(size=7)
            w, n, g, d = graves_2013_step(w, n, g, d, e)
            u, state = update(jnp.asarray(e), state, pw)
            pw = optax.apply_updates(pw, u)
        np.testing.assert_allclose(np.asarray(pw), w, rtol=1e-12)
