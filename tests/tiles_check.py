"""8-device check of layout='tiles' (run by tests/test_tiles.py): per case the collectives in the
compiled update (with their result types), the state's shardings and whether updates and state
equal the single-device run; and whether ``init`` warns, and with what, for shards narrower than
a tile."""

from __future__ import annotations

import contextlib
import functools
import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import rmsprop_jax

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# "%name = TYPE op(" or "%name = (TYPE, TYPE) op-start(": the op and its result type(s)
OP = re.compile(r"^\s*\S+ = (.+?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", re.M)
SPECS = {"rows": P("x", None), "cols": P(None, "x"), "2d": P("d", "m"), "repl": P()}
FORMATS = {"int8": rmsprop_jax.Int8, "int4": rmsprop_jax.Int4, "fp8": rmsprop_jax.Fp8}


def _spec(x):
    """The spec, one entry per dimension (``P()`` and ``P(None, None)`` both replicate)."""
    spec = tuple(x.sharding.spec)
    return str(spec + (None,) * (x.ndim - len(spec)))


def _collectives(hlo: str) -> list[list[str]]:
    """``[op, result types]`` of every collective (``-done`` halves not counted)."""
    return [[op, *re.findall(r"\w+\[[\d,]*\]", types)] for types, op in OP.findall(hlo)]


def _mesh(spec_name, at):
    if spec_name == "2d":
        return jax.make_mesh((2, 4), ("d", "m"), axis_types=(at, at))
    return jax.make_mesh((8,), ("x",), axis_types=(at,))


def _opt(fmt, layout, centered):
    return rmsprop_jax.rmsprop(
        1e-2,
        centered=centered,
        momentum=0.9 if centered else 0.0,
        accumulator_dtype=FORMATS[fmt](layout=layout, min_size=0),
    )


@functools.cache
def _one_device(fmt, layout, dtype, centered):
    """The leaf, its gradient, and one update with its state on one device."""
    rng = np.random.default_rng(0)
    w0 = jnp.asarray(rng.standard_normal((256, 128)), dtype)
    g0 = jnp.asarray(rng.standard_normal((256, 128)), dtype)
    opt = _opt(fmt, layout, centered)
    return (w0, g0, *jax.jit(opt.update)({"w": g0}, opt.init({"w": w0}), {"w": w0}))


def run(fmt, layout, spec_name, mode, dtype, centered, ref_layout=None):
    """One jitted update on 8 devices against one device with ``ref_layout`` (default ``layout``).
    ``layout="auto"`` reads the parameter's sharding at ``init``: under an Auto mesh only an eager
    ``init`` sees it (a tracer carries none), so that case inits eagerly."""
    at = AxisType.Explicit if mode == "explicit" else AxisType.Auto
    mesh = _mesh(spec_name, at)
    opt = _opt(fmt, layout, centered)
    w0, g0, ref_u, ref_s = _one_device(fmt, ref_layout or layout, dtype, centered)
    sh = NamedSharding(mesh, SPECS[spec_name])
    w, g = jax.device_put(w0, sh), jax.device_put(g0, sh)
    ctx = jax.set_mesh(mesh) if mode == "explicit" else contextlib.nullcontext()
    with ctx:
        init = opt.init if layout == "auto" and mode == "auto" else jax.jit(opt.init)
        s = init({"w": w})
        upd = jax.jit(opt.update).lower({"w": g}, s, {"w": w}).compile()
        u, s2 = upd({"w": g}, s, {"w": w})
    same = bool(np.array_equal(np.asarray(u["w"]), np.asarray(ref_u["w"]))) and all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(ref_s), strict=True)
    )
    state = {
        name: {"layout": q.layout, "codes_spec": _spec(q.codes), "absmax_spec": _spec(q.absmax)}
        for name in ("nu", "mu", "trace")
        if isinstance(q := (getattr(s2, name) or {}).get("w"), rmsprop_jax.QuantizedLeaf)
    }
    return {"collectives": _collectives(upd.as_text()), "state": state, "param_spec": _spec(w), "equal": same}


def narrow_shards_warning():
    """``init`` of a (32, 16) leaf whose 16 columns are cut in 8 shards of 2 (tiles are 16 wide)."""
    mesh = _mesh("cols", AxisType.Auto)
    w = jax.device_put(jnp.ones((32, 16)), NamedSharding(mesh, SPECS["cols"]))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _opt("int8", "tiles", False).init({"kernel": w})
    return [str(r.message) for r in rec]


CASES = [  # (format, dtype, centered + momentum); each on every sharding, Auto and Explicit
    ("int8", jnp.float32, False),
    ("int8", jnp.float32, True),
    ("int8", jnp.bfloat16, True),
    ("fp8", jnp.float32, False),
    ("fp8", jnp.float32, True),
    ("int4", jnp.float32, True),  # a rank-2 nu stays rank-1; mu and the momentum are tiled
]


def main() -> dict:
    report: dict = {}
    for mode in ("auto", "explicit"):
        for spec_name in SPECS:
            for fmt, dtype, centered in CASES:
                if spec_name == "repl" and fmt != "int8":  # nothing to gather: one format is enough
                    continue
                variant = "centered" if centered else "plain"
                key = f"tiles/{fmt}/{mode}/{spec_name}/{jnp.dtype(dtype).name}/{variant}"
                report[key] = run(fmt, "tiles", spec_name, mode, dtype, centered)
        report[f"rows/int8/{mode}/cols/float32/plain"] = run("int8", "rows", "cols", mode, jnp.float32, False)
        # layout="auto" (the default) on a (256, 128) leaf, whose 128-wide rows end in a partial
        # block of 256: tiles where column shards cut its rows, else flat (256 whole blocks, which
        # stay inside row shards); compared with one device in that layout
        for spec_name in SPECS:
            for fmt in ("int8", "fp8"):
                want = "tiles" if spec_name in ("cols", "2d") else "flat"
                key = f"auto/{fmt}/{mode}/{spec_name}/float32/plain"
                report[key] = run(fmt, "auto", spec_name, mode, jnp.float32, False, want) | {"want": want}
    report["warning"] = narrow_shards_warning()
    return report


if __name__ == "__main__":  # importable: tests/multiprocess_check.py uses _collectives
    print("TILES_REPORT " + json.dumps(main()))
