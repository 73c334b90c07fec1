"""Sharded-state checks, run by ``tests/test_sharding.py`` in a fresh process.

The process must see 8 (fake CPU) devices, which needs ``XLA_FLAGS`` set before
JAX starts: a pytest process that imported JAX already cannot do that, so the test
runs this script with ``subprocess`` and reads the one JSON line it prints.

Every check records facts (which leaf has which sharding, which collectives the
compiled update contains); ``test_sharding.py`` asserts on them, so a failure names
the layout, mesh type, configuration and leaf.
"""

from __future__ import annotations

import os
import sys

# Only where a check script is the program (run by hand, or by the tests' subprocess): pytest's
# --doctest-modules also imports this file to collect doctests, and 8 devices set here then would
# give that whole pytest worker 8 devices (which changed layout="auto"'s choices under test).
if sys.argv[0].endswith("_check.py"):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import rmsprop_jax

COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)\b")

# name -> (mesh shape, axis names, {leaf: (shape, dtype, spec)})
LAYOUTS = {
    "fsdp_1d": (
        (8,),
        ("fsdp",),
        {
            "w": ((16, 24), jnp.float32, P("fsdp", None)),
            "b": ((24,), jnp.float32, P(None)),
            "e": ((32, 3), jnp.bfloat16, P("fsdp", None)),
            "s": ((), jnp.float32, P()),
            "odd": ((3, 5), jnp.float32, P()),
        },
    ),
    "data_model_2d": (
        (2, 4),
        ("data", "model"),
        {
            "w": ((16, 24), jnp.float32, P("data", "model")),
            "b": ((24,), jnp.float32, P("model")),
            "e": ((8, 12), jnp.bfloat16, P(None, "model")),
            "s": ((), jnp.float32, P()),
            "odd": ((3, 5), jnp.float32, P()),
        },
    ),
}


def _configs() -> dict[str, optax.GradientTransformation]:
    def no_bias(p):
        return {k: k != "b" for k in p}

    return {
        "default": rmsprop_jax.rmsprop(1e-2),
        "centered_nesterov": rmsprop_jax.rmsprop(
            1e-2, centered=True, momentum=0.9, nesterov=True, initial_scale=1.0
        ),
        "bias_eps_outside_coupled_wd_masked": rmsprop_jax.rmsprop(
            1e-2, eps_in_sqrt=False, bias_correction=True, weight_decay=1e-2, weight_decay_mask=no_bias
        ),
        "torch_like_schedule_decoupled": rmsprop_jax.rmsprop(
            optax.cosine_decay_schedule(1e-2, 100),
            momentum=0.5,
            lr_in_momentum=False,
            weight_decay=1e-2,
            decoupled_weight_decay=True,
            maximize=True,
        ),
        "f32_accumulators": rmsprop_jax.rmsprop(1e-2, centered=True, accumulator_dtype=jnp.float32),
        "scale_by_rms_centered": rmsprop_jax.scale_by_rms(centered=True, bias_correction=True),
    }


def _values(leaves, seed):
    return {
        name: np.asarray(jax.random.normal(jax.random.key(seed + i), shape, jnp.float32).astype(dtype))
        for i, (name, (shape, dtype, _)) in enumerate(sorted(leaves.items()))
    }


def _params(mesh, leaves, seed):
    return {k: jax.device_put(v, NamedSharding(mesh, leaves[k][2])) for k, v in _values(leaves, seed).items()}


def _same_sharding(a, b) -> bool:
    return a.sharding.is_equivalent_to(b.sharding, a.ndim)


def _desc(x) -> str:
    s = x.sharding
    return str(s.spec) if isinstance(s, NamedSharding) else type(s).__name__


def _state_leaves(state):
    """(kind, name, array) for every per-parameter accumulator of a state."""
    for kind in ("nu", "mu", "trace"):
        tree = getattr(state, kind)
        if tree is not None:
            for k, v in tree.items():
                yield kind, k, v


def main() -> dict:
    assert jax.device_count() == 8, jax.devices()
    report: dict = {"devices": jax.device_count(), "cases": [], "optax_contrast": [], "detector": None}
    report["jax"], report["optax"] = jax.__version__, optax.__version__
    configs = _configs()
    # Element-wise math: a sharded update equals the one-device jitted one bit for bit
    # (both jitted: eager and jit differ by FMA contraction, see test_properties.py).
    refs = {}
    for layout, (_, _, leaves) in LAYOUTS.items():
        lp, lg = jax.device_put((_values(leaves, 0), _values(leaves, 100)), jax.devices()[0])
        for cname, opt in configs.items():
            step = jax.jit(opt.update)
            u, s = step(lg, opt.init(lp), lp)
            u, _ = step(lg, s, lp)
            refs[layout, cname] = {k: np.asarray(v) for k, v in u.items()}
    for layout, (mesh_shape, axes, leaves) in LAYOUTS.items():
        # Auto without a mesh context is the common way (shardings come from the arrays);
        # Explicit under jax.set_mesh is the documented way (shardings are in the types).
        # The other two pairings run with two configurations.
        for axis_type, set_mesh, names in (
            (AxisType.Auto, False, list(configs)),
            (AxisType.Explicit, True, list(configs)),
            (AxisType.Auto, True, ["default", "centered_nesterov"]),
            (AxisType.Explicit, False, ["default", "centered_nesterov"]),
        ):
            mesh = jax.make_mesh(mesh_shape, axes, axis_types=(axis_type,) * len(axes))
            ctx = jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext()
            with ctx:
                params = _params(mesh, leaves, 0)
                grads = _params(mesh, leaves, 100)
                for cname in names:
                    opt = configs[cname]
                    state = jax.jit(opt.init)(params)
                    init_bad = [
                        f"{kind}[{k}]: {_desc(v)} vs param {_desc(params[k])}"
                        for kind, k, v in _state_leaves(state)
                        if not _same_sharding(v, params[k])
                    ]
                    compiled = jax.jit(opt.update).lower(grads, state, params).compile()
                    collectives = sorted(set(COLLECTIVE.findall(compiled.as_text())))
                    _, new_state = compiled(grads, state, params)
                    upd2, new_state2 = compiled(grads, new_state, params)
                    upd_bad = [
                        f"update[{k}]: {_desc(upd2[k])} vs param {_desc(params[k])}"
                        for k in params
                        if not _same_sharding(upd2[k], params[k])
                    ] + [
                        f"new {kind}[{k}]: {_desc(v)} vs param {_desc(params[k])}"
                        for kind, k, v in _state_leaves(new_state2)
                        if not _same_sharding(v, params[k])
                    ]
                    mismatch = [
                        k for k in params if not np.array_equal(np.asarray(upd2[k]), refs[layout, cname][k])
                    ]
                    report["cases"].append(
                        {
                            "layout": layout,
                            "axis_type": axis_type.name,
                            "set_mesh": set_mesh,
                            "config": cname,
                            "n_accumulators": sum(1 for _ in _state_leaves(state)),
                            "init_mismatch": init_bad,
                            "update_mismatch": upd_bad,
                            "collectives": collectives,
                            "value_mismatch": mismatch,
                            "finite": bool(all(bool(jnp.all(jnp.isfinite(u))) for u in upd2.values())),
                        }
                    )
                if axis_type == AxisType.Auto and not set_mesh:
                    # The contrast: optax's own init under jit, Auto mode.
                    ostate = jax.jit(optax.rmsprop(1e-2, centered=True).init)(params)[0]
                    report["optax_contrast"].append(
                        {
                            "layout": layout,
                            "nu_matches_param": {k: _same_sharding(ostate.nu[k], params[k]) for k in params},
                            "nu_sharding": {k: _desc(ostate.nu[k]) for k in params},
                        }
                    )
                    # The check can fail: a constant fill under jit (the previous implementation,
                    # and optax's) is not placed like the parameter in Auto mode.
                    naive = {k: jax.jit(lambda p: jnp.full_like(p, 0.0))(v) for k, v in params.items()}
                    report["naive_fill_matches_param"] = report.get("naive_fill_matches_param", []) + [
                        _same_sharding(naive[k], params[k]) for k in params if params[k].ndim
                    ]
                    if layout == "data_model_2d":
                        # The detector can fail: a global-norm clip needs an all-reduce.
                        clip = optax.chain(optax.clip_by_global_norm(1.0), rmsprop_jax.rmsprop(1e-2))
                        cs = jax.jit(clip.init)(params)
                        text = jax.jit(clip.update).lower(grads, cs, params).compile().as_text()
                        report["detector"] = sorted(set(COLLECTIVE.findall(text)))
    report["int8_cases"] = int8_cases()
    return report


# 8-bit block-wise state: blocks along rows (Int8(layout="rows")), so a block never
# straddles a shard: rows sharded (FSDP), or columns sharded in multiples of 256.
INT8_LAYOUTS = {
    "fsdp_rows": ((8,), ("fsdp",), {"w": ((64, 600), P("fsdp", None)), "v": ((8, 4096), P("fsdp", None))}),
    "data_model_2d": (
        (2, 4),
        ("data", "model"),
        {"w": ((16, 2048), P("data", "model")), "v": ((32, 1024), P(None, "model"))},
    ),
}


def _int8_configs() -> dict[str, optax.GradientTransformation]:
    return {
        "int8": rmsprop_jax.rmsprop(1e-2, accumulator_dtype="int8"),
        "int8_centered_momentum": rmsprop_jax.rmsprop(
            1e-2, centered=True, momentum=0.9, accumulator_dtype="int8"
        ),
        "bf16_stochastic": rmsprop_jax.rmsprop(1e-2, accumulator_dtype=jnp.bfloat16),
        # The contrast (the checks can fail): bitsandbytes' flattened blocks cross the shards
        # of a column-sharded array.
        "int8_flat_contrast": rmsprop_jax.rmsprop(1e-2, accumulator_dtype=rmsprop_jax.Int8(layout="flat")),
    }


def _int8_values(leaves, seed):
    return {
        k: np.asarray(jax.random.normal(jax.random.key(seed + i), shape, jnp.float32))
        for i, (k, (shape, _)) in enumerate(sorted(leaves.items()))
    }


def _spec_sharding(mesh, spec):
    return NamedSharding(mesh, spec)


def _refusal(fn, *args) -> str:
    """The ValueError's message, or "accepted"."""
    try:
        fn(*args)
    except ValueError as e:
        return str(e)
    return "accepted"


def int8_cases() -> list:
    cases = []
    configs = _int8_configs()
    for layout, (mesh_shape, axes, leaves) in INT8_LAYOUTS.items():
        lp, lg = jax.device_put((_int8_values(leaves, 0), _int8_values(leaves, 100)), jax.devices()[0])
        refs = {}
        for cname, opt in configs.items():
            step = jax.jit(opt.update)
            u, s = step(lg, opt.init(lp), lp)
            u, s = step(lg, s, lp)
            refs[cname] = jax.tree.map(np.asarray, (u, s))
        mesh = jax.make_mesh(mesh_shape, axes, axis_types=(AxisType.Auto,) * len(axes))
        params = {
            k: jax.device_put(v, NamedSharding(mesh, leaves[k][1]))
            for k, v in _int8_values(leaves, 0).items()
        }
        grads = {
            k: jax.device_put(v, NamedSharding(mesh, leaves[k][1]))
            for k, v in _int8_values(leaves, 100).items()
        }
        for cname, opt in configs.items():
            state = jax.jit(opt.init)(params)
            compiled = jax.jit(opt.update).lower(grads, state, params).compile()
            collectives = sorted(set(COLLECTIVE.findall(compiled.as_text())))
            u, s = compiled(grads, state, params)
            u, s = compiled(grads, s, params)
            bad = []
            for kind in ("nu", "mu", "trace"):
                tree = getattr(s, kind)
                if tree is None:
                    continue
                for k, v in tree.items():
                    want = _spec_sharding(mesh, leaves[k][1])
                    arrays = [("codes", v.codes), ("absmax", v.absmax)] if hasattr(v, "codes") else [("", v)]
                    for part, arr in arrays:
                        if arr.ndim != len(leaves[k][0]) or not arr.sharding.is_equivalent_to(want, arr.ndim):
                            bad.append(f"{kind}[{k}].{part}: {_desc(arr)} vs {leaves[k][1]}")
            got = jax.tree.map(np.asarray, (u, s))
            same = all(
                np.array_equal(a, b)
                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(refs[cname]), strict=True)
            )
            quantized = sum(hasattr(v, "codes") for v in s.nu.values())
            cases.append(
                {
                    "layout": layout,
                    "config": cname,
                    "quantized_leaves": int(quantized),
                    "sharding_mismatch": bad,
                    "collectives": collectives,
                    "equals_single_device": bool(same),
                }
            )
    return cases


if __name__ == "__main__":
    print("SHARDING_REPORT " + json.dumps(main()))
    sys.exit(0)
