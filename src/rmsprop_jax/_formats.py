"""The storage formats a user passes as ``accumulator_dtype``, and which codec each leaf gets.

``accumulator_dtype`` is the only storage argument of :func:`rmsprop_jax.rmsprop`. It takes

* ``None``: each parameter's own dtype (``Float()``);
* a floating dtype: ``Float(dtype)`` (bfloat16 / float16 round stochastically by default);
* ``"int8"``: ``Int8()``, bitsandbytes' block-wise 8-bit state;
* ``"int4"``: ``Int4()``, 4-bit state (Li et al. 2023: rank-1 normalized second moment);
* ``"fp8"`` or ``jnp.float8_e4m3fn``: ``Fp8()``, block-scaled float8_e4m3fn state (torchao's);
* a format value, :class:`Float`, :class:`Int8`, :class:`Int4` or :class:`Fp8`, for every
  other choice.

A format is a small frozen value: it resolves, per leaf, to a codec of :mod:`rmsprop_jax._codecs`
(which only encodes and decodes) and chooses nothing about how the step is compiled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from rmsprop_jax import _quantize, _validate
from rmsprop_jax._codecs import PLAIN, Codec, Nearest, Quantized, Stochastic

_LOW = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
ROUNDINGS = ("stochastic", "nearest", "optax")
QUANTIZED_ROUNDINGS = ("stochastic", "nearest")
LAYOUTS = ("auto", "rows", "flat", "tiles")


@dataclasses.dataclass(frozen=True)
class Float:
    """Floating-point state: ``accumulator_dtype=Float(dtype, rounding=..., seed=...)``.

    Attributes:
      dtype: the accumulators' dtype (``jnp.float32``, ``jnp.bfloat16``, ``jnp.float16``,
        ``jnp.float64``), or ``None`` for each parameter's own dtype.
      rounding: how a 16-bit accumulator (bfloat16 / float16) is stored after each step;
        no effect on float32 / float64 state.
        ``"stochastic"`` (default): the arithmetic runs in float32 and the new value is
        rounded up with probability equal to the remainder (unbiased), so increments below
        half an ulp are not lost (with round to nearest a constant gradient leaves bfloat16
        ``nu`` stalled at 0.25 instead of ~1 at decay 0.999).
        ``"nearest"``: float32 arithmetic, rounded to nearest once when stored.
        ``"optax"``: optax's own arithmetic, every operation in the storage dtype rounded to
        nearest: bit for bit ``optax.rmsprop`` on bfloat16 parameters.
      seed: the stochastic rounding's seed, an integer in [0, 2**32): with the step count,
        leaf index and element index it fixes every rounding, so runs are reproducible.

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax
      >>> opt = rmsprop_jax.rmsprop(1e-3, accumulator_dtype=rmsprop_jax.Float(jnp.bfloat16, seed=7))
      >>> opt.init({"w": jnp.zeros(3)}).nu["w"].dtype
      dtype(bfloat16)
    """

    dtype: Any = None
    rounding: str = "stochastic"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype is not None:
            object.__setattr__(self, "dtype", _float_dtype("Float(dtype)", self.dtype))
        _validate.choice("rounding", self.rounding, ROUNDINGS)
        _validate.integer("seed", self.seed, 0, 2**32, "an integer in [0, 2**32)")

    @property
    def native_arithmetic(self) -> bool:
        """Whether ``rms_leaf`` computes in the accumulators' own dtype (``rounding="optax"``)."""
        return self.rounding == "optax"

    def codec(self, shape: tuple[int, ...], dtype: Any, role: str = "nu", like: Any = None) -> Codec:
        """The codec of an accumulator of ``shape`` whose float dtype is ``dtype`` (``role``:
        ``"nu"`` for the second moment, ``"acc"`` for the first moment and momentum; ``like``,
        its parameter, is for the quantized formats' layout)."""
        dt = jnp.dtype(dtype)
        if dt not in _LOW or self.rounding == "optax":
            return PLAIN
        return Stochastic(dt) if self.rounding == "stochastic" else Nearest(dt)


class _Blockwise:
    """What the quantized formats share: leaves of at least ``min_size`` real elements are stored
    as the codes of :meth:`quantized`, the rest as float32 with float32 arithmetic."""

    min_size: int
    dtype = jnp.dtype(jnp.float32)  # of the accumulators that are not quantized
    native_arithmetic = False
    seed = 0
    rounding = "nearest"

    def quantized(self, shape: tuple[int, ...], role: str, like: Any = None) -> Quantized:
        raise NotImplementedError

    def codec(self, shape: tuple[int, ...], dtype: Any, role: str = "nu", like: Any = None) -> Codec:
        """The codec of an accumulator of ``shape`` and float ``dtype`` (``role``: ``"nu"`` or
        ``"acc"``); ``like``: its parameter, whose sharding ``layout="auto"`` reads (``None``: unknown)."""
        if math.prod(shape) >= max(self.min_size, 1) and not jnp.issubdtype(dtype, jnp.complexfloating):
            return self.quantized(tuple(shape), role, like)
        return PLAIN


@dataclasses.dataclass(frozen=True)
class Int8(_Blockwise):
    """8-bit block-wise state (bitsandbytes' scheme); ``accumulator_dtype="int8"`` is ``Int8()``.

    Each accumulator of a large real leaf is a :class:`~rmsprop_jax.QuantizedLeaf`: one uint8 code
    per element and a float32 ``absmax`` per block, codes chosen code for code as bitsandbytes' CPU
    quantizer chooses them (about 1.02 bytes per element at ``block_size=256``). The step decodes
    to float32, computes the update from the new, unquantized accumulators, and quantizes them.

    Attributes:
      block_size: elements per block, each with its own float32 ``absmax`` (bitsandbytes: 256).
      min_size: leaves with fewer elements keep float32 accumulators (bitsandbytes'
        ``min_8bit_size``: 4096); complex leaves do too.
      layout: ``"auto"`` (default): ``"rows"``, unless the parameter's sharding as ``init`` sees it
        (a concrete or ``jax.ShapeDtypeStruct`` array's ``NamedSharding``, or its type under an
        ``AxisType.Explicit`` mesh; a tracer of an ``AxisType.Auto`` mesh shows none) splits the
        last axis into shards that cut row blocks and 2-D tiles fit its shards: then ``"tiles"``
        (where neither fits, ``init`` warns, naming the leaf); or unless the rows end in a partial
        block while the leaf is whole blocks, in a one-device process or where its known sharding
        splits only the first axis into whole blocks: then ``"flat"`` (a zero-padded partial
        block costs XLA:CPU a pass over memory and keeps the leaf from the fused GPU kernel). The
        layout is stored in each leaf.
        ``"rows"``: blocks along the last axis, each row cut on its own (the last block of a
        row may be short), so that blocks never straddle shards of an array sharded along a
        leading axis (or along the last one in multiples of ``block_size``) and the update needs
        no communication; equal to bitsandbytes whenever the last dimension is a multiple of
        ``block_size``. ``"flat"``: blocks over the flattened leaf, bitsandbytes' layout exactly
        (:func:`rmsprop_jax.presets.bitsandbytes` uses it). ``"tiles"``: a leaf of rank >= 2 in 2-D
        tiles of ``th x tw`` over its last two axes (``th`` the largest divisor of ``block_size`` not
        above its square root: 16 x 16 for 256), ``absmax`` of shape ``(..., ceil(R / th),
        ceil(C / tw))`` sharded like the parameter; tiles stay inside row, column and 2-D shards
        whose sizes are multiples of the tile, so tensor-parallel and 2-D meshes step with no
        collective; where shards cut tiles ``init`` warns, naming the leaf. Vectors use ``"rows"``.
      signed: the signed dynamic map (bitsandbytes uses it for every state, the non-negative
        second moment included); ``False``: the unsigned map (twice the resolution for ``nu``,
        not what bitsandbytes stores).

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax
      >>> fmt = rmsprop_jax.Int8(block_size=128, layout="flat")
      >>> leaf = rmsprop_jax.rmsprop(1e-3, accumulator_dtype=fmt).init({"w": jnp.zeros((64, 128))}).nu["w"]
      >>> leaf.codes.dtype, leaf.absmax.shape
      (dtype('uint8'), (64,))
    """

    block_size: int = 256
    min_size: int = 4096
    layout: str = "auto"
    signed: bool = True

    def __post_init__(self) -> None:
        _check_blocks(self, "bitsandbytes: 256")
        _validate.boolean("signed", self.signed)

    @property
    def axis(self) -> _quantize.Axis:
        return _quantize.layout_axis(self.layout)

    def quantized(self, shape: tuple[int, ...] = (), role: str = "nu", like: Any = None) -> Quantized:
        return Quantized(self.block_size, self.signed, leaf_layout(self.layout, shape, self.block_size, like))


def leaf_layout(layout: str, shape: tuple[int, ...], block_size: int, like: Any = None) -> str:
    """The layout a leaf of ``shape`` gets: ``"tiles"`` needs two axes (a vector's tiles are its
    rows); ``"auto"``: :func:`rmsprop_jax._quantize.auto_layout` (tiles where ``like``'s known
    sharding cuts row blocks and tiles fit its shards, flat where the rows end in a partial block
    but the leaf is whole blocks, else rows)."""
    if layout == "auto":
        return _quantize.auto_layout(tuple(shape), block_size, like)
    return "rows" if layout == "tiles" and len(shape) < 2 else layout


_BLOCK_LAYOUTS = ("rows", "flat", "tiles")


def stored_layout(codec: Codec, fmt: Any, shape: tuple[int, ...], absmax_shape: tuple[int, ...]) -> Codec:
    """``codec`` (of a parameter of ``shape``) with the layout ``layout="auto"`` gave a stored leaf
    whose ``absmax`` has ``absmax_shape``: a leaf that lost its metadata (through ``nnx.state``)
    keeps its arrays, and ``auto``'s choice can depend on a sharding that ``update`` does not see
    (or on the version that wrote the state), but each layout's ``absmax`` has its own shape:
    rows' ``(..., R, ceil(C / b))``, flat's ``(ceil(size / b),)``, tiles' ``(..., ceil(R / th),
    ceil(C / tw))``. ``codec``'s own layout is kept wherever its shape matches."""
    if not isinstance(codec, Quantized) or getattr(fmt, "layout", None) != "auto":
        return codec
    if codec.layout not in _BLOCK_LAYOUTS or len(shape) < 2:
        return codec
    for layout in (codec.layout, *_BLOCK_LAYOUTS):
        candidate = dataclasses.replace(codec, layout=layout)
        if tuple(absmax_shape) == _quantize.absmax_shape(shape, codec.block_size, candidate.axis):
            return candidate
    return codec


def _check_blocks(fmt: Any, paper: str) -> None:
    _validate.integer("block_size", fmt.block_size, 1, None, f"a positive integer ({paper})")
    _validate.integer("min_size", fmt.min_size, 0, None, "an integer >= 0")
    _validate.choice("layout", fmt.layout, LAYOUTS)


@dataclasses.dataclass(frozen=True)
class Int4(_Blockwise):
    """4-bit state (Li et al. 2023, "Memory Efficient Optimizers with 4-bit States"; the
    ``lpmm`` reference's second-moment configuration); ``accumulator_dtype="int4"`` is ``Int4()``.

    Two 4-bit codes per byte (about 0.52 bytes per element of ``nu``):

    * the second moment ``nu`` on the linear map without zero, ``linspace(0, 1, 17)[1:]``, so a
      positive value never decodes to 0 (a zero second moment makes ``g / sqrt(nu + eps)``
      explode: the paper's "zero-point problem"); a leaf of rank >= 2 is normalized rank-1
      (``rank1=True``): each element is divided by ``min`` over its axes of that axis' slice
      maximum, whose vectors (``sum(shape)`` float32 values) replace per-block scales; other
      leaves in blocks of ``block_size``;
    * the first moment (``centered=True``) and the momentum buffer on the signed
      dynamic-exponent 4-bit map in blocks of ``block_size``, each scaled by its max ``|x|``
      (torchao's ``OptimState4bit``, code for code).

    Attributes:
      block_size: elements per block (lpmm and torchao: 128).
      min_size: leaves with fewer elements keep float32 accumulators (lpmm: 4096); complex
        leaves do too.
      layout: the blocks' layout, as :class:`Int8`'s (``"auto"``, ``"rows"``, ``"flat"`` or ``"tiles"``).
      rank1: rank-1 normalization of the second moment of matrices (``False``: blocks).
      rounding: ``"stochastic"`` (default): each value goes to one of its two neighbouring map
        values with probabilities that make the code unbiased (a ``nu`` below the map's smallest
        value ``1/16`` of its scale keeps that code); ``"nearest"``: lpmm's ``real-nearest`` and
        torchao's rounding, code for code. With 16 levels a momentum buffer rounded to nearest
        loses every change smaller than half a level: on the noisy quadratic (centered, momentum
        0.9) nearest ends 8.8 % above float32 state, stochastic 0.2 % below it.
      seed: the stochastic rounding's seed, an integer in [0, 2**32).

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax
      >>> leaf = rmsprop_jax.rmsprop(1e-3, accumulator_dtype="int4").init({"w": jnp.zeros((64, 128))}).nu["w"]
      >>> leaf.codes.shape, leaf.absmax.shape, leaf.shape
      ((64, 64), (192,), (64, 128))
    """

    block_size: int = 128
    min_size: int = 4096
    layout: str = "auto"
    rank1: bool = True
    rounding: str = "stochastic"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_blocks(self, "lpmm and torchao: 128")
        _validate.boolean("rank1", self.rank1)
        _validate.choice("rounding", self.rounding, QUANTIZED_ROUNDINGS)
        _validate.integer("seed", self.seed, 0, 2**32, "an integer in [0, 2**32)")

    def quantized(self, shape: tuple[int, ...], role: str, like: Any = None) -> Quantized:
        signed = role != "nu"
        if not signed and self.rank1 and len(shape) >= 2:
            layout = "rank1"
        else:
            layout = leaf_layout(self.layout, shape, self.block_size, like)
        return Quantized(self.block_size, signed, layout, "int4", self.rounding, tuple(shape))


@dataclasses.dataclass(frozen=True)
class Fp8(_Blockwise):
    """Block-scaled float8_e4m3fn state (torchao's ``OptimStateFp8``); ``accumulator_dtype="fp8"``
    (or ``jnp.float8_e4m3fn``) is ``Fp8()``.

    Each block of ``block_size`` elements stores a float32 scale ``max |x| / 448`` and every
    element as the float8_e4m3fn value of ``x / scale`` (about 1.02 bytes per element). Encoding
    and decoding are elementwise arithmetic, which compilers fuse with the step (the 8-bit
    format's table lookups do not fuse on CPU). A positive second moment never decodes to 0: where
    its code would round to 0 it keeps e4m3's smallest positive code.

    Attributes:
      block_size: elements per block (torchao: 256).
      min_size: leaves with fewer elements keep float32 accumulators (torchao: 4096).
      layout: the blocks' layout, as :class:`Int8`'s (``"auto"``, ``"rows"``, ``"flat"`` or ``"tiles"``).
      rounding: ``"stochastic"`` (default): rounded up with probability equal to the remainder
        (unbiased; e4m3 keeps 3 mantissa bits, so under round to nearest an accumulator stalls
        once its per-step change falls below ~6 % of its value); ``"nearest"``: torchao's cast.
      seed: the stochastic rounding's seed, an integer in [0, 2**32).

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax
      >>> opt = rmsprop_jax.rmsprop(1e-3, decay=0.75, accumulator_dtype="fp8")
      >>> grads = {"w": jnp.ones((64, 256))}
      >>> leaf = opt.update(grads, opt.init(grads))[1].nu["w"]  # nu = 0.25 * 1**2
      >>> leaf.codes.dtype, leaf.absmax.shape, float(rmsprop_jax.decode(leaf)[0, 0])
      (dtype(float8_e4m3fn), (64, 1), 0.25)
    """

    block_size: int = 256
    min_size: int = 4096
    layout: str = "auto"
    rounding: str = "stochastic"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_blocks(self, "torchao: 256")
        _validate.choice("rounding", self.rounding, QUANTIZED_ROUNDINGS)
        _validate.integer("seed", self.seed, 0, 2**32, "an integer in [0, 2**32)")

    def quantized(self, shape: tuple[int, ...], role: str, like: Any = None) -> Quantized:
        layout = leaf_layout(self.layout, shape, self.block_size, like)
        return Quantized(self.block_size, role != "nu", layout, "fp8", self.rounding)


Format = Float | Int8 | Int4 | Fp8

_ALLOWED = (
    "None, a floating dtype, 'int8', 'int4', 'fp8', rmsprop_jax.Float(dtype, rounding=..., seed=...), "
    "rmsprop_jax.Int8(block_size=..., min_size=..., layout=..., signed=...), "
    "rmsprop_jax.Int4(block_size=..., min_size=..., layout=..., rank1=..., rounding=..., seed=...) or "
    "rmsprop_jax.Fp8(block_size=..., min_size=..., layout=..., rounding=..., seed=...)"
)
_NAMED = {"int8": Int8, "int4": Int4, "fp8": Fp8}


def is_quantized_format(fmt: Any) -> bool:
    """Whether ``fmt`` stores large leaves as codes (:class:`Int8`, :class:`Int4`, :class:`Fp8`)."""
    return isinstance(fmt, _Blockwise)


def _float_dtype(name: str, dtype: Any) -> Any:
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"{name}={dtype!r} is not a dtype; allowed: {_ALLOWED}.") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{name}={dtype!r} is not a floating dtype; allowed: {_ALLOWED}.")
    if dt.itemsize < 2:  # float8 variants: arithmetic state in them is the Fp8 format's job
        raise ValueError(
            f"{name}={dtype!r}: 1-byte floats are stored block-scaled; use accumulator_dtype='fp8' "
            f"(float8_e4m3fn, rmsprop_jax.Fp8). Allowed: {_ALLOWED}."
        )
    return dt


def resolve(accumulator_dtype: Any) -> Format:
    """The format value an ``accumulator_dtype`` argument stands for (validated)."""
    if accumulator_dtype is None:
        return Float()
    if isinstance(accumulator_dtype, (Float, Int8, Int4, Fp8)):
        return accumulator_dtype
    if isinstance(accumulator_dtype, str) and accumulator_dtype in _NAMED:
        return _NAMED[accumulator_dtype]()
    try:
        dt = jnp.dtype(accumulator_dtype)
    except TypeError:
        dt = None
    if dt == jnp.dtype(jnp.int8):
        return Int8()
    if dt == jnp.dtype(jnp.int4):
        return Int4()
    if dt == jnp.dtype(jnp.float8_e4m3fn):
        return Fp8()
    return Float(_float_dtype("accumulator_dtype", accumulator_dtype))
