"""THE equations. One pure per-leaf function computes every RMSProp variant.

Everything else in the package (tree plumbing, schedules, validation, state
layout, presets) lives elsewhere and calls :func:`rms_leaf`. A reader can check
this function line by line against the docs' "The update and every option" page (docs/equations.md):

    g  <- -g                                   if maximize
    g  <- g + wd * p                           coupled weight decay (L2)
    nu <- decay * nu + (1 - decay) * |g|^2     second moment
    mu <- decay * mu + (1 - decay) * g         first moment     (centered)
    nu^, mu^ <- nu / (1 - decay^t), mu / (1 - decay^t)          (bias_correction)
    v  <- max(nu^ - |mu^|^2, c nu^)  if centered else nu^   (v = inf where nu^ overflowed;
                                                          c = 0 unless the state is lossy)
    d  <- sqrt(v + eps)          if eps_in_sqrt else sqrt(v) + eps
    u  <- g / d
    lr inside momentum  (optax, TF, Keras):   u <- -lr * u; b <- u + m * b
    lr outside momentum (PyTorch):            b <- u + m * b;  u <- -lr * b
      (the update is b, or u + m * b with nesterov)
    u  <- u - lr * wd_decoupled * p            decoupled weight decay

``c`` is the floor of a lossy state storage (``_codecs.VARIANCE_FLOOR``: int8, fp8 and int4
2**-6, bfloat16 2**-7, float16 2**-10; 0 for float32/float64 state, which then compiles
to the unfloored program): below ``c * nu^`` the difference ``nu^ - |mu^|^2`` is the rounding
error of the stored ``nu`` and ``mu``, which otherwise reaches 0 where the gradient's mean
dominates its noise and makes the step ``g / sqrt(eps)``. The floor bounds the step at
``|g| / sqrt(c * nu^)``.

The arithmetic is done in at least float32 (bfloat16/float16 leaves are upcast
and the results cast back), so low-precision inputs can neither divide by zero
nor take the root of a negative number through rounding. The one exception is
``Flags.native_precision`` (``accumulator_dtype=Float(rounding="optax")``): the arithmetic then runs
in the inputs' own dtype, operation by operation, as ``optax.rmsprop`` does on
bfloat16 parameters, to reproduce its numbers bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Scalar = Any  # a Python number, or a 0-d (possibly traced) array


@dataclass(frozen=True)
class Flags:
    """Static (trace-time) choices; each selects a branch of :func:`rms_leaf`."""

    eps_in_sqrt: bool = True
    centered: bool = False
    momentum: bool = False  # whether a momentum buffer exists
    nesterov: bool = False
    bias_correction: bool = False
    lr_in_momentum: bool = True
    maximize: bool = False
    scale_by_lr: bool = True  # False for scale_by_rms (preconditioner only)
    native_precision: bool = False  # compute in result_type(g, nu) (optax's bf16 arithmetic)


@dataclass(frozen=True)
class Scalars:
    """Per-step hyperparameter values, shared by every leaf.

    Python floats are kept as Python floats so that JAX's weak typing applies
    exactly as it does in optax (this makes results bit-identical to optax in
    float32); schedules and injected hyperparameters arrive as 0-d arrays.
    """

    lr: Scalar
    decay: Scalar
    one_minus_decay: Scalar
    eps: Scalar
    momentum: Scalar
    coupled_wd: Scalar
    decoupled_wd: Scalar
    bias_correction: Scalar  # 1 - decay**t, or None


def split_scalars(s: Scalars) -> tuple[tuple[tuple[str, type, Any], ...], dict[str, Any]]:
    """``s``'s trace-time constants (``None`` or Python numbers) as ``(name, type, value)`` and its
    array values by name: an executor bakes the first into a compiled kernel and passes the second.

    The type is kept so that ``1`` and ``1.0`` (equal hashes, different JAX types) stay distinct
    as cache keys. ``Scalars(**{n: v for n, _, v in static}, **dynamic) == s``.
    """
    values = {f.name: getattr(s, f.name) for f in fields(s)}
    static = tuple((k, type(v), v) for k, v in values.items() if v is None or type(v) in (bool, int, float))
    return static, {k: v for k, v in values.items() if k not in {name for name, _, _ in static}}


def compute_dtype(*dtypes: Any) -> Any:
    """The dtype the arithmetic runs in: at least float32, complex kept complex."""
    return jnp.result_type(jnp.float32, *dtypes)


def abs_sq(x: Array) -> Array:
    """|x|^2, real for complex x."""
    if jnp.iscomplexobj(x):
        return (x.conj() * x).real
    return x * x


def rms_leaf(
    flags: Flags,
    s: Scalars,
    g: Array,
    p: Array | None,
    nu: Array,
    mu: Array | None,
    trace: Array | None,
    wd_on: bool | Array = True,
    var_floor: float = 0.0,
) -> tuple[Array, Array, Array | None, Array | None]:
    """One RMSProp step for one leaf.

    Args:
      flags: static options.
      s: the step's scalar hyperparameters.
      g: gradient. p: parameter (needed only with weight decay).
      nu, mu, trace: second moment, first moment (centered), momentum buffer.
      wd_on: the weight-decay mask for this leaf (a Python bool or a boolean array).
      var_floor: ``c`` in the centered variance ``v = max(nu^ - |mu^|^2, c * nu^)``: the
        relative precision of a lossy storage of ``nu`` and ``mu`` (a static Python float;
        0 for exact storage, which then compiles to exactly the unfloored program).

    Returns:
      ``(update, nu, mu, trace)``: the update in ``g``'s dtype and the new
      accumulators in their own dtypes.
    """
    cd = jnp.result_type(g.dtype, nu.dtype) if flags.native_precision else compute_dtype(g.dtype, nu.dtype)
    out_dtype = g.dtype
    g = g.astype(cd)
    if p is not None:
        p = p.astype(cd)

    if flags.maximize:
        g = -g
    if s.coupled_wd is not None and wd_on is not False:
        g = g + _masked(wd_on, s.coupled_wd) * p

    new_nu = s.one_minus_decay * abs_sq(g) + s.decay * nu.astype(abs_sq(g).dtype)
    nu_hat = new_nu
    new_mu = None
    if flags.centered:
        assert mu is not None
        new_mu = s.one_minus_decay * g + s.decay * mu.astype(cd)
        mu_hat = new_mu
    if flags.bias_correction:
        nu_hat = nu_hat / s.bias_correction
        if flags.centered:
            mu_hat = mu_hat / s.bias_correction
    if flags.centered:
        # Where |g|^2 overflowed, nu^ and |mu^|^2 are both inf: keep v = inf (so u = 0), not inf - inf.
        # A lossy storage (var_floor = c > 0) floors v at c * nu^: below that, nu^ - |mu^|^2 is
        # the storage's rounding error, not a variance (see _codecs.VARIANCE_FLOOR).
        floor = var_floor * nu_hat if var_floor else 0
        var = jnp.where(jnp.isinf(nu_hat), nu_hat, jnp.maximum(nu_hat - abs_sq(mu_hat), floor))
    else:
        var = nu_hat

    # The floor at the smallest normal number only matters when eps == 0 and
    # v == 0 (then g == 0 too): it turns 0 * inf = NaN into 0. (In bfloat16/float16
    # arithmetic, native_precision only, the smallest subnormal: optax's results
    # are kept wherever they are finite.)
    fi = jnp.finfo(var.dtype)
    tiny = fi.tiny if fi.bits >= 32 else fi.smallest_subnormal
    if flags.eps_in_sqrt:
        u = jax.lax.rsqrt(jnp.maximum(var + s.eps, tiny)) * g
    else:
        u = (1 / jnp.maximum(jnp.sqrt(var) + s.eps, tiny)) * g

    new_trace = None
    if flags.scale_by_lr and (flags.lr_in_momentum or not flags.momentum):
        u = -s.lr * u
    if flags.momentum:
        assert trace is not None
        new_trace = u + s.momentum * trace.astype(cd)
        u = u + s.momentum * new_trace if flags.nesterov else new_trace
        if flags.scale_by_lr and not flags.lr_in_momentum:
            u = -s.lr * u
    if s.decoupled_wd is not None and wd_on is not False:
        u = u - s.lr * _masked(wd_on, s.decoupled_wd) * p

    return (
        u.astype(out_dtype),
        new_nu.astype(nu.dtype),
        None if new_mu is None else new_mu.astype(mu.dtype),  # type: ignore[union-attr]
        None if new_trace is None else new_trace.astype(trace.dtype),  # type: ignore[union-attr]
    )


def _masked(wd_on: bool | Array, wd: Scalar) -> Scalar:
    """Weight decay for a leaf: ``wd`` if the mask is a static True, else ``wd * mask``."""
    if wd_on is True:
        return wd
    return jnp.where(wd_on, wd, 0)
