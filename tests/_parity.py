"""Shared helpers for the framework-parity tests (presets against torch, Keras, TF1, timm, papers).

Every comparison feeds both sides the same gradient sequence: a deterministic
float64 oracle (:func:`gradient_sequence`) rounded once to float32, so the
framework and this package see bit-identical inputs. Gradients are fixed, not
recomputed from the parameters, so a trajectory difference can only come from
the optimizer.

The error measure (:func:`rel_err`) is the largest absolute difference between
two parameter trajectories, divided by the largest distance the parameter moved
from its start (per leaf, maximised over leaves): an error relative to the
*motion*, which is much stricter than one relative to the parameter values.

This module has no dependency on torch, keras or tensorflow: the fixture
recorder (``tests/fixtures/record_tf1_timm.py``) imports it from a separate
virtual environment.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: The test pytree: several shapes, including a scalar.
SHAPES: dict[str, tuple[int, ...]] = {"w": (4, 3), "b": (3,), "s": (), "k": (2, 2, 2)}
#: Number of steps in every comparison.
STEPS = 160
#: Relative tolerance (of the motion) for float32 trajectories.
TOL = 2e-5


def leaf_names() -> list[str]:
    """Leaf order of the test pytree: ``jax.tree.leaves`` of a dict sorts its keys."""
    return sorted(SHAPES)


def initial_params(seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 starting parameters of order 1 (so weight decay matters)."""
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0.0, 1.0, SHAPES[k]).astype(np.float32) for k in leaf_names()}


def gradient_sequence(steps: int = STEPS, seed: int = 1) -> dict[str, np.ndarray]:
    """Gradients ``out[leaf][t]`` for ``t < steps``, float64 oracle rounded to float32.

    Each leaf has its own scale (0.03 to 1) so that ``eps = 1e-2`` sits inside
    the range of second moments and moving it across the root matters, a
    non-zero mean (so the centered and uncentered forms differ) and a slow
    drift (so the moving averages keep changing).
    """
    rng = np.random.default_rng(seed)
    scales = {"b": 0.03, "k": 0.3, "s": 1.0, "w": 0.1}
    t = np.arange(steps, dtype=np.float64)
    out = {}
    for k in leaf_names():
        shape = SHAPES[k]
        noise = rng.normal(0.0, 1.0, (steps, *shape))
        mean = rng.normal(0.0, 1.0, shape)
        drift = np.sin(0.05 * t).reshape((steps,) + (1,) * len(shape))
        g = scales[k] * (noise + 0.7 * mean + 0.5 * drift)
        out[k] = g.astype(np.float32)
    return out


def learning_rates(steps: int = STEPS, base: float = 1e-2) -> np.ndarray:
    """A learning rate that changes every step (float32 values, so every side uses the same numbers)."""
    t = np.arange(steps, dtype=np.float64)
    return (base * (1.0 + 0.6 * np.sin(0.37 * t) + 0.002 * t)).astype(np.float32)


def lr_schedule(lrs: np.ndarray):
    """An optax schedule that returns ``lrs[count]``."""
    import jax.numpy as jnp

    table = jnp.asarray(lrs)
    return lambda count: table[count]


def run_jax(opt, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], state=None, return_state=False):
    """Trajectory ``out[leaf][t]`` (params after step t+1) of an optax optimizer, scanned under jit.

    ``state``: start from this optimizer state instead of ``opt.init(params)``;
    ``return_state``: return ``(trajectory, final_state)``.
    """
    import jax
    import jax.numpy as jnp
    import optax

    p0 = {k: jnp.asarray(v) for k, v in params.items()}
    gs = {k: jnp.asarray(v) for k, v in grads.items()}

    @jax.jit
    def run(p, s, g_seq):
        def step(carry, g):
            p, s = carry
            u, s = opt.update(g, s, p)
            p = optax.apply_updates(p, u)
            return (p, s), p

        (_, s), traj = jax.lax.scan(step, (p, s), g_seq)
        return traj, s

    traj, final = run(p0, opt.init(p0) if state is None else state, gs)
    traj = {k: np.asarray(v) for k, v in traj.items()}
    return (traj, final) if return_state else traj


def run_reference(cfg, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Trajectory of ``tests/reference.py`` in float64 on the same (float32-rounded) gradients."""
    from reference import run_reference as ref

    names = leaf_names()
    steps = len(grads[names[0]])
    traj = ref(
        [params[k].astype(np.float64) for k in names],
        [[grads[k][t].astype(np.float64) for k in names] for t in range(steps)],
        cfg,
    )
    return {k: np.stack([traj[t][i] for t in range(steps)]) for i, k in enumerate(names)}


def rel_err(a: dict[str, np.ndarray], b: dict[str, np.ndarray], params: dict[str, np.ndarray]) -> float:
    """max over leaves of max_t |a_t - b_t| / max_t |b_t - p_0|: error relative to the motion."""
    worst = 0.0
    for k in leaf_names():
        ak, bk = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
        if ak.shape != bk.shape:
            raise AssertionError(f"leaf {k}: trajectory shapes differ: {ak.shape} vs {bk.shape}")
        motion = np.max(np.abs(bk - params[k].astype(np.float64)))
        worst = max(worst, float(np.max(np.abs(ak - bk)) / max(motion, 1e-30)))
    return worst


def assert_close(name: str, err: float, tol: float = TOL) -> None:
    assert err <= tol, f"{name}: relative error {err:.3g} exceeds {tol:.1g}"


def assert_discriminates(name: str, err: float, tol: float = TOL) -> None:
    """A deliberately wrong variant must be far outside the tolerance (by at least 10x)."""
    assert err > 10 * tol, f"mutation {name} is NOT detected: error {err:.3g} <= 10 * {tol:.1g}"


def stack_steps(per_step: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """List of per-step parameter dicts -> dict of trajectories."""
    return {k: np.stack([np.asarray(s[k]) for s in per_step]) for k in leaf_names()}
