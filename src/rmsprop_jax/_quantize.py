"""Storage codecs for optimizer state: pure functions, no RMSProp arithmetic here.

Two families:

**8-bit block-wise dynamic quantization** (Dettmers et al., 2022, "8-bit Optimizers
via Block-wise Quantization"), reproducing bitsandbytes 0.50.2 exactly:

* :func:`create_dynamic_map` is ``bitsandbytes.functional.create_dynamic_map``: 256
  float32 values in [-1, 1] (signed) or [0, 1] (unsigned), a dynamic exponent
  (powers of ten from 1e-6 to 1) followed by a linear fraction.
* :func:`quantize_blockwise` cuts the tensor into blocks of ``block_size`` elements,
  stores ``absmax = max |x|`` per block in float32 and, for every element, one byte:
  the index of a code of the map. The index is chosen as bitsandbytes' CPU kernel
  (``csrc/cpu_ops.cpp``, ``quantize_cpu_impl``) chooses it, which is **not** plain
  nearest-code rounding: the normalised value ``v = x * (1 / absmax)`` is first
  snapped to one of 65536 equally spaced points of [-1, 1],

      k = uint16((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5)          (truncation)
      t_k = -1 + 2 k / 65535,

  and the code is the map entry nearest to ``t_k`` (a precomputed 65536-entry table,
  ties to the lower code). Since ``t_k`` is never exactly 0 (65535 is odd), zero and
  every ``|v| < ~2.3e-5`` land on code 131 of the signed map (``+2.125e-5``), never on
  the exact zero (code 127): **a non-negative value never decodes to 0 unless its
  whole block is 0.** A second-moment estimate stored this way therefore keeps a
  floor of ``2.125e-5 * absmax`` and the next step can never become ``g / eps``.
  An all-zero block stores ``absmax = 0`` and codes 0 and decodes to (-)0.
* :func:`dequantize_blockwise` is ``code[c] * absmax`` in float32, bit for bit.

Blocks run over the flattened tensor (``axis=None``, bitsandbytes' layout) or along
the last axis (``axis=-1``: each row is cut into blocks of its own, the last one
short), or as 2-D tiles over the last two axes (``axis=TILES``, ``(-2, -1)``: a tile of
``th x tw`` elements, :func:`tile_shape`, 16 x 16 for blocks of 256; tiles at the bottom and
right edges short). The first two agree whenever the last dimension is a multiple of
``block_size``; the per-row layout never lets a block straddle rows, so a row-sharded (or
column-sharded with shard widths that are multiples of the block) array can be
quantized shard by shard with no communication. Tiles never straddle shards whose heights
and widths are multiples of the tile's (16 for blocks of 256): row, column and 2-D
shardings alike. Under explicit sharding (``jax.set_mesh``
with an ``AxisType.Explicit`` mesh) every reshape states its output's sharding, and where
shards would cut blocks the array is resharded first (:func:`_plan`); without sharding in
the types the program is the one it always was.

**Stochastic rounding** of float32 to bfloat16 or float16 (:func:`stochastic_round`):
each value goes to one of its two neighbours in the target format, up (away from
zero) with probability equal to the discarded remainder, so ``E[round(x)] = x``
exactly. The random bits come from :func:`hash_bits`, a counter-based integer hash
of (element index, step, leaf index, seed): deterministic for a seed, no PRNG key
to thread through the state, no communication under sharding. The rounding is pure
integer arithmetic on the float32 bit pattern (so it is exact, independent of the
FPU's flush-to-zero mode, and correct for subnormal targets, overflow to inf, inf
and NaN).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# --------------------------------------------------------------------------- the dynamic map


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU, bit for bit.

    PyTorch casts the ends to float32, divides their float32 difference in double and fills the first
    half as ``start + i * step`` and the second half as ``end - (steps - 1 - i) * step``
    (symmetric, so both ends are exact), rounding each value once to float32.
    """
    start64, end64 = float(np.float32(start)), float(np.float32(end))
    step = float(np.float32(end) - np.float32(start)) / (steps - 1)
    half = steps // 2
    vals = [start64 + i * step if i < half else end64 - (steps - 1 - i) * step for i in range(steps)]
    return np.array(vals, dtype=np.float32)


@functools.cache
def _dynamic_map_np(signed: bool, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    data: list[float] = []
    i = 0
    for i in range(max_exponent_bits):
        exponent = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        boundaries = _torch_linspace_f32(0.1, 1, int(2**exponent + 1))
        means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
        scale = np.float32(10 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    if additional_items > 0:
        boundaries = _torch_linspace_f32(0.1, 1, additional_items + 1)
        means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
        scale = np.float32(10 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    out = np.array(sorted(data), dtype=np.float32)
    out.flags.writeable = False
    return out


def create_dynamic_map(signed: bool = True) -> np.ndarray:
    """bitsandbytes' 8-bit dynamic quantization map (``create_dynamic_map``), as float32.

    Signed: 127 negative values, 0, and 128 positive values up to 1.0 (sorted).
    Unsigned: 0, 254 positive values and 1.0 (plus one duplicate 0 at the bottom).
    """
    return _dynamic_map_np(bool(signed)).copy()


@functools.cache
def _lut_np(signed: bool) -> np.ndarray:
    """The CPU kernel's 65536-entry table: point ``t_k = -1 + 2k/65535`` -> nearest code.

    ``build_quantize_lut`` in ``csrc/cpu_ops.cpp``: midpoints ``0.5 * (c[i] + c[i+1])``
    in float32; a point gets the first code whose upper midpoint is not below it.
    """
    code = _dynamic_map_np(signed)
    midpoints = np.float32(0.5) * (code[:-1] + code[1:])
    k = np.arange(65536, dtype=np.float32)
    points = np.float32(-1.0) + (np.float32(2.0) * k) / np.float32(65535)
    # code_idx advances while midpoints[code_idx] < point: the number of midpoints below it.
    lut = np.searchsorted(midpoints, points, side="left").astype(np.uint8)
    lut.flags.writeable = False
    return lut


# --------------------------------------------------------------------------- block layout

TILES = (-2, -1)
"""The ``axis`` of the 2-D tile layout: blocks are tiles over the last two axes."""

Axis = int | tuple[int, int] | None


def layout_axis(layout: str) -> Axis:
    """The quantizer's ``axis`` for a layout name: ``"flat"`` None, ``"tiles"`` TILES, else -1."""
    return None if layout == "flat" else TILES if layout == "tiles" else -1


def tile_shape(block_size: int) -> tuple[int, int]:
    """``(th, tw)`` of the tiles of ``block_size`` elements: ``th`` the largest divisor of
    ``block_size`` not above its square root (256: 16 x 16; 128: 8 x 16; 64: 8 x 8)."""
    th = max(d for d in range(1, math.isqrt(block_size) + 1) if block_size % d == 0)
    return th, block_size // th


def _is_tiles(axis: Axis, ndim: int) -> bool:
    if isinstance(axis, tuple):
        if axis != TILES:
            raise ValueError(f"axis={axis!r} is not supported; allowed: None, -1 or (-2, -1) (tiles).")
        return ndim >= 2
    return False


def _blocks(
    x: Array, block_size: int, axis: Axis, plan: _Plan | None = None
) -> tuple[Array, int | tuple[int, int]]:
    """``x`` as ``(..., n_blocks, block_size)``, zero-padded; returns it and the padded length.

    Tiles (``axis=TILES``, rank >= 2): ``(..., n_tile_rows, th, n_tile_cols, tw)``, a view of ``x``
    in its own layout (no transpose: a tile is the pair of axes ``(-3, -1)``, :func:`block_max`),
    and ``(rows, cols)`` in place of the length.

    ``plan``: under explicit sharding (:func:`_plan`), ``x`` is resharded to ``plan.work`` and
    every reshape states its output's sharding; ``None``: the program without sharding types.
    """
    if plan is not None:
        x = jax.sharding.reshard(x, plan.sharding(plan.work))
    if _is_tiles(axis, x.ndim):
        return _tiles(x, block_size, plan), tuple(x.shape[-2:])  # type: ignore[return-value]
    if isinstance(axis, tuple):  # tiles of a vector or scalar: its rows
        axis = -1
    if axis is None:
        x = _reshape(x, (x.size,), plan, plan and plan.blocks[:1])
    elif axis not in (-1, x.ndim - 1):
        raise ValueError(f"axis={axis!r} is not supported; allowed: None (flattened) or -1 (last axis).")
    if x.ndim == 0:
        x = x.reshape(1)
    n = x.shape[-1]
    nb = -(-n // block_size)
    pad = nb * block_size - n
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return _reshape(x, (*x.shape[:-1], nb, block_size), plan, plan and plan.blocks), n


def _tiles(x: Array, block_size: int, plan: _Plan | None) -> Array:
    """``(..., R, C)`` zero-padded as ``(..., ceil(R / th), th, ceil(C / tw), tw)``, no transpose."""
    th, tw = tile_shape(block_size)
    *lead, r, c = x.shape
    nr, nc = -(-r // th), -(-c // tw)
    if nr * th - r or nc * tw - c:
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, nr * th - r), (0, nc * tw - c)])
    return _reshape(x, (*lead, nr, th, nc, tw), plan, plan and _tile_spec(plan.blocks))


def _tile_spec(blocks: tuple[Any, ...]) -> tuple[Any, ...]:
    """The spec of the tiles ``(..., nr, th, nc, tw)`` from ``blocks`` (``blocks[:-1]``: ``absmax``'s)."""
    return (*blocks[:-3], blocks[-3], None, blocks[-2], None)


def block_max(xb: Array, tiled: bool = False) -> Array:
    """``max |x|`` per block of :func:`_blocks`' view, NaN counted as 0: over the last axis, or for
    tiles over ``(-3, -1)``, kept as ``(..., nr, 1, nc)`` so that ``m[..., None]`` broadcasts over
    the tiles as over blocks (:func:`block_scale` gives ``absmax``'s ``(..., nr, nc)``).

    Written so that XLA:CPU fuses it with the computation of ``xb`` instead of writing ``xb`` to a
    temporary (for a 16M-element leaf, a fresh 64 MB buffer every step): the magnitudes' float32
    bit patterns, whose unsigned order is the order of non-negative floats, are maxed elementwise
    over slices of each block (an 8-way elementwise chain, which fuses with its producer), and only
    the remaining ``block_size / 8`` columns are reduced. A float ``max`` reduction over the whole
    block is instead taken by XLA:CPU's library fusion, which reads a materialized input.
    """
    a = jnp.where(jnp.isnan(xb), 0.0, jnp.abs(xb)).astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
    if tiled:  # (..., nr, th, nc, tw): the chain over groups of th's rows, then the rest reduced
        th = bits.shape[-3]
        k = _MAX_CHAIN if th % _MAX_CHAIN == 0 else 1
        z = bits.reshape(*bits.shape[:-3], k, th // k, *bits.shape[-2:])
        acc = functools.reduce(jnp.maximum, [z[..., i, :, :, :] for i in range(k)])
        m = jnp.max(acc, axis=(-3, -1), keepdims=True)[..., 0]
    else:
        b = bits.shape[-1]
        k = _MAX_CHAIN if b % _MAX_CHAIN == 0 else 1
        z = bits.reshape(*bits.shape[:-1], k, b // k)
        m = jnp.max(functools.reduce(jnp.maximum, [z[..., i, :] for i in range(k)]), axis=-1)
    return jax.lax.bitcast_convert_type(m, jnp.float32)


_MAX_CHAIN = 8  # block_max's elementwise chain length (8: fused on XLA:CPU, 4 and 16 were not)


def block_scale(m: Array, tiled: bool) -> Array:
    """A per-block array of :func:`block_max`'s shape as ``absmax``'s (tiles: the kept axis dropped)."""
    return m[..., 0, :] if tiled else m


def per_block(scale: Array, tiled: bool) -> Array:
    """:func:`block_scale` undone: ``absmax`` shaped so that ``scale[..., None]`` broadcasts over blocks."""
    return scale[..., None, :] if tiled else scale


def _unblock(xb: Array, n: int | tuple[int, int], shape: tuple[int, ...], plan: _Plan | None) -> Array:
    """:func:`_blocks` undone: the blocks (or tiles) back to ``shape`` (and its sharding)."""
    if isinstance(n, tuple):  # tiles
        (r, c), (*lead, nr, th, nc, tw) = n, xb.shape
        x = _reshape(xb, (*lead, nr * th, nc * tw), plan, plan and plan.work)
        x = x if (nr * th, nc * tw) == (r, c) else x[..., :r, :c]
    else:
        x = _reshape(xb, (*xb.shape[:-2], xb.shape[-2] * xb.shape[-1]), plan, plan and plan.blocks[:-1])
        x = _reshape(x[..., :n], shape, plan, plan and plan.work)
    return x if plan is None else jax.sharding.reshard(x, plan.sharding(plan.spec))


def _reshape(x: Array, shape: tuple[int, ...], plan: _Plan | None, spec: Any) -> Array:
    if plan is None:
        return x.reshape(shape)
    return jnp.reshape(x, shape, out_sharding=plan.sharding(spec))


class _Plan(NamedTuple):
    """How an explicitly sharded array is cut into blocks: PartitionSpec entries, one per dimension.

    ``spec``: the array's own; ``work``: the one it is cut from (``spec`` where shards hold whole
    blocks, so that there is no communication); ``blocks``: of the ``(..., n_blocks, block_size)``
    view (``blocks[:-1]`` is ``absmax``'s).
    """

    mesh: Any
    spec: tuple[Any, ...]
    work: tuple[Any, ...]
    blocks: tuple[Any, ...]

    def sharding(self, spec: tuple[Any, ...]) -> Any:
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))


def explicit_sharding(x: Any) -> Any:
    """``x``'s sharding if its type carries one that splits it (explicit sharding: ``jax.typeof``
    with a spec naming a mesh axis), else ``None``."""
    try:
        sharding = jax.typeof(x).sharding
    except (AttributeError, TypeError):  # a JAX without sharding in types
        return None
    spec = tuple(getattr(sharding, "spec", None) or ())
    return sharding if any(s is not None for s in spec) else None


def mesh_axis_names(entry: Any) -> tuple[Any, ...]:
    """The mesh axis names of one PartitionSpec entry (``None``, a name, or a tuple of names)."""
    return () if entry is None else tuple(entry) if isinstance(entry, tuple) else (entry,)


def shard_count(entry: Any, sizes: Any) -> int:
    """How many shards one PartitionSpec entry cuts its dimension into (``sizes``: the mesh's)."""
    return math.prod(sizes[a] for a in mesh_axis_names(entry))


def _plan(x: Array, block_size: int, axis: Axis) -> _Plan | None:
    """The block plan of ``x`` if its type carries explicit sharding (``jax.set_mesh`` with an
    ``AxisType.Explicit`` mesh), else ``None`` (no sharding in the types: XLA places the blocks).

    Shards that hold whole blocks are quantized where they are. Otherwise ``x`` is resharded
    first: ``"rows"`` moves the last dimension's mesh axes to the first unsharded leading
    dimension they divide (an all-to-all), or else gathers the rows (an all-gather along the last
    dimension); ``"flat"`` moves every mesh axis to the first dimension, or else gathers ``x``;
    ``"tiles"`` gathers each of the last two dimensions whose shards do not hold whole tiles
    (the format warns at ``init``, naming the leaf). The codes always go back to ``x``'s
    sharding; ``absmax`` keeps the blocks' sharding.
    """
    sharding = explicit_sharding(x)
    if sharding is None:
        return None
    mesh = sharding.mesh
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    work, blocks = block_specs(spec, tuple(x.shape), dict(mesh.shape), block_size, axis)
    return _Plan(mesh, spec, work, blocks)


def block_specs(
    spec: tuple[Any, ...], shape: tuple[int, ...], sizes: Any, block_size: int, axis: Axis
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """:func:`_plan`'s rule on PartitionSpec entries: ``(work, blocks)`` for an array of ``shape``
    sharded as ``spec`` (one entry per dimension) on a mesh whose axis ``a`` has ``sizes[a]``
    devices. ``blocks[:-1]`` is ``absmax``'s spec; it divides ``absmax``'s shape."""
    ndim = len(shape)
    names = mesh_axis_names

    def devices(entry: Any) -> int:
        return shard_count(entry, sizes)

    if _is_tiles(axis, ndim):
        tiled = (*spec[:-2], *tile_fit(spec[-2:], shape[-2:], sizes, block_size))
        return tiled, (*tiled, None)
    if isinstance(axis, tuple):
        axis = -1
    if axis is None or ndim <= 1:
        axes = tuple(a for e in spec for a in names(e))
        lead = axes[0] if len(axes) == 1 else axes
        k = devices(lead)
        if _whole_flat_shards(shape, k, block_size):
            return (lead,) + (None,) * (ndim - 1), (lead, None)
        return (None,) * ndim, (None, None)
    last, work = spec[-1], list(spec)
    if last is not None and shape[-1] % (devices(last) * block_size):
        work[-1] = None
        free = [d for d in range(ndim - 1) if spec[d] is None and shape[d] % devices(last) == 0]
        if free:
            work[free[0]] = last
    return tuple(work), (*work, None)


def tile_fit(spec: tuple[Any, ...], shape: tuple[int, ...], sizes: Any, block_size: int) -> tuple[Any, Any]:
    """The entries of ``spec`` (the last two dimensions' of a tiled array of ``shape``) whose shards
    hold whole tiles; an entry whose shards do not (a shard narrower than the tile, or not a
    multiple of it) becomes ``None``, and that dimension is gathered."""
    tile = tile_shape(block_size)
    return tuple(  # type: ignore[return-value]
        e if e is None or n % (shard_count(e, sizes) * t) == 0 else None
        for e, n, t in zip(spec, shape, tile, strict=True)
    )


def known_spec(x: Any) -> tuple[tuple[Any, ...], dict[Any, int]] | None:
    """``(spec, mesh sizes)`` of ``x``'s sharding where it is known, one spec entry per dimension:
    read from its type (explicit sharding) or, for a concrete array or ``jax.ShapeDtypeStruct``,
    its ``NamedSharding``; ``None`` where it is not known (a tracer of an ``AxisType.Auto`` mesh)
    or names axes the mesh lacks."""
    sharding = explicit_sharding(x)
    if sharding is None and not isinstance(x, jax.core.Tracer):
        sharding = getattr(x, "sharding", None)
    sizes = dict(getattr(getattr(sharding, "mesh", None), "shape", None) or {})
    shape = tuple(x.shape)
    spec = (tuple(getattr(sharding, "spec", None) or ()) + (None,) * len(shape))[: len(shape)]
    if not sizes or not all(a in sizes for e in spec for a in mesh_axis_names(e)):
        return None
    return spec, sizes


def _replicated_type(x: Any) -> bool:
    """Whether ``x``'s type says it is replicated over a mesh whose axes are all ``Explicit``."""
    try:
        sharding = jax.typeof(x).sharding
    except (AttributeError, TypeError):
        return False
    types = tuple(getattr(getattr(sharding, "mesh", None), "axis_types", ()) or ())
    explicit = bool(types) and all(t == jax.sharding.AxisType.Explicit for t in types)
    return explicit and not any(e is not None for e in tuple(getattr(sharding, "spec", None) or ()))


def unfit_rows(x: Any, block_size: int) -> str | None:
    """Why the shards of ``x`` cut its row blocks (the last dimension is split into shards that are
    not whole multiples of ``block_size``), or ``None`` where they do not or the sharding is not known."""
    known = known_spec(x)
    if known is None or not x.shape or known[0][-1] is None:
        return None
    (*_, e), sizes = known
    n, k = x.shape[-1], shard_count(e, sizes)
    if n % (k * block_size) == 0:
        return None
    return f"{n} columns over {k} shards ({e!r}) do not make whole blocks of {block_size}"


def auto_layout(shape: tuple[int, ...], block_size: int, like: Any = None) -> str:
    """The layout ``layout="auto"`` gives a leaf of ``shape`` sharded as ``like`` (``None``, or a
    sharding :func:`known_spec` cannot read: unknown):

    * ``"tiles"`` where the known sharding cuts row blocks and 2-D tiles fit its shards;
    * ``"flat"`` where the rows end in a partial block (the last dimension is not a multiple of
      ``block_size``) but the leaf is whole blocks, and its shards are known to hold whole flat
      blocks (:func:`_flat_fits`: one device, or only the first axis sharded, in shards of whole
      blocks). A partial block is zero-padded in the block
      view, which makes XLA:CPU write the decoded float32 state to memory instead of fusing it
      into the step (the GPT-like tree's FP8 step 6.7x the float32 step with rows, 2.5x flat);
      whole blocks also keep the leaf eligible for the fused GPU kernel;
    * ``"rows"`` otherwise.
    """
    if len(shape) < 2:
        return "rows"
    if like is not None and unfit_rows(like, block_size) is not None and not unfit_tiles(like, block_size):
        return "tiles"
    size = math.prod(shape)
    if shape[-1] % block_size and size % block_size == 0 and _flat_fits(like, shape, block_size):
        return "flat"
    return "rows"


def _flat_fits(like: Any, shape: tuple[int, ...], block_size: int) -> bool:
    """Whether blocks over the flattened leaf are known to stay inside its shards: its known
    sharding (:func:`known_spec`, or a replicated type under an ``AxisType.Explicit`` mesh) splits
    only the first axis, into shards of whole blocks, or the process has one device. Not known with
    several devices (a tracer of an ``AxisType.Auto`` mesh, an array on one of them): ``False``, so
    that eager and jitted ``init`` agree, and row (FSDP) shards of a leaf whose rows end in a
    partial block could cut its flat blocks, where rows never straddle them."""
    known = None if like is None else known_spec(like)
    if known is None:
        return jax.device_count() == 1 or _replicated_type(like)
    (lead, *rest), sizes = known
    k = shard_count(lead, sizes)
    return all(e is None for e in rest) and _whole_flat_shards(shape, k, block_size)


def _whole_flat_shards(shape: tuple[int, ...], k: int, block_size: int) -> bool:
    """Whether ``k`` shards of the first axis each hold whole blocks of the flattened leaf."""
    return shape[0] % k == 0 and math.prod(shape) % (k * block_size) == 0


def unfit_tiles(x: Any, block_size: int) -> str | None:
    """Why the shards of ``x`` (rank >= 2) do not hold whole tiles, or ``None`` where they do or
    its sharding is not known (see :func:`known_spec`)."""
    known = known_spec(x)
    shape = tuple(x.shape)
    if len(shape) < 2 or known is None:
        return None
    spec, sizes = known
    fit = tile_fit(spec[-2:], shape[-2:], sizes, block_size)
    bad = []
    for label, e, f, n, t in zip(
        ("rows", "columns"), spec[-2:], fit, shape[-2:], tile_shape(block_size), strict=True
    ):
        if e is not None and f is None:
            bad.append(
                f"{n} {label} over {shard_count(e, sizes)} shards ({e!r}) do not make whole tiles of {t}"
            )
    return "; ".join(bad) or None


def _check_block_size(block_size: int) -> int:
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(
            f"block_size={block_size!r} is invalid; allowed: a positive integer (bitsandbytes: 256)."
        )
    return int(block_size)


def absmax_shape(shape: tuple[int, ...], block_size: int = 256, axis: Axis = None) -> tuple[int, ...]:
    """Shape of the ``absmax`` array :func:`quantize_blockwise` returns for an input of ``shape``."""
    if _is_tiles(axis, len(shape)):
        th, tw = tile_shape(block_size)
        return (*shape[:-2], -(-shape[-2] // th), -(-shape[-1] // tw))
    if axis is None or len(shape) <= 1:
        return (-(-math.prod(shape) // block_size),)
    return (*shape[:-1], -(-shape[-1] // block_size))


@functools.partial(jax.jit, static_argnames=("block_size", "signed", "axis"))
def quantize_blockwise(
    x: Array, *, block_size: int = 256, signed: bool = True, axis: Any = None
) -> tuple[Array, Array]:
    """Block-wise 8-bit dynamic quantization, code for code as bitsandbytes' CPU kernel.

    Args:
      x: a real array (computed in float32).
      block_size: elements per block (bitsandbytes' optimizers: 256).
      signed: use the signed dynamic map (bitsandbytes' default, and what its
        optimizers use for every state, the non-negative second moment included).
      axis: ``None``: blocks over the flattened array (bitsandbytes); ``-1``: blocks
        along the last axis, one set per row; ``(-2, -1)``: 2-D tiles over the last two axes
        (16 x 16 for ``block_size=256``; a vector is cut as by ``-1``), see the module docstring.

    Returns:
      ``(codes, absmax)``: ``codes`` uint8 with ``x``'s shape; ``absmax`` float32 of
      shape ``(ceil(x.size / block_size),)``, or ``(*x.shape[:-1], ceil(x.shape[-1] /
      block_size))`` with ``axis=-1``, or ``(*x.shape[:-2], ceil(R / th), ceil(C / tw))`` with
      tiles of ``th x tw`` (16 x 16 for blocks of 256).

    The rule, per block with ``a = max |x|``: ``a == 0`` gives codes 0; otherwise
    ``k = floor((clamp(x * (1/a), -1, 1) + 1) * 0.5 * 65535 + 0.5)`` and the code is
    ``LUT[k]``, the map entry nearest to ``-1 + 2k/65535``.
    """
    block_size = _check_block_size(block_size)
    x = jnp.asarray(x)
    shape = x.shape
    plan = _plan(x, block_size, axis)
    xb, n = _blocks(x.astype(jnp.float32), block_size, axis, plan)
    tiled = isinstance(n, tuple)
    codes, absmax = quantize_blocks(xb, _lookup(jnp.asarray(_lut_np(bool(signed))), plan), tiled)
    return _unblock(codes, n, shape, plan), block_scale(absmax, tiled)


def _lookup(table: Array, plan: _Plan | None) -> Any:
    """``table[i]``; under explicit sharding, sharded like ``i`` (``table`` is replicated)."""
    if plan is None:
        return lambda i: table[i]
    return lambda i: table.at[i].get(out_sharding=jax.typeof(i).sharding)


def quantize_blocks(xb: Array, lut_lookup: Any, tiled: bool = False) -> tuple[Array, Array]:
    """The quantizer on float32 blocks ``(..., n_blocks, block_size)`` (or :func:`_blocks`' tiles,
    ``tiled``): codes of that shape and ``absmax`` (:func:`block_max`'s shape).

    ``lut_lookup(k)`` returns ``_lut_np(signed)[k]`` for an int32 array ``k`` (an XLA
    gather here, a table read inside the fused kernel of :mod:`rmsprop_jax._pallas_int8`).
    """
    # std::max(a, |NaN|) keeps a in the C kernel: NaN does not enter absmax (and codes as 0).
    absmax = block_max(xb, tiled)
    inv = (jnp.float32(1.0) / absmax)[..., None]  # inf where absmax == 0: masked below
    v = jnp.clip(xb * inv, -1.0, 1.0)
    # Each operation rounded to float32 on its own, as the C kernel evaluates it:
    # k = ((v + 1) * 0.5) * 65535 + 0.5. The product h * 65535 is written h * 65536 - h (the
    # same float32 value: h * 65536 is exact), so that a compiler contracting a multiply and an
    # add into one fused multiply-add (Triton does) cannot skip the product's rounding.
    h = (v + jnp.float32(1.0)) * jnp.float32(0.5)
    k = h * jnp.float32(65536.0) - h
    k = k + jnp.float32(0.5)
    k = jnp.where(jnp.isnan(k), 0.0, k).astype(jnp.int32)  # truncation, as static_cast<uint16_t>
    codes = lut_lookup(k)
    codes = jnp.where((absmax == 0)[..., None], jnp.zeros((), codes.dtype), codes)
    return codes, absmax


def dequantize_blocks(cb: Array, absmax: Array, map_lookup: Any) -> Array:
    """``map_lookup(codes) * absmax[..., None]`` on :func:`quantize_blocks`' blocks and ``absmax``."""
    return map_lookup(cb.astype(jnp.int32)) * absmax[..., None]


@functools.partial(jax.jit, static_argnames=("block_size", "signed", "axis", "dtype"))
def dequantize_blockwise(
    codes: Array,
    absmax: Array,
    *,
    block_size: int = 256,
    signed: bool = True,
    axis: Any = None,
    dtype: Any = jnp.float32,
) -> Array:
    """``code[codes] * absmax`` per block in float32: bitsandbytes' ``dequantize_blockwise``, bit for bit."""
    block_size = _check_block_size(block_size)
    codes = jnp.asarray(codes)
    shape = codes.shape
    plan = _plan(codes, block_size, axis)
    cb, n = _blocks(codes, block_size, axis, plan)
    absmax = jnp.asarray(absmax, jnp.float32)
    if plan is not None:
        absmax = jax.sharding.reshard(absmax, plan.sharding(plan.blocks[:-1]))
    table = _lookup(jnp.asarray(_dynamic_map_np(bool(signed))), plan)
    out = dequantize_blocks(cb, per_block(absmax, isinstance(n, tuple)), table)
    return _unblock(out, n, shape, plan).astype(dtype)


# --------------------------------------------------------------------------- stochastic rounding


def _mix32(x: Array) -> Array:
    """A 32-bit integer finaliser ("lowbias32", C. Wellons): a bijection with good avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hash_key(seed: Any, step: Any, leaf: Any) -> Array:
    """A uint32 key for one (seed, step, leaf): the per-leaf, per-step stream of :func:`hash_bits`."""
    k = _mix32(jnp.asarray(leaf, jnp.uint32) + jnp.uint32(0x9E3779B9))
    k = _mix32(k ^ jnp.asarray(step).astype(jnp.uint32))
    return _mix32(k ^ jnp.asarray(seed, jnp.uint32))


def leaf_keys(seed: Any, step: Any, num_leaves: int) -> Array:
    """``hash_key(seed, step, 3 * leaf + i)`` for every leaf and its three accumulators: (n, 3) uint32.

    Computed as one array from the (traced) step, so that inside a ``jit`` each leaf's kernel
    reads its key as data: leaves of one shape then compile to one identical kernel, where
    a key folded into each kernel as a constant made XLA compile one kernel per leaf.
    """
    leaf = jnp.arange(num_leaves, dtype=jnp.uint32)[:, None] * jnp.uint32(3) + jnp.arange(3, dtype=jnp.uint32)
    return hash_key(seed, step, leaf)


def hash_bits(key: Array, shape: tuple[int, ...]) -> Array:
    """Uniform uint32 bits for every element of an array of ``shape``: ``mix(i * phi + key)``.

    ``i`` is the element's row-major index; counter-based, so every shard of a sharded
    array computes its own bits with no communication.
    """
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for ax in reversed(range(len(shape))):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, ax) * jnp.uint32(stride % 2**32)
        stride *= shape[ax]
    return _mix32(idx * jnp.uint32(0x9E3779B9) + key)


def uniform(bits: Array) -> Array:
    """float32 in [0, 1) from uint32 ``bits``: their top 24 bits times ``2**-24`` (exact)."""
    return (bits >> jnp.uint32(8)).astype(jnp.float32) * jnp.float32(2.0**-24)


class _FloatFormat(NamedTuple):
    mantissa_bits: int
    min_exponent: int  # of the smallest normal number
    inf_bits: int  # the largest magnitude a carry reaches: inf, or the largest finite value
    bits_dtype: Any
    nan_bits: int  # the quiet NaN a NaN input becomes (its sign kept)
    has_inf: bool  # False: an inf input becomes NaN, as a cast to the format does


_FORMATS = {
    jnp.dtype(jnp.bfloat16): _FloatFormat(7, -126, 0x7F80, jnp.uint16, 0x7FC0, True),
    jnp.dtype(jnp.float16): _FloatFormat(10, -14, 0x7C00, jnp.uint16, 0x7E00, True),
    # float8_e4m3fn has no inf: a carry past the largest finite value (448) saturates there.
    jnp.dtype(jnp.float8_e4m3fn): _FloatFormat(3, -6, 0x7E, jnp.uint8, 0x7F, False),
}


@functools.partial(jax.jit, static_argnames=("dtype",))
def stochastic_round(x: Array, dtype: Any, bits: Array) -> Array:
    """Round float32 ``x`` to ``dtype`` (bfloat16 or float16), up with probability = remainder.

    With ``x = (q + f) * 2^e`` where ``q * 2^e`` is ``|x|`` truncated to the target's
    precision (``2^e`` its spacing there, subnormal range included) and ``0 <= f < 1``,
    the result is ``sign(x) * (q + [u < f]) * 2^e`` for a uniform ``u`` taken from the
    low bits of ``bits``; so ``E[result] = x`` exactly. Computed on the integer bit
    pattern: the discarded bits of the significand plus the random bits carry into the
    kept ones (possibly into the exponent, up to inf past the largest finite value).
    inf and NaN pass through; values too small for a carry to reach the smallest
    subnormal (below ``2^-32`` for float16) round to zero.
    """
    dt = jnp.dtype(dtype)
    if dt not in _FORMATS:
        raise ValueError(f"stochastic rounding targets bfloat16, float16 or float8_e4m3fn, got dtype={dt}.")
    x = x.astype(jnp.float32)
    if dt == jnp.dtype(jnp.bfloat16):
        # bfloat16 is float32's upper half: add 16 random bits below it and truncate. The
        # carry runs into the exponent exactly as in the general rule (subnormals and the
        # overflow to inf included: tests/test_quantize.py checks the two agree bit for bit),
        # in 4 integer operations instead of ~20.
        # NaN is truncated with the quiet bit set (sign and top payload kept), on the bits too:
        # no float32 -> bfloat16 conversion in the program, whose expansion made XLA:CPU compile
        # each leaf's fusion slower (an update of 128 leaves: 13.4 s -> 11.2 s on a loaded 2-core
        # CPU; non-NaN results bit-identical, checked on 200k random float32 patterns).
        b = jax.lax.bitcast_convert_type(x, jnp.uint32)
        is_nan = (b & jnp.uint32(0x7FFFFFFF)) > jnp.uint32(0x7F800000)
        top = jnp.where(is_nan, (b >> 16) | jnp.uint32(0x40), (b + (bits & jnp.uint32(0xFFFF))) >> 16)
        return jax.lax.bitcast_convert_type(top.astype(jnp.uint16), dt)
    return round_to_format(x, dt, bits)


def round_to_format(x: Array, dtype: Any, bits: Array | None) -> Array:
    """float32 ``x`` rounded to ``dtype`` (a format of ``_FORMATS``) on the bit patterns: stochastically
    with the uniform uint32 ``bits`` (:func:`stochastic_round`), or to nearest, ties to even, with
    ``bits=None``, as ``x.astype(dtype)`` for finite ``x`` within the format's range (a float8 cast
    costs XLA:CPU several times these integer operations). float8_e4m3fn takes :func:`_round_e4m3`,
    the others :func:`_round_general`."""
    dt = jnp.dtype(dtype)
    if dt == jnp.dtype(jnp.float8_e4m3fn):
        return _round_e4m3(x, bits)
    return _round_general(x, dt, bits)


def _round_e4m3(x: Array, bits: Array | None) -> Array:
    """:func:`_round_general` for float8_e4m3fn in about half its integer operations.

    A magnitude in e4m3's normal range (``|x| >= 2**-6``) keeps its float32 pattern ``a``; one in
    its subnormal range becomes the fixed-point pattern ``2**-6``'s exponent field plus ``k``,
    ``k = |x| / 2**-29`` (20 bits below e4m3's last place, 2**-9). Then both are one rule:
    ``code = (X + add) >> 20`` less the exponent re-bias, saturated at 448 (``0x7E``); NaN and inf
    give NaN (e4m3fn has no inf). ``add`` is 20 random bits, or for round to nearest half the
    discarded range less one unless the kept part is odd.

    Normal range and non-finite values: the general rule's codes bit for bit, both roundings.
    Subnormal range, to nearest: ``k`` is the FPU's round to nearest even of ``|x|`` to a multiple
    of 2**-9 (adding ``2**14`` makes that the ulp; exact under XLA:CPU's flush-to-zero, since a
    float32 subnormal rounds to 0 anyway), so again the cast's codes. Subnormal range, stochastic:
    ``k`` truncates ``|x|`` to 20 bits below the last place, so the probability of rounding up is
    the remainder truncated to 2**-20 (the general rule keeps up to 31 bits there but flushes every
    ``|x| < 2**-17`` to 0; this flushes below 2**-29); the codes differ from the general rule's.
    """
    b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    a = b & jnp.uint32(0x7FFFFFFF)
    sub = a < jnp.uint32(0x3C800000)  # |x| < 2**-6
    ax = jax.lax.bitcast_convert_type(a, jnp.float32)
    rebias = jnp.uint32(120 << 23)  # e4m3's exponent bias 7 against float32's 127, in the pattern
    if bits is None:
        k = jax.lax.bitcast_convert_type(ax + jnp.float32(2.0**14), jnp.uint32) - jnp.uint32(0x46800000)
        big_x = jnp.where(sub, (k << 20) + rebias, a)
        add = jnp.uint32(0x7FFFF) + ((big_x >> 20) & jnp.uint32(1))
    else:
        fixed = jnp.minimum(ax, jnp.float32(2.0**-6)) * jnp.float32(2.0**29)  # < 2**23: exact
        big_x = jnp.where(sub, fixed.astype(jnp.int32).astype(jnp.uint32) + rebias, a)
        add = bits & jnp.uint32(0xFFFFF)
    code = jnp.minimum((big_x + add) >> 20, jnp.uint32((120 << 3) + 0x7E)) - jnp.uint32(120 << 3)
    code = jnp.where(a >= jnp.uint32(0x7F800000), jnp.uint32(0x7F), code)
    code = code | ((b >> 24) & jnp.uint32(0x80))
    return jax.lax.bitcast_convert_type(code.astype(jnp.uint8), jnp.float8_e4m3fn)


def _round_general(x: Array, dt: Any, bits: Array | None) -> Array:
    """:func:`round_to_format` from the significand and exponent, for any format in ``_FORMATS``."""
    dt = jnp.dtype(dt)
    fmt = _FORMATS[dt]
    x = x.astype(jnp.float32)
    b = jax.lax.bitcast_convert_type(x, jnp.uint32)
    sign = b >> 31
    e_field = ((b >> 23) & 0xFF).astype(jnp.int32)
    significand = (b & 0x7FFFFF) | jnp.where(e_field > 0, jnp.uint32(1 << 23), jnp.uint32(0))
    exponent = jnp.maximum(e_field, 1) - 127  # unbiased; float32 subnormals share -126
    t = fmt.mantissa_bits
    shift = (23 - t) + jnp.maximum(0, fmt.min_exponent - exponent)
    too_small = shift > 31
    shift_u = jnp.minimum(shift, 31).astype(jnp.uint32)
    mask = (jnp.uint32(1) << shift_u) - jnp.uint32(1)
    if bits is None:  # half the discarded range, less one unless the kept part is odd
        add = (mask >> jnp.uint32(1)) + ((significand >> shift_u) & jnp.uint32(1))
    else:
        add = bits & mask
    q = (significand + add) >> shift_u  # significand < 2^24, so no uint32 overflow
    q = jnp.where(too_small, jnp.uint32(0), q)
    base = (jnp.maximum(exponent, fmt.min_exponent) - fmt.min_exponent).astype(jnp.uint32) << t
    magnitude = jnp.minimum(base + q, jnp.uint32(fmt.inf_bits))
    sign_bit = sign << (8 * jnp.dtype(fmt.bits_dtype).itemsize - 1)
    # inf (where the format has it) already came out as inf_bits; NaN, and inf where it has not,
    # become the format's NaN on the bits: a select of a cast (``x.astype(dt)``) made XLA:CPU
    # expand the float8 cast for every element, 5x the cost of the rounding itself.
    is_nan = (b & jnp.uint32(0x7FFFFFFF)) > jnp.uint32(0x7F800000)
    to_nan = is_nan if fmt.has_inf else ~jnp.isfinite(x)
    magnitude = jnp.where(to_nan, jnp.uint32(fmt.nan_bits), magnitude)
    return jax.lax.bitcast_convert_type((sign_bit | magnitude).astype(fmt.bits_dtype), dt)
