"""2000 x 64: ffi_b split into custom calls of 250 leaves, interleaved with optax, rmsprop_jax, noop."""

import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench
import rmsprop_ffi

rmsprop_ffi.register()
fns = {k: v for k, v in bench.step_fns().items() if k in ("noop", "optax", "rmsprop_jax")}
zeros = fns["noop"][1]
fns["ffi_b_chunk250"] = (
    lambda p, nu, g: rmsprop_ffi.fused_chunked(p, g, nu, bench.LR, bench.DECAY, bench.EPS, 250),
    zeros,
)
p, g = bench.tree(2000, 64, 0), bench.tree(2000, 64, 1)
cases = {k: bench.Case(k, s, i, p, g) for k, (s, i) in fns.items()}
for k in ("optax", "rmsprop_jax", "ffi_b_chunk250"):
    cases[k].compile_s.append(cases[k].compile()[1])
times = bench.interleave(cases, 8, 3)
for k, ts in times.items():
    print(
        f"{k}: step {1e3 * statistics.median(ts):.1f} ms (p25 {1e3 * np.percentile(ts, 25):.1f}, p75 "
        f"{1e3 * np.percentile(ts, 75):.1f}); lower+compile {cases[k].compile_s}; {cases[k].counts}"
    )
print("loadavg", os.getloadavg())
