"""jit versus eager, bit for bit, for a fixed set of configurations.

Run by ``tests/test_properties.py`` in a fresh process, so that ``XLA_FLAGS`` such
as ``--xla_cpu_max_isa=AVX`` (no fused multiply-adds) take effect.
"""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np

import rmsprop_jax

CONFIGS = [
    {},
    {"momentum": 0.9, "nesterov": True, "centered": True},
    {"eps_in_sqrt": False, "eps": 1e-3},
    {"bias_correction": True},
    {"bias_correction": True, "centered": True, "eps": 1e-2},
    {"initial_scale": 1.0, "decay": 0.5, "weight_decay": 1e-2},
    {"weight_decay": 1e-2, "decoupled_weight_decay": True, "momentum": 0.5, "lr_in_momentum": False},
    {"maximize": True, "eps": 0.0},
    {"accumulator_dtype": jnp.float32, "centered": True},
]


def _tree(seed: int) -> dict:
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        "a": jax.random.normal(k[0], (17, 5)),
        "b": jax.random.normal(k[1], ()),
        "c": jax.random.normal(k[2], (0, 3)),
        "d": jax.random.normal(k[3], (33,)).astype(jnp.bfloat16),
    }


def run() -> dict:
    params = _tree(0)
    grads = [_tree(i + 1) for i in range(3)]
    differing, h_jit, h_eager = [], hashlib.sha256(), hashlib.sha256()
    for i, kw in enumerate(CONFIGS):
        opt = rmsprop_jax.rmsprop(1e-2, **kw)
        step = jax.jit(opt.update)
        s_e = s_j = opt.init(params)
        for t, g in enumerate(grads):
            out_e = opt.update(g, s_e, params)
            out_j = step(g, s_j, params)
            s_e, s_j = out_e[1], out_j[1]
            for a, b in zip(jax.tree.leaves(out_e), jax.tree.leaves(out_j), strict=True):
                a, b = np.asarray(a), np.asarray(b)
                h_eager.update(a.tobytes())
                h_jit.update(b.tobytes())
                if a.tobytes() != b.tobytes():
                    differing.append(f"config {i} {kw} step {t}")
    return {
        "cases": len(CONFIGS),
        "differing": sorted(set(differing)),
        "jit_digest": h_jit.hexdigest(),
        "eager_digest": h_eager.hexdigest(),
    }


if __name__ == "__main__":
    print("JIT_EAGER " + json.dumps(run(), default=str))
