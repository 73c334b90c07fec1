"""Flax NNX partitioning metadata on the optimizer state, run by ``tests/test_nnx_partitioning.py``.

A fresh process on 8 fake CPU devices, as ``tests/sharding_check.py`` (whose import sets
``XLA_FLAGS`` before JAX starts). Every format x kernel shape x mesh axis type follows the Flax
NNX sharding guide on a 2 x 4 mesh: the model is created inside ``nnx.jit`` and sharded by
``nnx.get_partition_spec`` + ``with_sharding_constraint`` (its two weights annotated with
``nnx.with_partitioning``: ``("a", "b")`` and ``(None, "b")``), ``nnx.Optimizer`` is built
under ``jax.set_mesh`` and its state sharded the same way, then two jitted
``optimizer.update`` steps run. The facts
(exceptions, the state's partition specs and shapes, bits against the same steps without a
mesh) are printed as one JSON line; the test asserts on them.
"""

from __future__ import annotations

import sharding_check  # noqa: F401  # first: sets XLA_FLAGS for 8 devices before JAX starts

# isort: split
import json
import math
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType

import rmsprop_jax

FORMATS = {
    "float32": jnp.float32,
    "bf16": jnp.bfloat16,
    "int8": "int8",
    "int8_flat": rmsprop_jax.Int8(layout="flat"),
    "int8_rows": rmsprop_jax.Int8(layout="rows"),  # pinned: where column shards cut blocks
    "int8_centered_momentum": "int8",  # nu, mu and the momentum buffer: three 8-bit leaves
    "int4": "int4",  # nu rank-1: codes and one statistics vector per axis
    "int4_centered_momentum": "int4",  # mu and the momentum buffer in blocks of 128
    "fp8": "fp8",
    "fp8_centered_momentum": "fp8",
}
OPTIONS = {f: dict(centered=True, momentum=0.9) for f in FORMATS if f.endswith("_centered_momentum")}
ONE_SHAPE = (*OPTIONS, "int8_rows")  # its mu and momentum buffer: as nu, at one shape (time)
# 2, 4 and 16 blocks of 256 per row: the per-row absmax (256, 2) cannot take the kernel's
# P("a", "b") ("b" has 4 devices), nor the flat absmax (rows x blocks,) of any shape (one axis).
SHAPES = ((256, 512), (256, 1024), (256, 4096))
AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
# The kernel splits rows and columns; "w" only columns (under Explicit, where its shards cut
# blocks, the quantizer moves "b" to the rows, and its absmax lives there).
SPECS = {"kernel": ("a", "b"), "w": (None, "b")}
LR, WRONG_LR = 1e-3, 2e-3


class Model(nnx.Module):
    def __init__(self, shape, specs, rngs):
        def param(name):
            init = nnx.initializers.lecun_normal()
            if specs is not None:
                init = nnx.with_partitioning(init, sharding=specs[name])
            return nnx.Param(init(rngs.params(), shape))

        self.kernel, self.w = param("kernel"), param("w")


@nnx.jit
def _step(model, optimizer, g):
    # d/dkernel sum(kernel * g[0]) = g[0] exactly: sharded and unsharded steps see the same grads.
    loss = lambda m: jnp.sum(m.kernel[...] * g[0]) + jnp.sum(m.w[...] * g[1])
    optimizer.update(model, nnx.grad(loss)(model))


def _reference(fmt, shape):
    """The format of the steps without a mesh: the layout ``layout="auto"`` gives the sharded leaves,
    tiles where the 4 column shards cut row blocks (Int8/Fp8 at 512 columns), else rows."""
    acc = FORMATS[fmt]
    cls = {"int8": rmsprop_jax.Int8, "int4": rmsprop_jax.Int4, "fp8": rmsprop_jax.Fp8}.get(str(acc))
    if cls is None:
        return acc
    return cls(layout="tiles" if (shape[1] // 4) % cls().block_size else "rows")


def _train(shape, fmt, specs, lr, gs, acc=None):
    """The guide's pattern; with ``specs=None`` the same steps without partitioning (no mesh), with
    ``acc`` as the accumulator format (default: the format's own)."""

    @nnx.jit
    def create():
        model = Model(shape, specs, nnx.Rngs(0))
        if specs is not None:
            state = nnx.state(model)
            nnx.update(model, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
        return model

    @nnx.jit
    def shard(optimizer):
        state = nnx.state(optimizer)
        nnx.update(optimizer, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))

    model = create()
    optimizer = nnx.Optimizer(
        model,
        rmsprop_jax.rmsprop(lr, accumulator_dtype=acc or FORMATS[fmt], **OPTIONS.get(fmt, {})),
        wrt=nnx.Param,
    )
    if specs is not None:
        shard(optimizer)
    specs = _specs(optimizer)
    for g in gs:
        _step(model, optimizer, g)
    return model, optimizer, specs


def _actual(optimizer) -> dict:
    """Each state array's own PartitionSpec after the steps, one entry per dimension."""
    leaves = jax.tree_util.tree_flatten_with_path(nnx.as_pure(nnx.state(optimizer)))[0]
    return {
        _key(p): str(tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))) for p, x in leaves
    }


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _specs(optimizer) -> dict:
    """Each state leaf's path -> (shape, its PartitionSpec from ``nnx.get_partition_spec``)."""
    state = nnx.state(optimizer)
    is_var = lambda x: isinstance(x, nnx.Variable)
    pspecs = jax.tree_util.tree_flatten_with_path(nnx.get_partition_spec(state), is_leaf=is_var)[0]
    variables = jax.tree.leaves(state, is_leaf=is_var)
    return {
        _key(p): (list(np.shape(v.get_value())), s.get_value())
        for (p, s), v in zip(pspecs, variables, strict=True)
    }


def _divides(shape, spec, sizes) -> bool:
    if len(spec) > len(shape):
        return False
    names = lambda e: () if e is None else e if isinstance(e, tuple) else (e,)
    return all(d % math.prod(sizes[a] for a in names(e)) == 0 for d, e in zip(shape, spec, strict=False))


def _bits(model, optimizer) -> dict:
    """The weights and every state leaf, by path, as bytes (the two runs' state trees differ in how
    8-bit leaves are nested, not in their paths' names)."""
    state = jax.device_get(nnx.as_pure(nnx.state(optimizer)))
    out = {_key(p): np.asarray(x).tobytes() for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    for name in SPECS:
        out[name] = np.asarray(jax.device_get(getattr(model, name)[...])).tobytes()
    return out


def main() -> dict:
    assert jax.device_count() == 8, jax.devices()
    cases = []
    for shape in SHAPES:
        gs = [np.asarray(jax.random.normal(jax.random.key(10 + i), (2, *shape))) for i in range(2)]
        for fmt in FORMATS:
            if fmt in ONE_SHAPE and shape != SHAPES[0]:
                continue
            ref = _bits(*_train(shape, fmt, None, LR, gs, _reference(fmt, shape))[:2])
            wrong = None
            if fmt == "int8" and shape == SHAPES[0]:  # the contrast: another learning rate
                wrong = _bits(*_train(shape, fmt, None, WRONG_LR, gs, _reference(fmt, shape))[:2])
            for tname, axis_type in AXIS_TYPES.items():
                case = {"format": fmt, "shape": list(shape), "axis_type": tname, "error": None}
                cases.append(case)
                try:
                    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(axis_type,) * 2)
                    sizes = dict(mesh.shape)
                    with jax.set_mesh(mesh):
                        model, optimizer, specs = _train(shape, fmt, SPECS, LR, gs)
                        got = _bits(model, optimizer)
                        actual = _actual(optimizer)
                    case["specs"] = {k: [shp, str(s)] for k, (shp, s) in specs.items()}
                    case["undivided"] = [k for k, (shp, s) in specs.items() if not _divides(shp, s, sizes)]
                    padded = lambda shp, s: str(tuple(s) + (None,) * (len(shp) - len(s)))
                    case["actual_like_specs"] = all(
                        actual[k] == padded(shp, s) for k, (shp, s) in specs.items()
                    )
                    case["actual"] = actual
                    case["param_specs"] = {k: str(getattr(model, k)[...].sharding.spec) for k in SPECS}
                    case["paths_equal"] = sorted(got) == sorted(ref)
                    case["equal_no_mesh"] = got == ref
                    case["unequal"] = sorted(k for k in ref if got.get(k) != ref[k])
                    if wrong is not None and tname == "auto":
                        case["equal_wrong_lr"] = got == wrong
                except Exception:  # recorded: the test names the case
                    case["error"] = traceback.format_exc(limit=-4)[-2000:]
    return {"devices": jax.device_count(), "cases": cases}


if __name__ == "__main__":
    print("NNX_PARTITIONING_REPORT " + json.dumps(main()))
    sys.exit(0)
