"""Shared test helpers: a mixed pytree, a fixed gradient oracle, and a scanned runner."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Shapes of the mixed pytree: a matrix, a vector, a scalar, an odd 3-d leaf and a 0-size leaf.
SHAPES = {"w": (3, 4), "b": (5,), "s": (), "conv": (2, 1, 3), "empty": (0, 3)}


def make_params(dtype=np.float64, seed: int = 0) -> dict:
    """A nested mixed pytree (dict + list + tuple) of numpy arrays."""
    rng = np.random.default_rng(seed)
    leaves = {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}
    return {
        "dense": {"w": leaves["w"], "b": leaves["b"]},
        "layers": [leaves["conv"], (leaves["s"], leaves["empty"])],
    }


def gradient_oracle(params: dict, steps: int, seed: int = 1, scale: float = 1.0) -> list:
    """``steps`` gradient trees of float64 noise (fixed: not recomputed from the params).

    The scale varies per step and per leaf so that the second moment actually moves.
    """
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for t in range(steps):
        mult = scale * (1.0 + 0.5 * np.sin(t / 3.0))
        gs = [mult * (0.3 + i) * rng.normal(size=np.shape(p)) + 0.1 * i for i, p in enumerate(leaves)]
        out.append(jax.tree.unflatten(treedef, gs))
    return out


def run_scanned(opt: optax.GradientTransformation, params, grads: list, dtype=jnp.float32):
    """Apply ``opt`` for len(grads) steps inside one jit (lax.scan); return the params after each step."""
    p0 = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    g_stacked = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs), dtype), *grads)

    @jax.jit
    def run(p, gs):
        def body(carry, g):
            p, s = carry
            u, s = opt.update(g, s, p)
            p = optax.apply_updates(p, u)
            return (p, s), p

        _, traj = jax.lax.scan(body, (p, opt.init(p)), gs)
        return traj

    traj = run(p0, g_stacked)
    return [jax.tree.map(lambda x, t=t: np.asarray(x[t]), traj) for t in range(len(grads))]


def max_rel_err(a, b, floor: float = 1e-3, per_leaf: bool = False) -> float:
    """Largest relative difference between pytrees ``a`` and ``b`` (``b`` is the yardstick).

    Elementwise: |a - b| / max(|b|, floor). With ``per_leaf``, each leaf's error is
    relative to that leaf's largest |b| instead (the norm-wise error, the right measure
    for float32 round-off, where an element crossing zero has no relative precision).
    """
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x = np.asarray(x, np.complex128 if np.iscomplexobj(x) else np.float64)
        y = np.asarray(y, x.dtype)
        if x.size:
            denom = max(np.max(np.abs(y)), floor) if per_leaf else np.maximum(np.abs(y), floor)
            worst = max(worst, float(np.max(np.abs(x - y) / denom)))
    return worst


def enable_x64():
    """A context in which arrays are float64: ``jax.enable_x64`` (newer jax) or its older name
    ``jax.experimental.enable_x64`` (jax 0.6, the declared minimum)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as old

    return old()
