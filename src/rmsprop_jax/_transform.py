"""Init/update plumbing around :func:`rmsprop_jax._update.rms_leaf`.

Tree mapping, state layout, schedules, dtype handling and validation live here;
the arithmetic does not.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple, TypeAlias, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _packed
from rmsprop_jax._executor import apply_leaves
from rmsprop_jax._state_codec import (
    DEFAULT_STORAGE,
    PLAIN,
    Blockwise,
    Stochastic,
    Storage,
    is_quantized,
    restore_quantized,
    stored_shape,
)
from rmsprop_jax._update import Flags, Scalars

ScalarOrSchedule: TypeAlias = float | jax.Array | optax.Schedule
MaskOrFn: TypeAlias = Any  # a pytree of bools (or a prefix of the params tree), or params -> such a pytree


class RmsPropState(NamedTuple):
    """State of :func:`rmsprop` and :func:`scale_by_rms`.

    Attributes:
      count: number of steps taken (int32 scalar); drives schedules and bias correction.
      nu: exponential moving average of squared gradients, one leaf per parameter
        (with ``packed=True``: a :class:`~rmsprop_jax._packed.PackedTree`, one flat buffer
        per leaf group; ``.unpack()`` gives the per-parameter tree).
      mu: exponential moving average of gradients (``centered=True``), else ``None``.
      trace: momentum buffer (``momentum`` not ``None``), else ``None``.

    With ``accumulator_dtype="int8"`` an accumulator leaf of a large parameter is a
    :class:`QuantizedLeaf` ``(codes, absmax)`` in place of an array (so
    ``optax.tree.get(state, "nu")`` returns the tree with those nodes); decode one
    with :func:`rmsprop_jax.dequantize_blockwise` (block size and layout as configured).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    nu: optax.Updates
    mu: optax.Updates | None
    trace: optax.Updates | None


# --------------------------------------------------------------------------- validation


def _concrete(x: Any) -> float | None:
    """``x`` as a Python float if it is a concrete real scalar, else ``None`` (traced: unchecked)."""
    if isinstance(x, jax.core.Tracer) or callable(x):
        return None
    arr = np.asarray(x)
    if arr.shape != () or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"expected a real scalar number, got {x!r} of shape {arr.shape}")
    return float(arr)


def _check(name: str, value: Any, ok: Callable[[float], bool], allowed: str) -> None:
    try:
        v = _concrete(value)
    except ValueError as e:
        raise ValueError(f"{name}={value!r} is invalid: {e}; allowed: {allowed}.") from None
    if v is not None and not (math.isfinite(v) and ok(v)):
        raise ValueError(f"{name}={value!r} is out of range; allowed: {allowed}.")


def _check_dtype(name: str, dtype: Any) -> Any:
    if dtype is None:
        return None
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"{name}={dtype!r} is not a dtype; allowed: a floating dtype or None.") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(
            f"{name}={dtype!r} is not a floating dtype; allowed: a floating dtype, 'int8' or None."
        )
    return dt


def _storage(
    accumulator_dtype: Any, stochastic_rounding: Any, rounding_seed: Any, quantization: Any
) -> tuple[Any, Storage]:
    """(float accumulator dtype or None, storage choice) from the public arguments."""
    int8 = isinstance(accumulator_dtype, str) and accumulator_dtype == "int8"
    if not int8 and accumulator_dtype is not None and not isinstance(accumulator_dtype, str):
        try:
            int8 = jnp.dtype(accumulator_dtype) == jnp.dtype(jnp.int8)
        except TypeError:
            pass
    if stochastic_rounding not in (None, True, False):
        raise ValueError(
            f"stochastic_rounding={stochastic_rounding!r} is invalid; allowed: None (automatic: on for "
            "bfloat16/float16 accumulators), True or False (round to nearest, as optax)."
        )
    # None is seed 0. (A numeric default would make optax.inject_hyperparams inject it, so the
    # injected state would no longer have optax.rmsprop's structure: checkpoints would not carry over.)
    if rounding_seed is None:
        rounding_seed = 0
    # optax.inject_hyperparams passes numbers as (possibly traced) arrays: checked when concrete.
    if not isinstance(rounding_seed, jax.core.Tracer):
        seed = np.asarray(rounding_seed)
        if seed.shape != () or seed.dtype.kind not in "iu" or not 0 <= int(seed) < 2**32:
            raise ValueError(
                f"rounding_seed={rounding_seed!r} is invalid; allowed: an integer in [0, 2**32)."
            )
    if quantization is not None and not isinstance(quantization, Blockwise):
        raise ValueError(
            f"quantization={quantization!r} is invalid; allowed: None or rmsprop_jax.Blockwise(...)."
        )
    if quantization is not None and not int8:
        raise ValueError(
            f"quantization={quantization!r} needs accumulator_dtype='int8', got {accumulator_dtype!r}."
        )
    storage = Storage(
        int8=int8,
        blockwise=quantization or Blockwise(),
        stochastic=stochastic_rounding,
        seed=rounding_seed,
    )
    if int8:
        return jnp.dtype(jnp.float32), storage
    if isinstance(accumulator_dtype, str) and accumulator_dtype not in ("int8",):
        try:
            jnp.dtype(accumulator_dtype)
        except TypeError:
            raise ValueError(
                f"accumulator_dtype={accumulator_dtype!r} is not a dtype; "
                "allowed: a floating dtype, 'int8' or None."
            ) from None
    return _check_dtype("accumulator_dtype", accumulator_dtype), storage


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r} is not a bool; allowed: True or False.")
    return bool(value)


def _validate_core(decay: Any, eps: Any, initial_scale: Any) -> None:
    _check("decay", decay, lambda v: 0 <= v < 1, "0 <= decay < 1")
    _check("eps", eps, lambda v: v >= 0, "eps >= 0")
    _check("initial_scale", initial_scale, lambda v: v >= 0, "initial_scale >= 0")


def _static_zero(x: Any) -> bool:
    """True for ``None`` and for a concrete zero: the option is statically off."""
    if x is None:
        return True
    if callable(x) or isinstance(x, jax.core.Tracer):
        return False
    return float(np.asarray(x)) == 0.0


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


def _check_packable(params: Any, accumulator_dtype: Any, storage: Storage) -> None:
    """``packed=True`` stores plain float buffers: 8-bit or stochastically rounded leaves raise."""
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        for dt in _accumulator_dtypes(_float_leaf_dtype(path, p), accumulator_dtype):
            codec = storage.codec(tuple(p.shape), dt)
            if codec is not PLAIN:
                raise ValueError(
                    f"packed=True cannot store leaf {jax.tree_util.keystr(path) or '<root>'} "
                    f"({p.shape}, {jnp.dtype(dt)} accumulators) as {type(codec).__name__}: the packed "
                    "layout holds plain float buffers. Use packed=False for 8-bit or stochastically "
                    "rounded state, or stochastic_rounding=False (round to nearest, as optax) with "
                    "low-precision accumulators."
                )


def _check_kernel_unsharded(leaves: Any, storage: Storage) -> None:
    """``Blockwise(kernel="pallas"...)`` refuses parameters sharded over several devices."""
    if not storage.int8 or storage.blockwise.kernel == "xla":
        return
    found = _packed.sharded_leaf(leaves)
    if found is not None:
        leaf, sharding = found
        raise ValueError(
            f"quantization=Blockwise(kernel={storage.blockwise.kernel!r}) cannot be used with parameters "
            f"sharded across devices: a leaf of shape {jnp.shape(leaf)} has sharding {sharding}. A Pallas "
            "kernel has no partitioning rule, so XLA would gather every such leaf onto each device. Use "
            "kernel='xla' (the default), whose 8-bit state is sharded like its parameter and updated "
            "with no communication."
        )


def _init_state(
    params: Any,
    initial_scale: Any,
    centered: bool,
    momentum: bool,
    accumulator_dtype: Any,
    storage: Storage = DEFAULT_STORAGE,
) -> RmsPropState:
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    nus, mus, traces = [], [], []

    def new(p: Any, value: Any, dtype: Any) -> Any:
        codec = storage.codec(tuple(p.shape), dtype)
        if codec is PLAIN:
            return _full_like_param(p, value, dtype)
        return codec.init(_full_like_param(p, value, jnp.float32))

    for path, p in paths_leaves:
        nu_dt, acc_dt = _accumulator_dtypes(_float_leaf_dtype(path, p), accumulator_dtype)
        nus.append(new(p, initial_scale, nu_dt))
        if centered:
            mus.append(new(p, 0, acc_dt))
        if momentum:
            traces.append(new(p, 0, acc_dt))
    return RmsPropState(
        count=jnp.zeros([], jnp.int32),
        nu=jax.tree.unflatten(treedef, nus),
        mu=jax.tree.unflatten(treedef, mus) if centered else None,
        trace=jax.tree.unflatten(treedef, traces) if momentum else None,
    )


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


def _check_structure(grads: Any, state: RmsPropState, params: Any) -> jax.tree_util.PyTreeDef:
    """Grads must have the state's tree, its shapes, and a float (complex only for complex params) dtype."""
    treedef: Any = jax.tree.structure(grads)  # jaxlib ships no stubs: PyTreeDef is opaque to mypy
    packed = _packed.structure(state.nu)
    nu_def, nu_shapes = packed or (
        jax.tree.structure(state.nu, is_leaf=is_quantized),
        [stored_shape(x) for x in jax.tree.leaves(state.nu, is_leaf=is_quantized)],
    )
    if treedef != nu_def:
        raise ValueError(
            "the gradient tree does not match the optimizer state.\n"
            f"  gradients: {treedef}\n  state.nu:  {nu_def}\n"
            "Pass gradients with the structure of the params given to init()."
        )
    paths_grads = jax.tree_util.tree_flatten_with_path(grads)[0]
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


def _make(
    *,
    learning_rate: ScalarOrSchedule | None,
    decay: Any,
    eps: Any,
    initial_scale: Any,
    flags: Flags,
    momentum: Any,
    weight_decay: ScalarOrSchedule | None,
    decoupled_weight_decay: bool,
    weight_decay_mask: MaskOrFn | None,
    accumulator_dtype: Any,
    storage: Storage = DEFAULT_STORAGE,
    packed: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Build the transformation. ``weight_decay`` is ``None`` when statically off."""

    def init_fn(params: optax.Params) -> RmsPropState:
        if packed:
            _check_packable(params, accumulator_dtype, storage)
            return _init_packed(params)
        _check_kernel_unsharded(jax.tree.leaves(params), storage)
        return _init_state(params, initial_scale, flags.centered, flags.momentum, accumulator_dtype, storage)

    def _init_packed(params: optax.Params) -> RmsPropState:
        treedef = jax.tree.structure(params)
        masks = _mask_leaves(weight_decay_mask, params, treedef) if weight_decay is not None else None
        layout = _packed.build_layout(
            params,
            lambda path, p: _accumulator_dtypes(_float_leaf_dtype(path, p), accumulator_dtype),
            masks,
        )
        return RmsPropState(
            count=jnp.zeros([], jnp.int32),
            nu=_packed.full(layout, initial_scale, "nu"),
            mu=_packed.full(layout, 0, "acc") if flags.centered else None,
            trace=_packed.full(layout, 0, "acc") if flags.momentum else None,
        )

    def update_fn(
        updates: optax.Updates,
        state: RmsPropState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, RmsPropState]:
        del extra_args  # optax's convention: keywords other transformations need are accepted and ignored
        return step(updates, state, params, apply=False)

    def apply_fn(
        updates: optax.Updates, state: RmsPropState, params: optax.Params, **extra_args: Any
    ) -> tuple[optax.Params, RmsPropState]:
        del extra_args
        if params is None:
            raise ValueError(
                "update_and_apply needs the parameters: update_and_apply(tx, grads, state, params)."
            )
        return step(updates, state, params, apply=True)

    def step(
        updates: optax.Updates, state: RmsPropState, params: optax.Params | None, apply: bool
    ) -> tuple[Any, RmsPropState]:
        """``update`` (``apply=False``), or ``update`` and ``optax.apply_updates`` in one (``apply=True``)."""
        # A state that went through Flax NNX's Optimizer holds mappings: see restore_quantized.
        if storage.int8:
            state = state._replace(
                nu=restore_quantized(state.nu),
                mu=restore_quantized(state.mu),
                trace=restore_quantized(state.trace),
            )
        treedef = _check_structure(updates, state, params)
        if weight_decay is not None and params is None:
            raise ValueError(
                f"weight_decay={weight_decay!r} needs the parameters: call update(grads, state, params)."
            )
        count = state.count
        count_inc = cast(jax.Array, optax.safe_increment(count))
        wd = _value(weight_decay, count)
        scalars = Scalars(
            lr=_value(learning_rate, count),
            decay=decay,
            one_minus_decay=1 - decay,
            eps=eps,
            momentum=momentum,
            coupled_wd=None if decoupled_weight_decay else wd,
            decoupled_wd=wd if decoupled_weight_decay else None,
            bias_correction=_bias_correction(decay, count_inc) if flags.bias_correction else None,
        )
        n = treedef.num_leaves
        gs = treedef.flatten_up_to(updates)
        if packed:  # one flat buffer per leaf group: see _packed
            masks = (
                _mask_leaves(weight_decay_mask, params, treedef) if weight_decay is not None else [True] * n
            )
            ps_ = treedef.flatten_up_to(params) if weight_decay is not None else None
            outs_, nu_, mu_, tr_ = _packed.update(
                flags, scalars, gs, ps_, masks, state.nu, state.mu, state.trace
            )
            out_tree = treedef.unflatten(outs_)
            if apply:
                out_tree = optax.apply_updates(params, out_tree)  # type: ignore[arg-type]
            return out_tree, RmsPropState(count=count_inc, nu=nu_, mu=mu_, trace=tr_)
        _check_kernel_unsharded(gs, storage)
        nus = treedef.flatten_up_to(state.nu)
        mus = treedef.flatten_up_to(state.mu) if flags.centered else [None] * n
        trs = treedef.flatten_up_to(state.trace) if flags.momentum else [None] * n
        ps = treedef.flatten_up_to(params) if weight_decay is not None or apply else [None] * n
        masks = _mask_leaves(weight_decay_mask, params, treedef) if weight_decay is not None else [True] * n

        # rms_leaf on every leaf, inside its storage codecs, traced once per distinct leaf
        # signature (see _executor and _state_codec).
        codecs = [
            (storage.codec_of(nu), storage.codec_of(mu), storage.codec_of(tr))
            for nu, mu, tr in zip(nus, mus, trs, strict=True)
        ]
        if all(c is PLAIN for cs in codecs for c in cs):
            outs = apply_leaves(flags, scalars, gs, ps, nus, mus, trs, masks, apply=apply)
        else:
            stochastic = any(isinstance(c, Stochastic) for cs in codecs for c in cs)
            rounding = (storage.seed, count) if stochastic else None
            outs = apply_leaves(
                flags, scalars, gs, ps, nus, mus, trs, masks, codecs=codecs, rounding=rounding, apply=apply
            )
        cols = list(zip(*outs, strict=True)) or [()] * 4
        new_updates, new_nu, new_mu, new_trace = (treedef.unflatten(list(c)) for c in cols)
        return new_updates, RmsPropState(
            count=count_inc,
            nu=new_nu,
            mu=new_mu if flags.centered else None,
            trace=new_trace if flags.momentum else None,
        )

    _FUSED_APPLY[update_fn] = apply_fn
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # type: ignore[arg-type]


# update -> its update-and-apply, for the transformations this module built (see update_and_apply).
_FUSED_APPLY: weakref.WeakKeyDictionary[Callable[..., Any], Callable[..., Any]] = weakref.WeakKeyDictionary()


def update_and_apply(
    tx: optax.GradientTransformation,
    grads: optax.Updates,
    state: optax.OptState,
    params: optax.Params,
    **extra_args: Any,
) -> tuple[optax.Params, optax.OptState]:
    """``tx.update`` followed by ``optax.apply_updates``, as one step: ``(new_params, new_state)``.

    For any transformation this is exactly::

        updates, state = tx.update(grads, state, params, **extra_args)
        params = optax.apply_updates(params, updates)

    For a transformation built by :func:`rmsprop` or :func:`scale_by_rms` (not wrapped in
    another transformation) the parameter is updated inside the step, so the update is
    never written to memory and read back. That matters for 8-bit state with the fused
    kernel (``quantization=Blockwise(kernel="pallas")``): the kernel then reads the gradient,
    the parameter and the codes and writes the parameter and the codes, 14 bytes per element
    where ``update`` + ``apply_updates`` move 22, in place of the float32-state step's 20.
    Under ``jit`` the results are the two-call version's bit for bit
    (``tests/test_update_and_apply.py``), except that the fused kernel may compute
    ``p + (-lr * x)`` as one fused multiply-add (as XLA does when both calls are compiled in
    one ``jit``, and when this function runs eagerly): one rounding of the parameter.

    Example:
      >>> import jax, jax.numpy as jnp, rmsprop_jax
      >>> opt = rmsprop_jax.rmsprop(0.1)
      >>> params = {"w": jnp.ones(3)}
      >>> state = opt.init(params)
      >>> params, state = jax.jit(rmsprop_jax.update_and_apply, static_argnums=0)(
      ...     opt, {"w": jnp.ones(3)}, state, params)
      >>> params["w"]
      Array([0.68377227, 0.68377227, 0.68377227], dtype=float32)
    """
    fused = _FUSED_APPLY.get(tx.update)
    if fused is not None:
        return cast(tuple[Any, Any], fused(grads, state, params, **extra_args))
    updates, state = tx.update(grads, state, params, **extra_args)
    return optax.apply_updates(params, updates), state


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
    accumulator_dtype: Any | None = None,
    stochastic_rounding: bool | None = None,
    rounding_seed: int | None = None,
    quantization: Blockwise | None = None,
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
      accumulator_dtype: how ``nu``, ``mu`` and the momentum buffer are stored;
        default: each parameter's dtype. ``"int8"``: 8-bit block-wise dynamic
        quantization (bitsandbytes' scheme, ~1 byte per element plus a float32
        ``absmax`` per block of 256; see :class:`Blockwise` and the README's
        "Low-memory state"); leaves below ``quantization.min_size`` (4096)
        elements stay float32. The arithmetic runs in float32 on the decoded
        state, the update uses the new, unquantized accumulators, and they are
        quantized after the step. Updates come back in the gradients' dtype.
      stochastic_rounding: for bfloat16/float16 accumulators (also the default for
        bfloat16/float16 parameters): ``None`` (default) or ``True``: the
        arithmetic runs in float32 and the new accumulators are rounded
        stochastically (up with probability equal to the remainder; unbiased), so
        that increments below half an ulp are not lost: with round to nearest a
        constant gradient leaves bfloat16 ``nu`` stalled at 0.25 instead of ~1 at
        decay 0.999. ``False``: round to nearest, with the arithmetic in the
        accumulators' own dtype operation by operation, exactly as
        ``optax.rmsprop`` (bit-identical on bfloat16 parameters). No effect on
        float32/float64 accumulators.
      rounding_seed: seed of the stochastic rounding (an integer in [0, 2**32); ``None``: 0);
        with the step count, leaf index and element index it determines every
        rounding: runs are reproducible.
      quantization: a :class:`Blockwise` configuration (block size, minimum leaf
        size, block layout) for ``accumulator_dtype="int8"``; default ``Blockwise()``.
      packed: store each accumulator as one flat buffer per group of leaves
        (same accumulator dtypes and static weight-decay mask) instead of one
        array per parameter: fewer arrays at the ``jit`` boundary and one
        update kernel per group, for trees of many small leaves. Same numbers
        as ``packed=False``. ``state.nu`` is then a ``PackedTree``
        (``state.nu.unpack()`` is the per-parameter tree). Not for parameters
        sharded across devices (raises), nor for 8-bit or stochastically rounded
        accumulators (raises: with bfloat16/float16 accumulators pass
        ``stochastic_rounding=False``). See ``rmsprop_jax._packed``.

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
    _check("learning_rate", learning_rate, lambda v: v >= 0, "learning_rate >= 0, or an optax schedule")
    _validate_core(decay, eps, initial_scale)
    if momentum is not None:
        _check("momentum", momentum, lambda v: 0 <= v < 1, "0 <= momentum < 1, or None")
    if nesterov and (momentum is None or _static_zero(momentum)):
        raise ValueError(f"nesterov=True needs momentum > 0, got momentum={momentum!r}.")
    _check(
        "weight_decay",
        weight_decay if weight_decay is not None else 0.0,
        lambda v: v >= 0,
        "weight_decay >= 0",
    )
    acc_dtype, storage = _storage(accumulator_dtype, stochastic_rounding, rounding_seed, quantization)
    return _make(
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
            native_precision=storage.native_low_precision,
        ),
        momentum=momentum,
        weight_decay=None if _static_zero(weight_decay) else weight_decay,
        decoupled_weight_decay=bool(decoupled_weight_decay),
        weight_decay_mask=weight_decay_mask,
        accumulator_dtype=acc_dtype,
        storage=storage,
        packed=_check_bool("packed", packed),
    )


def scale_by_rms(
    decay: float | jax.Array = 0.9,
    eps: float | jax.Array = 1e-8,
    initial_scale: float | jax.Array = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    centered: bool = False,
    accumulator_dtype: Any | None = None,
    stochastic_rounding: bool | None = None,
    rounding_seed: int | None = None,
    quantization: Blockwise | None = None,
    packed: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""The RMSProp preconditioner alone, :math:`g \mapsto g / \sqrt{v_t + \epsilon}`.

    A drop-in for :func:`optax.scale_by_rms` and, with ``centered=True``, for
    :func:`optax.scale_by_stddev`; the equations are :func:`rmsprop`'s without
    the learning rate, momentum and weight decay. Chain it with
    ``optax.scale_by_learning_rate`` (or anything else) as usual. The storage
    arguments (``accumulator_dtype``, ``stochastic_rounding``, ``rounding_seed``,
    ``quantization``) and ``packed`` are :func:`rmsprop`'s.

    Example:
      >>> import jax.numpy as jnp, rmsprop_jax
      >>> opt = rmsprop_jax.scale_by_rms(decay=0.5)
      >>> u, _ = opt.update(jnp.array([2.0]), opt.init(jnp.zeros(1)))
      >>> u
      Array([1.4142135], dtype=float32)
    """
    _validate_core(decay, eps, initial_scale)
    acc_dtype, storage = _storage(accumulator_dtype, stochastic_rounding, rounding_seed, quantization)
    return _make(
        learning_rate=None,
        decay=decay,
        eps=eps,
        initial_scale=initial_scale,
        flags=Flags(
            eps_in_sqrt=bool(eps_in_sqrt),
            centered=bool(centered),
            bias_correction=bool(bias_correction),
            scale_by_lr=False,
            native_precision=storage.native_low_precision,
        ),
        momentum=None,
        weight_decay=None,
        decoupled_weight_decay=False,
        weight_decay_mask=None,
        accumulator_dtype=acc_dtype,
        storage=storage,
        packed=_check_bool("packed", packed),
    )
