"""8-device check of layout='tiles' (run by tests/test_tiles.py): per case the collectives in the
compiled update, the state's shardings and whether updates and state equal the single-device run."""

from __future__ import annotations

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import rmsprop_jax

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
SPECS = {"rows": P("x", None), "cols": P(None, "x"), "2d": P("d", "m"), "repl": P()}


def _spec(x):
    """The spec, one entry per dimension (``P()`` and ``P(None, None)`` both replicate)."""
    spec = tuple(x.sharding.spec)
    return str(spec + (None,) * (x.ndim - len(spec)))


def run(layout, spec_name, mode, dtype, centered):
    at = AxisType.Explicit if mode == "explicit" else AxisType.Auto
    mesh = (
        jax.make_mesh((2, 4), ("d", "m"), axis_types=(at, at))
        if spec_name == "2d"
        else jax.make_mesh((8,), ("x",), axis_types=(at,))
    )
    rng = np.random.default_rng(0)
    w0 = jnp.asarray(rng.standard_normal((256, 128)), dtype)
    g0 = jnp.asarray(rng.standard_normal((256, 128)), dtype)
    opt = rmsprop_jax.rmsprop(
        1e-2,
        centered=centered,
        momentum=0.9 if centered else 0.0,
        accumulator_dtype=rmsprop_jax.Int8(layout=layout, min_size=0),
    )
    ref_s = opt.init({"w": w0})
    ref_u, ref_s = jax.jit(opt.update)({"w": g0}, ref_s, {"w": w0})
    sh = NamedSharding(mesh, SPECS[spec_name])
    w, g = jax.device_put(w0, sh), jax.device_put(g0, sh)
    ctx = jax.set_mesh(mesh) if mode == "explicit" else contextlib.nullcontext()
    with ctx:
        s = jax.jit(opt.init)({"w": w})
        upd = jax.jit(opt.update)
        hlo = upd.lower({"w": g}, s, {"w": w}).compile().as_text()
        u, s2 = upd({"w": g}, s, {"w": w})
    same = bool(np.array_equal(np.asarray(u["w"]), np.asarray(ref_u["w"]))) and all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(ref_s), strict=True)
    )
    nu = s2.nu["w"]
    return {
        "collectives": {c: hlo.count(c + "(") + hlo.count(c + "-start(") for c in COLLECTIVES if c in hlo},
        "codes_spec": _spec(nu.codes),
        "absmax_spec": _spec(nu.absmax),
        "param_spec": _spec(w),
        "equal": same,
    }


report = {}
for mode in ("auto", "explicit"):
    for spec_name in SPECS:
        for dtype in (jnp.float32, jnp.bfloat16):
            for centered in (False, True):
                key = (
                    f"tiles/{mode}/{spec_name}/{jnp.dtype(dtype).name}/{'centered' if centered else 'plain'}"
                )
                report[key] = run("tiles", spec_name, mode, dtype, centered)
    report[f"rows/{mode}/cols/float32/plain"] = run("rows", "cols", mode, jnp.float32, False)  # the mutant
print("TILES_REPORT " + json.dumps(report))
