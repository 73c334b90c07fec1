"""How each accumulator leaf is stored: a codec around :func:`rmsprop_jax._update.rms_leaf`.

``rms_leaf`` never sees a storage format. For each leaf the executor calls
:func:`step_leaf`, which decodes the stored accumulators to float32, runs
``rms_leaf`` and encodes the new accumulators:

========================  ==============================  ==========================================
codec                     stored as                       encode (after the step)
========================  ==============================  ==========================================
``Plain`` (default)       the accumulator dtype           ``rms_leaf``'s own cast (round to nearest)
``Stochastic``            bfloat16 / float16              stochastic rounding, counter-based hash
``Blockwise``             ``QuantizedLeaf(codes, absmax)``  :func:`~rmsprop_jax.quantize_blockwise`
========================  ==============================  ==========================================

The update itself is computed from the *unquantized* new accumulators (as
bitsandbytes does): quantization only affects what the next step reads back.
``Plain`` is the identity, so the float path compiles to exactly the program it
compiled to before codecs existed (bit-identical to optax in float32).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rmsprop_jax import _pallas_int8, _quantize
from rmsprop_jax._update import Flags, Scalars, rms_leaf

Array = jax.Array


class QuantizedLeaf(NamedTuple):
    """An 8-bit block-wise accumulator: ``codes`` (uint8, the parameter's shape) and
    ``absmax`` (float32, one per block). Decode with :func:`rmsprop_jax.dequantize_blockwise`
    (``block_size`` and ``axis`` as in the :class:`Blockwise` configuration that made it)."""

    codes: Array
    absmax: Array


@dataclasses.dataclass(frozen=True)
class Blockwise:
    """Configuration of 8-bit block-wise accumulators (``accumulator_dtype="int8"``).

    Attributes:
      block_size: elements per block, each with its own float32 ``absmax`` (bitsandbytes: 256).
      min_size: leaves with fewer elements keep float32 accumulators (bitsandbytes'
        ``min_8bit_size``: 4096). Their state is small and their statistics noisy.
      layout: ``"rows"``: blocks along the last axis, each row cut on its own (the last
        block of a row may be short), so that blocks never straddle shards of an array
        sharded along any leading axis (or along the last one in multiples of
        ``block_size``) and the update needs no communication; identical to
        bitsandbytes whenever the last dimension is a multiple of ``block_size``.
        ``"flat"``: blocks over the flattened leaf, bitsandbytes' layout exactly
        (:func:`rmsprop_jax.presets.bitsandbytes` uses it).
      signed: the signed dynamic map (bitsandbytes uses it for every state, the
        non-negative second moment included; the unsigned map would give it twice
        the resolution but is not what bitsandbytes stores).
      kernel: how an 8-bit leaf's step is compiled. ``"xla"``: the codec's decode,
        ``rms_leaf`` and encode as ordinary JAX code, fused by XLA as it can (portable;
        XLA cannot keep a block's new ``absmax`` on chip, so it makes several passes).
        ``"pallas"``: one Pallas kernel per leaf reads the gradient and the codes and writes
        the update and the new codes in a single pass (module ``rmsprop_jax._pallas_int8``);
        ``"pallas_state"``: the kernel writes only the new codes and the surrounding XLA
        program computes the update. Compiled by Triton on a GPU (H100, 256M-element leaf:
        1.15x the float32-state step instead of 1.25x, and 1.3x instead of 3.7x centered
        with momentum; 0.9x and 1.15x stepped with :func:`rmsprop_jax.update_and_apply`, which
        lets the kernel update the parameter itself; see the README), interpreted elsewhere
        (slow: for testing). Leaves
        whose blocks are not whole rows (a size, or with ``layout="rows"`` a last
        dimension, that is not a multiple of ``block_size``) and array weight-decay masks
        keep the XLA path. The codes equal ``"xla"``'s on the same device.
    """

    block_size: int = 256
    min_size: int = 4096
    layout: str = "rows"
    signed: bool = True
    kernel: str = "xla"

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise ValueError(f"block_size={self.block_size!r} is invalid; allowed: a positive integer.")
        if not isinstance(self.min_size, int) or isinstance(self.min_size, bool) or self.min_size < 0:
            raise ValueError(f"min_size={self.min_size!r} is invalid; allowed: an integer >= 0.")
        if self.layout not in ("rows", "flat"):
            raise ValueError(f"layout={self.layout!r} is invalid; allowed: 'rows' or 'flat'.")
        if self.kernel not in ("xla", "pallas", "pallas_state"):
            raise ValueError(
                f"kernel={self.kernel!r} is invalid; allowed: 'xla', 'pallas' or 'pallas_state'."
            )

    @property
    def axis(self) -> int | None:
        return -1 if self.layout == "rows" else None


@dataclasses.dataclass(frozen=True)
class Plain:
    """Stored as is; ``rms_leaf`` casts the new value to the stored dtype (round to nearest)."""

    def init(self, fill: Array) -> Array:
        return fill

    def decode(self, stored: Any) -> Any:
        return stored

    def encode(self, value: Array, bits: Any) -> Array:
        return value

    variance_floor = 0.0  # exact: the float path stays today's program


PLAIN = Plain()


@dataclasses.dataclass(frozen=True)
class Stochastic:
    """bfloat16/float16 storage, float32 arithmetic, stochastic rounding on the way back."""

    dtype: Any

    def init(self, fill: Array) -> Array:
        return fill.astype(self.dtype)

    def decode(self, stored: Array) -> Array:
        return stored.astype(jnp.float32)

    def encode(self, value: Array, bits: Array) -> Array:
        return _quantize.stochastic_round(value, self.dtype, bits)

    @property
    def variance_floor(self) -> float:
        return VARIANCE_FLOOR[jnp.dtype(self.dtype).name]


@dataclasses.dataclass(frozen=True)
class Quantized:
    """8-bit block-wise codes (see :class:`Blockwise`)."""

    config: Blockwise

    def init(self, fill: Array) -> QuantizedLeaf:
        return QuantizedLeaf(*self._quantize(fill))

    def decode(self, stored: QuantizedLeaf) -> Array:
        c = self.config
        return _quantize.dequantize_blockwise(
            stored.codes, stored.absmax, block_size=c.block_size, signed=c.signed, axis=c.axis
        )

    def encode(self, value: Array, bits: Any) -> QuantizedLeaf:
        return QuantizedLeaf(*self._quantize(value))

    @property
    def variance_floor(self) -> float:
        return VARIANCE_FLOOR["int8"]

    def _quantize(self, x: Array) -> tuple[Array, Array]:
        c = self.config
        return _quantize.quantize_blockwise(x, block_size=c.block_size, signed=c.signed, axis=c.axis)


Codec = Plain | Stochastic | Quantized

# The relative resolution c of each lossy storage, the floor of the centered variance:
# v = max(nu^ - |mu^|^2, c * nu^) (see rms_leaf). Below c * nu^ the difference is the
# rounding error of the stored nu and mu, not a variance: where the gradient's mean
# dominates its noise (var ~ 1 % of nu) it reaches 0 and the step becomes g / sqrt(eps),
# which made centered + momentum diverge on the noisy quadratic within ~100 steps.
# bfloat16/float16: one unit in the last place relative to the value (the bound on a
# stochastic rounding's error); int8: 2**-6, the dynamic map's spacing relative to the
# block's largest codes (measured relative round-trip error 1.4 % in [absmax/2, absmax]).
VARIANCE_FLOOR = {"bfloat16": 2.0**-7, "float16": 2.0**-10, "int8": 2.0**-6}


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedLeaf)


def _is_stored_quantized(x: Any) -> bool:
    return is_quantized(x) or (isinstance(x, Mapping) and set(x.keys()) == set(QuantizedLeaf._fields))


def restore_quantized(tree: Any) -> Any:
    """``tree`` with each ``{"codes": ..., "absmax": ...}`` mapping turned back into a ``QuantizedLeaf``.

    Flax NNX's ``nnx.Optimizer`` stores the state it gets back from ``update``
    through ``nnx.state``, which turns every NamedTuple below a Variable into an
    ``nnx.State`` mapping with the same field names; on the next step ``update``
    receives ``State(absmax=..., codes=...)`` where it returned a ``QuantizedLeaf``.
    """
    if tree is None:
        return None
    to_leaf = lambda x: x if is_quantized(x) else QuantizedLeaf(x["codes"], x["absmax"])
    return jax.tree.map(
        lambda x: to_leaf(x) if _is_stored_quantized(x) else x, tree, is_leaf=_is_stored_quantized
    )


def reject_quantized(state: Any, where: str) -> None:
    """Raise a clear ValueError if any accumulator of ``state`` is 8-bit (for the interop exports)."""
    if any(is_quantized(x) for x in jax.tree.leaves(state, is_leaf=is_quantized)):
        raise ValueError(
            f"{where}: the state holds 8-bit block-wise accumulators (accumulator_dtype='int8'), which "
            "the target framework's RMSprop cannot hold. Export from a float32-state optimizer, or "
            "decode the QuantizedLeaf nodes yourself with rmsprop_jax.dequantize_blockwise."
        )


def stored_shape(x: Any) -> tuple[int, ...]:
    return tuple(x.codes.shape) if is_quantized(x) else tuple(jnp.shape(x))


# --------------------------------------------------------------------------- choosing codecs


@dataclasses.dataclass(frozen=True)
class Storage:
    """The transformation's storage choice, resolved per leaf by :meth:`codec`.

    ``int8``: 8-bit block-wise (``blockwise``) for leaves of at least ``min_size``
    elements. ``stochastic``: stochastic rounding for bfloat16/float16 accumulators
    (``None``: automatic, i.e. on). ``seed``: the rounding hash's seed.
    """

    int8: bool = False
    blockwise: Blockwise = Blockwise()
    stochastic: bool | None = None
    seed: Any = 0  # an int, or an array under optax.inject_hyperparams

    @property
    def native_low_precision(self) -> bool:
        """Round to nearest with the arithmetic in the accumulators' own precision (optax)."""
        return self.stochastic is False

    def codec(self, shape: tuple[int, ...], dtype: Any) -> Codec:
        """The codec of a new accumulator of ``shape`` whose float dtype would be ``dtype``."""
        dt = jnp.dtype(dtype)
        big = math.prod(shape) >= max(self.blockwise.min_size, 1)
        if self.int8 and big and not jnp.issubdtype(dt, jnp.complexfloating):
            return Quantized(self.blockwise)
        return self._float_codec(dt)

    def codec_of(self, stored: Any) -> Codec:
        """The codec that produced a stored accumulator (read from its type and dtype)."""
        if is_quantized(stored):
            return Quantized(self.blockwise)
        return PLAIN if stored is None else self._float_codec(jnp.result_type(stored))

    def _float_codec(self, dt: Any) -> Codec:
        if self.stochastic is not False and dt in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return Stochastic(dt)
        return PLAIN


DEFAULT_STORAGE = Storage()


# --------------------------------------------------------------------------- the per-leaf step


def step_leaf(
    flags: Flags,
    s: Scalars,
    codecs: tuple[Codec, Codec, Codec],
    g: Array,
    p: Array | None,
    nu: Any,
    mu: Any,
    trace: Any,
    wd_on: bool | Array,
    rounding: Array | None = None,
    apply: bool = False,
) -> tuple[Array, Any, Any, Any]:
    """Decode the accumulators, :func:`rms_leaf`, encode them.

    ``rounding``: for stochastic rounding, this leaf's three uint32 keys (nu, mu, trace; a row
    of :func:`~rmsprop_jax._quantize.leaf_keys`), or ``None``.
    ``apply``: return the new parameter ``p + update`` (``optax.apply_updates``' arithmetic)
    instead of the update.
    """
    c_nu, c_mu, c_tr = codecs
    var_floor = max(c_nu.variance_floor, c_mu.variance_floor) if flags.centered else 0.0
    fused_config = _kernel_config(codecs, g, (nu, mu, trace), wd_on)
    if fused_config is not None:
        # One Pallas kernel decodes, steps and encodes (wd_on is a Python bool: _kernel_config).
        with_update = fused_config.kernel == "pallas"
        fused = _pallas_int8.fused_step(
            flags,
            s,
            fused_config,
            g,
            p,
            nu,
            mu,
            trace,
            bool(wd_on),
            var_floor,
            with_update=with_update,
            apply=apply and with_update,
        )
        if with_update:
            return fused  # type: ignore[return-value]
    decoded = (
        c_nu.decode(nu),
        None if mu is None else c_mu.decode(mu),
        None if trace is None else c_tr.decode(trace),
    )
    u, new_nu, new_mu, new_trace = rms_leaf(flags, s, g, p, *decoded, wd_on, var_floor)
    if apply:
        assert p is not None
        u = (p + u).astype(p.dtype)
    if fused_config is not None:  # "pallas_state": the update from this program, the state from the kernel
        return u, *fused[1:]

    def bits(i: int, x: Array) -> Any:
        if rounding is None:
            return None
        return _quantize.hash_bits(rounding[i], x.shape)

    return (
        u,
        c_nu.encode(new_nu, bits(0, new_nu)),
        None if new_mu is None else c_mu.encode(new_mu, bits(1, new_mu)),
        None if new_trace is None else c_tr.encode(new_trace, bits(2, new_trace)),
    )


def _kernel_config(
    codecs: tuple[Codec, Codec, Codec], g: Array, accs: tuple[Any, Any, Any], wd_on: Any
) -> Blockwise | None:
    """The ``Blockwise`` configuration if this leaf is stepped by the Pallas kernel, else ``None`` (XLA)."""
    present = [c for x, c in zip(accs, codecs, strict=True) if x is not None]
    if not present or not all(isinstance(c, Quantized) for c in present):
        return None
    config: Blockwise = present[0].config  # type: ignore[union-attr]  # one Storage: one config
    if config.kernel == "xla" or not isinstance(wd_on, bool):
        return None
    return config if _pallas_int8.eligible(tuple(g.shape), config.block_size, config.axis) else None
