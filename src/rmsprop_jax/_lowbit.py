"""4-bit and FP8 block-wise codecs for optimizer state: pure functions, no RMSProp arithmetic.

**FP8** (torchao 0.18, ``torchao/optim/subclass_fp8.py``): each block of ``block_size`` elements
(256) stores ``scale = max(max |x|, 1e-12) / 448`` in float32 and every element as the
``float8_e4m3fn`` value of ``x / scale``, so the block's largest element maps to 448, e4m3's
largest finite value; the division is kept a division (:func:`_divisor_like`), so the scale is
torchao's bit for bit. Decoding is ``float32(code) * scale``. Both are elementwise arithmetic,
which a compiler fuses with the step (no table lookup, unlike the 8-bit map); the casts are done
on the bit patterns (:func:`fp8_to_float32`, ``_quantize.round_to_format``), bit for bit
the casts' results, because XLA:CPU converts float8 in software at several times their cost.
Rounding is to nearest (torchao's cast) or stochastic (``_quantize.stochastic_round``, unbiased:
e4m3 keeps 3 mantissa bits, so increments below ~6 % of a value are lost under round to
nearest). For a non-negative accumulator (the second moment) a positive value whose code rounds
to 0 keeps e4m3's smallest positive code (2**-9) instead: it never decodes to 0.

**4-bit** (Li et al. 2023, "Memory Efficient Optimizers with 4-bit States"; lpmm and torchao):
two codes per byte along the last axis (the first element of a pair in the high nibble, as
torchao packs them). Two maps of 16 values:

* signed (first moment, momentum): the dynamic-exponent map with 3 exponent bits
  (``create_dynamic_map(True, 3, 4)``: 0, +-1 and 13 values between), blocks of ``block_size``
  (128), each scaled by ``max(max |x|, 1e-12)`` -- torchao's ``OptimState4bit`` code for code;
* unsigned (second moment): the linear map without zero, ``linspace(0, 1, 17)[1:]`` (lpmm's
  ``power-1``; torchao 0.18's unsigned map too), so a positive value never decodes to 0 (the
  paper's zero-point problem). A leaf of rank >= 2 is normalized rank-1 (lpmm's ``rank1``): the
  element ``x[i, j, ...]`` is divided by the minimum over its axes of that axis' slice maximum,
  ``min(max_row_i, max_col_j, ...)``, whose vectors (``sum(shape)`` float32) are stored
  concatenated in place of per-block scales. Other ranks use blocks.

Under round to nearest a value is mapped to the nearest of the 16 (ties up), found as torchao's
``quantize_4bit_with_qmap`` finds it, with comparisons against the map's constants instead of
table reads (the same codes; XLA fuses comparisons, not gathers). Stochastic rounding (the
format's default) takes the same two neighbours and goes up with probability equal to the
value's fraction of the gap between them, ``u`` from the counter-based hash bits
(:func:`_quantize.uniform`): unbiased between the map's extremes; the zero-free map's codes
stay >= its smallest value.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rmsprop_jax import _quantize

Array = jax.Array
FP8 = jnp.dtype(jnp.float8_e4m3fn)
FP8_MAX = 448.0
_TINY = 1e-12  # torchao's clip of a block's maximum
_SMALLEST_FP8 = 2.0**-9  # e4m3fn's smallest positive (subnormal) value, bit pattern 0x01
_SMALLEST_FP8_BITS = 0x01


@functools.cache
def _map4_np(signed: bool) -> np.ndarray:
    out = _quantize._dynamic_map_np(True, 3, 4) if signed else _quantize._torch_linspace_f32(0, 1, 17)[1:]
    out = np.array(out, np.float32)
    out.flags.writeable = False
    return out


def int4_map(signed: bool) -> np.ndarray:
    """The 16 float32 values of a 4-bit map: signed dynamic (torchao/lpmm) or linear without zero."""
    return _map4_np(bool(signed)).copy()


def _is_linear(table: np.ndarray) -> bool:
    """Whether ``table`` is the zero-free linear map ``(i + 1) / 16`` (exactly, in float32)."""
    return bool(np.array_equal(table, (np.arange(16, dtype=np.float32) + 1) / 16))


def _select(table: np.ndarray, idx: Array) -> Array:
    """``table[idx]`` for an int32 ``idx`` in [0, 16): arithmetic for the linear map (exact: the
    values are multiples of 1/16), else a chain of selects (fusible, no gather)."""
    if _is_linear(table):
        return (idx + 1).astype(jnp.float32) * jnp.float32(1 / 16)
    out = jnp.full(idx.shape, table[0], jnp.float32)
    for i in range(1, len(table)):
        out = jnp.where(idx >= i, jnp.float32(table[i]), out)
    return out


def quantize4(v: Array, table: np.ndarray, bits: Array | None = None) -> Array:
    """Codes (int32) of normalized float32 ``v``: torchao's ``quantize_4bit_with_qmap``.

    Its binary search finds the largest ``c`` with ``v >= table[c]`` (0 if none); here that is the
    count of ``table[1:]`` at or below ``v``. Then ``c + 1`` where ``v - table[c]`` reaches half
    the gap to the next value.

    For the linear map the same codes come from arithmetic: ``t = 16 v`` is exact (a power of
    two), so is ``frac = t - floor(t)``, and the rule above is ``floor(t) - 1 + (frac >= 1/2)``
    clipped to [0, 15] (``v - table[c]`` is exact there, by Sterbenz's lemma); NaN gets 0.
    """
    u = None if bits is None else _quantize.uniform(bits)
    if _is_linear(table):
        t = v * jnp.float32(16)
        k = jnp.floor(t)
        go_up = (t - k >= jnp.float32(0.5)) if u is None else (t - k > u)
        idx = k.astype(jnp.int32) - 1 + go_up.astype(jnp.int32)
        return jnp.where(jnp.isnan(v), 0, jnp.clip(idx, 0, 15))
    # One comparison per map value; table[c] and table[c + 1] are selected by the same masks
    # (the table is sorted, so the last true mask is c).
    last = len(table) - 1
    c = jnp.zeros(v.shape, jnp.int32)
    down_v = jnp.full(v.shape, table[0], jnp.float32)
    up_v = jnp.full(v.shape, table[1], jnp.float32)
    for i in range(1, len(table)):
        m = v >= jnp.float32(table[i])
        c = c + m.astype(jnp.int32)
        down_v = jnp.where(m, jnp.float32(table[i]), down_v)
        up_v = jnp.where(m, jnp.float32(table[min(i + 1, last)]), up_v)
    up = jnp.minimum(c + 1, last)
    if u is not None:
        return jnp.where(v - down_v > (up_v - down_v) * u, up, c)
    return jnp.where(v - down_v >= (up_v - down_v) * jnp.float32(0.5), up, c)


_block_max = _quantize.block_max


def _divisor_like(m: Array, c: float) -> Array:
    """``c`` in every element of ``m``, as a divisor that XLA keeps a division by: ``m / c`` is then
    correctly rounded, as PyTorch's, and FP8's scale ``max / 448`` is torchao's bit for bit.

    XLA's algebraic simplifier rewrites ``a / broadcast(b)`` as ``a * broadcast(1 / b)`` (for any
    ``b``, a constant or not), and 1 / 448 is inexact: about half the blocks' scales came out one
    ulp off. ``jnp.full_like(m, c)`` behind an ``optimization_barrier`` is not enough: under
    ``vmap`` the fill is not batched, and the batched division broadcasts it after the barrier. So
    the divisor is computed from ``m`` itself (batched and sharded as ``m`` is):
    ``where(isfinite(m), m, 0) * 0`` is +0.0 for every ``m``, behind a barrier so that no later
    simplification can fold it back into a constant.
    """
    zero = jnp.where(jnp.isfinite(m), m, 0.0) * jnp.float32(0.0)
    return jax.lax.optimization_barrier(zero) + jnp.float32(c)


# --------------------------------------------------------------------------- packing two codes per byte


def _like(x: Array, shape: tuple[int, ...], spec_of: Array, extra: tuple[Any, ...] = ()) -> Array:
    """``x.reshape(shape)``; under explicit sharding, sharded as ``spec_of`` is (plus ``extra`` entries)."""
    sharding = _quantize.explicit_sharding(spec_of)
    if sharding is None:
        return x.reshape(shape)
    spec = (*tuple(sharding.spec) + (None,) * (spec_of.ndim - len(sharding.spec)), *extra)
    named = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return jnp.reshape(x, shape, out_sharding=named)


def pack(codes: Array) -> Array:
    """int codes in [0, 16) of shape ``(..., n)`` as uint8 ``(..., ceil(n / 2))``, high nibble first."""
    c = codes.astype(jnp.uint8)
    if c.ndim == 0:
        c = c.reshape(1)
    n = c.shape[-1]
    if n % 2:
        c = jnp.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, 1)])
    pairs = _like(c, (*c.shape[:-1], c.shape[-1] // 2, 2), c, (None,))
    return (pairs[..., 0] << 4) | pairs[..., 1]


def unpack(packed: Array, shape: tuple[int, ...]) -> Array:
    """:func:`pack` undone: int32 codes of ``shape``."""
    both = jnp.stack([packed >> 4, packed & jnp.uint8(15)], axis=-1).astype(jnp.int32)
    flat = _like(both, (*packed.shape[:-1], 2 * packed.shape[-1]), packed)
    n = shape[-1] if shape else 1
    out = flat if flat.shape[-1] == n else flat[..., :n]
    return out if shape else out.reshape(())


# --------------------------------------------------------------------------- block-wise, both formats


def _blockwise(
    x: Array, block_size: int, axis: _quantize.Axis, encode: Any, bits: Array | None = None
) -> Any:
    """``encode(blocks, bit_blocks, tiled)`` on ``x``'s blocks (:func:`rmsprop_jax._quantize._blocks`)
    -> (codes of ``x``'s shape, per-block scale)."""
    plan = _quantize._plan(x, block_size, axis)
    xb, n = _quantize._blocks(x.astype(jnp.float32), block_size, axis, plan)
    bb = None if bits is None else _quantize._blocks(bits, block_size, axis, plan)[0]
    tiled = isinstance(n, tuple)
    codes, scale = encode(xb, bb, tiled)
    return _quantize._unblock(codes, n, tuple(x.shape), plan), _quantize.block_scale(scale, tiled)


def _unblockwise(codes: Array, scale: Array, block_size: int, axis: _quantize.Axis, decode: Any) -> Array:
    plan = _quantize._plan(codes, block_size, axis)
    cb, n = _quantize._blocks(codes, block_size, axis, plan)
    scale = jnp.asarray(scale, jnp.float32)
    if plan is not None:
        scale = jax.sharding.reshard(scale, plan.sharding(plan.blocks[:-1]))
    scale = _quantize.per_block(scale, isinstance(n, tuple))
    return _quantize._unblock(decode(cb) * scale[..., None], n, tuple(codes.shape), plan)


def quantize_fp8(
    x: Array,
    *,
    block_size: int = 256,
    axis: _quantize.Axis = None,
    bits: Array | None = None,
    positive: bool = False,
) -> tuple[Array, Array]:
    """``(codes, scale)``: float8_e4m3fn codes of ``x``'s shape and a float32 scale per block.

    ``bits``: uint32 random bits of ``x``'s shape for stochastic rounding (``None``: round to
    nearest, torchao's ``quantize_fp8``). ``positive``: a positive value never gets code 0
    (the smallest positive code instead).
    """

    def encode(xb: Array, bb: Array | None, tiled: bool) -> tuple[Array, Array]:
        m = jnp.maximum(_block_max(xb, tiled), jnp.float32(_TINY))
        scale = m / _divisor_like(m, FP8_MAX)
        v = xb / scale[..., None]
        codes = _quantize.round_to_format(v, FP8, bb)  # bb None: to nearest, as astype
        if positive:  # on the bit patterns (a select of float8 values is done in float16 on CPU)
            u = jax.lax.bitcast_convert_type(codes, jnp.uint8)
            u = jnp.where((xb > 0) & (u == 0), jnp.uint8(_SMALLEST_FP8_BITS), u)
            codes = jax.lax.bitcast_convert_type(u, FP8)
        return codes, scale

    return _blockwise(x, block_size, axis, encode, bits)


def dequantize_fp8(
    codes: Array, scale: Array, *, block_size: int = 256, axis: _quantize.Axis = None
) -> Array:
    """``float32(codes) * scale`` per block: torchao's ``OptimStateFp8.dequantize``, bit for bit."""
    return _unblockwise(codes, scale, block_size, axis, fp8_to_float32)


def fp8_to_float32(codes: Array) -> Array:
    """``codes.astype(float32)`` for float8_e4m3fn codes, bit for bit, on the bit patterns.

    A normal code ``s eeee mmm`` is float32's ``s 0..0eeee mmm0..0`` times 2**120 (its exponent
    bias less e4m3's), i.e. the pattern shifted by 20 plus 120 in the exponent field; a subnormal
    one is ``mmm * 2**-9``; ``s 1111 111`` is NaN. Integer operations that XLA:CPU vectorizes,
    where its float8 conversion runs about 4x slower.
    """
    c = jax.lax.bitcast_convert_type(codes, jnp.uint8).astype(jnp.uint32)
    mag = c & jnp.uint32(0x7F)
    normal = jax.lax.bitcast_convert_type((mag << 20) + jnp.uint32(120 << 23), jnp.float32)
    sub = (mag & jnp.uint32(7)).astype(jnp.float32) * jnp.float32(_SMALLEST_FP8)
    v = jnp.where(mag < jnp.uint32(8), sub, jnp.where(mag == jnp.uint32(0x7F), jnp.float32(jnp.nan), normal))
    sign = (c & jnp.uint32(0x80)) << 24
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(v, jnp.uint32) | sign, jnp.float32)


def quantize_int4(
    x: Array,
    *,
    block_size: int = 128,
    axis: _quantize.Axis = None,
    signed: bool = True,
    bits: Array | None = None,
) -> tuple[Array, Array]:
    """``(packed codes, scale)``: block-wise 4-bit codes, two per byte, and ``max |x|`` per block."""
    table = _map4_np(bool(signed))

    def encode(xb: Array, bb: Array | None, tiled: bool) -> tuple[Array, Array]:
        if signed:  # torchao's scale, clipped, so that an all-zero block gets the code of 0
            scale = jnp.maximum(_block_max(xb, tiled), jnp.float32(_TINY))
            return quantize4(xb / scale[..., None], table, bb), scale
        # the zero-free map has no code for 0: an all-zero block keeps scale 0 and decodes to 0
        # exactly (as the rank-1 path does), so a fresh state is zero, not 1e-12 / 16
        scale = _block_max(xb, tiled)
        safe = jnp.where(scale > 0, scale, 1.0)[..., None]
        return quantize4(jnp.where(scale[..., None] > 0, xb / safe, 0.0), table, bb), scale

    codes, scale = _blockwise(x, block_size, axis, encode, bits)
    return pack(codes), scale


def dequantize_int4(
    packed: Array,
    scale: Array,
    shape: tuple[int, ...],
    *,
    block_size: int = 128,
    axis: _quantize.Axis = None,
    signed: bool = True,
) -> Array:
    """Block-wise 4-bit codes back to float32 of ``shape`` (torchao's ``dequant_with_qmap``, bit for bit)."""
    table = _map4_np(bool(signed))
    return _unblockwise(unpack(packed, shape), scale, block_size, axis, lambda cb: _select(table, cb))


# --------------------------------------------------------------------------- rank-1 (second moment)


def rank1_stats(x: Array) -> list[Array]:
    """For each axis ``d``, the maximum of ``|x|`` over every other axis (lpmm's ``get_sm3_statistics``)."""
    a = jnp.where(jnp.isnan(x), 0.0, jnp.abs(x.astype(jnp.float32)))
    stats = [jnp.max(a, axis=tuple(i for i in range(x.ndim) if i != d)) for d in range(x.ndim)]
    sharding = _quantize.explicit_sharding(x)
    if sharding is not None:  # a small replicated vector per axis (named: eager arrays have no mesh context)
        replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        stats = [jax.sharding.reshard(s, replicated) for s in stats]
    return stats


def _rank1_scale(stats: list[Array], ndim: int) -> Array:
    """``min_d stats[d]`` broadcast over the leaf (lpmm's ``_compute_sm3_scale_tensor``)."""
    out = None
    for d, s in enumerate(stats):
        b = s.reshape(tuple(-1 if i == d else 1 for i in range(ndim)))
        out = b if out is None else jnp.minimum(out, b)
    assert out is not None
    return out


def quantize_rank1(x: Array, bits: Array | None = None) -> tuple[Array, Array]:
    """``(packed codes, stats)``: rank-1 normalized 4-bit codes on the zero-free linear map, and the
    per-axis maxima concatenated (``sum(x.shape)`` float32). ``x`` is non-negative, of rank >= 2."""
    table = _map4_np(False)
    stats = rank1_stats(x)
    s = _rank1_scale(stats, x.ndim)
    v = x.astype(jnp.float32) / s
    codes = jnp.where(s > 0, quantize4(jnp.where(s > 0, v, 0.0), table, bits), 0)
    return pack(codes), jnp.concatenate(stats)


def dequantize_rank1(packed: Array, stats: Array, shape: tuple[int, ...]) -> Array:
    """:func:`quantize_rank1` undone: float32 of ``shape``."""
    table = _map4_np(False)
    bounds = np.cumsum([0, *shape])
    vectors = [stats[int(bounds[d]) : int(bounds[d + 1])] for d in range(len(shape))]
    return _select(table, unpack(packed, shape)) * _rank1_scale(vectors, len(shape))


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the uint8 codes of a 4-bit leaf of ``shape`` (two codes per byte along the last axis)."""
    shape = shape or (1,)
    return (*shape[:-1], -(-shape[-1] // 2))


def stats_size(shape: tuple[int, ...]) -> int:
    return int(math.fsum(shape))
