"""Lower vs compile time of the FFI steps against the leaf count (why ffi_b compiles slowly)."""

import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench
import rmsprop_ffi

rmsprop_ffi.register()
fns = bench.step_fns()
t = bench.tree(4, 8, 0)
for k in ("ffi_a", "ffi_b", "rmsprop_jax"):
    jax.jit(fns[k][0])(t, fns[k][1](t), t)
for n in (250, 500, 1000):
    p, g = bench.tree(n, 64, 0), bench.tree(n, 64, 1)
    for k in ("rmsprop_jax", "ffi_a", "ffi_b"):
        step, init = fns[k]
        s = init(p)
        t0 = time.perf_counter()
        lo = jax.jit(lambda a, b, c, step=step: step(a, b, c), donate_argnums=(0, 1)).lower(p, s, g)
        t1 = time.perf_counter()
        lo.compile()
        t2 = time.perf_counter()
        print(f"{n} leaves {k}: lower {t1 - t0:.2f} s, compile {t2 - t1:.2f} s", flush=True)
