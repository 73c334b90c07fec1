"""How one accumulator leaf is stored: codecs that encode and decode, and nothing else.

``rms_leaf`` never sees a storage format. The executor (:mod:`rmsprop_jax._executor`) decodes
each stored accumulator to float32 with its codec, runs ``rms_leaf`` and encodes the new
accumulators; a codec never chooses how that is compiled.

========================  ================================  ==========================================
codec                     stored as                         encode (after the step)
========================  ================================  ==========================================
``Plain``                 the accumulator dtype             ``rms_leaf``'s own cast (round to nearest)
``Stochastic``            bfloat16 / float16                stochastic rounding, counter-based hash
``Quantized``             :class:`QuantizedLeaf`            :func:`~rmsprop_jax.quantize_blockwise`
========================  ================================  ==========================================

The update itself is computed from the *unquantized* new accumulators (as bitsandbytes does):
quantization only affects what the next step reads back. ``Plain`` is the identity, so the
float path compiles to exactly the program it compiled to before codecs existed (bit-identical
to optax in float32). Which codec a leaf gets is its format's choice (:mod:`rmsprop_jax._formats`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rmsprop_jax import _lowbit, _quantize

Array = jax.Array


# the quantized kinds whose codes can round stochastically (int8 rounds to nearest only)
ROUNDED_KINDS = ("fp8", "int4")


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedLeaf:
    """A block-wise quantized accumulator: ``codes`` and ``absmax`` (the float32 scales), with the
    scheme it was made with as static data.

    A pytree node whose children are ``codes`` and ``absmax``; ``block_size``, ``signed``,
    ``layout``, ``kind`` and ``param_shape`` are its static aux data, so
    :func:`rmsprop_jax.decode` needs nothing else.

    ``kind``:

    * ``"int8"``: ``codes`` uint8 of the parameter's shape, ``absmax`` the block's max ``|x|``
      (bitsandbytes' scheme);
    * ``"fp8"``: ``codes`` float8_e4m3fn of the parameter's shape, ``absmax`` the block's scale
      ``max |x| / 448`` (torchao's scheme);
    * ``"int4"``: ``codes`` uint8 with two codes per byte along the last axis (shape
      ``(..., ceil(n / 2))``), ``absmax`` the block's max ``|x|``, or with ``layout="rank1"``
      the per-axis maxima concatenated (``sum(param_shape)`` values).

    ``layout``: ``"rows"`` (blocks along the last axis), ``"flat"`` (over the flattened leaf),
    ``"tiles"`` (2-D tiles over the last two axes, ``absmax`` of shape ``(..., ceil(R / th),
    ceil(C / tw))``) or ``"rank1"`` (4-bit second moment of rank >= 2).
    """

    codes: Array
    absmax: Array
    block_size: int = 256
    signed: bool = True
    layout: str = "rows"
    kind: str = "int8"
    param_shape: tuple[int, ...] | None = None

    @property
    def axis(self) -> _quantize.Axis:
        return _quantize.layout_axis(self.layout)

    @property
    def shape(self) -> tuple[int, ...]:
        """The parameter's shape."""
        return tuple(self.codes.shape) if self.param_shape is None else tuple(self.param_shape)


jax.tree_util.register_dataclass(
    QuantizedLeaf,
    data_fields=["codes", "absmax"],
    meta_fields=["block_size", "signed", "layout", "kind", "param_shape"],
)


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
    stochastic = False


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

    stochastic = True

    @property
    def variance_floor(self) -> float:
        return VARIANCE_FLOOR[jnp.dtype(self.dtype).name]


@dataclasses.dataclass(frozen=True)
class Nearest:
    """bfloat16/float16 storage, float32 arithmetic, rounded to nearest once on the way back."""

    dtype: Any

    def init(self, fill: Array) -> Array:
        return fill.astype(self.dtype)

    def decode(self, stored: Array) -> Array:
        return stored.astype(jnp.float32)

    def encode(self, value: Array, bits: Any) -> Array:
        return value.astype(self.dtype)

    stochastic = False

    @property
    def variance_floor(self) -> float:
        return VARIANCE_FLOOR[jnp.dtype(self.dtype).name]


@dataclasses.dataclass(frozen=True)
class Quantized:
    """Block-wise quantized codes: ``kind`` ``"int8"`` (bitsandbytes' dynamic map, code for code),
    ``"fp8"`` (torchao's block-scaled float8_e4m3fn) or ``"int4"`` (torchao's / lpmm's 4-bit maps;
    ``layout="rank1"``: lpmm's rank-1 normalized second moment), see :mod:`rmsprop_jax._lowbit`.

    ``rounding`` (fp8 and int4): ``"nearest"`` or ``"stochastic"``. ``shape``: the parameter's shape
    (4-bit codes are packed, so it is not theirs).
    """

    block_size: int = 256
    signed: bool = True
    layout: str = "rows"
    kind: str = "int8"
    rounding: str = "nearest"
    shape: tuple[int, ...] | None = None

    @property
    def axis(self) -> _quantize.Axis:
        return _quantize.layout_axis(self.layout)

    @property
    def stochastic(self) -> bool:
        """Whether ``encode`` takes random bits."""
        return self.kind in ROUNDED_KINDS and self.rounding == "stochastic"

    def init(self, fill: Array) -> QuantizedLeaf:
        return self.encode(fill, None)

    def decode(self, stored: QuantizedLeaf) -> Array:
        codes, scale, bs, axis = stored.codes, stored.absmax, self.block_size, self.axis
        if self.kind == "fp8":
            return _lowbit.dequantize_fp8(codes, scale, block_size=bs, axis=axis)
        if self.kind == "int4":
            shape = stored.shape
            if self.layout == "rank1":
                return _lowbit.dequantize_rank1(codes, scale, shape)
            return _lowbit.dequantize_int4(codes, scale, shape, block_size=bs, axis=axis, signed=self.signed)
        return _quantize.dequantize_blockwise(codes, scale, block_size=bs, signed=self.signed, axis=axis)

    def encode(self, value: Array, bits: Any) -> QuantizedLeaf:
        bs, axis = self.block_size, self.axis
        if self.kind == "fp8":
            codes, scale = _lowbit.quantize_fp8(
                value,
                block_size=bs,
                axis=axis,
                bits=bits if self.stochastic else None,
                positive=not self.signed,
            )
        elif self.kind == "int4" and self.layout == "rank1":
            codes, scale = _lowbit.quantize_rank1(value, bits if self.stochastic else None)
        elif self.kind == "int4":
            codes, scale = _lowbit.quantize_int4(
                value, block_size=bs, axis=axis, signed=self.signed, bits=bits if self.stochastic else None
            )
        else:
            codes, scale = _quantize.quantize_blockwise(value, block_size=bs, signed=self.signed, axis=axis)
        return self.leaf(codes, scale)

    def leaf(self, codes: Array, absmax: Array) -> QuantizedLeaf:
        shape = self.shape if self.kind == "int4" else None
        return QuantizedLeaf(codes, absmax, self.block_size, self.signed, self.layout, self.kind, shape)

    @property
    def variance_floor(self) -> float:
        return VARIANCE_FLOOR[self.kind]


def leaf_codec(leaf: QuantizedLeaf, rounding: str = "nearest") -> Quantized:
    """The codec that made ``leaf`` (its static data; ``rounding``: the format's, for fp8 and int4)."""
    return Quantized(
        leaf.block_size,
        leaf.signed,
        leaf.layout,
        leaf.kind,
        rounding if leaf.kind in ROUNDED_KINDS else "nearest",
        leaf.shape if leaf.kind == "int4" else None,
    )


Codec = Plain | Stochastic | Nearest | Quantized

# The floor c of the centered variance: v = max(nu^ - |mu^|^2, c * nu^) (see rms_leaf). Where
# the gradient's mean dominates its noise (var ~ 1 % of nu) the difference is within the rounding
# error of the stored nu and mu: unfloored it reaches 0 and the step becomes g / sqrt(eps), which
# made centered + momentum diverge on the noisy quadratic within ~100 steps. The floor therefore
# caps the step at |g| / sqrt(c * nu^), 1 / sqrt(c) times the uncentered step. bfloat16/float16:
# one unit in the last place relative to the value (the bound on a stochastic rounding's error).
# The block formats share int8's 2**-6 (a cap of 8x):
# the storage error of nu^ - |mu^|^2 (EMAs of a mean-dominated gradient stream, re-encoded every
# step, 8192 elements, steps 50-300) has 1st percentiles of -0.16 nu (int8), -0.31 (fp8, SR),
# -0.22 (fp8, nearest), -0.77 (int4): its tails pass every such floor, so c is a step cap, not a
# noise threshold. fp8 and int4 had 2**-4 and 2**-3 (their relative spacing): with float32 state
# those floors alone cost +48 % and +98 % final loss on the quick noisy quadratic (centered,
# momentum 0.9, 300 steps), most of fp8's +60 % and much of int4's +142 %.
VARIANCE_FLOOR = {"bfloat16": 2.0**-7, "float16": 2.0**-10, "int8": 2.0**-6, "fp8": 2.0**-6, "int4": 2.0**-6}


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedLeaf)


def _is_stored_quantized(x: Any) -> bool:
    return is_quantized(x) or (isinstance(x, Mapping) and set(x.keys()) == {"codes", "absmax"})


def restore_quantized(tree: Any, like: Any, codec_for: Any) -> Any:
    """``tree`` with each ``{"codes": ..., "absmax": ...}`` mapping turned back into a ``QuantizedLeaf``.

    Flax NNX's ``nnx.Optimizer`` stores the state it gets back from ``update`` through
    ``nnx.state``, which turns every pytree node below a Variable into an ``nnx.State`` mapping
    with the same keys; on the next step ``update`` receives ``State(absmax=..., codes=...)``
    where it returned a ``QuantizedLeaf``. The static scheme comes from the format:
    ``codec_for(shape, absmax_shape)`` is the codec of a parameter of ``shape`` (read from ``like``,
    the gradient tree, whose leaves have the parameters' shapes; 4-bit codes are packed) whose
    stored ``absmax`` has ``absmax_shape`` (which tells ``layout="auto"``'s rows from tiles).
    """
    if tree is None:
        return None
    stored = jax.tree.leaves(tree, is_leaf=_is_stored_quantized)
    if not any(_is_stored_quantized(x) and not is_quantized(x) for x in stored):
        return tree

    def back(g: Any, x: Any) -> Any:
        if _is_stored_quantized(x) and not is_quantized(x):
            return codec_for(tuple(jnp.shape(g)), tuple(jnp.shape(x["absmax"]))).leaf(x["codes"], x["absmax"])
        return x

    try:
        return jax.tree.map(back, like, tree)
    except (ValueError, TypeError):  # not the gradients' structure: the structure check reports it
        return tree


def as_received(received: Any, new: Any) -> Any:
    """``new`` with each ``QuantizedLeaf`` put back into the container its old value came in.

    Where ``update`` received an 8-bit leaf as a mapping (the ``nnx.State`` of Flax NNX, see
    :func:`restore_quantized`), it returns the new leaf as the same kind of mapping, so that
    wrappers that combine the incoming and the new inner state leaf by leaf
    (``optax.MultiSteps``, ``optax.apply_if_finite``) see one structure.
    """
    if received is None or new is None:
        return new

    def back(old: Any, leaf: Any) -> Any:
        if is_quantized(old) or not is_quantized(leaf):
            return leaf
        try:
            return type(old)({"absmax": leaf.absmax, "codes": leaf.codes})
        except TypeError:  # a mapping type that cannot be built from a dict: keep the leaf
            return leaf

    return jax.tree.map(back, received, new, is_leaf=_is_stored_quantized)


def partition_parts(tree: Any) -> Any:
    """``tree`` with each 8-bit leaf held in a Flax NNX Variable with partitioning metadata split
    into a ``QuantizedLeaf`` of two such Variables, each with a partitioning that fits its shape.

    ``tx.init`` receives ``nnx.state(model, wrt)``, whose parameters are ``nnx.Variable`` pytree
    nodes, so every state leaf comes back inside a copy of its parameter's Variable, metadata and
    all; ``nnx.Optimizer`` (``to_opt_state`` in ``flax/nnx/training/optimizer.py``) turns each into
    an ``OptVariable`` with that metadata, whose constructor shards the value by its
    ``out_sharding`` (``flax.core.spmd.shard_value``), as ``nnx.get_partition_spec`` and
    ``with_sharding_constraint`` do later. A parameter's spec applied to a ``QuantizedLeaf``
    reaches ``absmax`` too, whose shape is not the parameter's: ``P('a', 'b')`` on ``(256, 2)``
    raised. Here the outer Variable is replaced by a ``QuantizedLeaf`` of two Variables of the
    parameter's type: ``codes`` keeps the parameter's metadata, ``absmax`` the same with the
    ``out_sharding`` of :func:`absmax_sharding`. Values are not touched; without Flax, or
    without partitioning metadata, ``tree`` is returned as it is.
    """
    variable: Any = getattr(sys.modules.get("flax.nnx"), "Variable", None)
    if variable is None:  # Flax NNX not imported: no Variable can be in the tree
        return tree

    def split(v: Any) -> Any:
        leaf: Any = v.get_value() if isinstance(v, variable) else None
        sharding = v.get_metadata().get("out_sharding") if is_quantized(leaf) else None
        if not sharding:
            return v
        mesh = v.get_metadata().get("mesh")
        codes: Any = v.replace(leaf.codes, out_sharding=_codes_sharding(sharding, leaf, mesh))
        if leaf.layout == "rank1":  # the per-axis maxima: one small vector, replicated
            scales = _replicated_like(sharding, 1)
        else:
            scales = absmax_sharding(sharding, leaf.shape, leaf.block_size, leaf.axis, mesh)
        absmax: Any = v.replace(leaf.absmax, out_sharding=scales)
        return dataclasses.replace(leaf, codes=codes, absmax=absmax)

    return jax.tree.map(split, tree, is_leaf=lambda x: isinstance(x, variable))


def _replicated_like(sharding: Any, ndim: int) -> Any:
    """A partitioning of ``sharding``'s kind that replicates an array of ``ndim`` dimensions."""
    named = sharding if hasattr(sharding, "spec") and hasattr(sharding, "mesh") else None
    return _same_kind(sharding, named, (None,) * ndim)


def _codes_sharding(sharding: Any, leaf: QuantizedLeaf, mesh: Any) -> Any:
    """The parameter's partitioning for ``leaf.codes``; for packed 4-bit codes, whose last dimension
    is halved, the last axis' names are dropped where the halved dimension does not divide."""
    if leaf.kind != "int4" or tuple(leaf.codes.shape) == leaf.shape:
        return sharding
    named, entries, mesh, sizes = _spec_entries(sharding, len(leaf.shape), mesh)
    last = entries[-1]
    known = all(a in sizes for a in _quantize.mesh_axis_names(last))
    if last is not None and (not known or leaf.codes.shape[-1] % _quantize.shard_count(last, sizes)):
        entries = (*entries[:-1], None)
    return _same_kind(sharding, named, entries)


def _spec_entries(sharding: Any, ndim: int, mesh: Any) -> tuple[Any, tuple[Any, ...], Any, dict[Any, int]]:
    """``(named, entries, mesh, sizes)`` of a partitioning given as a tuple of mesh axis names, a
    ``PartitionSpec`` or a ``NamedSharding``: ``entries`` one per dimension, the mesh from the
    sharding, else ``mesh``, else the one in context (``jax.set_mesh``), and its axis sizes."""
    named = sharding if hasattr(sharding, "spec") and hasattr(sharding, "mesh") else None
    spec_in = named.spec if named is not None else (sharding,) if isinstance(sharding, str) else sharding
    entries = tuple(spec_in)[:ndim]
    entries += (None,) * (ndim - len(entries))
    mesh = named.mesh if named is not None else mesh
    if mesh is None:
        mesh = getattr(jax.sharding, "get_abstract_mesh", lambda: None)()
    return named, entries, mesh, dict(getattr(mesh, "shape", None) or {})


def _same_kind(sharding: Any, named: Any, spec: tuple[Any, ...]) -> Any:
    """``spec`` as a partitioning of ``sharding``'s kind (NamedSharding, PartitionSpec or tuple)."""
    if named is not None:
        return jax.sharding.NamedSharding(named.mesh, jax.sharding.PartitionSpec(*spec))
    return jax.sharding.PartitionSpec(*spec) if isinstance(sharding, jax.sharding.PartitionSpec) else spec


def absmax_sharding(
    sharding: Any, shape: tuple[int, ...], block_size: int, axis: _quantize.Axis, mesh: Any
) -> Any:
    """The partitioning of ``absmax`` for a parameter of ``shape`` partitioned as ``sharding`` (a
    tuple of mesh axis names, a ``PartitionSpec`` or a ``NamedSharding``), of the same kind.

    It always divides ``absmax``'s shape. On an ``AxisType.Explicit`` mesh it is the placement the
    quantizer gives ``absmax`` (:func:`rmsprop_jax._quantize.block_specs`: where the parameter's
    shards cut blocks, its last mesh axes move to a free leading axis), so the state keeps its
    type through the update. Otherwise ``absmax`` stays with its parameter's shards: ``"rows"``
    keeps the leading axes' names and the last one's where those shards hold whole blocks;
    ``"flat"`` takes the first axis's names where each row shard holds whole blocks (the blocks of
    those rows); ``"tiles"`` keeps the parameter's spec, less the last two axes' names whose shards
    do not hold whole tiles. The mesh comes from ``sharding``, the Variable's ``mesh`` or the one in context
    (``jax.set_mesh``); a name it does not hold (a logical axis name) is kept only on the leading
    axes of ``"rows"``, which are the parameter's own.
    """
    named, entries, mesh, sizes = _spec_entries(sharding, len(shape), mesh)

    names = _quantize.mesh_axis_names

    def devices(e: Any) -> int:
        return _quantize.shard_count(e, sizes)

    def whole_blocks(e: Any, n: int) -> bool:  # do the shards of n elements split by e hold whole blocks?
        return e is not None and all(a in sizes for a in names(e)) and n % (devices(e) * block_size) == 0

    known = all(a in sizes for e in entries for a in names(e))
    spec: tuple[Any, ...]
    if getattr(mesh, "are_all_axes_explicit", False) and known and any(names(e) for e in entries):
        spec = _quantize.block_specs(entries, shape, sizes, block_size, axis)[1][:-1]
    elif axis == _quantize.TILES and len(shape) > 1:  # tiles: the parameter's spec where shards hold them
        fit = _quantize.tile_fit(entries[-2:], shape[-2:], sizes, block_size) if known else (None, None)
        spec = (*entries[:-2], *fit)
    elif axis is not None and len(shape) > 1:
        spec = (*entries[:-1], entries[-1] if whole_blocks(entries[-1], shape[-1]) else None)
    else:
        first = entries[0] if entries else None
        fits = whole_blocks(first, math.prod(shape)) and shape[0] % devices(first) == 0
        spec = (first if fits else None,)
    return _same_kind(sharding, named, spec)


def reject_quantized(state: Any, where: str) -> None:
    """Raise a clear ValueError if any accumulator of ``state`` is quantized (for the interop exports)."""
    kinds = sorted({x.kind for x in jax.tree.leaves(state, is_leaf=is_quantized) if is_quantized(x)})
    if kinds:
        label = {"int8": "8-bit", "int4": "4-bit", "fp8": "FP8"}
        raise ValueError(
            f"{where}: the state holds {' and '.join(label[k] for k in kinds)} block-wise accumulators "
            f"(accumulator_dtype={' / '.join(repr(k) for k in kinds)}), which the target framework's "
            "RMSprop cannot hold. Export from a float32-state optimizer, or decode the QuantizedLeaf "
            "nodes yourself with rmsprop_jax.decode."
        )


def stored_shape(x: Any) -> tuple[int, ...]:
    return x.shape if is_quantized(x) else tuple(jnp.shape(x))


def decode(leaf: Any) -> jax.Array:
    """A stored accumulator leaf, in any format, as float32 of its parameter's shape.

    ``leaf`` is one leaf of ``state.nu``, ``state.mu`` or ``state.trace`` (for example
    ``optax.tree.get(state, "nu")["w"]``): a :class:`QuantizedLeaf` (8-bit) or a float array
    (float32, bfloat16, float16, float64). Complex accumulators (``mu`` and the momentum buffer
    of complex parameters) decode to complex64.

    Example:
      >>> import jax.numpy as jnp, optax, rmsprop_jax
      >>> opt = rmsprop_jax.rmsprop(0.1, accumulator_dtype="int8")
      >>> params = {"w": jnp.ones((64, 64))}
      >>> _, state = opt.update({"w": jnp.full((64, 64), 0.5)}, opt.init(params), params)
      >>> nu = rmsprop_jax.decode(optax.tree.get(state, "nu")["w"])
      >>> nu.shape, nu.dtype, round(float(nu[0, 0]), 4)
      ((64, 64), dtype('float32'), 0.025)
    """
    if is_quantized(leaf):
        return leaf_codec(leaf).decode(leaf)
    if isinstance(leaf, Mapping) and _is_stored_quantized(leaf):
        raise ValueError(
            "decode: this quantized leaf lost its layout (it went through a mapping, e.g. nnx.state); "
            "decode the state the optimizer's update returned, or rmsprop_jax.dequantize_blockwise "
            "with the format's block_size, signed and layout."
        )
    try:
        x = jnp.asarray(leaf)
    except TypeError:
        raise ValueError(
            f"decode: {type(leaf).__name__} is not a stored accumulator leaf; allowed: a leaf of "
            "state.nu / state.mu / state.trace (an array or a QuantizedLeaf)."
        ) from None
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise ValueError(f"decode: an accumulator leaf has a floating dtype, got {x.dtype}.")
    return x.astype(jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32)
