"""Property-based tests: random trees, hyperparameters, options and gradient sequences.

Hypothesis draws the structure (leaf shapes and dtypes, including 0-d and 0-size
leaves), the hyperparameters and option flags, and a seed from which NumPy draws
the gradients; ``tests/conftest.py`` fixes the profile (derandomized, bounded).

The package is compared, update by update, with the independent float64 NumPy
reference (``tests/reference.py``): in float64 to 1e-9 relative, and in float32
(and mixed float32/bfloat16/float16 trees) within a few units of round-off of
each leaf's dtype.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import rmsprop_jax
from _procs import cpu_process_env
from reference import RefConfig, ReferenceRMSProp

HERE = Path(__file__).parent
SHAPES = [(), (0,), (1,), (3,), (2, 3), (1, 5, 1), (4, 0, 2), (7,), (3, 1, 2)]


# --------------------------------------------------------------------------- strategies


@st.composite
def configs(draw, *, weight_decay: bool = True, low_precision: bool = False) -> RefConfig:
    """In-range hyperparameters and option combinations."""
    centered = draw(st.booleans())
    bias_correction = draw(st.booleans())
    # float32: decay <= 0.99 keeps 1 - decay**t well conditioned; the centered variance
    # nu - mu^2 cancels (to 0 at the first bias-corrected step), so eps must dominate
    # its round-off there.
    decay = draw(st.floats(0.0, 0.99 if low_precision else 0.999))
    if centered:
        # At the first bias-corrected step the variance is pure round-off (~1e-16 |g|^2 in
        # float64), so eps must be >> 1e-7 for a 1e-9 comparison there.
        small = [1e-4, 1e-2] if bias_correction else [1e-6, 1e-4, 1e-2]
        eps = draw(st.sampled_from([1e-2, 1e-1] if low_precision else small))
        decay = max(decay, 0.1)
    else:
        eps = draw(st.sampled_from([0.0, 1e-12, 1e-8, 1e-3, 0.1]))
    # Centered and bias-corrected, the variance at the first step is exactly 0 in exact
    # arithmetic (nu_hat = |g|^2 = |mu_hat|^2) and round-off in either sign in floating
    # point: the package clamps it at 0, the reference takes sqrt of a tiny negative, and
    # sqrt(round-off) outside the root is not small next to eps. Keep eps inside there.
    eps_in_sqrt = draw(st.booleans()) or (centered and bias_correction)
    momentum = draw(st.one_of(st.none(), st.floats(0.0, 0.99)))
    wd = draw(st.sampled_from([0.0, 1e-3, 0.1])) if weight_decay else 0.0
    return RefConfig(
        lr=draw(st.floats(1e-4, 1.0)),
        decay=decay,
        eps=eps,
        initial_scale=draw(st.sampled_from([0.0, 0.0, 0.1, 1.0])),
        eps_in_sqrt=eps_in_sqrt,
        centered=centered,
        momentum=momentum,
        nesterov=bool(momentum) and draw(st.booleans()),
        bias_correction=bias_correction,
        weight_decay=wd,
        decoupled_weight_decay=draw(st.booleans()),
        lr_in_momentum=draw(st.booleans()),
        maximize=draw(st.booleans()),
    )


def leaf_specs(dtypes):
    return st.lists(st.tuples(st.sampled_from(SHAPES), st.sampled_from(dtypes)), min_size=1, max_size=4)


def make_opt(cfg: RefConfig, mask=None, **extra) -> optax.GradientTransformation:
    return rmsprop_jax.rmsprop(
        cfg.lr,
        decay=cfg.decay,
        eps=cfg.eps,
        initial_scale=cfg.initial_scale,
        eps_in_sqrt=cfg.eps_in_sqrt,
        centered=cfg.centered,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        bias_correction=cfg.bias_correction,
        weight_decay=cfg.weight_decay or None,
        decoupled_weight_decay=cfg.decoupled_weight_decay,
        weight_decay_mask=mask,
        lr_in_momentum=cfg.lr_in_momentum,
        maximize=cfg.maximize,
        **extra,
    )


def draw_arrays(specs, seed: int, steps: int, scale: float = 1.0):
    """Params (dict of leaves) and a list of gradient dicts, as NumPy arrays in each leaf's dtype."""
    rng = np.random.default_rng(seed)

    def one(shape, dtype, s):
        x = rng.standard_normal(shape) * s
        if np.dtype(dtype).kind == "c":
            x = x + 1j * rng.standard_normal(shape) * s
        return np.asarray(jnp.asarray(x, dtype))

    params = {f"l{i}": one(sh, dt, 1.0) for i, (sh, dt) in enumerate(specs)}
    grads = [{f"l{i}": one(sh, dt, scale) for i, (sh, dt) in enumerate(specs)} for _ in range(steps)]
    return params, grads


def reference_updates(params, grads, cfg, mask):
    """Per-step updates of the float64 reference: ``out[t][k] = p_{t+1} - p_t``, and the params fed."""
    refs = {
        k: ReferenceRMSProp(np.asarray(p, np.float64 if p.dtype.kind != "c" else np.complex128), cfg, m)
        for (k, p), m in zip(params.items(), mask.values(), strict=True)
    }
    ups, fed = [], []
    for g in grads:
        before = {k: r.p.copy() for k, r in refs.items()}
        fed.append(before)
        ups.append({k: refs[k].step(np.asarray(g[k], refs[k].p.dtype)) - before[k] for k in refs})
    return ups, fed


def package_updates(opt, params, grads, fed, update=None):
    """Per-step updates of the package, fed the reference's params (cast to each leaf's dtype)."""
    update = update or opt.update
    state = opt.init({k: jnp.asarray(v) for k, v in params.items()})
    out, states = [], []
    for g, p in zip(grads, fed, strict=True):
        p = {k: jnp.asarray(v, params[k].dtype) for k, v in p.items()}
        u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
        out.append(u)
        states.append(state)
    return out, states


def assert_close(got, want, rtol, atol, what=""):
    for t, (gs, ws) in enumerate(zip(got, want, strict=True)):
        for k in ws:
            g = np.asarray(gs[k]).astype(np.complex128 if np.iscomplexobj(gs[k]) else np.float64)
            np.testing.assert_allclose(g, ws[k], rtol=rtol, atol=atol, err_msg=f"{what} step {t} leaf {k}")


# --------------------------------------------------------------------------- vs reference


@given(
    cfg=configs(),
    specs=leaf_specs(["float64", "float64", "complex128"]),
    mask_bits=st.lists(st.booleans(), min_size=4, max_size=4),
    seed=st.integers(0, 2**31 - 1),
    steps=st.integers(1, 6),
)
def test_matches_reference_float64(cfg, specs, mask_bits, seed, steps):
    with jax.enable_x64(True):
        params, grads = draw_arrays(specs, seed, steps)
        mask = {k: mask_bits[i] for i, k in enumerate(params)}
        want, fed = reference_updates(params, grads, cfg, mask)
        got, states = package_updates(make_opt(cfg, mask), params, grads, fed)
        assert_close(got, want, rtol=1e-9, atol=1e-14 * cfg.lr)
        for s in states:
            assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(s.nu))


@given(
    cfg=configs(low_precision=True),
    specs=leaf_specs(["float32"]),
    seed=st.integers(0, 2**31 - 1),
    steps=st.integers(1, 6),
    jit=st.booleans(),
)
def test_matches_reference_float32(cfg, specs, seed, steps, jit):
    # Eager and jitted updates differ in the last bits (see "jit vs eager" below): both
    # must be within round-off of the float64 truth.
    params, grads = draw_arrays(specs, seed, steps)
    mask = dict.fromkeys(params, True)
    want, fed = reference_updates(params, grads, cfg, mask)
    opt = make_opt(cfg)
    got, _ = package_updates(opt, params, grads, fed, update=jax.jit(opt.update) if jit else None)
    # Round-off: ~1e-6 relative per step, times the condition of the centered variance.
    assert_close(got, want, rtol=1e-4 if cfg.centered else 2e-5, atol=1e-6 * cfg.lr)


# bfloat16 keeps 8 significant bits, float16 11: each step's update is rounded to
# the leaf's dtype and so is the state, so the error is a few of its epsilons.
LOW_RTOL = {"float32": 2e-5, "float16": 2e-2, "bfloat16": 1e-1}


@given(
    cfg=configs(weight_decay=False, low_precision=True),
    specs=leaf_specs(["float32", "bfloat16", "float16"]),
    f32_acc=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    steps=st.integers(1, 4),
)
def test_mixed_dtype_tree_matches_reference_within_its_round_off(cfg, specs, f32_acc, seed, steps):
    params, grads = draw_arrays(specs, seed, steps)
    mask = dict.fromkeys(params, True)
    want, fed = reference_updates(params, grads, cfg, mask)
    opt = make_opt(cfg, accumulator_dtype=jnp.float32 if f32_acc else None)
    got, states = package_updates(opt, params, grads, fed)
    for t, (g_t, w_t) in enumerate(zip(got, want, strict=True)):
        for k, p in params.items():
            assert g_t[k].dtype == p.dtype, "updates come back in the gradient dtype"
            rtol = LOW_RTOL["float32" if (f32_acc and p.dtype == np.float32) else str(p.dtype)]
            if f32_acc:  # only the final cast to the leaf dtype rounds
                rtol = min(rtol, 2 * float(jnp.finfo(p.dtype).eps) + 2e-5)
            np.testing.assert_allclose(
                np.asarray(g_t[k], np.float64),
                w_t[k],
                rtol=rtol,
                # Momentum sums terms of size ~lr that can cancel: the rounding of a
                # low-precision state is then relative to lr, not to the (small) result.
                atol=rtol * cfg.lr / 4,
                err_msg=f"step {t} leaf {k} {p.dtype}",
            )
    for s in states:
        for k, nu in s.nu.items():
            assert nu.dtype == (jnp.float32 if f32_acc else params[k].dtype), "state keeps its dtype"


# --------------------------------------------------------------------------- invariants


@given(
    cfg=configs(low_precision=True),
    specs=leaf_specs(["float32", "bfloat16", "float16"]),
    log_scale=st.integers(-20, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_second_moment_is_never_negative(cfg, specs, log_scale, seed):
    params, grads = draw_arrays(specs, seed, 5, scale=10.0**log_scale)
    opt = make_opt(cfg)
    state = opt.init(params)
    for g in grads:
        _, state = opt.update(g, state, params)
        for nu in jax.tree.leaves(state.nu):
            nu = np.asarray(nu, np.float64)
            # >= 0 and never NaN. (+inf is possible, only in a float16 state: |g|^2 past
            # 65504, i.e. |g| > 256; see test_bad_input.py for that documented limit.)
            assert np.all(nu >= 0), nu


@given(
    cfg=configs(weight_decay=False),
    specs=leaf_specs(["float32", "bfloat16", "float16"]),
    steps=st.integers(1, 5),
)
def test_zero_gradient_with_zero_initial_scale_gives_zero_update(cfg, specs, steps):
    cfg = dataclasses.replace(cfg, initial_scale=0.0)  # eps may be 0: 0/0 must not appear
    params, grads = draw_arrays(specs, 0, steps)
    opt = make_opt(cfg)
    state = opt.init(params)
    for _ in range(steps):
        u, state = opt.update(jax.tree.map(jnp.zeros_like, grads[0]), state, params)
        for leaf in jax.tree.leaves(u):
            np.testing.assert_array_equal(np.asarray(leaf, np.float32), 0)


@given(
    cfg=configs(weight_decay=False),
    specs=leaf_specs(["float32", "bfloat16", "float16"]),
    seed=st.integers(0, 2**31 - 1),
    steps=st.integers(1, 5),
)
def test_without_weight_decay_the_update_is_odd_in_the_gradient_history(cfg, specs, seed, steps):
    params, grads = draw_arrays(specs, seed, steps)
    opt = make_opt(cfg)
    s_pos = s_neg = opt.init(params)
    for g in grads:
        u_pos, s_pos = opt.update(g, s_pos, params)
        u_neg, s_neg = opt.update(jax.tree.map(np.negative, g), s_neg, params)
        # Bit for bit: every operation is sign-symmetric under round-to-nearest.
        for a, b in zip(jax.tree.leaves(u_pos), jax.tree.leaves(u_neg), strict=True):
            np.testing.assert_array_equal(np.asarray(a), -np.asarray(b))


@given(
    cfg=configs(weight_decay=False),
    specs=leaf_specs(["float64"]),
    log_c=st.floats(-6.0, 6.0),
    seed=st.integers(0, 2**31 - 1),
    steps=st.integers(1, 5),
)
def test_loss_scaling_leaves_the_update_invariant_as_eps_goes_to_zero(cfg, specs, log_c, seed, steps):
    # Centered and bias-corrected, the first step's variance is 0 (see configs()): with
    # eps = 0 the update is then 0/0-like and scale-dependent by construction. Excluded.
    cfg = dataclasses.replace(
        cfg, eps=0.0, initial_scale=0.0, bias_correction=cfg.bias_correction and not cfg.centered
    )
    c = 10.0**log_c
    with jax.enable_x64(True):
        params, grads = draw_arrays(specs, seed, steps)
        opt = make_opt(cfg)
        s1 = s2 = opt.init(params)
        for g in grads:
            u1, s1 = opt.update(g, s1, params)
            u2, s2 = opt.update(jax.tree.map(lambda x: c * x, g), s2, params)
            for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
                np.testing.assert_allclose(
                    np.asarray(b), np.asarray(a), rtol=1e-12 if not cfg.centered else 1e-9
                )


@given(
    cfg=configs(weight_decay=False),
    # float32's exponent range (float32/bfloat16 leaves; the arithmetic is float32): no
    # underflow here. A float16 state would go subnormal for small |g| and lose bits.
    specs=leaf_specs(["float32", "bfloat16"]),
    k=st.integers(-6, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_power_of_two_loss_scaling_is_exact_when_eps_is_zero(cfg, specs, k, seed):
    # Scaling by 4**k is exact in binary floating point, and sqrt(16**k v) = 4**k sqrt(v)
    # exactly: the updates must agree bit for bit (no overflow/underflow in this range).
    cfg = dataclasses.replace(
        cfg, eps=0.0, initial_scale=0.0, bias_correction=cfg.bias_correction and not cfg.centered
    )
    params, grads = draw_arrays(specs, seed, 3)
    opt = make_opt(cfg)
    s1 = s2 = opt.init(params)
    for g in grads:
        u1, s1 = opt.update(g, s1, params)
        u2, s2 = opt.update(jax.tree.map(lambda x: x * np.asarray(4.0**k, x.dtype), g), s2, params)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


@given(
    cfg=configs(),
    specs=leaf_specs(["float32", "bfloat16"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_same_inputs_give_bit_identical_outputs_across_runs(cfg, specs, seed):
    params, grads = draw_arrays(specs, seed, 3)
    runs = []
    for _ in range(2):
        opt = make_opt(cfg)  # a fresh transformation and a fresh jit each run
        step = jax.jit(opt.update)
        state = opt.init(params)
        eager_state = state
        out = []
        for g in grads:
            u, state = step(g, state, params)
            ue, eager_state = opt.update(g, eager_state, params)
            out += [np.asarray(x) for x in jax.tree.leaves((u, state, ue, eager_state))]
        runs.append(out)
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- jit vs eager
#
# jit and eager execution are NOT bit-identical on this CPU, for two reasons, both XLA's
# (optax behaves the same):
#   1. fused multiply-add contraction: XLA fuses element-wise ops into one loop and LLVM
#      contracts a multiply feeding an add/subtract (``decay * nu + (1 - decay) * g * g``,
#      ``nu - mu * mu``) into one FMA, rounded once; eager runs each op as its own
#      computation and rounds twice. ``--xla_cpu_max_isa=AVX`` (no FMA) turns this off.
#   2. XLA's algebraic simplifier rewrites ``x / broadcast(b)`` as ``x * broadcast(1 / b)``
#      under jit: the bias correction ``nu / (1 - decay**t)`` rounds twice there.
#      ``--xla_disable_hlo_passes=algsimp`` turns this off.
# With both off, jit and eager agree bit for bit (checked in fresh processes below);
# in-process both are within round-off of the reference (test_matches_reference_float32).


def _jit_eager_script(flags: str, script: str = "jit_eager_check.py") -> dict:
    """Run ``tests/<script>`` in a fresh CPU process with ``flags`` added to ``XLA_FLAGS``; its JSON."""
    proc = subprocess.run(
        [sys.executable, str(HERE / script)],
        env=cpu_process_env(flags=flags, pythonpath=(HERE.parent / "src", HERE)),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("JIT_EAGER "))
    return json.loads(line.split(" ", 1)[1])


def test_jit_equals_eager_bit_for_bit_without_fma_and_reciprocal_rewrite():
    report = _jit_eager_script("--xla_cpu_max_isa=AVX --xla_disable_hlo_passes=algsimp")
    assert report["cases"] >= 8
    assert report["differing"] == []


def test_without_fma_only_the_bias_corrected_configs_differ():
    # Pins down cause 2: with FMA off, what is left is the reciprocal rewrite.
    import jit_eager_check

    report = _jit_eager_script("--xla_cpu_max_isa=AVX")
    differing = {int(d.split()[1]) for d in report["differing"]}
    bias = {i for i, kw in enumerate(jit_eager_check.CONFIGS) if kw.get("bias_correction")}
    assert differing <= bias, report["differing"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
