"""The storage formats a user passes as ``accumulator_dtype``, and which codec each leaf gets.

``accumulator_dtype`` is the only storage argument of :func:`rmsprop_jax.rmsprop`. It takes

* ``None``: each parameter's own dtype (``Float()``);
* a floating dtype: ``Float(dtype)`` (bfloat16 / float16 round stochastically by default);
* ``"int8"``: ``Int8()``, bitsandbytes' block-wise 8-bit state;
* a format value, :class:`Float` or :class:`Int8`, for every other choice.

A format is a small frozen value: it resolves, per leaf, to a codec of :mod:`rmsprop_jax._codecs`
(which only encodes and decodes) and chooses nothing about how the step is compiled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from rmsprop_jax import _validate
from rmsprop_jax._codecs import PLAIN, Codec, Nearest, Quantized, Stochastic

_LOW = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
ROUNDINGS = ("stochastic", "nearest", "optax")
LAYOUTS = ("rows", "flat")


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

    def codec(self, shape: tuple[int, ...], dtype: Any) -> Codec:
        """The codec of an accumulator of ``shape`` whose float dtype is ``dtype``."""
        dt = jnp.dtype(dtype)
        if dt not in _LOW or self.rounding == "optax":
            return PLAIN
        return Stochastic(dt) if self.rounding == "stochastic" else Nearest(dt)


@dataclasses.dataclass(frozen=True)
class Int8:
    """8-bit block-wise state (bitsandbytes' scheme); ``accumulator_dtype="int8"`` is ``Int8()``.

    Each accumulator of a large real leaf is a :class:`~rmsprop_jax.QuantizedLeaf`: one uint8 code
    per element and a float32 ``absmax`` per block, codes chosen code for code as bitsandbytes' CPU
    quantizer chooses them (about 1.02 bytes per element at ``block_size=256``). The step decodes
    to float32, computes the update from the new, unquantized accumulators, and quantizes them.

    Attributes:
      block_size: elements per block, each with its own float32 ``absmax`` (bitsandbytes: 256).
      min_size: leaves with fewer elements keep float32 accumulators (bitsandbytes'
        ``min_8bit_size``: 4096); complex leaves do too.
      layout: ``"rows"``: blocks along the last axis, each row cut on its own (the last block of a
        row may be short), so that blocks never straddle shards of an array sharded along a
        leading axis (or along the last one in multiples of ``block_size``) and the update needs
        no communication; equal to bitsandbytes whenever the last dimension is a multiple of
        ``block_size``. ``"flat"``: blocks over the flattened leaf, bitsandbytes' layout exactly
        (:func:`rmsprop_jax.presets.bitsandbytes` uses it).
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
    layout: str = "rows"
    signed: bool = True

    def __post_init__(self) -> None:
        _validate.integer("block_size", self.block_size, 1, None, "a positive integer (bitsandbytes: 256)")
        _validate.integer("min_size", self.min_size, 0, None, "an integer >= 0")
        _validate.choice("layout", self.layout, LAYOUTS)
        _validate.boolean("signed", self.signed)

    dtype = jnp.dtype(jnp.float32)  # of the accumulators that are not quantized
    native_arithmetic = False
    seed = 0

    @property
    def axis(self) -> int | None:
        return -1 if self.layout == "rows" else None

    def codec(self, shape: tuple[int, ...], dtype: Any) -> Codec:
        if math.prod(shape) >= max(self.min_size, 1) and not jnp.issubdtype(dtype, jnp.complexfloating):
            return Quantized(self.block_size, self.signed, self.layout)
        return PLAIN

    def quantized_codec(self) -> Quantized:
        return Quantized(self.block_size, self.signed, self.layout)


Format = Float | Int8

_ALLOWED = (
    "None, a floating dtype, 'int8', rmsprop_jax.Float(dtype, rounding=..., seed=...) or "
    "rmsprop_jax.Int8(block_size=..., min_size=..., layout=..., signed=...)"
)


def _float_dtype(name: str, dtype: Any) -> Any:
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"{name}={dtype!r} is not a dtype; allowed: {_ALLOWED}.") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{name}={dtype!r} is not a floating dtype; allowed: {_ALLOWED}.")
    return dt


def resolve(accumulator_dtype: Any) -> Format:
    """The format value an ``accumulator_dtype`` argument stands for (validated)."""
    if accumulator_dtype is None:
        return Float()
    if isinstance(accumulator_dtype, (Float, Int8)):
        return accumulator_dtype
    if isinstance(accumulator_dtype, str) and accumulator_dtype == "int8":
        return Int8()
    try:
        if jnp.dtype(accumulator_dtype) == jnp.dtype(jnp.int8):
            return Int8()
    except TypeError:
        pass
    return Float(_float_dtype("accumulator_dtype", accumulator_dtype))
