"""Registers the prototype kernel (built by build.sh) and wraps its two targets.

Not part of the package: a measurement prototype for issue #4.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import jax
import numpy as np

SO = os.environ.get("RMSPROP_FFI_SO", "/tmp/rmsprop_ffi/librmsprop_ffi.so")
_registered = False


def register(so: str = SO) -> None:
    global _registered
    if _registered:
        return
    lib = ctypes.cdll.LoadLibrary(so)
    jax.ffi.register_ffi_target("rmsprop_ffi_updates", jax.ffi.pycapsule(lib.RmspropUpdates), platform="cpu")
    jax.ffi.register_ffi_target("rmsprop_ffi_fused", jax.ffi.pycapsule(lib.RmspropFused), platform="cpu")
    _registered = True


def _attrs(lr: float, decay: float, eps: float, parallel_min: int) -> dict[str, Any]:
    # The same float32 values XLA sees for rmsprop_jax's weakly typed Python scalars.
    return dict(
        lr=np.float32(lr),
        decay=np.float32(decay),
        one_minus_decay=np.float32(1 - decay),
        eps=np.float32(eps),
        parallel_min=np.int64(parallel_min),
    )


def updates(
    grads: Any, nu: Any, lr: float, decay: float = 0.9, eps: float = 1e-8, parallel_min: int = 1 << 18
) -> tuple[Any, Any]:
    """(updates, new nu) for every leaf in one custom call; new nu aliases nu."""
    g_leaves, treedef = jax.tree.flatten(grads)
    nu_leaves = treedef.flatten_up_to(nu)
    n = len(g_leaves)
    out_types = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in g_leaves] * 2
    call = jax.ffi.ffi_call(
        "rmsprop_ffi_updates",
        out_types,
        input_output_aliases={n + i: n + i for i in range(n)},
    )
    outs = call(*g_leaves, *nu_leaves, **_attrs(lr, decay, eps, parallel_min))
    return treedef.unflatten(outs[:n]), treedef.unflatten(outs[n:])


def fused(
    params: Any,
    grads: Any,
    nu: Any,
    lr: float,
    decay: float = 0.9,
    eps: float = 1e-8,
    parallel_min: int = 1 << 18,
) -> tuple[Any, Any]:
    """(new params, new nu) in one custom call, params and nu updated in place (aliased)."""
    p_leaves, treedef = jax.tree.flatten(params)
    g_leaves = treedef.flatten_up_to(grads)
    nu_leaves = treedef.flatten_up_to(nu)
    n = len(p_leaves)
    out_types = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in p_leaves] * 2
    aliases = {i: i for i in range(n)} | {2 * n + i: n + i for i in range(n)}
    call = jax.ffi.ffi_call("rmsprop_ffi_fused", out_types, input_output_aliases=aliases)
    outs = call(*p_leaves, *g_leaves, *nu_leaves, **_attrs(lr, decay, eps, parallel_min))
    return treedef.unflatten(outs[:n]), treedef.unflatten(outs[n:])


def fused_chunked(
    params: Any, grads: Any, nu: Any, lr: float, decay: float = 0.9, eps: float = 1e-8, chunk: int = 250
) -> tuple[Any, Any]:
    """fused() in calls of at most `chunk` leaves each (XLA's compile time grows superlinearly
    with the operand count of one custom call)."""
    p_leaves, treedef = jax.tree.flatten(params)
    g_leaves, nu_leaves = treedef.flatten_up_to(grads), treedef.flatten_up_to(nu)
    new_p, new_nu = [], []
    for i in range(0, len(p_leaves), chunk):
        sl = slice(i, i + chunk)
        a, b = fused(p_leaves[sl], g_leaves[sl], nu_leaves[sl], lr, decay, eps)
        new_p += a
        new_nu += b
    return treedef.unflatten(new_p), treedef.unflatten(new_nu)
