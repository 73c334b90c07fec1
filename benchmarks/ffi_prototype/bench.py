"""Interleaved A/B: the FFI multi-tensor kernel against rmsprop_jax and optax (plain RMSProp).

    benchmarks/ffi_prototype/build.sh
    PYTHONPATH=src /tmp/venv/bin/python benchmarks/ffi_prototype/bench.py [--out results.json]

Every case is one jitted step with params and state donated, compiled ahead of time:
  optax        u, s = optax.rmsprop(lr).update(g, s, p); p = optax.apply_updates(p, u)
  rmsprop_jax  the same with rmsprop_jax.rmsprop(lr)
  ffi_a        u, nu = <one FFI call over all leaves>(g, nu); p = optax.apply_updates(p, u)
  ffi_b        p, nu = <one FFI call over all leaves>(p, g, nu), both aliased (in place)
  ffi_b_1t     ffi_b on one thread (the others may use XLA's intra-op pool: 2 threads here)
  noop         (p, nu) returned unchanged, donated: the jit-boundary cost alone, no kernel
  loop20:*     20 steps in one jit (lax.fori_loop): the boundary paid once per 20 steps
Gradients are an input, not donated. Median of rounds x per_round steps, order rotated each round.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rmsprop_ffi

import rmsprop_jax

LR, DECAY, EPS = 1e-3, 0.9, 1e-8
NEVER = 1 << 62
LOOP = 20  # steps per call in the loop{LOOP}:* cases  # parallel_min that keeps the kernel on one thread


def tree(n: int, size: int, seed: int, scale: float = 1.0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    w = len(str(n - 1))
    return {f"p{i:0{w}d}": jnp.asarray(scale * rng.standard_normal(size, dtype=np.float32)) for i in range(n)}


def copy(t: Any) -> Any:
    return jax.tree.map(lambda x: jnp.array(x, copy=True), t)


def step_fns() -> dict[str, tuple[Callable[..., Any], Callable[[Any], Any]]]:
    """name -> (step(p, s, g) -> (p, s), init(p) -> s)."""

    def optax_like(opt: Any) -> tuple[Callable[..., Any], Callable[[Any], Any]]:
        def step(p: Any, s: Any, g: Any) -> Any:
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        return step, opt.init

    def ffi_a(p: Any, nu: Any, g: Any) -> Any:
        u, nu = rmsprop_ffi.updates(g, nu, LR, DECAY, EPS)
        return optax.apply_updates(p, u), nu

    def ffi_b(p: Any, nu: Any, g: Any) -> Any:
        return rmsprop_ffi.fused(p, g, nu, LR, DECAY, EPS)

    def ffi_b_1t(p: Any, nu: Any, g: Any) -> Any:
        return rmsprop_ffi.fused(p, g, nu, LR, DECAY, EPS, parallel_min=NEVER)

    def noop(p: Any, nu: Any, g: Any) -> Any:
        return p, nu  # donated: outputs alias inputs, no kernel; the jit-boundary (dispatch) floor

    zeros = lambda p: jax.tree.map(jnp.zeros_like, p)
    return {
        "noop": (noop, zeros),
        "optax": optax_like(optax.rmsprop(LR, DECAY, EPS)),
        "rmsprop_jax": optax_like(rmsprop_jax.rmsprop(LR, DECAY, EPS)),
        "ffi_a": (ffi_a, zeros),
        "ffi_b": (ffi_b, zeros),
        "ffi_b_1t": (ffi_b_1t, zeros),
    }


def looped(step: Callable[..., Any], k: int) -> Callable[..., Any]:
    """k steps inside one jit (lax.fori_loop): the jit-boundary cost is paid once per k steps."""

    def f(p: Any, s: Any, g: Any) -> Any:
        return jax.lax.fori_loop(0, k, lambda _, c: step(c[0], c[1], g), (p, s))

    return f


def hlo_counts(compiled: Any) -> dict[str, int]:
    text = compiled.as_text()
    entry = text[text.index("ENTRY") :]
    return {
        "fusions": len(re.findall(r"= \S+ fusion\(", entry)),
        "custom_calls": len(re.findall(r"custom-call\(", entry)),
        "copies": len(re.findall(r"= \S+ copy\(", entry)),
    }


class Case:
    def __init__(
        self, name: str, step: Callable[..., Any], init: Callable[[Any], Any], params: Any, grads: Any
    ):
        self.name, self.fn, self.grads = name, step, grads
        self.p = copy(params)
        self.s = init(self.p)
        self.compiled, _ = self.compile()
        self.counts = hlo_counts(self.compiled)
        self.compile_s: list[float] = []

    def compile(self) -> tuple[Any, float]:
        # A fresh jax.jit each time so that neither tracing nor compilation is cached.
        t0 = time.perf_counter()
        fn = self.fn
        c = (
            jax.jit(lambda p, s, g: fn(p, s, g), donate_argnums=(0, 1))
            .lower(self.p, self.s, self.grads)
            .compile()
        )
        return c, time.perf_counter() - t0

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.p, self.s = self.compiled(self.p, self.s, self.grads)
        jax.block_until_ready((self.p, self.s))
        return time.perf_counter() - t0


def interleave(
    cases: dict[str, Case], rounds: int, per_round: int, warmup: int = 2
) -> dict[str, list[float]]:
    names = list(cases)
    for n in names:
        for _ in range(warmup):
            cases[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            for _ in range(per_round):
                times[n].append(cases[n]())
    return times


def numerics(params: Any, grads_seq: list[Any]) -> dict[str, Any]:
    """Three chained steps from the same inputs; params and nu compared leaf by leaf with rmsprop_jax."""
    out: dict[str, Any] = {}
    results = {}
    fns = {k: v for k, v in step_fns().items() if k != "noop"}
    opt = rmsprop_jax.rmsprop(LR, DECAY, EPS)
    upd, app = jax.jit(opt.update), jax.jit(optax.apply_updates)
    # rmsprop_jax with the update materialized (opt.update and apply_updates in two jits): what
    # ffi_a computes, since there p + u is a separate add that XLA cannot contract into an FMA
    fns["rmsprop_jax_split"] = (lambda p, s, g: (lambda u, s: (app(p, u), s))(*upd(g, s, p)), opt.init)
    for name, (step, init) in fns.items():
        p = copy(params)
        s = init(p)
        f = step if name.endswith("split") else jax.jit(step)
        for g in grads_seq:
            p, s = f(p, s, g)
        nu = s if name.startswith("ffi") else optax.tree.get(s, "nu")
        results[name] = (
            np.concatenate([np.asarray(x) for x in jax.tree.leaves(p)]),
            np.concatenate([np.asarray(x) for x in jax.tree.leaves(nu)]),
        )
    pairs = [(k, "rmsprop_jax") for k in results if k != "rmsprop_jax"] + [("ffi_a", "rmsprop_jax_split")]
    for name, ref in pairs:
        (p, nu), (ref_p, ref_nu) = results[name], results[ref]
        d = {}
        for what, a, b in (("params", p, ref_p), ("nu", nu, ref_nu)):
            diff = np.abs(a.astype(np.float64) - b)
            d[what] = {
                "bit_identical": bool(np.array_equal(a.view(np.uint32), b.view(np.uint32))),
                "elements_differing": int(np.sum(a != b)),
                "max_abs": float(diff.max()),
                "max_rel": float((diff / np.maximum(np.abs(b), np.finfo(np.float32).tiny)).max()),
            }
        out[f"{name}_vs_{ref}"] = d
    return out


def run(n: int, size: int, rounds: int, per_round: int, compiles: int, skip: set[str]) -> dict[str, Any]:
    params, grads = tree(n, size, 0), tree(n, size, 1)
    grads_seq = [grads, tree(n, size, 2), tree(n, size, 3, scale=10.0)]
    res: dict[str, Any] = {"workload": f"{n} leaves x {size}", "numerics": numerics(params, grads_seq)}
    fns = {k: v for k, v in step_fns().items() if k not in skip}
    for k in ("optax", "rmsprop_jax", "ffi_a", "ffi_b"):
        fns[f"loop{LOOP}:{k}"] = (looped(fns[k][0], LOOP), fns[k][1])
    cases = {k: Case(k, s, i, params, grads) for k, (s, i) in fns.items()}
    # compile time: `compiles` rounds, order rotated (the constructors above were the warm-up compiles)
    names = [k for k in cases if not k.startswith(("loop", "noop"))]
    for r in range(compiles):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            cases[k].compile_s.append(cases[k].compile()[1])
    times = interleave(cases, rounds, per_round)
    res["cases"] = {
        k: {
            "median_ms": 1e3 * statistics.median(ts),
            "p25_ms": 1e3 * float(np.percentile(ts, 25)),
            "p75_ms": 1e3 * float(np.percentile(ts, 75)),
            "lower_plus_compile_s": statistics.median(cases[k].compile_s) if cases[k].compile_s else None,
            **cases[k].counts,
        }
        for k, ts in times.items()
    }
    c = res["cases"]
    for k in c:
        if k.startswith("loop"):
            c[k]["per_step_ms"] = c[k]["median_ms"] / LOOP
    res["ratios"] = {
        f"{k}/{ref}": {
            "step": c[k]["median_ms"] / c[ref]["median_ms"],
            "compile": c[k]["lower_plus_compile_s"] / c[ref]["lower_plus_compile_s"],
        }
        for k in c
        if k.startswith("ffi")
        for ref in ("optax", "rmsprop_jax")
    }
    res["loop_ratios"] = {
        f"{k}/{ref}": c[f"loop{LOOP}:{k}"]["median_ms"] / c[f"loop{LOOP}:{ref}"]["median_ms"]
        for k in ("ffi_a", "ffi_b", "rmsprop_jax")
        for ref in ("optax", "rmsprop_jax")
        if k != ref
    }
    res["noop_over_optax_step"] = c["noop"]["median_ms"] / c["optax"]["median_ms"]
    res["ratios"]["rmsprop_jax/optax"] = {
        "step": c["rmsprop_jax"]["median_ms"] / c["optax"]["median_ms"],
        "compile": c["rmsprop_jax"]["lower_plus_compile_s"] / c["optax"]["lower_plus_compile_s"],
    }
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None, help="2000, 512 or 1")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    rmsprop_ffi.register()
    # warm-up: JAX's one-time compiles, outside every measurement
    t = tree(4, 8, 0)
    for _name, (s, i) in step_fns().items():
        jax.jit(s)(t, i(t), t)
        jax.jit(looped(s, 2))(t, i(t), t)
    workloads = [(2000, 64, 2), (512, 1 << 15, 3), (1, 1 << 24, 3)]
    if args.only:
        workloads = [w for w in workloads if w[0] == int(args.only)]
    out = {"jax": jax.__version__, "optax": optax.__version__, "loadavg_start": os.getloadavg(), "groups": []}
    for n, size, compiles in workloads:
        skip = (
            {"ffi_b_1t"} if n * size < (1 << 18) else set()
        )  # below parallel_min ffi_b is one thread already
        g = run(n, size, args.rounds, 3, compiles, skip)
        g["loadavg_end"] = os.getloadavg()
        out["groups"].append(g)
        print(json.dumps(g, indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
