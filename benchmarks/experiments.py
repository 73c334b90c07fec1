"""The alternatives tried for the update executor and the arithmetic form (see README.md).

    python -m benchmarks.experiments executors [--leaves 2000 --size 64]
    python -m benchmarks.experiments arithmetic [--size 16777216]
    python -m benchmarks.experiments packing [--leaves 500 --size 64]
    python -m benchmarks.experiments ravel [--leaves 500]

``executors``: the same optimizer step (plain RMSProp + apply_updates, donated)
on ``leaves`` x ``size`` float32 leaves with each executor; prints lowering,
compile and step times, the number of XLA kernels and whether the result is
bit-identical to the per-leaf loop. ``arithmetic``: forms of ``g / sqrt(v + eps)``
on one large leaf. ``packing``: the formulations tried for gathering ``leaves`` arrays
into one flat buffer and splitting one back (compile time, run time), each in its own
jit. ``ravel``: a whole training step (an MLP of ``leaves / 2`` small layers) with the
params as a tree (per-leaf, packed, optax) or raveled into one vector that the forward
pass unravels (the README recipe). Measurements are interleaved; on a shared machine
repeat them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: `benchmarks` (which adds src/) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jax
import jax.numpy as jnp
import numpy as np
import optax

import benchmarks  # noqa: F401
import rmsprop_jax
from rmsprop_jax import _executor, _transform
from rmsprop_jax._update import rms_leaf


def grouped_concat(
    flags: Any, scalars: Any, gs: Any, ps: Any, nus: Any, mus: Any, trs: Any, masks: Any
) -> Any:
    """Concatenate leaves with equal dtypes and a static mask into one flat buffer, update, split."""
    groups: dict[Any, list[int]] = {}
    for i, (g, p, nu, mu, tr, m) in enumerate(zip(gs, ps, nus, mus, trs, masks, strict=True)):
        dtypes = tuple(None if a is None else a.dtype for a in (g, p, nu, mu, tr))
        key = (*dtypes, m if isinstance(m, bool) else i)
        groups.setdefault(key, []).append(i)
    outs: list[Any] = [None] * len(gs)
    for idx in groups.values():

        def cat(xs: Any, idx: list[int] = idx) -> Any:
            return None if xs[idx[0]] is None else jnp.concatenate([xs[i].reshape(-1) for i in idx])

        flat = rms_leaf(flags, scalars, cat(gs), cat(ps), cat(nus), cat(mus), cat(trs), masks[idx[0]])
        offsets = np.cumsum([0] + [gs[i].size for i in idx])
        for j, i in enumerate(idx):
            outs[i] = tuple(
                None if x is None else x[offsets[j] : offsets[j + 1]].reshape(gs[i].shape) for x in flat
            )
    return outs


EXECUTORS: dict[str, Callable[..., Any]] = {
    "per_leaf_loop (op-by-op trace)": _executor.apply_leaves_reference,
    "nested_jit (default)": _executor.apply_leaves,
    "grouped_concat": grouped_concat,
}


def _time(fn: Callable[[], Any], n: int) -> list[float]:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return ts


def executors(leaves: int, size: int, steps: int, skip_grouped: bool) -> None:
    params = {f"p{i}": jnp.full((size,), 1.0 + i * 1e-3, jnp.float32) for i in range(leaves)}
    grads = jax.tree.map(lambda x: x * 0.01, params)

    def build(name: str) -> Any:
        saved = _transform.apply_leaves
        if name in EXECUTORS:
            _transform.apply_leaves = EXECUTORS[name]
        try:
            opt = optax.rmsprop(1e-3) if name == "optax" else rmsprop_jax.rmsprop(1e-3)

            def step(p: Any, s: Any, g: Any) -> Any:
                u, s = opt.update(g, s, p)
                return optax.apply_updates(p, u), s

            p0 = jax.tree.map(jnp.copy, params)
            s0 = opt.init(p0)
            t0 = time.perf_counter()
            lowered = jax.jit(step, donate_argnums=(0, 1)).lower(p0, s0, grads)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
        finally:
            _transform.apply_leaves = saved
        kernels = sum(
            " fusion(" in line for line in (compiled.as_text() or "").split("ENTRY")[-1].splitlines()
        )
        first = compiled(jax.tree.map(jnp.copy, params), opt.init(params), grads)[0]
        return {
            "c": compiled,
            "p": p0,
            "s": s0,
            "lower": t1 - t0,
            "compile": t2 - t1,
            "k": kernels,
            "out": first,
        }

    def build_flat_state() -> Any:
        """The flat accumulator layout, simulated outside the optax API: nu is one flat buffer."""
        flags, sizes = _transform.Flags(), [x.size for x in jax.tree.leaves(params)]
        offsets = np.cumsum([0, *sizes])
        scalars = _transform.Scalars(1e-3, 0.9, 1 - 0.9, 1e-8, None, None, None, None)

        def step(p: Any, nu: Any, g: Any) -> Any:
            leaves, treedef = jax.tree.flatten(g)
            flat_g = jnp.concatenate([x.reshape(-1) for x in leaves])
            u, nu, _, _ = rms_leaf(flags, scalars, flat_g, None, nu, None, None)
            us = [u[offsets[i] : offsets[i + 1]] for i in range(len(sizes))]
            return optax.apply_updates(p, jax.tree.unflatten(treedef, us)), nu

        p0, s0 = jax.tree.map(jnp.copy, params), jnp.zeros(int(offsets[-1]), jnp.float32)
        t0 = time.perf_counter()
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(p0, s0, grads)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        kernels = sum(
            " fusion(" in line for line in (compiled.as_text() or "").split("ENTRY")[-1].splitlines()
        )
        first = compiled(jax.tree.map(jnp.copy, params), jnp.zeros_like(s0), grads)[0]
        return {
            "c": compiled,
            "p": p0,
            "s": s0,
            "lower": t1 - t0,
            "compile": t2 - t1,
            "k": kernels,
            "out": first,
        }

    names = [n for n in EXECUTORS if not (skip_grouped and n == "grouped_concat")]
    cases = {name: build(name) for name in [*names, "optax"]}
    cases["flat_nu_layout (simulated)"] = build_flat_state()
    ref = cases["per_leaf_loop (op-by-op trace)"]["out"]
    times: dict[str, list[float]] = {n: [] for n in cases}
    for r in range(steps):
        for name in list(cases)[r % len(cases) :] + list(cases)[: r % len(cases)]:
            c = cases[name]

            def run(c: dict[str, Any] = c) -> Any:
                c["p"], c["s"] = c["c"](c["p"], c["s"], grads)
                return c["p"]

            times[name] += _time(run, 3)
    print(f"{leaves} leaves x {size}: lower s, compile s, step ms (median), kernels, bit-identical to loop")
    for name, c in cases.items():
        same = all(
            bool(jnp.array_equal(a, b))
            for a, b in zip(jax.tree.leaves(c["out"]), jax.tree.leaves(ref), strict=True)
        )
        print(
            f"  {name:32s} {c['lower']:6.2f} {c['compile']:7.2f} {np.median(times[name]) * 1e3:8.2f} "
            f"{c['k']:6d}  {same}"
        )


ARITHMETIC: dict[str, Callable[[Any, Any], Any]] = {
    "rsqrt(max(v+eps, tiny))*g (rms_leaf)": lambda v, g: (
        jax.lax.rsqrt(jnp.maximum(v + 1e-8, 1.1754944e-38)) * g
    ),
    "rsqrt(v+eps)*g (optax)": lambda v, g: jax.lax.rsqrt(v + 1e-8) * g,
    "g/sqrt(v+eps)": lambda v, g: g / jnp.sqrt(v + 1e-8),
    "g*(1/sqrt(v+eps))": lambda v, g: g * (1 / jnp.sqrt(v + 1e-8)),
}


def arithmetic(size: int, steps: int) -> None:
    rng = np.random.default_rng(0)
    g = jnp.asarray(rng.standard_normal(size, dtype=np.float32) * 0.01)

    def make(form: Callable[[Any, Any], Any]) -> Any:
        def step(p: Any, nu: Any, g: Any) -> Any:
            nu = 0.9 * nu + 0.1 * g * g
            return p + -1e-3 * form(nu, g), nu

        return jax.jit(step, donate_argnums=(0, 1))

    cases = {k: [make(f), jnp.ones(size), jnp.zeros(size)] for k, f in ARITHMETIC.items()}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(steps):
        for name in list(cases)[r % len(cases) :] + list(cases)[: r % len(cases)]:
            c = cases[name]

            def run(c: list[Any] = c) -> Any:
                c[1], c[2] = c[0](c[1], c[2], g)
                return c[1]

            times[name] += _time(run, 3)
    print(f"one leaf x {size}, plain step donated: median ms (p25-p75)")
    for name, ts in times.items():
        a = np.asarray(ts[2:]) * 1e3
        print(f"  {name:40s} {np.median(a):7.2f} ({np.percentile(a, 25):.2f}-{np.percentile(a, 75):.2f})")


def _split_slices(flat: Any, n: int, size: int) -> list[Any]:
    return [flat[i * size : (i + 1) * size] for i in range(n)]


def _split_index_gather(flat: Any, n: int, size: int) -> list[Any]:
    idx = np.arange(n * size, dtype=np.int32)
    return [flat[idx[i * size : (i + 1) * size]] for i in range(n)]


def _split_row_gather(flat: Any, n: int, size: int) -> list[Any]:
    from rmsprop_jax._packed import _take

    return [_take(flat, i * size, (size,)) for i in range(n)]


def _gather_concat(xs: list[Any]) -> Any:
    return jnp.concatenate(xs)


def _gather_tree(xs: list[Any]) -> Any:
    from rmsprop_jax._packed import _concat

    return _concat(xs)


def _gather_dus(xs: list[Any]) -> Any:
    out = jnp.zeros(sum(x.size for x in xs), xs[0].dtype)
    offset = 0
    for x in xs:
        out = jax.lax.dynamic_update_slice(out, x, (offset,))
        offset += x.size
    return out


SPLITS = {
    "slices": _split_slices,
    "gather, one index per element": _split_index_gather,
    "row gather (kept)": _split_row_gather,
}
GATHERS = {
    "one concatenate": _gather_concat,
    "2-level concatenate tree + barrier (kept)": _gather_tree,
    "dynamic_update_slice chain": _gather_dus,
}


def packing(leaves: int, size: int, rounds: int) -> None:
    """Compile and run time of each way to split a flat buffer into leaves / gather leaves into one."""
    params = [jnp.full((size,), 1.0 + i * 1e-3, jnp.float32) for i in range(leaves)]
    flat = jnp.zeros(leaves * size, jnp.float32)
    fns: dict[str, Any] = {}
    for name, split in SPLITS.items():
        fns[f"split: {name} (+ p + u per leaf)"] = lambda ps, u, split=split: [
            p + x for p, x in zip(ps, split(u, leaves, size), strict=True)
        ]
    for name, gather in GATHERS.items():
        fns[f"gather: {name} (+ nu update)"] = lambda ps, u, gather=gather: 0.9 * u + 0.1 * gather(ps) ** 2
    cases = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(params, flat).compile()
        cases[name] = (compiled, time.perf_counter() - t0)
        print(f"  compiled {name}: {cases[name][1]:.2f} s", flush=True)
    times: dict[str, list[float]] = {n: [] for n in cases}
    for r in range(rounds):
        for name in list(cases)[r % len(cases) :] + list(cases)[: r % len(cases)]:
            times[name] += _time(lambda name=name: cases[name][0](params, flat), 3)
    print(f"{leaves} leaves x {size}: compile s, run ms (median)")
    for name, (_, c) in cases.items():
        print(f"  {name:60s} {c:7.2f} {np.median(times[name]) * 1e3:8.3f}")


def ravel(leaves: int, rounds: int) -> None:
    """Training-step cost of the raveled-vector recipe against the tree layouts."""
    from jax.flatten_util import ravel_pytree

    layers, width, batch = leaves // 2, 16, 32
    rng = np.random.default_rng(0)
    params = {
        f"l{i:04d}": {
            "w": jnp.asarray(rng.standard_normal((width, width), dtype=np.float32) / 4),
            "b": jnp.zeros(width, jnp.float32),
        }
        for i in range(layers)
    }
    x = jnp.asarray(rng.standard_normal((batch, width), dtype=np.float32))

    def loss_fn(p: Any) -> Any:
        h = x
        for i in range(layers):
            h = jnp.tanh(h @ p[f"l{i:04d}"]["w"] + p[f"l{i:04d}"]["b"])
        return jnp.mean(h**2)

    flat, unravel = ravel_pytree(params)
    variants = {
        "tree, rmsprop_jax per-leaf": (rmsprop_jax.rmsprop(1e-3), params, loss_fn),
        "tree, rmsprop_jax packed=True": (rmsprop_jax.rmsprop(1e-3, packed=True), params, loss_fn),
        "tree, optax": (optax.rmsprop(1e-3), params, loss_fn),
        "raveled vector (one leaf), unravel in the loss": (
            rmsprop_jax.rmsprop(1e-3),
            flat,
            lambda f: loss_fn(unravel(f)),
        ),
    }
    cases: dict[str, Any] = {}
    for name, (opt, p0, loss) in variants.items():

        def step(p: Any, s: Any, opt: Any = opt, loss: Any = loss) -> Any:
            g = jax.grad(loss)(p)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        p = jax.tree.map(jnp.copy, p0)
        s = opt.init(p)
        t0 = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(p, s).compile()
        cases[name] = [compiled, p, s, time.perf_counter() - t0]
        print(f"  compiled {name}: {cases[name][3]:.2f} s", flush=True)
    times: dict[str, list[float]] = {n: [] for n in cases}
    for r in range(rounds):
        for name in list(cases)[r % len(cases) :] + list(cases)[: r % len(cases)]:
            c = cases[name]

            def run(c: list[Any] = c) -> Any:
                c[1], c[2] = c[0](c[1], c[2])
                return c[1]

            times[name] += _time(run, 3)
    print(f"MLP of {layers} layers {width}x{width} ({2 * layers} leaves), batch {batch}: compile s, step ms")
    for name, c in cases.items():
        print(f"  {name:50s} {c[3]:7.2f} {np.median(times[name]) * 1e3:8.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.experiments")
    ap.add_argument("what", choices=["executors", "arithmetic", "packing", "ravel"])
    ap.add_argument("--leaves", type=int, default=2000)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--skip-grouped", action="store_true", help="grouped_concat compiles for minutes at 2000")
    args = ap.parse_args()
    if args.what == "executors":
        executors(args.leaves, args.size or 64, args.rounds, args.skip_grouped)
    elif args.what == "ravel":
        ravel(args.leaves, args.rounds)
    elif args.what == "packing":
        packing(args.leaves, args.size or 64, args.rounds)
    else:
        arithmetic(args.size or 1 << 24, args.rounds)


if __name__ == "__main__":
    main()
