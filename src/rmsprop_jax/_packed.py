"""The packed state layout (``rmsprop(..., packed=True)``): one flat buffer per leaf group.

With ``packed=True`` each accumulator (``nu``, and ``mu`` / the momentum buffer when
they exist) is stored as one flat 1-D buffer per *group* of leaves instead of one
array per parameter. A group is the set of leaves that share the accumulator dtypes
and, with weight decay, the same static weight-decay mask value, so a plain float32
model has one group and one buffer per accumulator. Inside the same ``jit``:

1. the gradients (and, with weight decay, the parameters) of a group are gathered
   into one flat vector: the small leaves (the layout puts them first) with a two-level
   concatenate (fan-in ``~sqrt(n)``, an ``optimization_barrier`` between the levels so
   that XLA does not merge them back into one n-operand concatenate, which compiles in
   time superlinear in n on XLA:CPU), the big ones (>= 16k elements) copied in with
   ``dynamic_update_slice`` (XLA:CPU runs a concatenate ~3x slower than a copy);
2. :func:`rmsprop_jax._update.rms_leaf` runs once on the flat buffers: it is
   element-wise, so this is the same arithmetic as per leaf, in one kernel;
3. each leaf's update is read back with a ``gather`` of constant row indices
   (rows of up to 512 contiguous elements). A ``slice`` would do the same work,
   but XLA:CPU compiles each slice kernel ~40x slower than an element-wise kernel
   (~45 ms each), so thousands of slices took minutes; the row gather compiles like an
   element-wise kernel and runs as fast as the slice. See ``benchmarks/README.md``.

The leaf boundaries are a static table (:class:`Layout`): the offsets and shapes live
in the pytree *structure* of the state (the aux data of :class:`PackedTree`), not in
its arrays, so ``jit``, Orbax, ``jax.eval_shape`` and ``optax`` wrappers see only the
flat buffers.

Packing gathers every leaf into one buffer on one set of devices: parameters that are
sharded across devices cannot be packed without moving them, so :func:`check_packable`
refuses them with an error that says so.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rmsprop_jax._quantize import explicit_sharding

_MAX_ROW = 512  # elements per gathered row when splitting the flat update back into leaves
_BIG = 1 << 14  # leaves at least this big are gathered with dynamic_update_slice, not concatenate


@dataclasses.dataclass(frozen=True)
class Group:
    """Leaves stored in one flat buffer per accumulator (a static table).

    ``wd`` is the group's static weight-decay mask value (``True``: decayed or no
    weight decay at all; ``False``: not decayed; ``None``: the mask is an array,
    applied per element).
    """

    name: str
    nu_dtype: str
    acc_dtype: str
    wd: bool | None
    leaves: tuple[int, ...]  # indices into the flattened parameter tree
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    size: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every leaf of the parameter tree sits in the packed buffers (static, hashable)."""

    treedef: Any  # jax.tree_util.PyTreeDef
    groups: tuple[Group, ...]
    paths: tuple[str, ...] = ()  # each leaf's key path, boxes removed (see leaf_path)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Each leaf's shape, in the order of the flattened parameter tree."""
        out: list[tuple[int, ...]] = [()] * self.treedef.num_leaves
        for g in self.groups:
            for i, s in zip(g.leaves, g.shapes, strict=True):
                out[i] = s
        return out


class PackedTree:
    """An accumulator in the packed layout: one flat buffer per :class:`Group`.

    A pytree whose children are the flat buffers (keyed by group name, e.g.
    ``"float32"``) and whose static aux data is the :class:`Layout`. This is what
    ``state.nu`` (and ``optax.tree.get(state, "nu")``) returns with ``packed=True``;
    :meth:`unpack` gives the per-parameter tree that ``packed=False`` would hold.
    """

    __slots__ = ("buffers", "layout")

    def __init__(self, buffers: Iterable[Any], layout: Layout) -> None:
        self.buffers = tuple(buffers)
        self.layout = layout

    def unpack(self) -> Any:
        """The accumulator as a tree shaped like the parameters (copies, for inspection)."""
        leaves: list[Any] = [None] * self.layout.treedef.num_leaves
        for g, buf in zip(self.layout.groups, self.buffers, strict=True):
            for i, x in zip(g.leaves, split(buf, g), strict=True):
                leaves[i] = x
        return self.layout.treedef.unflatten(leaves)

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{g.name}: {getattr(b, 'shape', '?')} over {len(g.leaves)} leaves"
            for g, b in zip(self.layout.groups, self.buffers, strict=True)
        )
        return f"PackedTree({parts})"


jax.tree_util.register_pytree_with_keys(
    PackedTree,
    lambda t: (
        tuple((jax.tree_util.DictKey(g.name), b) for g, b in zip(t.layout.groups, t.buffers, strict=True)),
        t.layout,
    ),
    lambda layout, buffers: PackedTree(buffers, layout),
    lambda t: (t.buffers, t.layout),
)


# --------------------------------------------------------------------------- layout


def build_layout(
    params: Any,
    dtypes: Callable[[Any, Any], tuple[Any, Any]],
    masks: Sequence[Any] | None,
) -> Layout:
    """Group the leaves of ``params`` by (nu dtype, mu/trace dtype, static weight-decay mask).

    ``dtypes(path, leaf)`` gives a leaf's accumulator dtypes; ``masks`` one
    weight-decay mask value per leaf (``None``: no weight decay).
    """
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    check_packable(leaf for _, leaf in paths_leaves)
    keys: dict[tuple[str, str, bool | None], list[int]] = {}
    for i, (path, leaf) in enumerate(paths_leaves):
        nu_dt, acc_dt = dtypes(path, leaf)
        m = True if masks is None else masks[i]
        wd = m if isinstance(m, bool) else None
        keys.setdefault((jnp.dtype(nu_dt).name, jnp.dtype(acc_dt).name, wd), []).append(i)
    groups = []
    for (nu_dt, acc_dt, wd), idx in keys.items():
        # small leaves first (gathered by the concatenate tree), then the big ones (gathered by
        # dynamic_update_slice: XLA:CPU's concatenate runs ~3x slower than a copy per element)
        idx = [i for i in idx if _size(paths_leaves[i][1]) < _BIG] + [
            i for i in idx if _size(paths_leaves[i][1]) >= _BIG
        ]
        name = nu_dt if acc_dt == nu_dt else f"{nu_dt}_{acc_dt}"
        if masks is not None:
            name += {True: "_decayed", False: "_not_decayed", None: "_masked"}[wd]
        shapes = tuple(tuple(int(d) for d in np.shape(paths_leaves[i][1])) for i in idx)
        sizes = [math.prod(s) for s in shapes]
        offsets = tuple(int(o) for o in np.cumsum([0, *sizes[:-1]]))
        groups.append(Group(name, nu_dt, acc_dt, wd, tuple(idx), shapes, offsets, int(sum(sizes))))
    return Layout(treedef, tuple(groups), tuple(leaf_path(p) for p, _ in paths_leaves))


def leaf_path(path: Any) -> str:
    """A leaf's key path as a string, without the ``.value`` of a box around it.

    Flax NNX's ``nnx.Optimizer`` calls ``init`` on ``nnx.Param``-wrapped leaves (a pytree node
    whose one child is ``.value``) and ``update`` on the pure arrays: the two trees differ only
    by those boxes, so the packed layout compares paths without them.
    """
    keys = list(path)
    while keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys.pop()
    return jax.tree_util.keystr(tuple(keys))


def full(layout: Layout, value: Any, which: str) -> Any:  # a PackedTree; Any to fit optax's state types
    """A packed accumulator filled with ``value``; ``which`` is ``"nu"`` or ``"acc"`` (mu, trace)."""
    return PackedTree(
        [jnp.full((g.size,), value, g.nu_dtype if which == "nu" else g.acc_dtype) for g in layout.groups],
        layout,
    )


def check_packable(leaves: Any) -> None:
    """Refuse parameters sharded over several devices: packing would gather them onto each device."""
    found = sharded_leaf(leaves)
    if found is not None:
        raise _sharded_error(*found)


def sharded_leaf(leaves: Any) -> tuple[Any, Any] | None:
    """The first leaf sharded over several devices (not replicated) and its sharding, or ``None``.

    Concrete arrays and ``ShapeDtypeStruct`` carry their sharding; a tracer only under
    explicit sharding (``jax.typeof(x).sharding`` with a non-trivial spec).
    """
    for leaf in leaves:
        sharding = getattr(leaf, "sharding", None)
        if isinstance(leaf, jax.core.Tracer):
            sharding = explicit_sharding(leaf)
            if sharding is not None:
                return leaf, sharding
            continue
        if sharding is None:
            continue
        if len(sharding.device_set) > 1 and not sharding.is_fully_replicated:
            return leaf, sharding
    return None


def _sharded_error(leaf: Any, sharding: Any) -> ValueError:
    return ValueError(
        f"packed=True cannot be used with parameters sharded across devices: a leaf of shape "
        f"{jnp.shape(leaf)} has sharding {sharding}. Packing concatenates every leaf into one "
        "flat buffer, which would gather the shards onto every device. Use packed=False "
        "(the default), whose per-parameter accumulators follow each parameter's sharding."
    )


def structure(nu: Any) -> tuple[tuple[str, ...], list[tuple[int, ...]]] | None:
    """``(leaf paths, leaf shapes)`` of the parameters a packed ``nu`` was built for, or ``None``."""
    if isinstance(nu, PackedTree):
        return nu.layout.paths, nu.layout.shapes
    return None


# --------------------------------------------------------------------------- gather / split


def _concat(xs: list[Any]) -> Any:
    """``concatenate(xs)`` as a two-level tree of at most ~sqrt(n)-operand concatenates."""
    if len(xs) == 1:
        return xs[0]
    fan_in = max(16, math.isqrt(len(xs) - 1) + 1)
    if len(xs) > fan_in:
        xs = [
            jax.lax.optimization_barrier(jnp.concatenate(xs[i : i + fan_in]))
            for i in range(0, len(xs), fan_in)
        ]
    return jnp.concatenate(xs) if len(xs) > 1 else xs[0]


def _size(x: Any) -> int:
    return math.prod(np.shape(x))


def gather(xs: Sequence[Any], group: Group, dtype: Any) -> Any:
    """The group's leaves as one flat vector: small ones concatenated, big ones copied in place."""
    flat = [jnp.asarray(xs[i], dtype).reshape(-1) for i in group.leaves]
    small = [x for x in flat if x.size < _BIG]  # the layout puts them first
    big = flat[len(small) :]
    out = _concat(small) if small else jnp.zeros((0,), dtype)
    if big:
        buf = jnp.zeros((group.size,), dtype)
        out = jax.lax.dynamic_update_slice(buf, out, (0,)) if small else buf
        offset = sum(x.size for x in small)
        for x in big:
            out = jax.lax.dynamic_update_slice(out, x, (offset,))
            offset += x.size
    return out


def _row(size: int) -> int:
    """Elements per gathered row: the largest divisor of ``size`` that leaves >= 2 rows, at most 512."""
    for c in range(min(_MAX_ROW, size // 2), 0, -1):
        if size % c == 0:
            return c
    return 1


_ROWS = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(), start_index_map=(0,))


def _take(flat: Any, offset: int, shape: tuple[int, ...]) -> Any:
    """``flat[offset : offset + size].reshape(shape)``, as a row gather (fast to compile on XLA:CPU)."""
    size = math.prod(shape)
    if size < 2:  # one row would be simplified back into a slice; a few of them are cheap
        return jax.lax.slice(flat, (offset,), (offset + size,)).reshape(shape)
    c = _row(size)
    idx_dtype = np.int32 if offset + size < 2**31 else np.int64
    starts = np.arange(offset, offset + size, c, dtype=idx_dtype)[:, None]
    rows = jax.lax.gather(
        flat,
        starts,
        _ROWS,
        (c,),
        indices_are_sorted=True,
        unique_indices=True,
        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )
    return rows.reshape(shape)


def split(flat: Any, group: Group) -> list[Any]:
    return [_take(flat, o, s) for o, s in zip(group.offsets, group.shapes, strict=True)]
