"""8-bit codes and stochastic rounding on the accelerator equal those computed on the CPU.

The CPU codes equal bitsandbytes' (tests/test_quantize.py); this closes the chain on a GPU,
where bitsandbytes' CPU kernel cannot run. Inputs: random, squares, a 10-decade block, zeros,
and every code midpoint +- 1 ulp. Run on a machine with an accelerator; prints one line per case.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import jax
import jax.numpy as jnp
import numpy as np

import rmsprop_jax
from rmsprop_jax import _quantize as Q


def _round_bf16(v: jax.Array) -> jax.Array:
    return Q.stochastic_round(v, jnp.bfloat16, Q.hash_bits(Q.hash_key(7, 3, 1), v.shape))


def main() -> int:
    cpu, acc = jax.devices("cpu")[0], jax.devices()[0]
    rng = np.random.default_rng(0)
    qmap = np.asarray(Q.create_dynamic_map(signed=True))
    mids = (qmap[1:] + qmap[:-1]) / 2
    edges = np.concatenate([mids, np.nextafter(mids, 2), np.nextafter(mids, -2), qmap])
    cases = {
        "normal": rng.normal(size=300_000),
        "squares": rng.normal(size=300_000) ** 2,
        "ten_decades": np.repeat(10.0 ** rng.uniform(-10, 0, size=(1, 4096)), 4, 0).ravel(),
        "zeros_and_one": np.concatenate([np.zeros(1024), [1.0], np.zeros(255)]),
        "midpoints": np.tile(np.concatenate([edges, [1.0]]), 3),
    }
    bad = 0
    for name, x in cases.items():
        x = np.asarray(x, np.float32)
        outs = []
        for dev in (cpu, acc):
            xd = jax.device_put(x, dev)
            codes, absmax = jax.jit(lambda v: rmsprop_jax.quantize_blockwise(v, block_size=256))(xd)
            back = jax.jit(lambda c, a: rmsprop_jax.dequantize_blockwise(c, a, block_size=256))(codes, absmax)
            sr = jax.jit(_round_bf16)(xd)
            outs.append([np.asarray(a).view(np.uint8) for a in (codes, absmax, back, sr)])
        same = [np.array_equal(a, b) for a, b in zip(*outs, strict=True)]
        bad += not all(same)
        print(f"{name:14s} n={x.size:7d} codes/absmax/dequant/bf16-SR equal CPU vs {acc.platform}: {same}")
    print("CODEC_CPU_VS_ACCEL", "OK" if bad == 0 else f"{bad} cases differ")
    return int(bad != 0)


if __name__ == "__main__":
    raise SystemExit(main())
