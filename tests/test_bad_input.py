"""Bad and extreme input: clear errors, never a silent broadcast, documented limits.

What is accepted, and what is not (tested below):

* Hyperparameters: each out-of-range, non-finite or non-scalar value raises
  ``ValueError`` naming the argument, the value and the allowed range. Traced values
  (under ``jit``/``grad``) are not checked.
* Gradient trees: the structure must equal the params'; each leaf's shape must equal
  its parameter's exactly (no broadcasting), else ``ValueError`` naming the leaf and
  both shapes. Any floating gradient dtype is accepted on any floating state (a
  float32 gradient on a bfloat16 state is normal in mixed precision): the arithmetic
  runs in at least float32, the update comes back in the gradient's dtype and the
  state keeps its own dtype.
* Integer and boolean params leaves: ``TypeError`` at ``init`` naming the leaf path
  (exclude them with ``optax.masked`` or a Flax ``wrt`` filter).
* Non-finite gradients: NaN/inf propagate into the update and the state (as in optax
  and PyTorch); wrap with ``optax.apply_if_finite`` to skip such steps.
* Float16 state: |g|^2 overflows float16 for |g| > 256 (65504 is its largest value);
  the state becomes inf and that element's update 0 from then on. Use
  ``accumulator_dtype=jnp.float32`` (or bfloat16) with float16 params. In float32 and
  bfloat16 the same happens past |g| ~ 1.8e19.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import rmsprop, scale_by_rms

# --------------------------------------------------------------------------- hyperparameters

NAN, INF = float("nan"), float("inf")

# (factory, kwargs, argument named in the message, a fragment of the allowed range)
INVALID = [
    (rmsprop, {"learning_rate": -0.1}, "learning_rate", "learning_rate >= 0"),
    (rmsprop, {"learning_rate": NAN}, "learning_rate", "learning_rate >= 0"),
    (rmsprop, {"learning_rate": INF}, "learning_rate", "learning_rate >= 0"),
    (rmsprop, {"learning_rate": "0.1"}, "learning_rate", "learning_rate >= 0"),
    (rmsprop, {"learning_rate": True}, "learning_rate", "learning_rate >= 0"),
    (rmsprop, {"learning_rate": np.array([0.1, 0.2])}, "learning_rate", "learning_rate >= 0"),
    (rmsprop, {"learning_rate": 0.1, "decay": -0.1}, "decay", "0 <= decay < 1"),
    (rmsprop, {"learning_rate": 0.1, "decay": 1.0}, "decay", "0 <= decay < 1"),
    (rmsprop, {"learning_rate": 0.1, "decay": 1.5}, "decay", "0 <= decay < 1"),
    (rmsprop, {"learning_rate": 0.1, "decay": NAN}, "decay", "0 <= decay < 1"),
    (rmsprop, {"learning_rate": 0.1, "eps": -1e-8}, "eps", "eps >= 0"),
    (rmsprop, {"learning_rate": 0.1, "eps": INF}, "eps", "eps >= 0"),
    (rmsprop, {"learning_rate": 0.1, "eps": NAN}, "eps", "eps >= 0"),
    (rmsprop, {"learning_rate": 0.1, "initial_scale": -1.0}, "initial_scale", "initial_scale >= 0"),
    (rmsprop, {"learning_rate": 0.1, "initial_scale": NAN}, "initial_scale", "initial_scale >= 0"),
    (rmsprop, {"learning_rate": 0.1, "momentum": -0.1}, "momentum", "0 <= momentum < 1"),
    (rmsprop, {"learning_rate": 0.1, "momentum": 1.0}, "momentum", "0 <= momentum < 1"),
    (rmsprop, {"learning_rate": 0.1, "momentum": NAN}, "momentum", "0 <= momentum < 1"),
    (rmsprop, {"learning_rate": 0.1, "nesterov": True}, "nesterov", "momentum > 0"),
    (rmsprop, {"learning_rate": 0.1, "nesterov": True, "momentum": 0.0}, "nesterov", "momentum > 0"),
    (rmsprop, {"learning_rate": 0.1, "weight_decay": -1e-4}, "weight_decay", "weight_decay >= 0"),
    (rmsprop, {"learning_rate": 0.1, "weight_decay": NAN}, "weight_decay", "weight_decay >= 0"),
    (rmsprop, {"learning_rate": 0.1, "weight_decay": INF}, "weight_decay", "weight_decay >= 0"),
    (rmsprop, {"learning_rate": 0.1, "accumulator_dtype": jnp.int32}, "accumulator_dtype", "floating"),
    (rmsprop, {"learning_rate": 0.1, "accumulator_dtype": "int16"}, "accumulator_dtype", "floating"),
    (rmsprop, {"learning_rate": 0.1, "accumulator_dtype": "no-such"}, "accumulator_dtype", "floating"),
    (rmsprop, {"learning_rate": 0.1, "accumulator_dtype": bool}, "accumulator_dtype", "floating"),
    (scale_by_rms, {"decay": 1.0}, "decay", "0 <= decay < 1"),
    (scale_by_rms, {"decay": -1e-3}, "decay", "0 <= decay < 1"),
    (scale_by_rms, {"eps": -1.0}, "eps", "eps >= 0"),
    (scale_by_rms, {"eps": NAN}, "eps", "eps >= 0"),
    (scale_by_rms, {"initial_scale": -0.5}, "initial_scale", "initial_scale >= 0"),
    (scale_by_rms, {"initial_scale": INF}, "initial_scale", "initial_scale >= 0"),
    (scale_by_rms, {"accumulator_dtype": jnp.int32}, "accumulator_dtype", "floating"),
]


def _id(row) -> str:
    factory, kwargs, name, _ = row
    return f"{factory.__name__}-{name}={kwargs[name] if name in kwargs else kwargs}"


@pytest.mark.parametrize("row", INVALID, ids=[_id(r) for r in INVALID])
def test_invalid_hyperparameter_raises_naming_argument_value_and_range(row):
    factory, kwargs, name, allowed = row
    with pytest.raises(ValueError) as info:
        factory(**kwargs)
    msg = str(info.value)
    assert name in msg
    value = kwargs.get(name, kwargs.get("momentum"))
    assert repr(value) in msg or str(value) in msg, msg
    assert allowed in msg, msg


# Complex scalars are rejected: checking only the real part would let learning_rate=1j pass
# as "0 >= 0", and the imaginary part would leak into the arithmetic.


@pytest.mark.parametrize(
    "kwargs",
    [{"learning_rate": 1j}, {"learning_rate": 0.1, "decay": 0.5 + 0.5j}, {"learning_rate": 0.1, "eps": 1j}],
)
def test_complex_hyperparameter_is_rejected(kwargs):
    with pytest.raises(ValueError, match=next(k for k in kwargs if k != "learning_rate" or len(kwargs) == 1)):
        rmsprop(**kwargs)


def test_valid_edges_and_traced_values_are_accepted():
    for kw in [{"decay": 0.0}, {"eps": 0.0}, {"momentum": 0.0}, {"weight_decay": 0.0}, {"decay": 0.999999}]:
        rmsprop(0.0, **kw)
    rmsprop(optax.constant_schedule(1e-3), weight_decay=optax.constant_schedule(1e-4))

    @jax.jit
    def make_and_step(lr, decay):  # traced hyperparameters: not checked, no error
        opt = rmsprop(lr, decay=decay)
        return opt.update(jnp.ones(2), opt.init(jnp.ones(2)))[0]

    assert np.all(np.isfinite(make_and_step(0.1, 0.9)))


# --------------------------------------------------------------------------- tree mismatches


@pytest.fixture
def opt_and_state():
    opt = rmsprop(0.1, centered=True, momentum=0.9)
    params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4), "nested": {"s": jnp.ones(())}}
    return opt, opt.init(params), params


def _grads_like(params):
    return jax.tree.map(jnp.ones_like, params)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda g: {**g, "extra": jnp.ones(2)}, r"gradient tree does not match"),
        (lambda g: {k: v for k, v in g.items() if k != "b"}, r"gradient tree does not match"),
        (lambda g: {**g, "nested": [g["nested"]["s"]]}, r"gradient tree does not match"),
        (lambda g: [g["w"], g["b"], g["nested"]], r"gradient tree does not match"),
    ],
    ids=["extra-key", "missing-key", "dict-vs-list", "list-for-dict"],
)
def test_gradient_tree_structure_mismatch_names_both_structures(opt_and_state, mutate, pattern):
    opt, state, params = opt_and_state
    with pytest.raises(ValueError, match=pattern) as info:
        opt.update(mutate(_grads_like(params)), state, params)
    assert "gradients:" in str(info.value) and "state.nu:" in str(info.value)


@pytest.mark.parametrize(
    "leaf, shape",
    [("w", (4, 3)), ("w", (1, 4)), ("w", (3, 1)), ("b", (1,)), ("b", ()), ("b", (1, 4)), ("nested", (1,))],
)
def test_gradient_shape_mismatch_is_an_error_not_a_broadcast(opt_and_state, leaf, shape):
    opt, state, params = opt_and_state
    grads = _grads_like(params)
    if leaf == "nested":
        grads["nested"]["s"] = jnp.ones(shape)
        path, want = "['nested']['s']", "()"
    else:
        grads[leaf] = jnp.ones(shape)
        path, want = f"['{leaf}']", str(params[leaf].shape)
    with pytest.raises(ValueError) as info:
        opt.update(grads, state, params)
    msg = str(info.value)
    assert path in msg and str(shape) in msg and want in msg, msg


@pytest.mark.parametrize(
    "param_dtype, grad_dtype",
    [
        (jnp.bfloat16, jnp.float32),
        (jnp.float16, jnp.float32),
        (jnp.float32, jnp.bfloat16),
        (jnp.float32, jnp.float16),
        (jnp.bfloat16, jnp.float16),
    ],
)
def test_any_floating_gradient_dtype_is_accepted_on_any_floating_state(param_dtype, grad_dtype):
    opt = rmsprop(0.1, centered=True, momentum=0.5)
    params = {"w": jnp.ones(5, param_dtype)}
    state = opt.init(params)
    g = {"w": jnp.linspace(-2, 2, 5).astype(grad_dtype)}
    u, new = opt.update(g, state, params)
    assert u["w"].dtype == grad_dtype  # the update in the gradient's dtype
    for tree in (new.nu, new.mu, new.trace):  # the state keeps its own dtype
        assert tree["w"].dtype == param_dtype
    # Same values as with a gradient already in float32, rounded once to grad_dtype.
    u32, _ = opt.update({"w": g["w"].astype(jnp.float32)}, state, params)
    np.testing.assert_array_equal(np.asarray(u["w"]), np.asarray(u32["w"].astype(grad_dtype)))


@pytest.mark.parametrize("grad", [jnp.array([1, 2, 3], jnp.int32), jnp.array([True, False, True])])
def test_integer_or_boolean_gradient_is_rejected(grad):
    opt = rmsprop(0.1)
    params = {"w": jnp.ones(3)}
    with pytest.raises(TypeError, match=r"\['w'\]"):
        opt.update({"w": grad}, opt.init(params), params)


def test_complex_gradient_on_real_parameter_is_rejected():
    opt = rmsprop(0.1)
    params = {"w": jnp.ones(3)}
    with pytest.raises(TypeError, match=r"\['w'\]"):
        opt.update({"w": jnp.ones(3, jnp.complex64)}, opt.init(params), params)


@pytest.mark.parametrize(
    "params, path, dtype",
    [
        ({"i": jnp.arange(3)}, "['i']", "int32"),
        ({"flag": jnp.ones(2, bool)}, "['flag']", "bool"),
        ({"a": {"b": [jnp.ones(2), jnp.arange(2, dtype=jnp.uint8)]}}, "['a']['b'][1]", "uint8"),
        (jnp.int32(3), "<root>", "int32"),
    ],
)
def test_integer_and_boolean_params_raise_type_error_naming_the_leaf(params, path, dtype):
    for opt in (rmsprop(0.1), scale_by_rms()):
        with pytest.raises(TypeError) as info:
            opt.init(params)
        msg = str(info.value)
        assert path in msg and dtype in msg and "optax.masked" in msg, msg


def test_integer_leaves_can_be_excluded_with_optax_masked():
    params = {"w": jnp.ones(3), "step": jnp.int32(0)}
    opt = optax.masked(rmsprop(0.1), {"w": True, "step": False})
    state = opt.init(params)
    u, _ = opt.update({"w": jnp.ones(3), "step": jnp.int32(0)}, state, params)
    assert np.all(np.asarray(u["w"]) < 0)


# --------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_apply_if_finite_skips_the_step_and_leaves_everything_untouched(bad):
    opt = optax.apply_if_finite(rmsprop(0.1, centered=True, momentum=0.9), max_consecutive_errors=5)
    params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.ones(())}
    state = opt.init(params)
    good = {"w": jnp.array([0.5, 0.5, -1.0]), "b": jnp.array(0.3)}
    u, state = opt.update(good, state, params)
    params = optax.apply_updates(params, u)

    grads = {"w": jnp.array([0.5, bad, -1.0]), "b": jnp.array(0.3)}
    u2, state2 = opt.update(grads, state, params)
    for leaf in jax.tree.leaves(u2):
        np.testing.assert_array_equal(np.asarray(leaf), 0)
    new_params = optax.apply_updates(params, u2)
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(state2.inner_state), jax.tree.leaves(state.inner_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state2.notfinite_count) == 1 and int(state2.total_notfinite) == 1


def test_without_apply_if_finite_non_finite_gradients_propagate_elementwise():
    # Documented behaviour (as optax/PyTorch): NaN and inf reach the update and the state
    # of their own element only; the other elements are unaffected.
    opt = rmsprop(0.1)
    params = jnp.ones(4)
    state = opt.init(params)
    u, state = opt.update(jnp.array([np.nan, np.inf, -np.inf, 1.0]), state, params)
    u, nu = np.asarray(u), np.asarray(state.nu)
    assert np.isnan(u[:3]).all() and np.isfinite(u[3])  # inf / sqrt(inf) = NaN
    assert np.isnan(nu[0]) and nu[1] == np.inf and nu[2] == np.inf and np.isfinite(nu[3])
    ref, _ = opt.update(jnp.array([1.0]), opt.init(jnp.ones(1)))
    assert u[3] == np.asarray(ref)[0]


# --------------------------------------------------------------------------- extreme magnitudes


CONFIGS = {
    "default": {},
    "eps0": {"eps": 0.0},
    "centered": {"centered": True},
    "centered_eps0": {"centered": True, "eps": 0.0},
    "eps_outside_bias": {"eps_in_sqrt": False, "bias_correction": True},
    "momentum_nesterov": {"momentum": 0.9, "nesterov": True},
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_extreme_magnitudes_give_finite_updates(config, dtype):
    # 1e-30 .. 1e15 in one array, each element its own magnitude, 20 steps.
    mags = np.logspace(-30, 15, 46)
    g = jnp.asarray(np.concatenate([mags, -mags]), dtype)
    opt = rmsprop(1e-3, **CONFIGS[config])
    state = opt.init(jnp.zeros_like(g))
    step = jax.jit(opt.update)
    for _ in range(20):
        u, state = step(g, state)
        assert np.all(np.isfinite(np.asarray(u, np.float32))), config
        assert np.all(np.isfinite(np.asarray(state.nu, np.float32)))
    # Where |g|^2 is a normal float32 the update is the normalized step, with the sign of -g.
    u = np.asarray(u, np.float64)
    normal = (np.abs(np.asarray(g, np.float64)) > 1e-18) & (np.abs(np.asarray(g, np.float64)) < 1e19)
    assert np.all(np.sign(u[normal]) == -np.sign(np.asarray(g, np.float64)[normal]))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_float16_range_is_finite_with_float32_accumulators(config):
    # float16's whole range: the smallest subnormal up to its largest value.
    finfo = jnp.finfo(jnp.float16)
    mags = np.concatenate([[float(finfo.smallest_subnormal)], np.logspace(-7, 4, 12), [float(finfo.max)]])
    g = jnp.asarray(np.concatenate([mags, -mags]), jnp.float16)
    opt = rmsprop(1e-3, accumulator_dtype=jnp.float32, **CONFIGS[config])
    state = opt.init(jnp.zeros_like(g))
    for _ in range(5):
        u, state = opt.update(g, state)
        assert u.dtype == jnp.float16
        assert np.all(np.isfinite(np.asarray(u, np.float32)))


def test_float16_state_overflow_is_the_documented_limit():
    # A float16 state holds |g|^2 only up to 65504: nu -> |g|^2 over the steps, so a constant
    # |g| = 250 stays finite and |g| = 300 overflows (after ~15 steps at decay 0.9), after
    # which that element's update is 0 (g / sqrt(inf)), never NaN.
    opt = rmsprop(1e-2)
    g = jnp.asarray([250.0, 300.0], jnp.float16)

    def body(state, _):
        u, state = opt.update(g, state)
        return state, u

    state, us = jax.lax.scan(body, opt.init(jnp.zeros(2, jnp.float16)), length=100)
    nu, us = np.asarray(state.nu, np.float32), np.asarray(us, np.float32)
    assert np.isfinite(nu[0]) and nu[1] == np.inf
    assert np.all(us[:, 0] < 0) and us[-1, 1] == 0 and not np.isnan(us).any()
    # The remedy: float32 accumulators.
    opt32 = rmsprop(1e-2, accumulator_dtype=jnp.float32)
    state32 = opt32.init(jnp.zeros(2, jnp.float16))
    for _ in range(100):
        u32, state32 = opt32.update(g, state32)
    np.testing.assert_allclose(np.asarray(u32, np.float32), -1e-2, rtol=1e-3)


def test_float32_square_overflow_is_the_documented_limit_without_centering():
    # |g|^2 overflows float32 (and bfloat16) past |g| ~ 1.8e19: nu = inf and the update is 0.
    opt = rmsprop(1e-3)
    u, state = opt.update(jnp.asarray([1e20, -1e20, 1.0]), opt.init(jnp.zeros(3)))
    assert np.asarray(state.nu)[0] == np.inf
    np.testing.assert_array_equal(np.asarray(u)[:2], 0)


@pytest.mark.parametrize("op_by_op", [False, True])
def test_centered_never_nan_for_finite_gradient_beyond_square_overflow(op_by_op):
    """|g|^2 overflows: nu = |mu|^2 = inf; v stays inf (update 0) instead of inf - inf = NaN."""
    opt = rmsprop(1e-3, centered=True)
    with jax.disable_jit(op_by_op):
        u, _ = opt.update(jnp.asarray([1e21, -1e21]), opt.init(jnp.zeros(2)))
    np.testing.assert_array_equal(np.asarray(u), [0.0, 0.0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("value", [1.0, -3.0, 1e-3, 200.0])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_centered_constant_gradient_400_steps_stays_finite(dtype, value, bias_correction):
    # nu - mu^2 -> 0 in exact arithmetic; rounding makes it either sign. eps = 1e-8 rounds
    # to 0 in float16, yet the arithmetic is float32 and the variance is clamped at 0.
    opt = rmsprop(1e-3, centered=True, bias_correction=bias_correction)
    g = jnp.full((3,), value, dtype)

    def body(state, _):
        u, state = opt.update(g, state)
        return state, u

    state, us = jax.lax.scan(body, opt.init(jnp.zeros(3, dtype)), length=400)
    us = np.asarray(us, np.float32)
    assert np.all(np.isfinite(us)) and np.all(np.sign(us) == -np.sign(value))
    assert np.all(np.asarray(state.nu, np.float32) >= 0)


def test_arithmetic_runs_in_at_least_float32_for_low_precision_inputs():
    # No sqrt/rsqrt/div of the update runs in bfloat16/float16: the jaxpr says so.
    opt = rmsprop(1e-3, centered=True, momentum=0.9, bias_correction=True, eps_in_sqrt=False)
    for dt in (jnp.bfloat16, jnp.float16):
        p = jnp.ones(3, dt)
        jaxpr = str(jax.make_jaxpr(opt.update)(p, opt.init(p), p))
        for prim in ("sqrt", "rsqrt", "div"):
            for line in jaxpr.splitlines():
                if re.search(rf"= {prim}\b", line):
                    assert "f32[" in line.split("=")[0], line
    assert float(jnp.asarray(1e-8, jnp.float16)) == 0.0  # why it matters


def test_momentum_and_all_options_are_finite_at_float32_extremes():
    opt = rmsprop(1e-3, centered=True, momentum=0.9, nesterov=True, bias_correction=True, weight_decay=1e-2)
    g = jnp.asarray([1e-30, 1e15, -1e15, 3.4e18, 0.0], jnp.float32)
    p = jnp.asarray([1e3, -1e3, 1.0, 0.0, 1e10], jnp.float32)
    state = opt.init(p)
    for _ in range(10):
        u, state = opt.update(g, state, p)
        assert np.all(np.isfinite(np.asarray(u)))


def test_public_names_are_exported():
    assert {"rmsprop", "scale_by_rms", "RmsPropState"} <= set(rmsprop_jax.__all__)
