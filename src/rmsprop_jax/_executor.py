"""How :func:`rms_leaf` runs over the leaves of a tree: the one place that chooses a strategy.

Three strategies, one entry point (:func:`run`):

* **per leaf, XLA** (the default everywhere): each leaf's step -- decode its stored accumulators
  (:mod:`rmsprop_jax._codecs`), ``rms_leaf``, encode -- is one ``jax.jit`` per distinct static
  configuration, so JAX traces it once per distinct leaf signature and every other leaf is one
  call to the same function, which XLA inlines before fusing. The compiled program is the
  op-by-op one (tests compare them bit for bit), and an eager ``update`` runs the same compiled
  leaf function as a jitted one.
* **fused kernel** (8-bit leaves on CUDA GPUs): one Pallas kernel per leaf decodes, calls the
  same ``rms_leaf`` and re-quantizes in one pass (:mod:`rmsprop_jax._pallas_int8`, imported only
  when a kernel is built). Chosen automatically for a leaf whose accumulators are all 8-bit,
  whose blocks are whole rows, with a static weight-decay mask, on a GPU backend, and that is not
  sharded (a ``pallas_call`` has no partitioning rule: a sharded leaf would be gathered). A
  leaf whose sharding is unknown at trace time (a tracer in an ``AxisType.Auto`` mesh with
  several devices) keeps the XLA path.
* **packed** (``rmsprop(..., packed=True)``): the state is one flat buffer per leaf group
  (:mod:`rmsprop_jax._packed`); the gradients are gathered into it, ``rms_leaf`` runs once per
  group and the updates are split back.

The private switch ``RMSPROP_JAX_KERNEL`` (environment variable, read at trace time) or the
context manager :func:`kernel_mode` overrides the automatic choice for tests and debugging:
``"auto"`` (default), ``"xla"`` (never the kernel) or ``"pallas"`` (the kernel wherever a leaf
is eligible, whatever the backend: interpreted off GPUs, slow, bit-identical to XLA there).

Hyperparameters that are Python numbers stay static (closed over), exactly as in the op-by-op
trace: JAX's weak typing then applies as in optax, which keeps float32 results bit-identical to
``optax.rmsprop``. Array hyperparameters (schedules, injected values, ``1 - decay**t``) and array
weight-decay masks are passed as arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rmsprop_jax import _packed, _quantize
from rmsprop_jax._codecs import PLAIN, Codec, Quantized
from rmsprop_jax._update import Flags, Scalars, rms_leaf, split_scalars

LeafOut = tuple[jax.Array, Any, Any, Any]
Codecs = tuple[Codec, Codec, Codec]
_PLAIN3: Codecs = (PLAIN, PLAIN, PLAIN)
KERNEL_MODES = ("auto", "xla", "pallas")
_forced: list[str] = []


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """Override the kernel choice inside the block (tests and debugging; see the module docstring).

    The choice is made when a step is traced: jit the step inside the block.
    """
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode {mode!r} is invalid; allowed: {KERNEL_MODES}.")
    _forced.append(mode)
    try:
        yield
    finally:
        _forced.pop()


def _mode() -> str:
    if _forced:
        return _forced[-1]
    mode = os.environ.get("RMSPROP_JAX_KERNEL", "auto")
    if mode not in KERNEL_MODES:
        raise ValueError(f"RMSPROP_JAX_KERNEL={mode!r} is invalid; allowed: {KERNEL_MODES}.")
    return mode


# --------------------------------------------------------------------------- the step of one leaf


def step_leaf(
    flags: Flags,
    s: Scalars,
    codecs: Codecs,
    g: jax.Array,
    p: jax.Array | None,
    nu: Any,
    mu: Any,
    trace: Any,
    wd_on: bool | jax.Array,
    rounding: jax.Array | None = None,
    apply: bool = False,
    kernel: bool = False,
) -> LeafOut:
    """Decode the accumulators, :func:`rms_leaf`, encode them (or the fused kernel, ``kernel=True``).

    ``rounding``: for stochastic rounding, this leaf's three uint32 keys (nu, mu, trace; a row
    of :func:`~rmsprop_jax._quantize.leaf_keys`), or ``None``.
    ``apply``: return the new parameter ``p + update`` (``optax.apply_updates``' arithmetic)
    instead of the update.
    """
    c_nu, c_mu, c_tr = codecs
    var_floor = max(c_nu.variance_floor, c_mu.variance_floor) if flags.centered else 0.0
    if kernel:
        from rmsprop_jax import _pallas_int8  # Pallas is imported only when a kernel is built

        assert isinstance(c_nu, Quantized) and isinstance(wd_on, bool)
        return _pallas_int8.fused_step(flags, s, c_nu, g, p, nu, mu, trace, wd_on, var_floor, apply=apply)
    decoded = (
        c_nu.decode(nu),
        None if mu is None else c_mu.decode(mu),
        None if trace is None else c_tr.decode(trace),
    )
    u, new_nu, new_mu, new_trace = rms_leaf(flags, s, g, p, *decoded, wd_on, var_floor)
    if apply:
        assert p is not None
        u = (p + u).astype(p.dtype)

    def bits(i: int, x: jax.Array) -> Any:
        return None if rounding is None else _quantize.hash_bits(rounding[i], x.shape)

    return (
        u,
        c_nu.encode(new_nu, bits(0, new_nu)),
        None if new_mu is None else c_mu.encode(new_mu, bits(1, new_mu)),
        None if new_trace is None else c_tr.encode(new_trace, bits(2, new_trace)),
    )


def use_kernel(codecs: Codecs, g: Any, accs: Sequence[Any], wd_on: Any) -> bool:
    """Whether the fused kernel steps this leaf (see the module docstring)."""
    present = [c for x, c in zip(accs, codecs, strict=True) if x is not None]
    if not present or not all(isinstance(c, Quantized) for c in present) or not isinstance(wd_on, bool):
        return False
    mode = _mode()
    if mode == "xla":
        return False
    c: Quantized = present[0]  # type: ignore[assignment]  # one format: one codec
    if any(x.kind != "int8" for x in present):  # type: ignore[union-attr]  # the kernel is 8-bit
        return False
    if not _kernel_eligible(tuple(jnp.shape(g)), c.block_size, c.axis):
        return False
    if mode == "pallas":
        return True
    if jax.default_backend() != "gpu":
        return False
    leaves = [g, *(x.codes for x in accs if x is not None)]
    if _packed.sharded_leaf(leaves) is not None:
        return False
    # A tracer of an Auto-mode mesh carries no sharding: only a single device rules sharding out.
    return jax.device_count() == 1 or not any(isinstance(x, jax.core.Tracer) for x in leaves)


def _kernel_eligible(shape: tuple[int, ...], block_size: int, axis: _quantize.Axis) -> bool:
    """Whether a leaf of ``shape`` cuts into whole blocks of ``block_size`` (a power of two >= 16)."""
    if block_size < 16 or block_size & (block_size - 1) or isinstance(axis, tuple):  # tiles: XLA path
        return False
    size = math.prod(shape)
    if size == 0:
        return False
    if axis is None or len(shape) <= 1:
        return size % block_size == 0
    return shape[-1] % block_size == 0


@functools.lru_cache(maxsize=256)
def _leaf_fn(
    flags: Flags,
    static: tuple[tuple[str, type, Any], ...],
    wd_static: bool | None,
    codecs: Codecs = _PLAIN3,
    apply: bool = False,
    kernel: bool = False,
) -> Callable[..., Any]:
    """A jitted :func:`step_leaf` with the static hyperparameters, the static mask and the codecs baked in.

    ``static`` holds ``(name, type, value)`` so that ``1`` and ``1.0`` (equal hashes, different JAX
    types) get separate entries.
    """
    fixed = {name: value for name, _, value in static}

    def leaf(
        dynamic: dict[str, Any], g: Any, p: Any, nu: Any, mu: Any, trace: Any, wd: Any, rnd: Any
    ) -> LeafOut:
        return step_leaf(
            flags,
            Scalars(**fixed, **dynamic),
            codecs,
            g,
            p,
            nu,
            mu,
            trace,
            wd if wd_static is None else wd_static,
            rnd,
            apply,
            kernel,
        )

    return jax.jit(leaf)


# --------------------------------------------------------------------------- the entry point


@dataclasses.dataclass
class Result:
    """What :func:`run` returns: per leaf the update (or new parameter), and the new accumulators.

    ``kernel``: per leaf, whether the fused kernel stepped it (``update_and_apply`` uses it).
    For packed state ``nu``/``mu``/``trace`` are the new :class:`~rmsprop_jax._packed.PackedTree`;
    otherwise per-leaf lists.
    """

    outs: list[Any]
    nu: Any
    mu: Any
    trace: Any
    kernel: list[bool]


def run(
    flags: Flags,
    scalars: Scalars,
    gs: Sequence[Any],
    ps: Sequence[Any] | None,
    masks: Sequence[Any],
    nus: Any,
    mus: Any,
    traces: Any,
    codecs: Sequence[Codecs] | None = None,
    rounding: tuple[Any, Any] | None = None,
    apply: bool = False,
) -> Result:
    """One RMSProp step over every leaf, by the strategy the state and the backend call for.

    ``gs``/``ps``/``masks`` are per leaf (``ps`` may be ``None`` when neither weight decay nor
    ``apply`` needs it); ``nus``/``mus``/``traces`` are per-leaf lists of stored accumulators
    (``None`` entries where absent), or :class:`~rmsprop_jax._packed.PackedTree` for packed state.
    ``codecs``: per leaf, the codecs of (nu, mu, trace). ``rounding``: ``(seed, step)`` for
    stochastic rounding. ``apply``: each leaf returns its new parameter instead of its update.
    """
    if isinstance(nus, _packed.PackedTree):
        return _run_packed(flags, scalars, gs, ps, masks, nus, mus, traces, codecs, rounding, apply)
    n = len(gs)
    ps = ps if ps is not None else [None] * n
    codecs = codecs if codecs is not None else [_PLAIN3] * n
    static, dynamic = split_scalars(scalars)
    keys = None
    if rounding is not None and any(cs != _PLAIN3 for cs in codecs):
        keys = _quantize.leaf_keys(*rounding, n)
        # Each leaf's keys as a separate value behind a barrier, so that XLA does not fold the row
        # index into every leaf's kernel (which made leaves of one shape compile to distinct
        # kernels): measured on 128 bf16 leaves, centered + momentum, compile 36.5 s -> 21.5 s.
        keys = jax.lax.optimization_barrier([keys[i] for i in range(n)])
    outs, new_nu, new_mu, new_tr, kernels = [], [], [], [], []
    for i, (g, p, nu, mu, tr, mask, cs) in enumerate(
        zip(gs, ps, nus, mus, traces, masks, codecs, strict=True)
    ):
        wd_static = mask if isinstance(mask, bool) else None
        kernel = use_kernel(cs, g, (nu, mu, tr), mask)
        fn = _leaf_fn(flags, static, wd_static, cs, apply, kernel)
        rnd = None if keys is None or cs == _PLAIN3 else keys[i]
        u, a, b, c = fn(dynamic, g, p, nu, mu, tr, None if wd_static is not None else mask, rnd)
        outs.append(u)
        new_nu.append(a)
        new_mu.append(b)
        new_tr.append(c)
        kernels.append(kernel)
    return Result(outs, new_nu, new_mu, new_tr, kernels)


# --------------------------------------------------------------------------- packed


def _run_packed(
    flags: Flags,
    scalars: Scalars,
    gs: Sequence[Any],
    ps: Sequence[Any] | None,
    masks: Sequence[Any],
    nu: Any,
    mu: Any,
    trace: Any,
    codecs: Any,
    rounding: Any,
    apply: bool,
) -> Result:
    layout = nu.layout
    _packed.check_packable(gs)
    if ps is not None:
        _packed.check_packable(ps)
    static, dynamic = split_scalars(scalars)
    codecs = tuple(codecs) if codecs is not None else (_PLAIN3,) * len(layout.groups)
    # Stochastic rounding: each leaf's keys, as in the per-leaf strategy (same bits per element).
    keys = None
    if rounding is not None and any(cs != _PLAIN3 for cs in codecs):
        seed, step = rounding
        keys = _quantize.leaf_keys(seed, step, len(gs))
    wd_static: list[bool | None] = []
    group_masks: list[Any] = []
    for group in layout.groups:
        ms = [masks[i] for i in group.leaves]
        if all(isinstance(m, bool) for m in ms) and len(set(ms)) <= 1:
            wd_static.append(ms[0] if ms else True)
            group_masks.append(None)
        else:  # the mask differs within the group (or is an array): one boolean per element
            wd_static.append(None)
            group_masks.append([jnp.asarray(m, bool) for m in ms])
    fn = _packed_fn(flags, static, layout, tuple(wd_static), ps is not None, codecs)
    updates, (nus, mus, trs) = fn(
        dynamic,
        keys,
        list(gs),
        list(ps) if ps is not None else [],
        nu.buffers,
        None if mu is None else mu.buffers,
        None if trace is None else trace.buffers,
        group_masks,
    )
    if apply:
        assert ps is not None
        updates = [(p + u).astype(jnp.result_type(p)) for p, u in zip(ps, updates, strict=True)]
    return Result(
        updates,
        _packed.PackedTree(nus, layout),
        None if mu is None else _packed.PackedTree(mus, layout),
        None if trace is None else _packed.PackedTree(trs, layout),
        [False] * len(gs),
    )


@functools.lru_cache(maxsize=64)
def _packed_fn(
    flags: Flags,
    static: tuple[tuple[str, type, Any], ...],
    layout: _packed.Layout,
    wd_static: tuple[bool | None, ...],
    has_params: bool,
    codecs: tuple[Codecs, ...],
) -> Callable[..., Any]:
    """One jitted function for the whole packed update of a layout and static configuration.

    Jitted so that eager ``update`` calls run the same compiled program as a jitted training
    step (inlined there), as the per-leaf strategy does.
    """
    fixed = {name: value for name, _, value in static}

    def update(
        dynamic: dict[str, Any],
        keys: Any,
        gs: list[Any],
        ps: list[Any],
        nus: Any,
        mus: Any,
        trs: Any,
        masks: Any,
    ) -> tuple[list[Any], tuple[list[Any], list[Any], list[Any]]]:
        scalars = Scalars(**fixed, **dynamic)
        n = layout.treedef.num_leaves
        updates: list[Any] = [None] * n
        new: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
        for k, group in enumerate(layout.groups):
            g_dtype = jnp.result_type(*(gs[i] for i in group.leaves)) if group.leaves else group.acc_dtype
            g = _packed.gather(gs, group, g_dtype)
            p = (
                _packed.gather(ps, group, jnp.result_type(*(ps[i] for i in group.leaves)))
                if has_params
                else None
            )
            if wd_static[k] is None:  # array masks: one boolean per element
                wd_on: Any = _packed.gather(
                    [
                        jnp.broadcast_to(jnp.asarray(m, bool), s)
                        for m, s in zip(masks[k], group.shapes, strict=True)
                    ],
                    dataclasses.replace(group, leaves=tuple(range(len(group.leaves)))),
                    bool,
                )
            else:
                wd_on = wd_static[k]
            cs = codecs[k]
            mu = None if mus is None else cs[1].decode(mus[k])
            tr = None if trs is None else cs[2].decode(trs[k])
            var_floor = max(cs[0].variance_floor, cs[1].variance_floor) if flags.centered else 0.0
            u, *accs = rms_leaf(flags, scalars, g, p, cs[0].decode(nus[k]), mu, tr, wd_on, var_floor)
            for i, x in zip(group.leaves, _packed.split(u, group), strict=True):
                updates[i] = x.astype(jnp.result_type(gs[i]))
            for j, (out, x) in enumerate(zip(new, accs, strict=True)):
                if x is not None and keys is not None and cs[j] is not PLAIN:
                    # each leaf's bits, as the per-leaf strategy draws them, gathered like the leaves
                    bits = [
                        _quantize.hash_bits(keys[i, j], s)
                        for i, s in zip(group.leaves, group.shapes, strict=True)
                    ]
                    index = dataclasses.replace(group, leaves=tuple(range(len(group.leaves))))
                    x = cs[j].encode(x, _packed.gather(bits, index, jnp.uint32))
                elif x is not None:
                    x = cs[j].encode(x, None)  # type: ignore[arg-type]  # no bits: not stochastic
                out.append(x)
        return updates, new

    return jax.jit(update)
