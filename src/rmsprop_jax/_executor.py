"""How :func:`rms_leaf` is applied to every leaf of a tree (the update executor).

The math stays in :func:`rmsprop_jax._update.rms_leaf`; this module only decides
how it is traced. Tracing ``rms_leaf`` op by op costs ~0.3 ms of Python per
``jax.numpy`` call and ~10 calls per leaf, so on a model with thousands of small
leaves tracing alone took seconds. :func:`apply_leaves` instead wraps
``rms_leaf`` in one ``jax.jit`` per distinct static configuration: JAX traces it
once per distinct leaf signature (shape and dtypes) and every other leaf is a
single call to the same function, which XLA inlines before fusing. The compiled
program is the same as the op-by-op one, so the results are bit-identical
(``tests/test_executor.py`` checks this against :func:`apply_leaves_reference`).

Called outside any ``jit``, ``update`` now runs the same compiled leaf function,
so eager and jitted updates of the same leaf compile to the same kernel. (Under
``jax.disable_jit()`` the executor runs op by op again, and XLA's fused code may then
differ in the last bit, e.g. from fused multiply-adds.)

Hyperparameters that are Python numbers stay static (closed over), exactly as in
the op-by-op trace: JAX's weak typing then applies as in optax, which is what
keeps float32 results bit-identical to ``optax.rmsprop``. Array hyperparameters
(schedules, injected values, ``1 - decay**t``) and array weight-decay masks are
passed as arguments.

Measured alternatives (see ``benchmarks/README.md``): concatenating leaves of one
dtype into a flat buffer and splitting the results back compiles 5-10x slower on
XLA:CPU (each of the thousands of slices becomes its own kernel, and slice
kernels are slow to compile) and steps no faster, so it is not the default;
``packed=True`` (:mod:`rmsprop_jax._packed`) stores the state that way and splits with
row gathers, which compile like element-wise kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax

from rmsprop_jax import _quantize
from rmsprop_jax._state_codec import PLAIN, Codec, step_leaf
from rmsprop_jax._update import Flags, Scalars, split_scalars

LeafOut = tuple[jax.Array, Any, Any, Any]
_PLAIN3 = (PLAIN, PLAIN, PLAIN)


@functools.lru_cache(maxsize=128)
def _leaf_fn(
    flags: Flags,
    static: tuple[tuple[str, type, Any], ...],
    wd_static: bool | None,
    codecs: tuple[Codec, Codec, Codec] = _PLAIN3,
    apply: bool = False,
) -> Callable[..., Any]:
    """A jitted ``rms_leaf`` (inside its storage codecs, see ``_state_codec.step_leaf``) with the
    static hyperparameters, the static mask and the codecs baked in.

    ``static`` holds ``(name, type, value)`` so that ``1`` and ``1.0`` (equal
    hashes, different JAX types) get separate entries.
    """
    fixed = {name: value for name, _, value in static}

    def leaf(
        dynamic: dict[str, Any],
        g: Any,
        p: Any,
        nu: Any,
        mu: Any,
        trace: Any,
        wd_array: Any,
        rounding: Any = None,
    ) -> LeafOut:
        scalars = Scalars(**fixed, **dynamic)
        wd = wd_array if wd_static is None else wd_static
        return step_leaf(flags, scalars, codecs, g, p, nu, mu, trace, wd, rounding, apply)

    return jax.jit(leaf)


def apply_leaves(
    flags: Flags,
    scalars: Scalars,
    gs: Sequence[Any],
    ps: Sequence[Any],
    nus: Sequence[Any],
    mus: Sequence[Any],
    traces: Sequence[Any],
    masks: Sequence[Any],
    codecs: Sequence[tuple[Codec, Codec, Codec]] | None = None,
    rounding: tuple[Any, Any] | None = None,
    apply: bool = False,
) -> list[LeafOut]:
    """``[step_leaf(flags, scalars, codecs, *leaf) for leaf in zip(...)]``, traced once per leaf signature.

    ``codecs``: per leaf, the storage codecs of (nu, mu, trace) (default: plain).
    ``rounding``: ``(seed, step)`` for stochastic rounding (dynamic values); each leaf's keys
    (:func:`~rmsprop_jax._quantize.leaf_keys`) are derived here.
    ``apply``: each leaf returns its new parameter instead of its update (``step_leaf``).
    """
    static, dynamic = split_scalars(scalars)
    codecs = codecs if codecs is not None else [_PLAIN3] * len(gs)
    keys = None if rounding is None else _quantize.leaf_keys(*rounding, len(gs))
    if keys is not None:
        # Each leaf's keys as a separate value behind a barrier, so that XLA does not fold the row
        # index into every leaf's kernel (which made leaves of one shape compile to distinct
        # kernels): measured on 128 bf16 leaves, centered + momentum, compile 36.5 s -> 21.5 s.
        keys = jax.lax.optimization_barrier([keys[i] for i in range(len(gs))])
    outs = []
    for i, (g, p, nu, mu, trace, mask, cs) in enumerate(
        zip(gs, ps, nus, mus, traces, masks, codecs, strict=True)
    ):
        wd_static = mask if isinstance(mask, bool) else None
        fn = _leaf_fn(flags, static, wd_static, cs, apply)
        rnd = None if keys is None or cs == _PLAIN3 else keys[i]
        outs.append(fn(dynamic, g, p, nu, mu, trace, None if wd_static is not None else mask, rnd))
    return outs


def apply_leaves_reference(
    flags: Flags,
    scalars: Scalars,
    gs: Sequence[Any],
    ps: Sequence[Any],
    nus: Sequence[Any],
    mus: Sequence[Any],
    traces: Sequence[Any],
    masks: Sequence[Any],
    codecs: Sequence[tuple[Codec, Codec, Codec]] | None = None,
    rounding: tuple[Any, Any] | None = None,
    apply: bool = False,
) -> list[LeafOut]:
    """The straightforward loop, op by op: what :func:`apply_leaves` must reproduce bit for bit."""
    codecs = codecs if codecs is not None else [_PLAIN3] * len(gs)
    keys = None if rounding is None else _quantize.leaf_keys(*rounding, len(gs))
    leaves = zip(gs, ps, nus, mus, traces, masks, codecs, strict=True)
    return [
        step_leaf(
            flags,
            scalars,
            cs,
            g,
            p,
            nu,
            mu,
            tr,
            mask,
            None if keys is None or cs == _PLAIN3 else keys[i],
            apply,
        )
        for i, (g, p, nu, mu, tr, mask, cs) in enumerate(leaves)
    ]
