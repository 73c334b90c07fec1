"""The storage codecs alone: bitsandbytes' block-wise 8-bit quantizer (live) and stochastic rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsprop_jax
from rmsprop_jax import _quantize as Q

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")


def _bnb(x: np.ndarray, block_size: int = 256):
    codes, qs = F.quantize_blockwise(torch.from_numpy(x), blocksize=block_size)
    return codes.numpy(), qs.absmax.numpy(), F.dequantize_blockwise(codes, qs).numpy()


def _bits(x) -> np.ndarray:
    return np.asarray(x).view(np.uint32)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes_bit_for_bit(signed):
    ours = Q.create_dynamic_map(signed=signed)
    theirs = F.create_dynamic_map(signed=signed).numpy()
    np.testing.assert_array_equal(_bits(ours), _bits(theirs))


def _adversarial() -> np.ndarray:
    """Values on and one ulp either side of every edge of the kernel's 65536-point grid and of
    every midpoint between codes, every code itself, zeros and tiny values; each block's max is 1."""
    k = np.arange(0, 65536, 3, dtype=np.float32)
    edges = (k - np.float32(0.5)) / np.float32(65535) * np.float32(2) - np.float32(1)
    code = Q.create_dynamic_map(True)
    mids = np.float32(0.5) * (code[:-1] + code[1:])
    pts = np.concatenate([edges, mids, code]).astype(np.float32)
    vals = np.concatenate([np.nextafter(pts, -2), pts, np.nextafter(pts, 2), [0, -0.0, 1e-30, -1e-30, 1e-7]])
    vals = np.clip(vals, -1, 1).astype(np.float32)
    np.random.default_rng(0).shuffle(vals)
    n = vals.size // 256 * 256
    blocks = vals[:n].reshape(-1, 256)
    blocks[:, 0] = 1.0
    return blocks.reshape(-1)


def _inputs():
    rng = np.random.default_rng(1)
    yield "normal", rng.standard_normal(70_001).astype(np.float32)
    yield "squares (a second moment)", (rng.standard_normal(10_000) ** 2).astype(np.float32)
    yield "10 orders of magnitude in each block", np.exp(rng.uniform(-23.1, 0, 65_536)).astype(np.float32)
    yield "adversarial grid edges", _adversarial()
    yield "adversarial, scaled", _adversarial() * np.float32(3.7e-3)
    z = np.zeros(1000, np.float32)
    z[700] = 2.0
    yield "all-zero blocks", z
    x = rng.standard_normal(1024).astype(np.float32)
    x[[3, 900]] = [np.inf, -np.inf]
    x[300] = np.nan
    yield "inf and nan", x


@pytest.mark.parametrize(("name", "x"), list(_inputs()), ids=lambda v: v if isinstance(v, str) else "")
def test_quantize_blockwise_equals_bitsandbytes_code_for_code(name, x):
    codes, absmax, deq = _bnb(x)
    for fn in (rmsprop_jax.quantize_blockwise, jax.jit(rmsprop_jax.quantize_blockwise)):
        c, a = fn(jnp.asarray(x))
        assert c.dtype == jnp.uint8 and c.shape == x.shape and a.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(c), codes, err_msg=name)
        np.testing.assert_array_equal(_bits(a), _bits(absmax), err_msg=name)
    ours = rmsprop_jax.dequantize_blockwise(jnp.asarray(codes), jnp.asarray(absmax))
    np.testing.assert_array_equal(_bits(ours), _bits(deq), err_msg=name)


def test_plain_nearest_rounding_would_differ_from_bitsandbytes():
    """The mutation the live comparison must catch: nearest-code rounding (0 -> code 127)."""
    x = _adversarial()
    codes, absmax, _ = _bnb(x)
    code = Q.create_dynamic_map(True)
    v = x.reshape(-1, 256) / absmax[:, None]
    nearest = np.abs(v[..., None] - code).argmin(-1).reshape(-1)
    assert (nearest != codes).sum() > 100
    assert not np.any(codes == 127)  # bnb never stores the exact zero of the signed map


def test_non_negative_values_never_decode_to_zero():
    """The floor: a positive (or zero) value in a non-zero block decodes to >= 2.125e-5 * absmax."""
    rng = np.random.default_rng(2)
    x = np.exp(rng.uniform(-23.1, 0, 4096)).astype(np.float32)  # 1e-10 .. 1 in every block
    x[::97] = 0.0
    c, a = rmsprop_jax.quantize_blockwise(jnp.asarray(x))
    d = np.asarray(rmsprop_jax.dequantize_blockwise(c, a)).reshape(-1, 256)
    assert np.all(d > 0)
    assert np.all(d >= 2.1e-5 * np.asarray(a)[:, None])


@pytest.mark.parametrize("shape", [(3, 512), (4, 300), (7,), ()])
def test_last_axis_blocks_equal_row_by_row_quantization(shape):
    x = jnp.asarray(np.random.default_rng(3).standard_normal(shape).astype(np.float32))
    c, a = rmsprop_jax.quantize_blockwise(x, axis=-1)
    assert a.shape == Q.absmax_shape(shape, 256, -1)
    rows = x.reshape(-1, shape[-1] if shape else 1)
    for i, row in enumerate(rows):
        rc, ra = rmsprop_jax.quantize_blockwise(row)
        np.testing.assert_array_equal(np.asarray(c).reshape(rows.shape)[i], np.asarray(rc))
        np.testing.assert_array_equal(np.asarray(a).reshape(rows.shape[0], -1)[i], np.asarray(ra))
    back = rmsprop_jax.dequantize_blockwise(c, a, axis=-1)
    assert back.shape == x.shape and float(jnp.max(jnp.abs(back - x))) <= 0.1 * float(jnp.max(jnp.abs(x)))
    if shape and shape[-1] % 256 == 0:  # then identical to bitsandbytes' flattened blocks
        cf, af = rmsprop_jax.quantize_blockwise(x)
        np.testing.assert_array_equal(np.asarray(cf), np.asarray(c))
        np.testing.assert_array_equal(np.asarray(af), np.asarray(a).reshape(-1))


def test_bad_block_size_and_axis_raise():
    with pytest.raises(ValueError, match="block_size=0"):
        rmsprop_jax.quantize_blockwise(jnp.ones(4), block_size=0)
    with pytest.raises(ValueError, match="axis=0"):
        rmsprop_jax.quantize_blockwise(jnp.ones((4, 4)), axis=0)


# --------------------------------------------------------------------------- stochastic rounding


def _sr(x, dtype, seed=0, step=0, leaf=0):
    x = jnp.asarray(x, jnp.float32)
    return Q.stochastic_round(x, dtype, Q.hash_bits(Q.hash_key(seed, step, leaf), x.shape))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(dtype):
    rng = np.random.default_rng(4)
    x = rng.uniform(0.5, 1.0, 2000).astype(np.float32) * np.where(rng.random(2000) < 0.5, -1, 1)
    x = x.astype(np.float32)
    ulp = 2.0 ** (-8 if dtype == jnp.bfloat16 else -11)  # spacing in [0.5, 1)
    lo = np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32))
    seeds = 300
    many = jax.jit(jax.vmap(lambda s: _sr(x, dtype, seed=s).astype(jnp.float32)))
    outs = np.asarray(many(jnp.arange(seeds)))
    # every result is one of the two neighbours
    assert np.all(np.abs(outs - x) < ulp * (1 + 1e-6))
    assert np.all((outs == lo) | (np.abs(outs - lo) == ulp))
    # unbiased: mean error in ulps ~ N(0, sigma / sqrt(n)); sigma <= 0.5 / sqrt(seeds) per element
    err = (outs.mean(0) - x) / ulp
    assert abs(err.mean()) < 5 * 0.5 / np.sqrt(seeds * x.size)
    assert np.abs(err).max() < 6 * 0.5 / np.sqrt(seeds)
    # round-to-nearest is biased by construction on this set: the mutation the test must catch
    rtn_err = (lo - x) / ulp
    assert np.abs(rtn_err).max() > 6 * 0.5 / np.sqrt(seeds)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_stochastic_rounding_special_values_and_subnormals(dtype):
    fi = jnp.finfo(dtype)
    big = float(fi.max)
    x = np.array(
        [np.inf, -np.inf, np.nan, 0.0, -0.0, big, -big, float(fi.tiny), float(fi.smallest_subnormal)]
    )
    out = np.asarray(_sr(x.astype(np.float32), dtype).astype(jnp.float32))
    np.testing.assert_array_equal(out[:2], [np.inf, -np.inf])
    assert np.isnan(out[2])
    np.testing.assert_array_equal(_bits(out[3:5]), _bits(np.array([0.0, -0.0], np.float32)))
    np.testing.assert_array_equal(out[5:], x[5:].astype(dtype).astype(np.float32))  # representable: kept
    # past the largest finite value: inf with probability = remainder, never NaN
    ulp = 2.0 ** (fi.maxexp - 1 - fi.nmant)  # spacing at the top binade
    over = np.full(4000, big + 0.25 * ulp, np.float32)
    r = np.asarray(_sr(over, dtype).astype(jnp.float32))
    assert set(np.unique(r)) <= {big, np.inf} and 0.2 < np.mean(np.isinf(r)) < 0.3
    # subnormal target range: the mean is kept
    sub = np.full(20000, 0.3 * float(fi.smallest_subnormal), np.float32)
    m = np.asarray(_sr(sub, dtype, seed=7).astype(jnp.float32)).mean()
    assert abs(m / (0.3 * float(fi.smallest_subnormal)) - 1) < 0.05


def test_stochastic_rounding_is_deterministic_per_seed_and_varies_with_step_leaf_seed():
    x = jnp.linspace(0.1, 1.0, 4096)
    a = _sr(x, jnp.bfloat16, seed=1, step=2, leaf=3)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(_sr(x, jnp.bfloat16, seed=1, step=2, leaf=3)))
    np.testing.assert_array_equal(
        np.asarray(a), np.asarray(jax.jit(_sr, static_argnums=1)(x, jnp.bfloat16, 1, 2, 3))
    )
    for kw in (
        {"seed": 2, "step": 2, "leaf": 3},
        {"seed": 1, "step": 3, "leaf": 3},
        {"seed": 1, "step": 2, "leaf": 4},
    ):
        assert np.mean(np.asarray(a) != np.asarray(_sr(x, jnp.bfloat16, **kw))) > 0.2


def test_hash_bits_are_uniform():
    bits = np.asarray(Q.hash_bits(Q.hash_key(0, 1, 2), (256, 256))).reshape(-1)
    for shift in (0, 8, 16, 24):  # every byte of the word, low bits included
        counts = np.bincount(((bits >> shift) & 0xFF).astype(np.int64), minlength=256)
        chi2 = ((counts - bits.size / 256) ** 2 / (bits.size / 256)).sum()
        assert chi2 < 400, (shift, chi2)  # 255 degrees of freedom: p ~ 1e-8 at 400


def test_bfloat16_fast_path_equals_the_general_rule_bit_for_bit():
    """bfloat16's 4-operation path (add 16 random bits, truncate) against the general
    significand/exponent rule that float16 uses, on uniformly random float32 bit patterns
    (every binade, subnormals, the largest values, inf; NaN apart)."""
    rng = np.random.default_rng(5)
    patterns = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    patterns[:4] = [0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x00000001]
    x = jnp.asarray(patterns.view(np.float32))
    x = jnp.where(jnp.isnan(x), 1.0, x)
    bits = jnp.asarray(rng.integers(0, 2**32, x.shape, dtype=np.uint64).astype(np.uint32))
    fast = Q.stochastic_round(x, jnp.bfloat16, bits)
    general = jax.jit(Q._round_general, static_argnums=1)(x, jnp.bfloat16, bits)
    np.testing.assert_array_equal(np.asarray(fast).view(np.uint16), np.asarray(general).view(np.uint16))
