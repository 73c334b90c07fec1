"""optax's two sharding-in-types tests, run against this package by ``tests/test_optax_sharding.py``.

Ported from optax ``optax/_src/sharding_test.py`` (Copyright 2025 DeepMind Technologies Limited,
Apache License 2.0): ``test_state_sharding_type_init_match_update`` and
``test_state_sharding_type_preserved_with_jit``, unchanged in substance (float16 params of shape
(2, 8, 4) sharded ``P(None, "x")`` on an 8-device ``AxisType.Explicit`` mesh, under
``jax.set_mesh``). optax guards them with ``jax.__version__ < '0.7.2'``, a string comparison that
skips them on jax 0.10; here they always run. A fresh process on 8 fake CPU devices, launched
like ``tests/sharding_check.py``; prints one JSON line.
"""

from __future__ import annotations

import sharding_check  # noqa: F401  # first: sets XLA_FLAGS for 8 devices before JAX starts

# isort: split
import json
import traceback

import jax
import jax.numpy as jnp
import optax

import rmsprop_jax

TRANSFORMATIONS = {
    "optax.rmsprop": lambda: optax.rmsprop(1.0),  # the baseline optax's test covers
    "rmsprop": lambda: rmsprop_jax.rmsprop(1.0),
    "scale_by_rms": lambda: rmsprop_jax.scale_by_rms(),
    "rmsprop_centered_momentum_wd": lambda: rmsprop_jax.rmsprop(
        1.0, centered=True, momentum=0.9, weight_decay=1e-2
    ),
    "rmsprop_bf16_stochastic": lambda: rmsprop_jax.rmsprop(1.0, accumulator_dtype=jnp.bfloat16),
    "rmsprop_float32_state": lambda: rmsprop_jax.rmsprop(1.0, accumulator_dtype=jnp.float32),
    # (2, 8, 4) is below Int8's min_size; min_size=0 stores it in 8 bits
    "rmsprop_int8": lambda: rmsprop_jax.rmsprop(1.0, accumulator_dtype=rmsprop_jax.Int8(min_size=0)),
    "rmsprop_int8_flat_centered": lambda: rmsprop_jax.rmsprop(
        1.0, centered=True, accumulator_dtype=rmsprop_jax.Int8(min_size=0, layout="flat")
    ),
    # rank 3: the 4-bit second moment is rank-1 normalized (a statistics vector per axis)
    "rmsprop_int4": lambda: rmsprop_jax.rmsprop(1.0, accumulator_dtype=rmsprop_jax.Int4(min_size=0)),
    "rmsprop_int4_centered_momentum": lambda: rmsprop_jax.rmsprop(
        1.0, centered=True, momentum=0.9, accumulator_dtype=rmsprop_jax.Int4(min_size=0)
    ),
    "rmsprop_fp8": lambda: rmsprop_jax.rmsprop(1.0, accumulator_dtype=rmsprop_jax.Fp8(min_size=0)),
    "rmsprop_fp8_centered_momentum": lambda: rmsprop_jax.rmsprop(
        1.0, centered=True, momentum=0.9, accumulator_dtype=rmsprop_jax.Fp8(min_size=0)
    ),
}


def _replicating_mutant() -> optax.GradientTransformation:
    """Deliberately wrong: its update hands the state back replicated. The check must catch it."""
    inner = rmsprop_jax.rmsprop(1.0)

    def update(updates, state, params=None):
        updates, state = inner.update(updates, state, params)
        return updates, jax.tree.map(lambda x: jax.sharding.reshard(x, jax.P()), state)

    return optax.GradientTransformation(inner.init, update)


MUTANT = "mutant_replicates_state"


def _types(tree):
    return [str(t) for t in jax.tree.leaves(jax.tree.map(jax.typeof, tree))]


def _case(make) -> dict:
    out: dict = {"error": None}
    try:
        optimizer = make()
        mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
        sharding = jax.sharding.NamedSharding(mesh, jax.P(None, "x"))
        with jax.set_mesh(mesh):
            params = jnp.zeros((2, 8, 4), dtype=jnp.float16, out_sharding=sharding)
            # test_state_sharding_type_init_match_update
            state0 = optimizer.init(params)
            _, state1 = optimizer.update(params, state0, params)
            out["init_match_update"] = _types(state0) == _types(state1)
            # test_state_sharding_type_preserved_with_jit
            out["jit_init_types_equal"] = _types(state0) == _types(jax.jit(optimizer.init)(params))
            _, state2 = optimizer.update(params, state0, params)
            _, state3 = jax.jit(optimizer.update)(params, state0, params)
            out["jit_update_types_equal"] = _types(state2) == _types(state3)
            out["state_types"] = _types(state0)
            out["quantized"] = any(
                isinstance(x, rmsprop_jax.QuantizedLeaf)
                for x in jax.tree.leaves(state0, is_leaf=lambda x: isinstance(x, rmsprop_jax.QuantizedLeaf))
            )
    except Exception:
        out["error"] = traceback.format_exc(limit=6)
    return out


if __name__ == "__main__":
    cases = {n: _case(m) for n, m in TRANSFORMATIONS.items()}
    report = {"devices": len(jax.devices()), "cases": cases, "mutant": _case(_replicating_mutant)}
    print("OPTAX_SHARDING_REPORT " + json.dumps(report))
