"""Cost of the counter-based stochastic rounding against jax.random-based rounding, and of the
low-memory states against float32 state, as ratios measured interleaved in one process.

    python benchmarks/stochastic_rounding.py [--n 4194304] [--shape 512x32768] [--steps 20]
        [--rounds 7] [--compile-leaves 512] [--skip-rounding]

Two tables:

* **Rounding alone** (float32 -> bfloat16, one jitted call on ``n`` elements): round to nearest
  (a cast), stochastic rounding with this package's hash bits (``_quantize.hash_bits``), and the
  same rounding with bits from ``jax.random.bits`` (threefry, JAX's default PRNG, and "rbg").
* **Optimizer step** (``update`` + ``apply_updates`` of one ``n``-element leaf, ``steps`` steps in a
  jitted ``fori_loop``): float32 state, bfloat16 state with stochastic rounding (the default for
  bf16 accumulators), with round to nearest (``stochastic_rounding=False``), and 8-bit state.
  The leaf is ``(n // 1024, 1024)`` or ``--shape``; parameters and gradients are arguments of the
  jitted loop (closed-over arrays would be constant-folded into the program at compile time).
* **Compile time** (``--compile-leaves L``, 0 to skip): ``jit(update).lower(...).compile()`` of a
  tree of ``L`` leaves of 64 x 128 (8192 elements, above bitsandbytes' 4096 minimum, so every leaf
  is quantized in the 8-bit mode), per state mode and as a ratio to float32 state.

Medians over ``rounds`` interleaved rounds. Runs on whatever device JAX uses (GPU included); on a
GPU, ``--n 268435456 --steps 10 --rounds 5 --compile-leaves 0`` (one 256M-element leaf, ~1 GiB in
float32) fits an H100 and runs in well under two minutes.
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


def _optimizers() -> dict[str, Any]:
    return {
        "float32 state": rmsprop_jax.rmsprop(1e-3),
        "bfloat16, stochastic (default)": rmsprop_jax.rmsprop(1e-3, accumulator_dtype=jnp.bfloat16),
        "bfloat16, round to nearest": rmsprop_jax.rmsprop(
            1e-3, accumulator_dtype=jnp.bfloat16, stochastic_rounding=False
        ),
        "int8 block-wise": rmsprop_jax.rmsprop(1e-3, accumulator_dtype="int8"),
    }


def optimizer_step(shape: tuple[int, ...], steps: int, rounds: int) -> dict[str, float]:
    params = {"w": jax.random.normal(jax.random.key(1), shape, jnp.float32)}
    grads = {"w": jax.random.normal(jax.random.key(2), shape, jnp.float32)}
    cases = {}
    for name, opt in _optimizers().items():

        def run(params: Any, state: Any, grads: Any, opt: Any = opt) -> Any:
            def body(_: Any, carry: Any) -> Any:
                p, s = carry
                u, s = opt.update(grads, s, p)
                return optax.apply_updates(p, u), s

            return jax.lax.fori_loop(0, steps, body, (params, state))

        cases[name] = (jax.jit(run), (params, opt.init(params), grads))
    return {k: v / steps for k, v in _interleaved(cases, rounds).items()}


def compile_times(leaves: int) -> dict[str, float]:
    """Seconds to lower and compile one jitted ``update`` of a ``leaves``-leaf tree, per mode."""
    spec = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    params = {f"w{i:04d}": spec for i in range(leaves)}
    out = {}
    for name, opt in _optimizers().items():
        state = jax.eval_shape(opt.init, params)
        t = time.perf_counter()
        jax.jit(opt.update).lower(params, state, params).compile()
        out[name] = time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4 * 1024 * 1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shape", default=None, help="leaf shape of the step table, e.g. 512x32768")
    ap.add_argument("--compile-leaves", type=int, default=0)
    ap.add_argument("--skip-rounding", action="store_true")
    args = ap.parse_args()
    shape = tuple(int(d) for d in args.shape.split("x")) if args.shape else (args.n // 1024, 1024)
    print(f"device: {jax.devices()[0].device_kind}, n = {args.n}, step leaf shape = {shape}")
    if not args.skip_rounding:
        r = rounding_alone(args.n, args.rounds)
        base = r["round to nearest (cast)"]
        hashed = r["stochastic, hash bits"]
        print("\n| rounding float32 -> bfloat16 | ms | / cast | / hash |\n|---|---|---|---|")
        for k, v in r.items():
            print(f"| {k} | {v * 1e3:.3f} | {v / base:.2f} | {v / hashed:.2f} |")
    s = optimizer_step(shape, args.steps, args.rounds)
    base = s["float32 state"]
    print(f"\n| optimizer step, one {'x'.join(map(str, shape))} leaf | ms / step | / float32 state |")
    print("|---|---|---|")
    for k, v in s.items():
        print(f"| {k} | {v * 1e3:.3f} | {v / base:.2f} |")
    if args.compile_leaves:
        c = compile_times(args.compile_leaves)
        base = c["float32 state"]
        print(f"\n| compile update, {args.compile_leaves} leaves of 64x128 | s | / float32 state |")
        print("|---|---|---|")
        for k, v in c.items():
            print(f"| {k} | {v:.2f} | {v / base:.2f} |")


if __name__ == "__main__":
    main()
