"""Centered RMSProp on lossy state: the package's variance floor vs storing the variance (Welford).

    python -m benchmarks.centered_variance      # ~1-2 minutes on 2 loaded cores

Noisy quadratic (``lowmem_quality``'s, 4096 coordinates, 400 steps, seeds 0 and 1), centered,
momentum 0.9, lr 1e-4, decay 0.9, eps 1e-8, no bias correction. The state (second moment or
variance, first moment, momentum buffer) is stored in float32, bfloat16 with stochastic rounding,
or 8-bit block-wise codes after each step. Schemes:

* ``nu``: store nu, ``v = max(nu - mu^2, 0)`` (the package before the floor: diverges lossy);
* ``floor``: store nu, ``v = max(nu - mu^2, c nu)`` (the package: ``c`` from ``VARIANCE_FLOOR``);
* ``welford``: store ``s = nu - mu^2`` with the exact EMA identity
  ``s_t = r s_{t-1} + r (1 - r) (g - mu_{t-1})^2`` (always >= 0, its error relative to s itself).

This is a standalone simulation (the package implements ``floor``): it shows what option (b)
would buy. Prints the final loss (mean of the last 20 steps) per scheme, storage and seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: `benchmarks` (which adds src/) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jax
import jax.numpy as jnp
import numpy as np

import benchmarks  # noqa: F401
from rmsprop_jax import _quantize as Q
from rmsprop_jax._state_codec import VARIANCE_FLOOR

N, STEPS, LR, MOMENTUM, DECAY, EPS = 4096, 400, 1e-4, 0.9, 0.9, 1e-8
FLOOR = {"float32": 0.0, "bf16_sr": VARIANCE_FLOOR["bfloat16"], "int8": VARIANCE_FLOOR["int8"]}


def store(kind: str, x: jax.Array, key: jax.Array) -> jax.Array:
    """``x`` after a round trip through the storage."""
    if kind == "float32":
        return x
    if kind == "bf16_sr":
        bits = jax.random.bits(key, x.shape, jnp.uint32)
        return Q.stochastic_round(x, jnp.bfloat16, bits).astype(jnp.float32)
    codes, absmax = Q.quantize_blockwise(x, block_size=256, signed=True, axis=-1)
    return Q.dequantize_blockwise(codes, absmax, block_size=256, signed=True, axis=-1)


def run(kind: str, scheme: str, seed: int) -> float:
    h = jnp.asarray(np.logspace(-3, 0, N), jnp.float32)
    init_key, key = jax.random.split(jax.random.key(seed))
    x0 = jax.random.normal(init_key, (N,), jnp.float32)
    c = FLOOR[kind] if scheme == "floor" else 0.0

    def body(carry: tuple[jax.Array, ...], t: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
        x, a, mu, tr = carry
        g = h * x + 0.1 * jax.random.normal(jax.random.fold_in(key, t), (N,))
        if scheme == "welford":
            a = DECAY * a + DECAY * (1 - DECAY) * (g - mu) ** 2
            mu = DECAY * mu + (1 - DECAY) * g
            v = a
        else:
            a = DECAY * a + (1 - DECAY) * g * g
            mu = DECAY * mu + (1 - DECAY) * g
            v = jnp.maximum(a - mu * mu, c * a)
        tr = -LR * g * jax.lax.rsqrt(v + EPS) + MOMENTUM * tr
        x = x + tr
        k1, k2, k3 = jax.random.split(jax.random.fold_in(jax.random.key(99), t), 3)
        return (x, store(kind, a, k1), store(kind, mu, k2), store(kind, tr, k3)), 0.5 * jnp.sum(h * x * x)

    z = jnp.zeros(N)
    _, losses = jax.jit(lambda c0: jax.lax.scan(body, c0, jnp.arange(STEPS)))((x0, z, z, z))
    return float(np.asarray(losses, np.float64)[-20:].mean())


def main() -> None:
    base = {s: run("float32", "nu", s) for s in (0, 1)}
    print(f"float32 state: {base[0]:.4g} / {base[1]:.4g}")
    for scheme in ("nu", "floor", "welford"):
        for kind in ("bf16_sr", "int8"):
            finals = [run(kind, scheme, s) for s in (0, 1)]
            ratios = " / ".join(f"{f:.4g} ({f / base[s]:.4f}x)" for s, f in zip((0, 1), finals, strict=True))
            print(f"{scheme:8s} {kind:8s} {ratios}", flush=True)


if __name__ == "__main__":
    main()
