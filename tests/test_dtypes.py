"""dtype behaviour: updates in the gradients' dtype, state dtype stable across steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsprop_jax

FULL = dict(centered=True, momentum=0.9, nesterov=True, weight_decay=1e-3, bias_correction=True)


def _run(dtype, steps=5, **kw):
    opt = rmsprop_jax.rmsprop(0.01, **{**FULL, **kw})
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), dtype), "b": jnp.asarray(rng.normal(size=3), dtype)}
    state = opt.init(params)
    init_dtypes = jax.tree.map(lambda x: x.dtype, state)
    step = jax.jit(opt.update)
    for t in range(steps):
        g = jax.tree.map(lambda p, t=t: jnp.asarray(rng.normal(size=p.shape) * (1 + t), dtype), params)
        updates, state = step(g, state, params)
        assert jax.tree.map(lambda x: x.dtype, state) == init_dtypes
        assert all(u.dtype == jnp.dtype(dtype) for u in jax.tree.leaves(updates))
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    return state


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_update_dtype_follows_gradient_and_state_keeps_its_dtype(dtype):
    state = _run(dtype)
    assert state.nu["w"].dtype == jnp.dtype(dtype)  # default: the params' dtype


def test_float64_with_x64_enabled():
    with jax.enable_x64(True):
        state = _run(jnp.float64)
        assert state.nu["w"].dtype == jnp.float64


def test_complex64_nu_is_real_and_buffers_complex():
    state = _run(jnp.complex64)
    assert state.nu["w"].dtype == jnp.float32
    assert state.mu["w"].dtype == jnp.complex64
    assert state.trace["w"].dtype == jnp.complex64


@pytest.mark.parametrize("acc", [jnp.float32, jnp.bfloat16])
def test_accumulator_dtype_overrides_params_dtype(acc):
    state = _run(jnp.bfloat16, accumulator_dtype=acc)
    assert {x.dtype for x in jax.tree.leaves((state.nu, state.mu, state.trace))} == {jnp.dtype(acc)}


def test_low_precision_math_runs_in_float32():
    """eps = 1e-8 underflows to 0 in float16; the update is still finite for a zero gradient."""
    opt = rmsprop_jax.rmsprop(0.1, centered=True)
    p = jnp.zeros(3, jnp.float16)
    u, _s = opt.update(jnp.zeros(3, jnp.float16), opt.init(p))
    assert bool(jnp.all(u == 0)) and u.dtype == jnp.float16
    # a naive float16 evaluation of the same formula would give 0 * rsqrt(0 + 0) = nan
    assert bool(jnp.isnan(jnp.float16(0) * jax.lax.rsqrt(jnp.float16(0) + jnp.float16(1e-8))))


def test_eps_zero_and_zero_gradient_is_not_nan():
    for eps_in_sqrt in (True, False):
        opt = rmsprop_jax.rmsprop(0.1, eps=0.0, eps_in_sqrt=eps_in_sqrt)
        u, _ = opt.update(jnp.zeros(2), opt.init(jnp.zeros(2)))
        np.testing.assert_array_equal(u, [0.0, 0.0])
