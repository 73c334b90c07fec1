"""4-bit and FP8 state: ``rmsprop`` steps under ``jax.disable_jit()`` against ``jax.jit``, bit for bit.

Run by ``tests/test_lowbit.py`` in a fresh process with ``--xla_cpu_max_isa=AVX
--xla_disable_hlo_passes=algsimp``, as ``tests/jit_eager_check.py`` is run by
``tests/test_properties.py``: in process, fused multiply-adds and the reciprocal rewrite of
divisions differ between the two (XLA's doing, not the codecs'; the codecs alone agree in process,
``test_jit_equals_eager_for_every_codec``). A script of its own, not ``test_lowbit``, so that the
fresh process does not import torch and torchao. Prints one JSON line.
"""

from __future__ import annotations

import json

import jax
import numpy as np

import rmsprop_jax

# One leaf a configuration, quantized (min_size=0): int4 on the matrix "m" (nu rank-1, signed
# int4 blocks for mu and momentum), fp8 on the vector "v" (nu stochastic and positive, mu and
# momentum; blocks with a partial last one). Eager compiles every primitive once per shape, ~5 s
# of CPU a leaf and configuration, so the codecs are covered on other shapes elsewhere: each
# codec alone under disable_jit, int4's unsigned blocks included, on a matrix in process
# (test_jit_equals_eager_for_every_codec), and "int4" and "fp8" through rmsprop op by op against
# jit (test_rmsprop_steps_jit_equal_eager).
CONFIGS = {
    "int4 centered momentum": ("int4", {"centered": True, "momentum": 0.9}, ("m",)),
    "fp8 centered momentum": ("fp8", {"centered": True, "momentum": 0.9, "nesterov": True}, ("v",)),
}
FORMATS = {"int4": rmsprop_jax.Int4(min_size=0), "fp8": rmsprop_jax.Fp8(min_size=0)}
SHAPES = {"m": (8, 12), "v": (150,)}
STEPS = 2  # the second decodes a state that is not zero


def _data(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """As ``tests/test_lowbit.py``'s: normal values with per-element scales over 6 decades, zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp(rng.uniform(np.log(1e-6), 0, shape))
    x.reshape(-1)[rng.choice(x.size, x.size // 50, replace=False)] = 0.0
    return x.astype(np.float32)


def _mismatches(a: object, b: object) -> int:
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    return int(a.size != b.size) or int(np.sum(a.view(np.uint8) != b.view(np.uint8)))


def run() -> dict:
    """Every configuration: ``STEPS`` steps with ``jax.disable_jit()`` and under ``jax.jit``; the leaves
    (updates and state: codes, scales, counts) that differ in their bytes."""
    rng = np.random.default_rng(30)
    params = {k: jax.numpy.asarray(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()}
    grads = [{k: jax.numpy.asarray(_data(s, 31 + t)) for k, s in SHAPES.items()} for t in range(STEPS)]
    differing, leaves, quantized = [], 0, {}
    for name, (fmt, kw, keys) in CONFIGS.items():
        opt = rmsprop_jax.rmsprop(1e-2, accumulator_dtype=FORMATS[fmt], **kw)
        p = {k: params[k] for k in keys}

        def steps(update, opt=opt, p=p, keys=keys):
            s, out = opt.init(p), []
            for g in grads:
                u, s = update({k: g[k] for k in keys}, s, p)
                out.append(u)
            return out, s

        with jax.disable_jit():
            eager = steps(opt.update)
        jitted = steps(jax.jit(opt.update))
        quantized[name] = sum(
            isinstance(leaf, rmsprop_jax.QuantizedLeaf)
            for leaf in jax.tree.leaves(jitted[1], is_leaf=lambda x: isinstance(x, rmsprop_jax.QuantizedLeaf))
        )
        pairs = list(zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True))
        leaves += len(pairs)
        differing += [f"{name} leaf {i}" for i, (a, b) in enumerate(pairs) if _mismatches(a, b)]
    return {"configs": len(CONFIGS), "leaves": leaves, "quantized": quantized, "differing": differing}


if __name__ == "__main__":
    print("JIT_EAGER " + json.dumps(run()))
