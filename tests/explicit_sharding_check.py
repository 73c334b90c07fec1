"""8-bit (and float) state under explicit sharding, run by ``tests/test_explicit_sharding.py``.

A fresh process on 8 fake CPU devices, as ``tests/sharding_check.py`` (whose import sets
``XLA_FLAGS`` before JAX starts): every format x sharding x parameter dtype inits and takes
two jitted steps under ``jax.set_mesh`` with an ``AxisType.Explicit`` mesh, and records facts
(exceptions, state types after init and after the update, values against the same steps
without a mesh, collectives); the test asserts on them. Prints one JSON line.
"""

from __future__ import annotations

import sharding_check  # noqa: F401  # first: sets XLA_FLAGS for 8 devices before JAX starts

# isort: split
import json
import re
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import rmsprop_jax
from sharding_check import COLLECTIVE

# The quantized formats with layout="rows" pinned: this check is about the rows (and flat) layout's
# resharding where shards cut its blocks. The default layout="auto" would give the column-sharded
# "w" tiles (no collective): that rule is checked in tests/tiles_check.py.
ROWS = {"int8": rmsprop_jax.Int8(layout="rows"), "int4": rmsprop_jax.Int4(layout="rows")}
ROWS["fp8"] = rmsprop_jax.Fp8(layout="rows")
FORMATS = {
    "float32": dict(accumulator_dtype=jnp.float32),
    "centered_momentum_wd": dict(
        centered=True, momentum=0.9, weight_decay=1e-2, accumulator_dtype=jnp.float32
    ),
    "bf16_stochastic": dict(accumulator_dtype=jnp.bfloat16),
    "int8": dict(accumulator_dtype=ROWS["int8"]),
    "int8_centered_momentum": dict(centered=True, momentum=0.9, accumulator_dtype=ROWS["int8"]),
    "int8_flat": dict(accumulator_dtype=rmsprop_jax.Int8(layout="flat")),
    "int4": dict(accumulator_dtype=ROWS["int4"]),
    "int4_centered_momentum": dict(centered=True, momentum=0.9, accumulator_dtype=ROWS["int4"]),
    "fp8": dict(accumulator_dtype=ROWS["fp8"]),
    "fp8_centered_momentum": dict(centered=True, momentum=0.9, accumulator_dtype=ROWS["fp8"]),
}
# Leaves: "w" (64-column shards when columns are sharded: blocks of 256 straddle them), "v"
# (256-column shards: one whole block each), "b" (below Int8's min_size: float32 state).
SHAPES = {"w": (1024, 512), "v": (16, 2048), "b": (512,)}
SHARDINGS = {
    "rows": {"w": P("x", None), "v": P("x", None), "b": P()},
    "columns": {"w": P(None, "x"), "v": P(None, "x"), "b": P("x")},
    "replicated": {"w": P(), "v": P(), "b": P()},
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# also stepped eagerly (float32 params)
EAGER = ("int8", "int8_centered_momentum", "int8_flat", "int4_centered_momentum", "fp8_centered_momentum")


def _tx(fmt: str, lr: float = 1e-2):
    return rmsprop_jax.rmsprop(lr, **FORMATS[fmt])


def _values(dtype, seed):
    return {
        k: np.asarray(jax.random.normal(jax.random.key(seed + i), s, jnp.float32).astype(dtype))
        for i, (k, s) in enumerate(sorted(SHAPES.items()))
    }


def _two_steps(step, tx, grads, params):
    state = tx.init(params)
    u, s = step(grads, state, params)
    u, s = step(grads, s, params)
    return state, u, s


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _types(tree):
    """Every leaf's type (dtype, shape, sharding) with its spec padded to one entry per dimension."""
    return [
        f"{jax.typeof(x)} {tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))}"
        for x in jax.tree.leaves(tree)
    ]


def _state_diff(state, ref) -> dict:
    """How two states differ: the share of 8-bit codes that differ, the largest code difference,
    and the largest relative difference of the float leaves (absmax and float accumulators)."""
    codes, code_step, n_codes, rel = 0, 0, 0, 0.0
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(ref), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype == np.uint8 or a.dtype.itemsize == 1:  # int8/int4 codes, fp8 bit patterns
            d = np.abs(a.view(np.uint8).astype(np.int64) - b.view(np.uint8).astype(np.int64))
            codes, code_step = codes + int(np.sum(d > 0)), max(code_step, int(d.max()))
            n_codes += d.size
        else:
            a, b = a.astype(np.float64), b.astype(np.float64)
            rel = max(rel, float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30), initial=0.0)))
    return {"codes_share": codes / max(n_codes, 1), "code_step": code_step, "float_rel": rel}


def _updates_diff(u, ref) -> dict:
    """How two updates differ: the share of elements that differ and their largest difference in
    units of the parameter dtype's spacing at the reference value (ulps)."""
    n, bad, ulps = 0, 0, 0.0
    for a, b in zip(jax.tree.leaves(jax.device_get(u)), jax.tree.leaves(ref), strict=True):
        eps = float(jnp.finfo(np.asarray(b).dtype).eps)
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        spacing = eps * np.exp2(np.floor(np.log2(np.maximum(np.abs(b), 1e-30))))
        d = np.abs(a - b)
        n, bad = n + d.size, bad + int(np.sum(d > 0))
        ulps = max(ulps, float(np.max(d / np.maximum(spacing, 1e-45), initial=0.0)))
    return {"share": bad / max(n, 1), "ulps": ulps}


# An HLO instruction that is a collective: "%name = f32[8,128]{1,0} all-reduce(...".
_NAMES = COLLECTIVE.pattern.removeprefix(r"\b(").removesuffix(r")\b")  # all-gather|all-reduce|...
_COLLECTIVE_OP = re.compile(r"= (\(?[a-z0-9]+\[[0-9,]*\][^ ]*) (" + _NAMES + r")\(")


_LAYOUT = re.compile(r"\{[^}]*\}")


def _collective_ops(hlo: str) -> list[str]:
    """Each collective of a compiled program with its result type (per-device shape), sorted."""
    return sorted(f"{op} {_LAYOUT.sub('', ty)}" for ty, op in _COLLECTIVE_OP.findall(hlo))


def _quantized(state):
    for kind in ("nu", "mu", "trace"):
        tree = getattr(state, kind)
        for k, v in (tree or {}).items():
            if hasattr(v, "codes"):
                yield f"{kind}[{k}]", k, v


def main() -> dict:
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
    cases, refs, states, ups = [], {}, {}, {}
    for fmt in FORMATS:
        for dname, dtype in DTYPES.items():
            p, g = _values(dtype, 0), _values(dtype, 100)
            lp, lg = jax.device_put((p, g), jax.devices()[0])
            _, u, s = _two_steps(jax.jit(_tx(fmt).update), _tx(fmt), lg, lp)
            refs[fmt, dname], states[fmt, dname] = _bits((u, s)), jax.device_get(s)
            ups[fmt, dname] = jax.device_get(u)
            if fmt == "int8" and dname == "float32":  # the contrast: another learning rate
                _, u, s = _two_steps(jax.jit(_tx(fmt, 2e-2).update), _tx(fmt, 2e-2), lg, lp)
                refs["wrong_lr"] = _bits((u, s))
            for shname, specs in SHARDINGS.items():
                case = {"format": fmt, "sharding": shname, "dtype": dname, "error": None}
                cases.append(case)
                try:
                    with jax.set_mesh(mesh):
                        params = {k: jax.device_put(v, specs[k]) for k, v in p.items()}
                        grads = {k: jax.device_put(v, specs[k]) for k, v in g.items()}
                        tx = _tx(fmt)
                        compiled = jax.jit(tx.update).lower(grads, tx.init(params), params).compile()
                        case["collectives"] = sorted(set(COLLECTIVE.findall(compiled.as_text())))
                        case["collective_ops"] = _collective_ops(compiled.as_text())
                        state, u, s = _two_steps(compiled, tx, grads, params)
                        case["init_types"], case["update_types"] = _types(state), _types(s)
                        case["quantized"] = [
                            {
                                "leaf": name,
                                "param": str(specs[k]),
                                "codes": str(v.codes.sharding.spec),
                                "absmax": str(v.absmax.sharding.spec),
                                "codes_like_param": v.codes.sharding.is_equivalent_to(
                                    params[k].sharding, v.codes.ndim
                                ),
                            }
                            for name, k, v in _quantized(s)
                        ]
                        got, ref, n = _bits((u, s)), refs[fmt, dname], len(jax.tree.leaves(u))
                        case["updates_equal_no_mesh"] = got[:n] == ref[:n]
                        case["state_equal_no_mesh"] = got[n:] == ref[n:]
                        case["state_diff"] = _state_diff(s, states[fmt, dname])
                        case["updates_diff"] = _updates_diff(u, ups[fmt, dname])
                        if "wrong_lr" in refs and fmt == "int8" and dname == "float32" and shname == "rows":
                            case["equal_wrong_lr"] = got == refs["wrong_lr"]
                        if fmt in EAGER and dname == "float32":
                            estate, eu, es = _two_steps(tx.update, tx, grads, params)
                            case["eager_equal_no_mesh"] = _bits((eu, es)) == got
                            case["eager_types_equal"] = _types(es) == _types(estate) == case["init_types"]
                except Exception:  # recorded: the test names the case
                    case["error"] = traceback.format_exc(limit=3)[-2000:]
    return {"devices": jax.device_count(), "jax": jax.__version__, "cases": cases}


if __name__ == "__main__":
    print("EXPLICIT_SHARDING_REPORT " + json.dumps(main()))
    sys.exit(0)
