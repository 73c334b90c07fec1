"""The codecs' integer formulations against the float operations they replace, and the fusion they buy.

XLA:CPU converts float8 in software and never fuses a float ``max`` reduction with its producer, so
the FP8 step does its arithmetic on bit patterns: the e4m3 decode, round to nearest (and stochastic
rounding's NaN handling) and the block maximum (as unsigned integers, over an 8-way elementwise
chain). Each must equal the float operation bit for bit; the last test checks, on the compiled
step, that the block maximum no longer writes the float32 accumulator to a temporary. No torch:
these run in the core test set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import _lowbit as lb
from rmsprop_jax import _quantize as Q

FP8 = jnp.float8_e4m3fn
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _bits(x) -> np.ndarray:
    a = np.asarray(x)
    return a.view(_UINT[a.dtype.itemsize])


def _patterns(n: int, seed: int) -> np.ndarray:
    """Uniformly random float32 bit patterns: every binade, subnormals, inf and NaN."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)


def test_fp8_decode_on_bits_equals_the_cast_for_all_256_codes() -> None:
    codes = jnp.arange(256, dtype=jnp.uint8).view(FP8)
    ours, cast = np.asarray(lb.fp8_to_float32(codes)), np.asarray(codes.astype(jnp.float32))
    assert np.array_equal(np.isnan(ours), np.isnan(cast)) and np.isnan(ours).sum() == 2
    finite = ~np.isnan(cast)
    np.testing.assert_array_equal(_bits(ours[finite]), _bits(cast[finite]))  # -0.0 and subnormals too


def _ties(dtype) -> np.ndarray:
    """Every float32 midway between two adjacent finite values of ``dtype``, and the floats either side."""
    grid = np.arange(256 if jnp.dtype(dtype).itemsize == 1 else 65536, dtype=_UINT[jnp.dtype(dtype).itemsize])
    values = np.asarray(jnp.asarray(grid).view(dtype).astype(jnp.float32))
    values = np.sort(values[np.isfinite(values)])
    ties = ((values[:-1].astype(np.float64) + values[1:]) / 2).astype(np.float32)  # exact in float32
    return np.concatenate([ties, np.nextafter(ties, -np.inf), np.nextafter(ties, np.inf)])


@pytest.mark.parametrize(("dtype", "limit"), [(FP8, 464.0), (jnp.bfloat16, np.inf), (jnp.float16, 65520.0)])
def test_round_to_nearest_on_bits_equals_the_cast(dtype, limit: float) -> None:
    """``round_to_format(x, dtype, None)``: ties to even, as ``x.astype(dtype)``, for every
    finite ``x`` that the cast does not overflow (fp8: below 448 + half its ulp), exact ties and
    their neighbours included."""
    x = np.concatenate([_patterns(300_000, 1), _ties(dtype)])
    x = x[np.isfinite(x) & (np.abs(x) < limit)].astype(np.float32)
    ours = jax.jit(Q.round_to_format, static_argnums=(1, 2))(jnp.asarray(x), dtype, None)
    np.testing.assert_array_equal(_bits(ours), _bits(jnp.asarray(x).astype(dtype)))


def test_round_half_up_mutant_fails_the_cast_check() -> None:
    """The check above can fail: adding exactly half the discarded range (constant "random" bits
    of 2**19) rounds e4m3's ties up, and the cast rounds them to even."""
    ties = jnp.asarray([1.0625, 1.1875, 17.0, 3.0 * 2.0**-10], jnp.float32)  # midway between codes
    half_up = Q.round_to_format(ties, FP8, jnp.full(ties.shape, 1 << 19, jnp.uint32))
    assert np.sum(_bits(half_up) != _bits(ties.astype(FP8))) >= 2


def test_e4m3_rounding_equals_the_general_rule_and_stays_unbiased_below_its_normals() -> None:
    """``_round_e4m3`` against ``_round_general``, the significand/exponent rule every format shares,
    on random patterns, e4m3's whole range and its ties: to nearest everywhere, and stochastically wherever
    ``|x| >= 2**-6`` or ``x`` is not finite, bit for bit. In the subnormal range the stochastic codes
    are drawn differently (20 random bits below the last place): each is one of the two neighbours,
    and their mean over many draws is ``x``."""
    rng = np.random.default_rng(8)
    e4m3_range = rng.standard_normal(200_000) * 10.0 ** rng.uniform(-12, 2.6, 200_000)
    x = np.concatenate([_patterns(200_000, 2), e4m3_range.astype(np.float32), _ties(FP8)])
    x = np.concatenate([x, [0.0, -0.0, np.inf, -np.inf, np.nan, 448.0, 463.9, 1e30]]).astype(np.float32)
    bits = jnp.asarray(rng.integers(0, 2**32, x.size, dtype=np.uint64).astype(np.uint32))
    for b in (None, bits):
        fast = _bits(jax.jit(Q._round_e4m3)(jnp.asarray(x), b))
        general = _bits(jax.jit(Q._round_general, static_argnums=1)(jnp.asarray(x), jnp.dtype(FP8), b))
        keep = slice(None) if b is None else ~(np.abs(x) < 2.0**-6)
        np.testing.assert_array_equal(fast[keep], general[keep])
    # the subnormal range, stochastically: neighbours only, unbiased (k / 2**-9 + 0.3, and a tiny value)
    sub = np.array([0.3, 2.7, 5.5, 7.9, 1e-6], np.float64) * 2.0**-9
    draws = 4000
    x = jnp.asarray(sub, jnp.float32)
    many = jax.vmap(lambda s: Q._round_e4m3(x, Q.hash_bits(Q.hash_key(s, 0, 0), sub.shape)))
    out = np.asarray(many(jnp.arange(draws)).astype(jnp.float32), np.float64)
    ulp = 2.0**-9
    assert np.all((out == np.floor(sub / ulp) * ulp) | (out == np.ceil(sub / ulp) * ulp))
    stderr = 0.5 * ulp / np.sqrt(draws)
    assert np.all(np.abs(out.mean(0) - sub)[:4] < 5 * stderr)
    assert np.abs(out.mean(0)[4] - sub[4]) < 1e-6 * ulp + 5 * np.sqrt(1e-6 / draws) * ulp


@pytest.mark.parametrize("dtype", [FP8, jnp.bfloat16, jnp.float16])
def test_stochastic_rounding_turns_nan_and_inf_into_what_the_cast_gives(dtype) -> None:
    x = jnp.asarray([np.nan, -np.nan, np.inf, -np.inf, 1.0], jnp.float32)
    bits = jnp.full(x.shape, 12345, jnp.uint32)
    ours = np.asarray(Q.round_to_format(x, dtype, bits)).astype(np.float32)
    cast = np.asarray(x.astype(dtype)).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(cast))
    np.testing.assert_array_equal(ours[~np.isnan(cast)], cast[~np.isnan(cast)])
    assert np.array_equal(np.signbit(ours), np.signbit(cast))


VIEWS = [("rows", (64, 4, 256)), ("rows", (64, 8, 128)), ("rows", (64, 10, 100)), ("tiles", (8, 16, 32, 16))]


@pytest.mark.parametrize(("view", "shape"), VIEWS)
def test_block_max_on_bits_equals_the_float_max(view: str, shape: tuple[int, ...]) -> None:
    """``max |x|`` per block, NaN as 0, over random bit patterns (inf, -0.0, subnormals, NaN), against
    NumPy's float maximum: blocks over the last axis (an 8-way chain where the block divides by
    8, a plain reduction where not), tiles ``(..., nr, th, nc, tw)`` over axes -3 and -1."""
    xb = _patterns(int(np.prod(shape)), 2).reshape(shape)
    a = np.where(np.isnan(xb), np.float32(0), np.abs(xb))
    want = a.max(axis=(-3, -1), keepdims=True)[..., 0] if view == "tiles" else a.max(-1)
    got = jax.jit(Q.block_max, static_argnums=1)(jnp.asarray(xb), view == "tiles")
    np.testing.assert_array_equal(_bits(got), _bits(want))


def _fp8_step_temp_bytes(shape: tuple[int, int], layout: str) -> int:
    params = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
    opt = rmsprop_jax.rmsprop(1e-3, accumulator_dtype=rmsprop_jax.Fp8(layout=layout))
    state = jax.eval_shape(opt.init, params)

    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusion")
@pytest.mark.parametrize("layout", ["rows", "tiles"])
def test_fp8_step_writes_no_float32_temporary_on_cpu(layout: str) -> None:
    """The FP8 step's block maximum is fused with the accumulator's computation: its temporaries
    (a copy of the donated codes and the scales, about 1 byte per element) stay far below the
    4 bytes per element that a materialized float32 accumulator takes. With a float ``max``
    reduction (the formulation before) the temporaries held the whole float32 accumulator."""
    shape = (1024, 1024)
    temp = _fp8_step_temp_bytes(shape, layout)
    assert temp < 2 * shape[0] * shape[1], f"{temp} bytes of temporaries for a {shape} float32 leaf"
