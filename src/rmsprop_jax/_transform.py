"""The optax plumbing around :func:`rmsprop_jax._update.rms_leaf`: state type, init, update.

``update`` reads top to bottom: restore the state (a state that went through Flax NNX holds
mappings), check the gradient tree, compute the step's scalars, run the executor
(:mod:`rmsprop_jax._executor`, which chooses how), build the new state. The arithmetic is in
``_update``, the storage formats in ``_formats`` and ``_codecs``, validation in ``_validate``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, TypeAlias, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _executor, _packed, _quantize, _validate
from rmsprop_jax._codecs import (
    PLAIN,
    Codec,
    Quantized,
    as_received,
    is_quantized,
    leaf_codec,
    partition_parts,
    restore_quantized,
    stored_shape,
)
from rmsprop_jax._formats import Format, is_quantized_format, resolve, stored_layout
from rmsprop_jax._update import Flags, Scalars

ScalarOrSchedule: TypeAlias = float | jax.Array | optax.Schedule
MaskOrFn: TypeAlias = Any  # a pytree of bools (or a prefix of the params tree), or params -> such a pytree
AccumulatorDtype: TypeAlias = Any  # None, a floating dtype, "int8", Float(...) or Int8(...)


class RmsPropState(NamedTuple):
    """State of :func:`rmsprop` and :func:`scale_by_rms`.

    Attributes:
      count: number of steps taken (int32 scalar); drives schedules and bias correction.
      nu: exponential moving average of squared gradients, one leaf per parameter
        (with ``packed=True``: a :class:`~rmsprop_jax._packed.PackedTree`, one flat buffer
        per leaf group; ``.unpack()`` gives the per-parameter tree).
      mu: exponential moving average of gradients (``centered=True``), else ``None``.
      trace: momentum buffer (``momentum`` not ``None``), else ``None``.

    With 8-bit state (``accumulator_dtype="int8"``) an accumulator leaf of a large parameter is
    a :class:`QuantizedLeaf` ``(codes, absmax)`` in place of an array (so
    ``optax.tree.get(state, "nu")`` returns the tree with those nodes). :func:`rmsprop_jax.decode`
    turns any accumulator leaf, in every format, back into float32.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    nu: optax.Updates
    mu: optax.Updates | None
    trace: optax.Updates | None


# --------------------------------------------------------------------------- validation


# --------------------------------------------------------------------------- state


def _float_leaf_dtype(path: Any, leaf: Any) -> Any:
    dtype = jnp.dtype(leaf.dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"params leaf {jax.tree_util.keystr(path) or '<root>'} has dtype {dtype}; "
            "RMSProp needs floating or complex parameters. Exclude integer and boolean "
            "leaves from the optimized tree (e.g. with optax.masked or a Flax `wrt` filter)."
        )
    return dtype


def _accumulator_dtypes(param_dtype: Any, accumulator_dtype: Any) -> tuple[Any, Any]:
    """(dtype of nu, dtype of mu/trace) for a parameter dtype.

    nu holds |g|^2 and is real for complex parameters; mu and the momentum
    buffer follow the gradient and stay complex.
    """
    base = param_dtype if accumulator_dtype is None else accumulator_dtype
    real = jnp.finfo(base).dtype
    if jnp.issubdtype(param_dtype, jnp.complexfloating):
        return real, jnp.result_type(real, jnp.complex64)
    return real, base


def _init_state(
    params: Any,
    initial_scale: Any,
    centered: bool,
    momentum: bool,
    fmt: Format,
) -> RmsPropState:
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    nus, mus, traces = [], [], []

    def new(p: Any, value: Any, dtype: Any, codec: Codec) -> Any:
        if codec is PLAIN:
            return _full_like_param(p, value, dtype)
        return codec.init(_full_like_param(p, value, jnp.float32))

    for path, p in paths_leaves:
        nu_dt, acc_dt = _accumulator_dtypes(_float_leaf_dtype(path, p), fmt.dtype)
        roles = [("nu", nu_dt)] + ([("acc", acc_dt)] if centered or momentum else [])
        codecs = [fmt.codec(tuple(p.shape), dt, role, like=p) for role, dt in roles]
        _warn_unfit_blocks(path, p, codecs, getattr(fmt, "layout", ""))
        nus.append(new(p, initial_scale, nu_dt, codecs[0]))
        if centered:
            mus.append(new(p, 0, acc_dt, codecs[1]))
        if momentum:
            traces.append(new(p, 0, acc_dt, codecs[1]))

    def tree(leaves: list[Any]) -> Any:
        # Flax NNX: a quantized leaf under a partitioned Variable gets a partitioning per part.
        t = jax.tree.unflatten(treedef, leaves)
        return partition_parts(t) if is_quantized_format(fmt) else t

    return RmsPropState(
        count=jnp.zeros([], jnp.int32),
        nu=tree(nus),
        mu=tree(mus) if centered else None,
        trace=tree(traces) if momentum else None,
    )


def _warn_unfit_blocks(path: Any, p: Any, codecs: list[Codec], chosen: str) -> None:
    """Warn, naming the leaf, where the known shards of ``p`` cut its blocks or tiles, so that every
    update gathers it; ``chosen``: the format's layout (``"auto"`` cuts only where neither fits)."""
    for codec in codecs:
        if not isinstance(codec, Quantized) or codec.layout not in ("rows", "tiles"):
            continue
        bs, tile = codec.block_size, "x".join(map(str, _quantize.tile_shape(codec.block_size)))
        if codec.layout == "tiles":
            why, what = _quantize.unfit_tiles(p, bs), f"layout='tiles' cannot keep its {tile} tiles"
        else:
            why, what = _quantize.unfit_rows(p, bs), f"layout='{chosen}' cannot keep its blocks of {bs}"
            if why and len(p.shape) >= 2:
                tiles = _quantize.unfit_tiles(p, bs)
                why += f"; {tile} tiles do not fit either ({tiles})" if tiles else "; layout='tiles' fits"
        if why:
            leaf = jax.tree_util.keystr(path) or "<root>"
            warnings.warn(
                f"params leaf {leaf} {tuple(p.shape)}: {what} inside its shards ({why}); every update "
                "gathers it along that dimension. Shard it in multiples of the block or tile, or "
                "choose a block_size that fits.",
                stacklevel=4,
            )
            return


def _full_like_param(p: Any, value: Any, dtype: Any) -> jax.Array:
    """An accumulator for parameter ``p``, placed (sharded) like ``p``.

    Concrete arrays and ``jax.ShapeDtypeStruct`` carry a sharding: the accumulator
    gets the same. Under ``jit`` a tracer carries none in ``AxisType.Auto`` meshes (nor
    without a mesh), and a constant fill would be placed by XLA on its own: replicated,
    or on one device, as optax's accumulators are. So the fill is made to depend
    element-wise on ``p`` and XLA's sharding propagation gives it ``p``'s sharding. In
    ``AxisType.Explicit`` meshes this also works without a ``jax.set_mesh`` context,
    where ``jnp.full_like`` fails. ``where(isfinite(|p|), |p|, 0) * 0`` is exactly +0.0
    (never NaN or -0.0, whatever ``p`` holds), so the values equal a plain fill bit for bit.
    """
    if not isinstance(p, jax.core.Tracer):
        # Single-device placement is left to JAX, so that init's output is not "committed"
        # where the params were not (a committed/uncommitted mix compiles the first step twice).
        sharding = getattr(p, "sharding", None)
        if sharding is not None and len(sharding.device_set) == 1:
            sharding = None
        return jnp.full(p.shape, value, dtype, device=sharding)
    magnitude = jnp.abs(p)  # real, >= 0: the product below is +0.0, never -0.0
    zero = jnp.where(jnp.isfinite(magnitude), magnitude, 0) * 0
    return zero.astype(dtype) + jnp.asarray(value).astype(dtype)


# --------------------------------------------------------------------------- update


def _check_structure(grads: Any, state: RmsPropState, params: Any) -> Any:
    """Grads must have the state's tree, its shapes, and a float (complex only for complex params) dtype."""
    treedef: Any = jax.tree.structure(grads)  # jaxlib ships no stubs: PyTreeDef is opaque to mypy
    paths_grads = jax.tree_util.tree_flatten_with_path(grads)[0]
    packed = _packed.structure(state.nu)
    if packed is not None:  # compared by key paths: see _packed.leaf_path
        nu_def, nu_shapes = packed
        same = tuple(_packed.leaf_path(p) for p, _ in paths_grads) == nu_def
    else:
        nu_def = jax.tree.structure(state.nu, is_leaf=is_quantized)
        nu_shapes = [stored_shape(x) for x in jax.tree.leaves(state.nu, is_leaf=is_quantized)]
        same = treedef == nu_def
    if not same:
        raise ValueError(
            "the gradient tree does not match the optimizer state.\n"
            f"  gradients: {treedef}\n  state.nu:  {nu_def}\n"
            "Pass gradients with the structure of the params given to init()."
        )
    ps = treedef.flatten_up_to(params) if params is not None else [None] * len(paths_grads)
    for (path, g), nu_shape, p in zip(paths_grads, nu_shapes, ps, strict=True):
        name = jax.tree_util.keystr(path) or "<root>"
        if jnp.shape(g) != nu_shape:
            raise ValueError(
                f"gradient leaf {name} has shape {jnp.shape(g)} "
                f"but its state (and so its parameter) has shape {nu_shape}."
            )
        g_dtype = jnp.result_type(g)
        if not jnp.issubdtype(g_dtype, jnp.inexact):
            raise TypeError(
                f"gradient leaf {name} has dtype {g_dtype}; expected a floating or complex dtype."
            )
        if p is not None and jnp.iscomplexobj(g) and not jnp.iscomplexobj(p):
            raise TypeError(
                f"gradient leaf {name} is complex ({g_dtype}) but its parameter is real "
                f"({jnp.result_type(p)}); take the real part, or make the parameter complex."
            )
    return treedef


def _mask_leaves(mask: MaskOrFn | None, params: Any, treedef: jax.tree_util.PyTreeDef) -> list[Any]:
    """One mask value per leaf: a static Python bool where possible, else a boolean array."""
    n = treedef.num_leaves
    if mask is None:
        return [True] * n
    tree = mask(params) if callable(mask) else mask
    # The mask may be a prefix of the params tree: broadcast each entry over its subtree.
    full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), tree, treedef.unflatten([0] * n))
    out = []
    for m in jax.tree.leaves(full):
        if isinstance(m, (bool, np.bool_)) or (isinstance(m, np.ndarray) and m.shape == ()):
            out.append(bool(m))
        else:
            out.append(m)
    return out


@functools.partial(jax.jit, inline=True)
def _bias_correction(decay: Any, count: jax.Array) -> jax.Array:
    """``1 - decay**count``, always compiled (as optax's ``bias_correction`` helper is).

    Op by op (an un-jitted ``update``), ``decay**count`` takes a different code path
    from the compiled one and differs in the last bit; ``1 - decay**t`` then loses
    most of its digits to cancellation (relative error ~1e-5 at decay 0.999). As a
    jitted helper (inlined under an outer ``jit``) eager and jitted updates use the
    same compiled power, and so equal each other and optax's.
    """
    return 1 - decay**count


def _value(x: ScalarOrSchedule | None, count: jax.Array) -> Any:
    """A hyperparameter's value at step ``count`` (``None`` stays ``None``)."""
    if x is None:
        return None
    # Compiled (inlined under an outer jit), so that an eager update reads the same value as a jitted one.
    if not callable(x):
        return x
    try:
        hash(x)
    except TypeError:  # an unhashable callable object: it cannot key the compile cache
        return x(count)
    return _call_compiled(x, count)


@functools.partial(jax.jit, static_argnums=0, inline=True)
def _call_compiled(fn: Callable[[jax.Array], Any], count: jax.Array) -> Any:
    return fn(count)


def _codec_of(fmt: Format, stored: Any) -> Codec:
    """The codec that produced a stored accumulator (read from its type and dtype)."""
    if stored is None:
        return PLAIN
    if is_quantized(stored):
        return leaf_codec(stored, getattr(fmt, "rounding", "nearest"))
    if is_quantized_format(fmt):
        return PLAIN
    return fmt.codec((), jnp.result_type(stored))


_KIND = {"int8": "8-bit", "int4": "4-bit", "fp8": "FP8"}  # a quantized codec kind, in words


def _check_packable(params: Any, fmt: Format) -> None:
    """``packed=True`` stores float buffers (any rounding): quantized leaves raise."""
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        for dt in _accumulator_dtypes(_float_leaf_dtype(path, p), fmt.dtype):
            codec = fmt.codec(tuple(p.shape), dt)
            if isinstance(codec, Quantized):
                raise ValueError(
                    f"packed=True cannot store leaf {jax.tree_util.keystr(path) or '<root>'} "
                    f"({p.shape}) as {_KIND[codec.kind]} codes: the packed layout holds float buffers (a "
                    f"quantized block would straddle leaves). Use packed=False for {codec.kind} state, "
                    f"or optax.flatten(rmsprop_jax.rmsprop(..., accumulator_dtype='{codec.kind}')) for "
                    "one quantized buffer."
                )


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything a transformation was built with (validated; ``weight_decay`` ``None`` when off)."""

    learning_rate: ScalarOrSchedule | None
    decay: Any
    eps: Any
    initial_scale: Any
    flags: Flags
    momentum: Any
    weight_decay: ScalarOrSchedule | None
    decoupled_weight_decay: bool
    weight_decay_mask: MaskOrFn | None
    fmt: Format
    packed: bool

    def scalars(self, count: jax.Array, count_inc: jax.Array) -> Scalars:
        """The step's hyperparameter values (schedules evaluated at ``count``)."""
        wd = _value(self.weight_decay, count)
        return Scalars(
            lr=_value(self.learning_rate, count),
            decay=self.decay,
            one_minus_decay=1 - self.decay,
            eps=self.eps,
            momentum=self.momentum,
            coupled_wd=None if self.decoupled_weight_decay else wd,
            decoupled_wd=wd if self.decoupled_weight_decay else None,
            bias_correction=_bias_correction(self.decay, count_inc) if self.flags.bias_correction else None,
        )


class _Recorder:
    """Handed to ``update`` by :func:`update_and_apply` (as an extra argument, which optax's wrappers
    pass on): where the fused kernel steps a leaf, ``update`` also computes that leaf's new
    parameter inside the kernel and records, per leaf, the plain outputs beside the fused ones."""

    KEY = "_rmsprop_jax_update_and_apply"

    def __init__(self) -> None:
        # per leaf: (update, [its state leaves], new parameter, [the fused step's state leaves])
        self.leaves: list[tuple[Any, list[Any], Any, list[Any]]] = []


def _build(c: _Config) -> optax.GradientTransformationExtraArgs:
    flags = c.flags

    def init_fn(params: optax.Params) -> RmsPropState:
        if not c.packed:
            return _init_state(params, c.initial_scale, flags.centered, flags.momentum, c.fmt)
        _check_packable(params, c.fmt)
        treedef = jax.tree.structure(params)
        masks = _mask_leaves(c.weight_decay_mask, params, treedef) if c.weight_decay is not None else None
        layout = _packed.build_layout(
            params, lambda path, p: _accumulator_dtypes(_float_leaf_dtype(path, p), c.fmt.dtype), masks
        )
        return RmsPropState(
            count=jnp.zeros([], jnp.int32),
            nu=_packed.full(layout, c.initial_scale, "nu"),
            mu=_packed.full(layout, 0, "acc") if flags.centered else None,
            trace=_packed.full(layout, 0, "acc") if flags.momentum else None,
        )

    def update_fn(
        updates: optax.Updates, state: RmsPropState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, RmsPropState]:
        # optax's convention: keywords other transformations need are accepted and ignored.
        recorder = extra_args.get(_Recorder.KEY)
        # 1. restore the state: a state that went through Flax NNX's Optimizer holds mappings.
        received = state
        if is_quantized_format(c.fmt):
            codec_for = lambda role: (
                lambda shape, absmax: stored_layout(
                    c.fmt.codec(shape, jnp.float32, role), c.fmt, shape, absmax
                )
            )
            state = state._replace(
                nu=restore_quantized(state.nu, updates, codec_for("nu")),
                mu=restore_quantized(state.mu, updates, codec_for("acc")),
                trace=restore_quantized(state.trace, updates, codec_for("acc")),
            )
        # 2. check the tree.
        treedef = _check_structure(updates, state, params)
        if c.weight_decay is not None and params is None:
            raise ValueError(
                f"weight_decay={c.weight_decay!r} needs the parameters: call update(grads, state, params)."
            )
        # 3. the step's scalars.
        count_inc = cast(jax.Array, optax.safe_increment(state.count))
        scalars = c.scalars(state.count, count_inc)
        # 4. the executor.
        n = treedef.num_leaves
        gs = treedef.flatten_up_to(updates)
        needs_params = c.weight_decay is not None or recorder is not None
        ps = treedef.flatten_up_to(params) if needs_params and params is not None else None
        masks = (
            _mask_leaves(c.weight_decay_mask, params, treedef) if c.weight_decay is not None else [True] * n
        )
        if c.packed:  # one codec triple per group of leaves
            accs: tuple[Any, Any, Any] = (state.nu, state.mu, state.trace)
            bufs = [
                cast(Any, x).buffers if x is not None else [None] * len(cast(Any, state.nu).buffers)
                for x in accs
            ]
            codecs = [tuple(_codec_of(c.fmt, x) for x in group) for group in zip(*bufs, strict=True)]
        else:
            accs = (
                treedef.flatten_up_to(state.nu),
                treedef.flatten_up_to(state.mu) if flags.centered else [None] * n,
                treedef.flatten_up_to(state.trace) if flags.momentum else [None] * n,
            )
            codecs = [tuple(_codec_of(c.fmt, x) for x in leaf) for leaf in zip(*accs, strict=True)]
        stochastic = codecs is not None and any(x.stochastic for cs in codecs for x in cs)
        rounding = (c.fmt.seed, state.count) if stochastic else None
        args = (flags, scalars, gs, ps if c.weight_decay is not None else None, masks, *accs)
        result = _executor.run(*args, codecs, rounding)  # type: ignore[arg-type]
        # 5. the new state, 8-bit leaves in the containers they came in.
        new_state = _new_state(c, treedef, count_inc, result)
        if is_quantized_format(c.fmt) and not c.packed:
            new_state = new_state._replace(
                nu=as_received(received.nu, new_state.nu),
                mu=as_received(received.mu, new_state.mu),
                trace=as_received(received.trace, new_state.trace),
            )
        new_updates = treedef.unflatten(result.outs)
        if recorder is not None and ps is not None and any(result.kernel):
            fused = _executor.run(flags, scalars, gs, ps, masks, *accs, codecs, rounding, apply=True)  # type: ignore[arg-type]
            for i in range(n):
                if result.kernel[i]:
                    recorder.leaves.append(
                        (result.outs[i], _acc_leaves(result, i), fused.outs[i], _acc_leaves(fused, i))
                    )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # type: ignore[arg-type]


def _acc_leaves(result: _executor.Result, i: int) -> list[Any]:
    return jax.tree.leaves([result.nu[i], result.mu[i], result.trace[i]])


def _new_state(c: _Config, treedef: Any, count_inc: jax.Array, result: _executor.Result) -> RmsPropState:
    if c.packed:
        return RmsPropState(count=count_inc, nu=result.nu, mu=result.mu, trace=result.trace)
    return RmsPropState(
        count=count_inc,
        nu=treedef.unflatten(result.nu),
        mu=treedef.unflatten(result.mu) if c.flags.centered else None,
        trace=treedef.unflatten(result.trace) if c.flags.momentum else None,
    )


# --------------------------------------------------------------------------- update and apply


_warned: set[str] = set()
# For tests: per trace of update_and_apply, how many leaves the fused kernel updated in place.
fused_trace_log: list[int] = []


def update_and_apply(
    tx: optax.GradientTransformation,
    grads: optax.Updates,
    state: optax.OptState,
    params: optax.Params,
    **extra_args: Any,
) -> tuple[optax.Params, optax.OptState]:
    """``tx.update`` followed by ``optax.apply_updates``, as one step: ``(new_params, new_state)``.

    For any transformation the result is that of::

        updates, state = tx.update(grads, state, params, **extra_args)
        params = optax.apply_updates(params, updates)

    Where the package's fused 8-bit kernel steps a leaf (CUDA GPUs, see the docs' performance
    page), the parameter is updated inside the kernel, so the update is never written to memory
    and read back: the kernel reads the gradient, the parameter and the codes and writes the
    parameter and the codes, 14 bytes per element where ``update`` + ``apply_updates`` move 22
    (H100, 256M-element leaf: 0.90x the float32-state step). This is a property of the
    transformations :func:`rmsprop` and :func:`scale_by_rms` build, wherever they sit inside
    ``tx``: it holds through ``optax.inject_hyperparams``, ``optax.chain`` (as the last
    transformation) and ``optax.masked``, every wrapper that passes the inner updates and state
    on unchanged. A wrapper that changes them (``optax.MultiSteps``, a transformation chained
    after the RMSProp) gets the two calls, with a warning, once per wrapper, that names it.

    The step runs under ``jax.jit`` (inlined into a caller's ``jit``), so that the fused and
    the plain computation of a leaf are never both carried out. The results equal the two-call
    version's under ``jit`` bit for bit, except that the kernel may compute
    ``p + (-lr * x)`` as one fused multiply-add: one rounding of the parameter.

    Example:
      >>> import jax, jax.numpy as jnp, rmsprop_jax
      >>> opt = rmsprop_jax.rmsprop(0.1)
      >>> params = {"w": jnp.ones(3)}
      >>> state = opt.init(params)
      >>> params, state = rmsprop_jax.update_and_apply(opt, {"w": jnp.ones(3)}, state, params)
      >>> params["w"]
      Array([0.68377227, 0.68377227, 0.68377227], dtype=float32)
    """
    if params is None:
        raise ValueError("update_and_apply needs the parameters: update_and_apply(tx, grads, state, params).")
    if not _accepts_extra_args(tx):
        updates, state = tx.update(grads, state, params, **extra_args)
        return optax.apply_updates(params, updates), state
    return cast(tuple[Any, Any], _update_and_apply_jit(tx, grads, state, params, extra_args))


def _accepts_extra_args(tx: Any) -> bool:
    """optax's ExtraArgs transformations and duck-typed ones (``optax.MultiSteps``) with ``**kwargs``."""
    if isinstance(tx, optax.GradientTransformationExtraArgs):
        return True
    try:
        parameters = inspect.signature(tx.update).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


@functools.partial(jax.jit, static_argnums=0)
def _update_and_apply_jit(tx: Any, grads: Any, state: Any, params: Any, extra_args: Any) -> Any:
    recorder = _Recorder()
    updates, new_state = tx.update(grads, state, params, **extra_args, **{_Recorder.KEY: recorder})
    if not recorder.leaves:
        return optax.apply_updates(params, updates), new_state
    u_leaves, u_def = cast(tuple[list[Any], Any], jax.tree.flatten(updates))
    s_leaves, s_def = cast(tuple[list[Any], Any], jax.tree.flatten(new_state))
    s_ids = {id(x) for x in s_leaves}
    new_param: dict[int, Any] = {}  # id of an update leaf -> the fused step's new parameter
    swap: dict[int, Any] = {}  # id of a state leaf -> the fused step's leaf
    for u, accs, p_new, fused_accs in recorder.leaves:
        if any(u is x for x in u_leaves) and all(id(a) in s_ids for a in accs):
            new_param[id(u)] = p_new
            swap.update({id(a): b for a, b in zip(accs, fused_accs, strict=True)})
    fused_trace_log.append(len(new_param))
    if not new_param:
        name = type(new_state).__name__
        if name not in _warned:
            _warned.add(name)
            warnings.warn(
                f"update_and_apply: the transformation around rmsprop_jax's (its state is {name}) changes "
                "the updates or the state it returns (as optax.MultiSteps does, or a transformation chained "
                "after it), so the fused step cannot update the parameters itself: stepped as update + "
                "optax.apply_updates.",
                stacklevel=4,
            )
    p_leaves = u_def.flatten_up_to(params)
    out = [
        new_param[id(u)] if id(u) in new_param else optax.apply_updates(p, u)
        for u, p in zip(u_leaves, p_leaves, strict=True)
    ]
    new_state = s_def.unflatten([swap.get(id(x), x) for x in s_leaves])
    return u_def.unflatten(out), new_state


# --------------------------------------------------------------------------- public factories


def rmsprop(
    learning_rate: ScalarOrSchedule,
    decay: float | jax.Array = 0.9,
    eps: float | jax.Array = 1e-8,
    initial_scale: float | jax.Array = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | jax.Array | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
    *,
    weight_decay: ScalarOrSchedule | None = None,
    decoupled_weight_decay: bool = False,
    weight_decay_mask: MaskOrFn | None = None,
    lr_in_momentum: bool = True,
    maximize: bool = False,
    accumulator_dtype: AccumulatorDtype = None,
    packed: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""RMSProp as an Optax gradient transformation; a drop-in for :func:`optax.rmsprop`.

    The positional arguments, their defaults and the results equal
    ``optax.rmsprop``'s. For a gradient :math:`g_t`, parameters :math:`p_t`,
    learning rate :math:`\alpha_t` and decay :math:`\rho`:

    .. math::

        g &\leftarrow -g_t \ \text{if maximize}; \quad
        g \leftarrow g + \lambda p_t \ \text{(coupled weight decay)} \\
        \nu_t &= \rho\,\nu_{t-1} + (1-\rho)\,|g|^2 \qquad (\nu_0 = \text{initial\_scale}) \\
        \mu_t &= \rho\,\mu_{t-1} + (1-\rho)\,g \qquad \text{(centered only)} \\
        \hat\nu_t, \hat\mu_t &= \nu_t / (1-\rho^t),\ \mu_t / (1-\rho^t) \quad \text{(bias\_correction)} \\
        v_t &= \max(\hat\nu_t - |\hat\mu_t|^2, 0) \ \text{if centered else}\ \hat\nu_t \\
        u_t &= g / \sqrt{v_t + \epsilon} \ \text{if eps\_in\_sqrt else}\ g / (\sqrt{v_t} + \epsilon)

    Momentum :math:`m` (when not ``None``), with the learning rate inside the
    buffer (``lr_in_momentum=True``: optax, TensorFlow, Keras) or outside it
    (``False``: PyTorch):

    .. math::

        \text{inside:}\quad b_t &= -\alpha_t u_t + m\,b_{t-1}, \quad \Delta_t = b_t
            \ (\text{nesterov: } -\alpha_t u_t + m\,b_t) \\
        \text{outside:}\quad b_t &= u_t + m\,b_{t-1}, \quad \Delta_t = -\alpha_t b_t
            \ (\text{nesterov: } -\alpha_t (u_t + m\,b_t))

    Without momentum :math:`\Delta_t = -\alpha_t u_t`. Decoupled weight decay
    (AdamW, Keras 3) adds :math:`-\alpha_t \lambda p_t` to :math:`\Delta_t`.
    The two placements of the learning rate agree while it is constant and
    differ as soon as it changes.

    Args:
      learning_rate: :math:`\alpha`, a float, 0-d array or optax schedule.
      decay: :math:`\rho`, in [0, 1).
      eps: :math:`\epsilon \ge 0`, added inside or outside the square root.
      initial_scale: :math:`\nu_0 \ge 0` (TensorFlow 1 uses 1.0).
      eps_in_sqrt: where eps sits: inside the root (optax, TF1, Keras 3, timm) or outside (PyTorch).
      centered: divide by the root of the variance estimate (Graves, 2013).
      momentum: :math:`m` in [0, 1), or ``None`` for no momentum buffer.
      nesterov: Nesterov momentum; requires ``momentum``.
      bias_correction: divide the moments by :math:`1-\rho^t`.
      weight_decay: :math:`\lambda \ge 0`, a float or schedule; ``None``/0 is off.
      decoupled_weight_decay: ``False``: L2 added to the gradient before the
        moments (PyTorch ``weight_decay``); ``True``: :math:`p \leftarrow p -
        \alpha\lambda p` beside the update (AdamW, Keras 3).
      weight_decay_mask: a pytree of bools with the params' structure (or a
        prefix of it), or a function ``params -> such a pytree``; ``False``
        leaves (biases, norms) are not decayed. optax's convention.
      lr_in_momentum: see above; irrelevant without momentum.
      maximize: ascend the objective instead of descending it (PyTorch's flag).
      accumulator_dtype: how ``nu``, ``mu`` and the momentum buffer are stored, the one storage
        argument. ``None`` (default): each parameter's dtype (bfloat16/float16 parameters then
        get float32 arithmetic and stochastically rounded state). A floating dtype:
        ``Float(dtype)``; bfloat16/float16 round stochastically. ``"int8"``: ``Int8()``,
        bitsandbytes' 8-bit block-wise state (~1.02 bytes per element; leaves below 4096
        elements stay float32). Or a format value, :class:`Float` (dtype, rounding -- stochastic,
        nearest, or ``"optax"``: optax's own bf16 arithmetic bit for bit -- and seed) or
        :class:`Int8` (block size, minimum size, layout, map). The arithmetic runs in float32
        on the decoded state, the update uses the new, unquantized accumulators, and they are
        encoded after the step; updates come back in the gradients' dtype. Read any stored leaf
        with :func:`rmsprop_jax.decode`. How the step is executed (per leaf, the fused GPU kernel
        for 8-bit leaves) is the library's choice, never an argument.
      packed: store each accumulator as one flat buffer per group of leaves
        (same accumulator dtypes and static weight-decay mask) instead of one
        array per parameter: fewer arrays at the ``jit`` boundary, one update
        kernel per group, and 3-5x faster compiles for trees of many small leaves.
        Same numbers as ``packed=False``. ``state.nu`` is then a ``PackedTree``
        (``state.nu.unpack()`` is the per-parameter tree). Not for parameters
        sharded across devices (raises), nor for 8-bit or stochastically rounded
        accumulators (raises: with bfloat16/float16 accumulators pass
        ``accumulator_dtype=Float(rounding="optax")``).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is :class:`RmsPropState`.

    .. warning::
      Libraries disagree on eps placement, the initial accumulator, lr placement
      and weight decay; see :mod:`rmsprop_jax.presets` to reproduce each exactly.

    Example:
      >>> import jax.numpy as jnp, optax, rmsprop_jax
      >>> opt = rmsprop_jax.rmsprop(learning_rate=0.1)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.array([0.5, 0.5])}, state, params)
      >>> optax.apply_updates(params, updates)["w"]
      Array([ 0.6837723, -2.3162277], dtype=float32)

    References:
      Hinton, Srivastava, Swersky, *Neural Networks for Machine Learning*, lecture 6e (2012).
      Graves, *Generating Sequences With Recurrent Neural Networks*, arXiv:1308.0850, eqs. 38-41 (2013).
    """
    _validate.number(
        "learning_rate", learning_rate, lambda v: v >= 0, "learning_rate >= 0, or an optax schedule"
    )
    _validate.core(decay, eps, initial_scale)
    if momentum is not None:
        _validate.number("momentum", momentum, lambda v: 0 <= v < 1, "0 <= momentum < 1, or None")
    if nesterov and (momentum is None or _validate.static_zero(momentum)):
        raise ValueError(f"nesterov=True needs momentum > 0, got momentum={momentum!r}.")
    _validate.number(
        "weight_decay",
        weight_decay if weight_decay is not None else 0.0,
        lambda v: v >= 0,
        "weight_decay >= 0",
    )
    fmt = resolve(accumulator_dtype)
    return _build(
        _Config(
            learning_rate=learning_rate,
            decay=decay,
            eps=eps,
            initial_scale=initial_scale,
            flags=Flags(
                eps_in_sqrt=bool(eps_in_sqrt),
                centered=bool(centered),
                momentum=momentum is not None,
                nesterov=bool(nesterov),
                bias_correction=bool(bias_correction),
                lr_in_momentum=bool(lr_in_momentum),
                maximize=bool(maximize),
                native_precision=fmt.native_arithmetic,
            ),
            momentum=momentum,
            weight_decay=None if _validate.static_zero(weight_decay) else weight_decay,
            decoupled_weight_decay=bool(decoupled_weight_decay),
            weight_decay_mask=weight_decay_mask,
            fmt=fmt,
            packed=_validate.boolean("packed", packed),
        )
    )


def scale_by_rms(
    decay: float | jax.Array = 0.9,
    eps: float | jax.Array = 1e-8,
    initial_scale: float | jax.Array = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    centered: bool = False,
    accumulator_dtype: AccumulatorDtype = None,
    packed: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""The RMSProp preconditioner alone, :math:`g \mapsto g / \sqrt{v_t + \epsilon}`.

    A drop-in for :func:`optax.scale_by_rms` and, with ``centered=True``, for
    :func:`optax.scale_by_stddev`; the equations are :func:`rmsprop`'s without
    the learning rate, momentum and weight decay. Chain it with
    ``optax.scale_by_learning_rate`` (or anything else) as usual.
    ``accumulator_dtype`` and ``packed`` are :func:`rmsprop`'s.

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax
      >>> opt = rmsprop_jax.scale_by_rms(decay=0.5)
      >>> u, _ = opt.update(jnp.array([2.0]), opt.init(jnp.zeros(1)))
      >>> u
      Array([1.4142135], dtype=float32)
    """
    _validate.core(decay, eps, initial_scale)
    fmt = resolve(accumulator_dtype)
    return _build(
        _Config(
            learning_rate=None,
            decay=decay,
            eps=eps,
            initial_scale=initial_scale,
            flags=Flags(
                eps_in_sqrt=bool(eps_in_sqrt),
                centered=bool(centered),
                bias_correction=bool(bias_correction),
                scale_by_lr=False,
                native_precision=fmt.native_arithmetic,
            ),
            momentum=None,
            weight_decay=None,
            decoupled_weight_decay=False,
            weight_decay_mask=None,
            fmt=fmt,
            packed=_validate.boolean("packed", packed),
        )
    )
