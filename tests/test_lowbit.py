"""4-bit and FP8 codecs against torchao 0.18 (CPU, live) and a float64 rank-1 reference.

torchao (``torchao.optim.subclass_4bit`` / ``subclass_fp8``) defines the block-wise schemes for
Adam: 4-bit signed dynamic map in blocks of 128 (first moment, momentum here) and FP8 e4m3 in
blocks of 256. Both are compared code for code and dequantized bit for bit. The second moment's
4-bit rank-1 path (lpmm's) is compared with ``tests/reference.py``. Each agreement check is also
run on a deliberately wrong variant, which must fail it.

torchao's blocks are ``x.view(-1, block_size)``, so it takes no length that is not a multiple of
the block: such lengths are compared with torchao run on the input zero-padded to whole blocks
(padding zeros change no block's ``max |x|``), on the first ``n`` codes. Packing: torchao packs the
flattened tensor, this package each row of the last axis (so that a row's codes stay together
under sharding): the packed bytes are equal where the last axis is even; where it is odd the
unpacked codes are compared.

jit against eager (``jax.disable_jit()``) through ``rmsprop`` runs in a fresh process
(tests/lowbit_jit_eager_check.py) with ``--xla_cpu_max_isa=AVX --xla_disable_hlo_passes=algsimp``,
as tests/test_properties.py does: in process, fused multiply-adds and the reciprocal rewrite of
divisions differ between the two (not the codecs' doing; the codecs alone agree in process).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import rmsprop_jax
from reference import fp8_e4m3_round_toward_zero, rank1_4bit, rank1_normalized
from rmsprop_jax import _lowbit as lb
from test_properties import _jit_eager_script

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")
from torchao.optim import subclass_4bit, subclass_fp8  # noqa: E402


def _data(shape: tuple[int, ...], seed: int, positive: bool = False) -> np.ndarray:
    """Normal values with per-element scales over 6 decades, some exact zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp(rng.uniform(np.log(1e-6), 0, shape))
    x.reshape(-1)[rng.choice(x.size, x.size // 50, replace=False)] = 0.0
    return (np.abs(x) if positive else x).astype(np.float32)


def _torchao_4bit(x: np.ndarray, signed: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    state = subclass_4bit.OptimState4bit.zeros(x.shape, signed=signed, block_size=128)
    state.copy_(torch.tensor(x))
    return state.codes.numpy(), state.scale.numpy(), state.dequantize().numpy()


def _mismatches(a: np.ndarray, b: np.ndarray) -> int:
    a, b = np.asarray(a), np.asarray(b)
    return int(a.size != b.size) or int(np.sum(a.reshape(-1).view(np.uint8) != b.reshape(-1).view(np.uint8)))


SHAPES_4BIT = [(8192,), (32, 256), (4, 8, 128)]


@pytest.mark.parametrize("shape", SHAPES_4BIT, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_signed_4bit_codes_and_dequantization_equal_torchao(shape: tuple, seed: int) -> None:
    x = _data(shape, seed)
    codes, scale, deq = _torchao_4bit(x)
    ours, our_scale = lb.quantize_int4(jnp.asarray(x), block_size=128, axis=None, signed=True)
    # two codes per byte, the first of each pair in the high nibble (torchao packs the flat tensor)
    assert _mismatches(ours, codes) == 0
    assert _mismatches(np.asarray(our_scale, np.float32), scale) == 0
    our_deq = lb.dequantize_int4(ours, our_scale, shape, block_size=128, axis=None, signed=True)
    np.testing.assert_array_equal(np.asarray(our_deq), deq)
    # the signed map itself
    np.testing.assert_array_equal(lb.int4_map(True), np.asarray(subclass_4bit.get_qmap_signed(), np.float32))


def test_unsigned_map_is_lpmm_and_torchao_018_zero_free_map() -> None:
    """torchao 0.18's unsigned 4-bit map is ``linspace(0, 1, 17)[1:]`` (no zero), lpmm's too."""
    theirs = np.asarray(subclass_4bit.get_qmap_unsigned(), np.float32)
    np.testing.assert_array_equal(lb.int4_map(False), theirs)
    assert theirs.min() > 0 and theirs[0] == np.float32(1 / 16)
    x = _data((8192,), 3, positive=True)
    codes, scale, _deq = _torchao_4bit(x, signed=False)
    ours, our_scale = lb.quantize_int4(jnp.asarray(x), block_size=128, axis=None, signed=False)
    assert _mismatches(ours, codes) == 0  # blocks with a positive maximum: the same scale
    np.testing.assert_array_equal(np.asarray(our_scale), scale)


def _zero_including_map_decodes(x: np.ndarray) -> np.ndarray:
    """Mutant: 16 linear levels including 0 (``linspace(0, 1, 16)``), nearest, blocks of 128."""
    xb = x.reshape(-1, 128).astype(np.float64)
    s = xb.max(-1, keepdims=True)
    return (np.round(np.divide(xb, s, out=np.zeros_like(xb), where=s > 0) * 15) / 15 * s).reshape(x.shape)


def test_a_zero_including_map_loses_positive_second_moments_where_ours_does_not() -> None:
    """One large second moment per block and tiny ones: on a map with 0 the tiny ones decode to
    0 and ``g / sqrt(nu + eps)`` becomes ``g / sqrt(eps)``; on the zero-free map never."""
    nu = np.full((4096,), 1e-6, np.float32)
    nu[::128] = 1.0
    ours = np.asarray(
        lb.dequantize_int4(
            *lb.quantize_int4(jnp.asarray(nu), axis=None, signed=False), nu.shape, axis=None, signed=False
        )
    )
    mutant = _zero_including_map_decodes(nu)
    assert np.all(ours > 0) and np.sum(mutant == 0) == 4096 - 32
    g, eps = np.float32(1e-3), np.float32(1e-8)
    assert np.max(g / (np.sqrt(mutant) + eps)) > 1e4 * np.max(g / (np.sqrt(ours) + eps))


def test_block_size_256_mutant_disagrees_with_torchao() -> None:
    x = _data((8192,), 5)
    codes, _, _ = _torchao_4bit(x)
    mutant, _ = lb.quantize_int4(jnp.asarray(x), block_size=256, axis=None, signed=True)
    assert _mismatches(mutant, codes) > 100


def test_round_down_mutant_disagrees_with_torchao() -> None:
    x = _data((8192,), 6)
    codes, scale, _ = _torchao_4bit(x)
    table = lb.int4_map(True)
    v = x.reshape(-1, 128) / scale[:, None]
    down = np.sum(v[..., None] >= table[1:], axis=-1).reshape(-1)  # the lower neighbour, no rounding
    packed = ((down[::2] << 4) | down[1::2]).astype(np.uint8)
    assert _mismatches(packed, codes) > 1000


# --------------------------------------------------------------------------- FP8


def _torchao_fp8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes, scale = subclass_fp8.quantize_fp8(torch.tensor(x), 256)
    return codes.view(torch.uint8).numpy(), scale.numpy()


@pytest.mark.parametrize("shape", [(8192,), (16, 512)], ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_fp8_nearest_codes_and_dequantization_equal_torchao(shape: tuple, seed: int) -> None:
    x = _data(shape, seed)
    codes, scale = _torchao_fp8(x)
    ours, our_scale = lb.quantize_fp8(jnp.asarray(x), block_size=256, axis=None)
    assert _mismatches(ours, codes) == 0
    # the scale max / 448, correctly rounded as PyTorch divides (see the reciprocal mutant below)
    our_scale = np.asarray(our_scale)
    np.testing.assert_array_equal(our_scale, scale)
    # dequantization: torchao's of our codes and scales equals ours bit for bit
    fp8 = torch.tensor(np.asarray(ours).view(np.uint8)).view(torch.float8_e4m3fn).reshape(shape)
    theirs = subclass_fp8.OptimStateFp8(fp8, torch.tensor(our_scale)).dequantize().numpy()
    np.testing.assert_array_equal(
        np.asarray(lb.dequantize_fp8(ours, jnp.asarray(our_scale), axis=None)), theirs
    )


def test_fp8_second_moment_keeps_the_smallest_code_exactly_where_torchao_flushes_to_zero() -> None:
    nu = _data((16384,), 7, positive=True)
    codes, _ = _torchao_fp8(nu)
    ours, _ = lb.quantize_fp8(jnp.asarray(nu), block_size=256, axis=None, positive=True)
    ours = np.asarray(ours).view(np.uint8)
    flushed = (codes == 0) & (nu > 0)
    differ = ours != codes
    assert flushed.sum() > 100  # torchao's positive values that decode to 0 in this sample
    np.testing.assert_array_equal(differ, flushed)
    assert np.all(ours[flushed] == 1)  # e4m3fn's smallest positive value, 2**-9


def test_fp8_stochastic_rounding_is_unbiased_and_never_zero_for_positive_values() -> None:
    nu = np.float32(448) * np.linspace(0.01, 1, 256, dtype=np.float32)  # one block, scale 1
    n = 2000
    bits = jax.random.bits(jax.random.key(0), (n, 256), jnp.uint32)
    codes, scale = jax.vmap(lambda b: lb.quantize_fp8(jnp.asarray(nu), axis=-1, bits=b, positive=True))(bits)
    dec = np.asarray(jax.vmap(lambda c, s: lb.dequantize_fp8(c, s, axis=-1))(codes, scale), np.float64)
    assert np.all(dec > 0)
    # e4m3 spacing relative to the value is at most 2**-3: a rounding's sd < value / 8
    stderr = nu / 8 / np.sqrt(n)
    assert np.all(np.abs(dec.mean(0) - nu) < 5 * stderr + 1e-6)
    nearest = np.asarray(lb.dequantize_fp8(*lb.quantize_fp8(jnp.asarray(nu), axis=-1), axis=-1), np.float64)
    assert np.abs(nearest - nu).max() > 10 * np.abs(dec.mean(0) - nu).max()  # the contrast: biased


def _int4_codecs(signed: bool, rank1: bool = False) -> tuple[Any, Any]:
    """(encode(x, bits) -> decoded, neighbours(x) -> (down, up) decoded) for one 4-bit path."""
    table = lb.int4_map(signed).astype(np.float64)
    if rank1:

        def enc(x: jax.Array, b: Any) -> jax.Array:
            return lb.dequantize_rank1(*lb.quantize_rank1(x, b), x.shape)

        def scale(x: np.ndarray) -> np.ndarray:
            return np.minimum(x.max(1, keepdims=True), x.max(0, keepdims=True)).astype(np.float64)
    else:

        def enc(x: jax.Array, b: Any) -> jax.Array:
            return lb.dequantize_int4(
                *lb.quantize_int4(x, axis=-1, signed=signed, bits=b), x.shape, axis=-1, signed=signed
            )

        def scale(x: np.ndarray) -> np.ndarray:
            return np.abs(x).max(-1, keepdims=True).astype(np.float64)

    def neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = scale(x)
        v = x / s
        c = np.clip(np.sum(v[..., None] >= table[1:], axis=-1), 0, 15)
        return table[c] * s, table[np.minimum(c + 1, 15)] * s

    return jax.jit(enc), neighbours


@pytest.mark.parametrize("path", ["signed", "unsigned", "rank-1"])
def test_int4_stochastic_rounding_is_unbiased_between_the_two_neighbouring_codes(path: str) -> None:
    """4000 encodings of one tensor with independent bits: each decodes to one of the value's two
    neighbouring map values, and their mean is the value within 5 standard errors (a rounding
    between neighbours ``d <= x <= u`` has sd <= (u - d) / 2). The zero-free map's values below its
    smallest level keep that level (never 0). Round to nearest, and always up (bits of 0), fail."""
    rng = np.random.default_rng(3)
    x = rng.uniform(0.0, 1.0, (8, 128)).astype(np.float32)
    if path == "signed":
        x = x * rng.choice([-1.0, 1.0], x.shape).astype(np.float32)
    enc, neighbours = _int4_codecs(path == "signed", rank1=path == "rank-1")
    n = 4000
    keys = jax.random.split(jax.random.key(1), n)
    draws = np.asarray(
        jax.lax.map(lambda k: enc(jnp.asarray(x), jax.random.bits(k, x.shape, jnp.uint32)), keys), np.float64
    )
    down, up = neighbours(x)
    tol = 1e-6 * np.maximum(np.abs(down), np.abs(up))  # float32 products against float64
    assert np.all((np.abs(draws - down) <= tol) | (np.abs(draws - up) <= tol)), path
    # between two map values (the signed map's lowest is -0.8875: below it the code is clipped)
    inside = (down <= x) & (x <= up) & (up > down)
    assert inside.mean() > 0.75  # rank-1: an element that is its column's maximum is at 1
    bias = np.abs(draws.mean(0) - x)[inside]
    bound = (5 * (up - down) / 2 / np.sqrt(n))[inside] + 1e-7
    assert np.all(bias < bound), np.max(bias / bound)
    if path != "signed":  # the zero-free map: below 1/16 of the scale the code stays 1/16
        assert np.all(draws > 0)
    nearest = np.asarray(enc(jnp.asarray(x), None), np.float64)
    always_up = np.asarray(enc(jnp.asarray(x), jnp.zeros(x.shape, jnp.uint32)), np.float64)
    for mutant in (nearest, always_up):
        assert np.mean(np.abs(mutant - x)[inside] > bound) > 0.5


def test_int4_stochastic_rounding_lets_a_momentum_ema_reach_what_round_to_nearest_stalls() -> None:
    """A momentum-like buffer ``m <- 0.95 m + 0.05 x`` re-encoded on the signed 4-bit map every
    step, from 0, for 400 steps (the float64 EMA is ``x`` within 1e-8); one element of each block
    holds its scale at 1. Round to nearest stops where the step's change is below half a level
    (the map's spacing near 0.5 is 0.22): it ends below 16 % of ``x``. Stochastic rounding's
    average over 64 rows x 127 elements is ``x``'s within 0.02 (the 4-bit quadratic's +8.8 %
    with momentum under nearest, see Int4's docstring)."""
    x = np.concatenate([[1.0], np.linspace(0.05, 0.6, 127)]).astype(np.float32)
    shape = (64, 128)
    target = jnp.tile(jnp.asarray(x), (shape[0], 1))

    def run(stochastic: bool) -> np.ndarray:
        def body(c: Any, t: jax.Array) -> tuple[Any, None]:
            m = 0.95 * lb.dequantize_int4(*c, shape, axis=-1, signed=True) + 0.05 * target
            m = m.at[:, 0].set(1.0)
            key = jax.random.fold_in(jax.random.key(0), t)
            bits = jax.random.bits(key, shape, jnp.uint32) if stochastic else None
            return lb.quantize_int4(m, axis=-1, signed=True, bits=bits), None

        c0 = lb.quantize_int4(jnp.zeros(shape).at[:, 0].set(1.0), axis=-1, signed=True)
        c, _ = jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(400)))(c0)
        return np.asarray(lb.dequantize_int4(*c, shape, axis=-1, signed=True), np.float64)[:, 1:]

    sr, nearest = run(True), run(False)
    assert abs(sr.mean() - x[1:].mean()) < 0.02, sr.mean()
    assert np.all(nearest.mean(0) < 0.16 * x[1:]), (nearest.mean(0) / x[1:]).max()


# --------------------------------------------------------------------------- rank-1


@pytest.mark.parametrize("shape", [(64, 96), (8, 16, 40), (128, 33)], ids=str)
def test_rank1_codes_equal_the_float64_reference(shape: tuple) -> None:
    nu = _data(shape, 11, positive=True)
    nu[3] = 0.0  # an all-zero row
    packed, stats = lb.quantize_rank1(jnp.asarray(nu))
    codes = np.asarray(lb.unpack(packed, shape))
    ref_codes, ref_dec = rank1_4bit(nu)
    # float32 against float64 division: only values within rounding of a midpoint may differ
    assert np.sum(codes != ref_codes) <= max(2, nu.size // 10_000), np.sum(codes != ref_codes)
    assert np.abs(codes - ref_codes).max() <= 1
    dec = np.asarray(lb.dequantize_rank1(packed, stats, shape))
    same = codes == ref_codes
    np.testing.assert_allclose(dec[same], ref_dec[same], rtol=1e-6)
    assert np.all(dec[nu > 0] > 0) and np.all(dec[3] == 0)


def test_no_rank1_normalization_mutant_disagrees_with_the_reference() -> None:
    shape = (64, 256)
    rng = np.random.default_rng(12)
    nu = (
        np.outer(np.exp(rng.uniform(-6, 0, 64)), np.exp(rng.uniform(-6, 0, 256))) * rng.uniform(0.5, 1, shape)
    ).astype(np.float32)
    ref_codes, _ = rank1_4bit(nu)
    blocks, _scale = lb.quantize_int4(jnp.asarray(nu), block_size=128, axis=-1, signed=False)
    assert np.sum(np.asarray(lb.unpack(blocks, shape)) != ref_codes) > nu.size // 10


def test_jit_equals_eager_for_every_codec() -> None:
    x = jnp.asarray(_data((64, 256), 13))
    fns = {
        "int4_signed": lambda v: lb.quantize_int4(v, axis=-1, signed=True),
        "int4_unsigned": lambda v: lb.quantize_int4(jnp.abs(v), axis=-1, signed=False),
        "rank1": lambda v: lb.quantize_rank1(jnp.abs(v)),
        "fp8": lambda v: lb.quantize_fp8(v, axis=-1),
        "fp8_positive": lambda v: lb.quantize_fp8(jnp.abs(v), axis=-1, positive=True),
    }
    for name, f in fns.items():
        with jax.disable_jit():
            eager = f(x)
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jax.jit(f)(x)), strict=True):
            assert _mismatches(a, b) == 0, name


_IN_PROCESS = {
    "int4": ("int4", {}),
    "int4 nearest": (rmsprop_jax.Int4(rounding="nearest"), {}),
    "fp8": ("fp8", {}),
    "fp8 nearest": (rmsprop_jax.Fp8(rounding="nearest"), {}),
    "int4 centered momentum": ("int4", {"centered": True, "momentum": 0.9}),
    "fp8 centered momentum": ("fp8", {"centered": True, "momentum": 0.9}),
}


@pytest.mark.parametrize("name", list(_IN_PROCESS))
def test_rmsprop_steps_jit_equal_eager(name: str) -> None:
    """``opt.update`` called outside jit (as a user calls it) against ``jax.jit(opt.update)``."""
    fmt, kw = _IN_PROCESS[name]
    opt = rmsprop_jax.rmsprop(1e-2, accumulator_dtype=fmt, **kw)
    p = {"w": jnp.asarray(_data((64, 128), 14))}
    grads = [{"w": jnp.asarray(_data((64, 128), 20 + i))} for i in range(3)]

    def run(update):
        s, out = opt.init(p), []
        for g in grads:
            u, s = update(g, s, p)
            out.append(u)
        return out, s

    eager = run(opt.update)  # op by op outside jit, as a user calls it
    jitted = run(jax.jit(opt.update))
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        assert _mismatches(a, b) == 0


# --------------------------------------------------------------------------- odd lengths, extreme values


def _extreme(shape: tuple[int, ...], seed: int, positive: bool = False) -> np.ndarray:
    """:func:`_data` plus values from 1e-30 to 1e30, one block of values below torchao's 1e-12
    clip of the maximum and a block of zeros."""
    x = _data(shape, seed, positive).reshape(-1)
    rng = np.random.default_rng(seed + 100)
    idx = rng.choice(x.size, x.size // 20, replace=False)
    mags = 10.0 ** rng.uniform(-30, 30, idx.size)
    x[idx] = (mags if positive else mags * rng.choice([-1.0, 1.0], idx.size)).astype(np.float32)
    x[:128] = np.float32(1e-20) * np.arange(128, dtype=np.float32)  # maximum under the clip
    x[256:384] = 0.0
    return x.reshape(shape)


def _padded(x: np.ndarray, block: int) -> np.ndarray:
    flat = x.reshape(-1)
    return np.concatenate([flat, np.zeros(-flat.size % block, np.float32)])


def _unpack_flat(packed: np.ndarray) -> np.ndarray:
    return np.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)


ODD_SHAPES = [(4097,), (3, 333), (130, 7), (8192,)]


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_4bit_odd_lengths_and_extreme_values_equal_torchao(shape: tuple, signed: bool) -> None:
    """Signed: every code, scale and decoded value equals torchao's. Unsigned: the same, except in
    blocks whose maximum is below torchao's clip (1e-12): there this package keeps the scale
    ``max |x|`` unclipped (0 for an all-zero block, which then decodes to 0), where torchao's
    1e-12 turns every value into code 0 and decodes it to 1e-12 / 16 (larger than the block)."""
    x = _extreme(shape, sum(shape) + signed, positive=not signed)
    n = x.size
    codes, scale, deq = _torchao_4bit(_padded(x, 128), signed=signed)
    ours, our_scale = lb.quantize_int4(jnp.asarray(x), block_size=128, axis=None, signed=signed)
    our_scale = np.asarray(our_scale)
    assert ours.shape == lb.packed_shape(shape)
    unpacked = np.asarray(lb.unpack(ours, shape)).reshape(-1).astype(np.uint8)
    block_max = np.abs(_padded(x, 128).reshape(-1, 128)).max(-1)
    keep = block_max >= np.float32(1e-12) if not signed else np.ones(scale.shape, bool)
    assert keep.sum() >= keep.size - 2  # the two sub-clip blocks of _extreme
    per_elem = np.repeat(keep, 128)[:n]
    assert _mismatches(unpacked[per_elem], _unpack_flat(codes)[:n][per_elem]) == 0
    if shape[-1] % 2 == 0:  # the same bytes: high nibble first
        in_keep = per_elem[::2]
        assert _mismatches(np.asarray(ours).reshape(-1)[in_keep], codes[: n // 2][in_keep]) == 0
    np.testing.assert_array_equal(our_scale[keep], scale[keep])
    np.testing.assert_array_equal(our_scale[~keep], block_max[~keep])  # unclipped
    our_deq = np.asarray(lb.dequantize_int4(ours, our_scale, shape, axis=None, signed=signed)).reshape(-1)
    np.testing.assert_array_equal(our_deq[per_elem], deq[:n][per_elem])
    if not signed:
        assert np.all(our_deq[x.reshape(-1) > 0] > 0)


@pytest.mark.parametrize("shape", [(4097,), (3, 333), (8192,)], ids=str)
@pytest.mark.parametrize("positive", [False, True])
def test_fp8_odd_lengths_and_extreme_values_equal_torchao(shape: tuple, positive: bool) -> None:
    x = _extreme(shape, sum(shape) + positive, positive=positive)
    n = x.size
    tcodes, tscale = subclass_fp8.quantize_fp8(torch.tensor(_padded(x, 256)), 256)
    theirs = tcodes.view(torch.uint8).numpy()[:n]
    tdeq = subclass_fp8.OptimStateFp8(tcodes, tscale).dequantize().numpy()[:n]
    ours, our_scale = lb.quantize_fp8(jnp.asarray(x), block_size=256, axis=None, positive=positive)
    ours = np.asarray(ours).reshape(-1)
    np.testing.assert_array_equal(np.asarray(our_scale), tscale.numpy())
    flushed = (theirs == 0) & (x.reshape(-1) > 0) if positive else np.zeros(n, bool)
    np.testing.assert_array_equal(ours.view(np.uint8) != theirs, flushed)
    dec = np.asarray(lb.dequantize_fp8(jnp.asarray(ours.reshape(shape)), our_scale, axis=None)).reshape(-1)
    np.testing.assert_array_equal(dec[~flushed], tdeq[~flushed])
    if positive:
        assert np.all(dec[x.reshape(-1) > 0] > 0)


def test_fp8_reciprocal_scale_mutant_disagrees_with_torchao() -> None:
    """``max * (1 / 448)`` (what XLA's simplifier makes of ``max / 448``) is one ulp off in many
    blocks; the scale is torchao's in every context the codec runs in: op by op, ``jax.jit``,
    ``jax.disable_jit()`` and ``jax.vmap`` (where a divisor not computed from the batched maximum
    would be broadcast after its barrier, and rewritten)."""
    x = _data((65536,), 21)
    _, scale = _torchao_fp8(x)
    mutant = np.maximum(np.abs(x.reshape(-1, 256)).max(-1), np.float32(1e-12)) * np.float32(1 / 448)
    assert _mismatches(mutant, scale) > 40
    xs = jnp.asarray(x)
    f = lambda v: lb.quantize_fp8(v, axis=None)[1]
    batched = jax.vmap(f)(xs.reshape(2, -1)).reshape(-1)
    with jax.disable_jit():
        eager = f(xs)
    for name, ours in {
        "op by op": f(xs),
        "jit": jax.jit(f)(xs),
        "disable_jit": eager,
        "vmap": batched,
        "jit of vmap": jax.jit(jax.vmap(f))(xs.reshape(2, -1)).reshape(-1),
    }.items():
        assert _mismatches(np.asarray(ours), scale) == 0, name


def test_fp8_round_toward_zero_mutant_disagrees_with_torchao() -> None:
    x = _data((8192,), 22)
    codes, scale = _torchao_fp8(x)
    v = x.reshape(-1, 256) / scale[:, None]
    mutant = fp8_e4m3_round_toward_zero(v).astype(np.float32).astype(jnp.float8_e4m3fn).view(np.uint8)
    assert _mismatches(mutant.reshape(-1), codes) > 1000
    # and the reference rounding itself is right: it never rounds away from zero
    theirs = codes.view(jnp.float8_e4m3fn).astype(np.float64).reshape(v.shape)
    assert np.all(np.abs(fp8_e4m3_round_toward_zero(v)) <= np.abs(v))
    assert np.all(np.abs(theirs - fp8_e4m3_round_toward_zero(v)) <= np.abs(theirs) * 2.0**-3 + 2.0**-9)


# --------------------------------------------------------------------------- rank-1: boundary cases


def _rank1_boundary(nu: np.ndarray) -> np.ndarray:
    """Elements whose float64 normalized value lies within 2 float32 ulps of a rounding midpoint
    ``(k + 1.5) / 16``: there float32 and float64 division may round to different codes."""
    v = rank1_normalized(nu)
    mid = (np.clip(np.round(16 * v - 1.5), 0, 14) + 1.5) / 16
    return np.abs(v - mid) <= 2 * np.spacing(np.float32(v)).astype(np.float64)


@pytest.mark.parametrize("shape", [(64, 96), (8, 16, 40), (128, 33)], ids=str)
def test_rank1_mismatches_are_exactly_boundary_cases(shape: tuple) -> None:
    nu = _data(shape, 11, positive=True)
    nu[3] = 0.0
    codes = np.asarray(lb.unpack(lb.quantize_rank1(jnp.asarray(nu))[0], shape))
    ref_codes, _ = rank1_4bit(nu)
    differ = codes != ref_codes
    assert not np.any(differ & ~_rank1_boundary(nu)), np.argwhere(differ & ~_rank1_boundary(nu))[:5]
    assert differ.sum() <= _rank1_boundary(nu).sum()


def test_rank1_ties_round_up_as_the_reference() -> None:
    nu = np.zeros((4, 8), np.float32)
    nu[1:, 1:] = np.float32([1.5, 2.5, 3.5, 7.5, 14.5, 15.5, 0.5]) / 16  # midpoints, exact in float32
    nu[0, :] = nu[:, 0] = 1.0  # every row and column maximum 1: the scale is 1 everywhere
    codes = np.asarray(lb.unpack(lb.quantize_rank1(jnp.asarray(nu))[0], nu.shape))
    ref_codes, _ = rank1_4bit(nu)
    np.testing.assert_array_equal(codes, ref_codes)


def test_rank1_round_down_mutant_disagrees_with_the_reference() -> None:
    nu = np.random.default_rng(23).uniform(0, 1, (64, 96)).astype(np.float32)
    ref_codes, _ = rank1_4bit(nu)
    mutant = np.clip(np.floor(16 * rank1_normalized(nu)) - 1, 0, 15)
    assert np.sum(mutant != ref_codes) > nu.size // 10


# --------------------------------------------------------------------------- never 0 for a positive nu

_Q_FP8 = jax.jit(lambda x: lb.dequantize_fp8(*lb.quantize_fp8(x, axis=None, positive=True), axis=None))
_Q_FP8_SR = jax.jit(
    lambda x, b: lb.dequantize_fp8(*lb.quantize_fp8(x, axis=None, bits=b, positive=True), axis=None)
)
_Q_INT4 = jax.jit(
    lambda x: lb.dequantize_int4(
        *lb.quantize_int4(x, axis=None, signed=False), x.shape, axis=None, signed=False
    )
)
_Q_RANK1 = jax.jit(lambda x: lb.dequantize_rank1(*lb.quantize_rank1(x), x.shape))
_Q_INT4_SR = jax.jit(
    lambda x, b: lb.dequantize_int4(
        *lb.quantize_int4(x, axis=None, signed=False, bits=b), x.shape, axis=None, signed=False
    )
)
_Q_RANK1_SR = jax.jit(lambda x, b: lb.dequantize_rank1(*lb.quantize_rank1(x, b), x.shape))


@given(
    seed=st.integers(0, 2**32 - 1),
    low=st.integers(-30, 0),
    span=st.integers(0, 45),
    zeros=st.floats(0.0, 0.9),
)
def test_second_moment_never_decodes_to_zero_where_positive(
    seed: int, low: int, span: int, zeros: float
) -> None:
    """Positive values over up to 45 decades (floored at 1e-30), some zeros: every codec of ``nu``
    decodes a positive value to a positive one and a zero to zero (blocks and rank-1 paths)."""
    rng = np.random.default_rng(seed)
    shape = (6, 160)  # blocks of 256 and 128 with a partial last one; rank-1 rows and columns
    nu = (10.0 ** rng.uniform(low, min(low + span, 30), shape)).astype(np.float32)
    nu[rng.random(shape) < zeros] = 0.0
    x = jnp.asarray(nu)
    bits = jax.random.bits(jax.random.key(seed % 2**31), shape, jnp.uint32)
    for name, dec in (
        ("fp8", _Q_FP8(x)),
        ("fp8 stochastic", _Q_FP8_SR(x, bits)),
        ("int4 blocks", _Q_INT4(x)),
        ("int4 rank-1", _Q_RANK1(x)),
        ("int4 blocks stochastic", _Q_INT4_SR(x, bits)),
        ("int4 rank-1 stochastic", _Q_RANK1_SR(x, bits)),
    ):
        dec = np.asarray(dec)
        assert np.all(dec[nu > 0] > 0), name
        assert np.all(np.isfinite(dec)) and np.all(dec >= 0), name
    assert np.all(np.asarray(_Q_FP8(x))[nu == 0] == 0)  # FP8 has a code for 0 (the 4-bit map not)


def test_flush_to_zero_mutant_fails_the_never_zero_check() -> None:
    """The same check on torchao's rounding (``positive=False``, a positive code may round to 0)."""
    nu = np.full((256,), 1e-6, np.float32)
    nu[0] = 1.0
    dec = np.asarray(lb.dequantize_fp8(*lb.quantize_fp8(jnp.asarray(nu), axis=None), axis=None))
    assert np.sum(dec[nu > 0] == 0) == 255


# --------------------------------------------------------------------------- jit == eager through rmsprop


@pytest.mark.slow  # ~15 s on 2 cores: eager compiles every primitive
def test_rmsprop_steps_jit_equal_disable_jit_bit_for_bit() -> None:
    """tests/lowbit_jit_eager_check.py, in a fresh process without fused multiply-adds and without
    the algebraic simplifier: every 4-bit and FP8 codec through ``rmsprop`` for 2 steps."""
    flags = "--xla_cpu_max_isa=AVX --xla_disable_hlo_passes=algsimp"
    report = _jit_eager_script(flags, "lowbit_jit_eager_check.py")
    assert report["configs"] == 2
    # nu, mu and momentum: int4 on a matrix (rank-1 nu), fp8 on a vector
    assert report["quantized"] == {"int4 centered momentum": 3, "fp8 centered momentum": 3}
    assert report["leaves"] > 0 and report["differing"] == [], report["differing"]
