"""4-bit and FP8 codecs against torchao 0.18 (CPU, live) and a float64 rank-1 reference.

torchao (``torchao.optim.subclass_4bit`` / ``subclass_fp8``) defines the block-wise schemes for
Adam: 4-bit signed dynamic map in blocks of 128 (first moment, momentum here) and FP8 e4m3 in
blocks of 256. Both are compared code for code and dequantized bit for bit. The second moment's
4-bit rank-1 path (lpmm's) is compared with ``tests/reference.py``. Each agreement check is also
run on a deliberately wrong variant, which must fail it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsprop_jax
from reference import rank1_4bit
from rmsprop_jax import _lowbit as lb

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
    # the scale max / 448: XLA's simplifier makes it max * (1/448), inexact (PyTorch divides), so
    # about half the blocks' scales are one ulp apart; never more
    our_scale = np.asarray(our_scale)
    np.testing.assert_array_max_ulp(our_scale, scale, maxulp=1)
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


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_rmsprop_steps_jit_equal_eager_centered_momentum(fmt: str) -> None:
    opt = rmsprop_jax.rmsprop(1e-2, centered=True, momentum=0.9, accumulator_dtype=fmt)
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
