"""A fused Pallas kernel for 8-bit leaves: decode, :func:`rms_leaf`, encode in one pass.

Through XLA, an 8-bit leaf's step is several passes over memory: the quantizer needs
each block's new ``absmax = max |nu|`` before it can code any element of the block, so
XLA materializes the decoded state and the new ``nu`` between a reduction and the
element-wise code lookup (see ``docs/low_memory.md`` and ``benchmarks/README.md``). This
kernel holds ``rows`` blocks of ``block_size`` elements at a time: it reads the
gradient (and parameter), the codes and absmax, decodes, calls
:func:`rmsprop_jax._update.rms_leaf` (the same function as every other path), reduces
each block's new absmax and writes the new codes, all in one pass.

The decode and the quantizer are :func:`rmsprop_jax._quantize.dequantize_blocks` and
:func:`~rmsprop_jax._quantize.quantize_blocks`, the functions the XLA path runs; only
the table reads differ (a gather from the kernel's table inputs). On a GPU the kernel
is compiled by Triton; elsewhere Pallas runs it in interpret mode (correct, slow: for
tests). Results equal the XLA path's bit for bit in interpret mode
(``tests/test_pallas_int8.py``); compiled by Triton, the arithmetic of ``rms_leaf`` may
contract differently into fused multiply-adds, so a ``nu`` can differ in its last bit and,
rarely, a code by one.

The executor (:mod:`rmsprop_jax._executor`) decides which leaves it steps: those whose blocks are
whole rows of ``block_size`` (a power of two), on a GPU, unsharded; every other leaf keeps the
XLA path. Pallas is imported when a kernel is built, not with the package.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from rmsprop_jax import _quantize
from rmsprop_jax._codecs import Quantized
from rmsprop_jax._update import Flags, Scalars, rms_leaf, split_scalars

Array = jax.Array

ROWS = 32  # blocks per kernel instance (32 x 256 = 8192 elements)
NUM_WARPS = 4


def _tables(signed: bool) -> tuple[Array, Array]:
    """The kernel's two table inputs: the dynamic map (256 float32) and the quantizer's 65536-point LUT."""
    return jnp.asarray(_quantize._dynamic_map_np(signed)), jnp.asarray(_quantize._lut_np(signed))


def _read(table_ref: Any, index: Array) -> Array:
    """``table[index]`` inside the kernel: a gather from the table input (cached on chip)."""
    return table_ref[index]


def _rows(num_blocks: int, rows: int) -> int:
    """The largest power of two <= ``rows`` that divides ``num_blocks``."""
    r = 1
    while r * 2 <= rows and num_blocks % (r * 2) == 0:
        r *= 2
    return r


def fused_step(
    flags: Flags,
    s: Scalars,
    config: Quantized,
    g: Array,
    p: Array | None,
    nu: Any,
    mu: Any,
    trace: Any,
    wd_on: bool,
    var_floor: float,
    *,
    apply: bool = False,
    rows: int | None = None,
    num_warps: int | None = None,
    interpret: bool | None = None,
) -> tuple[Array, Any, Any, Any]:
    """``step_leaf`` for a leaf whose accumulators are all ``QuantizedLeaf`` of one codec ``config``.

    Returns ``(update, nu, mu, trace)``, the accumulators as ``QuantizedLeaf`` values.
    ``apply=True``: the first output is the new parameter ``p + update``
    (in ``p``'s dtype, as ``optax.apply_updates``), written over ``p``'s buffer.
    """
    from jax.experimental import pallas as pl

    bs = config.block_size
    shape = g.shape
    nb = math.prod(shape) // bs
    r = _rows(nb, rows or ROWS)
    grid = (nb // r,)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"

    static, dynamic = split_scalars(s)
    fixed = {k: v for k, _, v in static}
    dyn_names = list(dynamic)
    n_scal = max(1, 1 << max(0, len(dyn_names) - 1).bit_length())  # a power of two for Triton
    values = [jnp.asarray(v, jnp.float32) for v in dynamic.values()]
    scal = jnp.stack(values + [jnp.float32(0)] * (n_scal - len(values)))

    accs = [x for x in (nu, mu, trace) if x is not None]
    present = [x is not None for x in (nu, mu, trace)]
    table, lut = _tables(config.signed)

    def full(n: int) -> pl.BlockSpec:
        return pl.BlockSpec((n,), lambda i: (0,))

    tile = pl.BlockSpec((r, bs), lambda i: (i, 0))
    vec = pl.BlockSpec((r,), lambda i: (i,))
    args = [scal, table, lut, g.reshape(nb, bs)]
    in_specs = [full(n_scal), full(256), full(65536), tile]
    if p is not None:
        args.append(p.reshape(nb, bs))
        in_specs.append(tile)
    for x in accs:
        args += [x.codes.reshape(nb, bs), x.absmax.reshape(nb)]
        in_specs += [tile, vec]
    if apply and p is None:
        raise ValueError("apply=True needs the parameter")
    out_shape = [jax.ShapeDtypeStruct((nb, bs), p.dtype if apply and p is not None else g.dtype)]
    out_specs = [tile]
    for _ in accs:
        out_shape += [jax.ShapeDtypeStruct((nb, bs), jnp.uint8), jax.ShapeDtypeStruct((nb,), jnp.float32)]
        out_specs += [tile, vec]
    # The new codes and absmax overwrite the old ones (in place when the caller donates the state).
    first_acc_in = 5 if p is not None else 4
    first_acc_out = 1
    aliases = {first_acc_in + j: first_acc_out + j for j in range(2 * len(accs))}
    if apply:
        aliases[4] = 0  # the new parameter over the old one

    def kernel(*refs: Any) -> None:
        ins, outs = refs[: len(args)], list(refs[len(args) :])
        scal_ref, table_ref, lut_ref, g_ref = ins[:4]
        rest = list(ins[4:])
        scalars = Scalars(**fixed, **{k: scal_ref[i] for i, k in enumerate(dyn_names)})
        p_val = rest.pop(0)[...] if p is not None else None
        decoded: list[Array | None] = []
        for flag in present:
            if flag:
                codes_ref, absmax_ref = rest.pop(0), rest.pop(0)
                decoded.append(
                    _quantize.dequantize_blocks(
                        codes_ref[...], absmax_ref[...], lambda c: _read(table_ref, c)
                    )
                )
            else:
                decoded.append(None)
        d_nu, d_mu, d_tr = decoded
        assert d_nu is not None
        u, *new = rms_leaf(flags, scalars, g_ref[...], p_val, d_nu, d_mu, d_tr, wd_on, var_floor)
        if apply:
            assert p_val is not None
            outs.pop(0)[...] = (p_val + u).astype(p_val.dtype)
        else:
            outs.pop(0)[...] = u
        for x in new:
            if x is not None:
                codes, absmax = _quantize.quantize_blocks(x, lambda k: _read(lut_ref, k))
                outs.pop(0)[...] = codes
                outs.pop(0)[...] = absmax

    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton

        compiler_params = pl_triton.CompilerParams(num_warps=num_warps or NUM_WARPS, num_stages=1)
    results = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=grid,
        in_specs=in_specs,
        out_specs=tuple(out_specs),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=compiler_params,
    )(*args)
    results = list(results)
    u_out = results.pop(0).reshape(shape)
    new_accs: list[Any] = []
    for x in (nu, mu, trace):
        if x is None:
            new_accs.append(None)
        else:
            codes, absmax = results.pop(0), results.pop(0)
            new_accs.append(config.leaf(codes.reshape(shape), absmax.reshape(x.absmax.shape)))
    return u_out, new_accs[0], new_accs[1], new_accs[2]
