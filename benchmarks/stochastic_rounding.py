"""Cost of the counter-based stochastic rounding against jax.random-based rounding, and of the
low-memory states against float32 state, as ratios measured interleaved in one process.

    python benchmarks/stochastic_rounding.py [--n 4194304] [--steps 20] [--rounds 7]

Two tables:

* **Rounding alone** (float32 -> bfloat16, one jitted call on ``n`` elements): round to nearest
  (a cast), stochastic rounding with this package's hash bits (``_quantize.hash_bits``), and the
  same rounding with bits from ``jax.random.bits`` (threefry, JAX's default PRNG, and "rbg").
* **Optimizer step** (``update`` + ``apply_updates`` of one ``n``-element leaf, ``steps`` steps in a
  jitted ``fori_loop``): float32 state, bfloat16 state with stochastic rounding (the default for
  bf16 accumulators), with round to nearest (``stochastic_rounding=False``), and 8-bit state.

Medians over ``rounds`` interleaved rounds. Runs on whatever device JAX uses (GPU included).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax
from rmsprop_jax import _quantize as Q


def _time(fn: Any, *args: Any) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def _interleaved(cases: dict[str, tuple[Any, tuple]], rounds: int) -> dict[str, float]:
    for fn, args in cases.values():  # compile + warm up
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, (fn, args) in cases.items():
            times[k].append(_time(fn, *args))
    return {k: float(np.median(v)) for k, v in times.items()}


def rounding_alone(n: int, rounds: int) -> dict[str, float]:
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)

    def nearest(x: Any, step: Any) -> Any:
        return x.astype(jnp.bfloat16)

    def hashed(x: Any, step: Any) -> Any:
        return Q.stochastic_round(x, jnp.bfloat16, Q.hash_bits(Q.hash_key(0, step, 0), x.shape))

    def with_prng(impl: str) -> Any:
        def f(x: Any, step: Any) -> Any:
            key = jax.random.fold_in(jax.random.key(0, impl=impl), step)
            return Q.stochastic_round(x, jnp.bfloat16, jax.random.bits(key, x.shape, jnp.uint32))

        return f

    step = jnp.int32(3)
    cases = {
        "round to nearest (cast)": (jax.jit(nearest), (x, step)),
        "stochastic, hash bits": (jax.jit(hashed), (x, step)),
        "stochastic, jax.random threefry": (jax.jit(with_prng("threefry2x32")), (x, step)),
        "stochastic, jax.random rbg": (jax.jit(with_prng("rbg")), (x, step)),
    }
    return _interleaved(cases, rounds)


def optimizer_step(n: int, steps: int, rounds: int) -> dict[str, float]:
    params = {"w": jax.random.normal(jax.random.key(1), (n // 1024, 1024), jnp.float32)}
    grads = {"w": jax.random.normal(jax.random.key(2), (n // 1024, 1024), jnp.float32)}
    opts = {
        "float32 state": rmsprop_jax.rmsprop(1e-3),
        "bfloat16, stochastic (default)": rmsprop_jax.rmsprop(1e-3, accumulator_dtype=jnp.bfloat16),
        "bfloat16, round to nearest": rmsprop_jax.rmsprop(
            1e-3, accumulator_dtype=jnp.bfloat16, stochastic_rounding=False
        ),
        "int8 block-wise": rmsprop_jax.rmsprop(1e-3, accumulator_dtype="int8"),
    }
    cases = {}
    for name, opt in opts.items():

        def run(params: Any, state: Any, opt: Any = opt) -> Any:
            def body(_: Any, carry: Any) -> Any:
                p, s = carry
                u, s = opt.update(grads, s, p)
                return optax.apply_updates(p, u), s

            return jax.lax.fori_loop(0, steps, body, (params, state))

        cases[name] = (jax.jit(run), (params, opt.init(params)))
    return {k: v / steps for k, v in _interleaved(cases, rounds).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4 * 1024 * 1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, n = {args.n}")
    r = rounding_alone(args.n, args.rounds)
    base = r["round to nearest (cast)"]
    hashed = r["stochastic, hash bits"]
    print("\n| rounding float32 -> bfloat16 | ms | / cast | / hash |\n|---|---|---|---|")
    for k, v in r.items():
        print(f"| {k} | {v * 1e3:.3f} | {v / base:.2f} | {v / hashed:.2f} |")
    s = optimizer_step(args.n, args.steps, args.rounds)
    base = s["float32 state"]
    print("\n| optimizer step, one leaf | ms / step | / float32 state |\n|---|---|---|")
    for k, v in s.items():
        print(f"| {k} | {v * 1e3:.3f} | {v / base:.2f} |")


if __name__ == "__main__":
    main()
