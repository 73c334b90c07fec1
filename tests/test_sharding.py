"""Sharded optimizer state on an 8-device mesh (JAX SPMD).

The checks run in a fresh process (``tests/sharding_check.py``) because the fake
8-device CPU platform must be requested (``XLA_FLAGS``) before JAX starts, and
this pytest process has started it already. 2 layouts (FSDP along one axis;
2-D data x model) x 2 mesh types (``AxisType.Auto`` without a mesh context,
``AxisType.Explicit`` under ``jax.set_mesh``) x 6 element-wise configurations, plus
Auto under ``jax.set_mesh`` and Explicit without it for 2 configurations: 32 compiled
updates.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _procs import cpu_process_env

HERE = Path(__file__).parent
N_LAYOUTS, N_AXIS_TYPES, N_CONFIGS = 2, 2, 6
N_EXTRA = 2 * 2  # Auto under set_mesh and Explicit without it, two configurations each


def run_on_8_devices(script: str, marker: str) -> dict:
    """Run ``tests/<script>`` in a fresh process on 8 fake CPU devices; the JSON after ``marker``."""
    proc = subprocess.run(
        [sys.executable, str(HERE / script)],
        env=cpu_process_env(8, pythonpath=(HERE.parent / "src",)),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(marker + " "))
    return json.loads(line.split(" ", 1)[1])


@pytest.fixture(scope="module")
def report() -> dict:
    return run_on_8_devices("sharding_check.py", "SHARDING_REPORT")


def _failures(report: dict, key: str) -> list[str]:
    return [f"{c['layout']}/{c['axis_type']}/{c['config']}: {c[key]}" for c in report["cases"] if c[key]]


def test_all_layouts_mesh_types_and_configs_ran(report):
    assert report["devices"] == 8
    assert len(report["cases"]) == N_LAYOUTS * (N_AXIS_TYPES * N_CONFIGS + N_EXTRA)
    assert {c["axis_type"] for c in report["cases"]} == {"Auto", "Explicit"}
    assert sum(c["n_accumulators"] for c in report["cases"]) > 0


def test_jit_init_gives_every_accumulator_its_parameters_sharding(report):
    assert not _failures(report, "init_mismatch")


def test_jitted_update_keeps_the_shardings(report):
    assert not _failures(report, "update_mismatch")


def test_compiled_update_has_no_collective(report):
    assert not _failures(report, "collectives")


def test_sharded_update_equals_one_device_update_bit_for_bit(report):
    assert not _failures(report, "value_mismatch")
    assert all(c["finite"] for c in report["cases"])


def test_the_checks_can_fail(report):
    # A constant fill under jit in Auto mode is not placed like the parameter (what
    # the sharding check would catch if _full_like_param regressed) ...
    assert report["naive_fill_matches_param"] and not any(report["naive_fill_matches_param"])
    # ... and the HLO scan does see a collective when there is one (global-norm clipping).
    assert "all-reduce" in report["detector"]


def test_contrast_optax_init_in_auto_mode_is_not_sharded_like_params(report):
    # Documents optax's behaviour (optax 0.2.8): its jitted init leaves accumulators on one
    # device in Auto mode. If a later optax fixes that, drop this contrast.
    for entry in report["optax_contrast"]:
        assert not any(entry["nu_matches_param"].values()), (report["optax"], entry)


def test_low_memory_state_is_sharded_like_its_parameter_without_collectives(report):
    """8-bit codes and absmax (blocks along rows: they never straddle a shard) and bf16 with
    stochastic rounding (the hash counts global element indices): sharded like the parameter,
    no collective in the compiled update, bit-identical to the single-device update."""
    cases = [c for c in report["int8_cases"] if c["config"].startswith(("int8", "bf16"))]
    cases = [c for c in cases if not c["config"].endswith("_contrast")]
    assert len(cases) == 2 * 3
    assert all(c["quantized_leaves"] == 2 for c in cases if c["config"].startswith("int8"))
    # The checks can fail: bitsandbytes' flattened blocks cross shards (all-gathers, misplaced state).
    contrast = [c for c in report["int8_cases"] if c["config"].endswith("_contrast")]
    assert len(contrast) == 2 and all(c["collectives"] and c["sharding_mismatch"] for c in contrast)
    for c in cases:
        where = f"{c['layout']}/{c['config']}"
        assert not c["sharding_mismatch"], (where, c["sharding_mismatch"])
        assert not c["collectives"], (where, c["collectives"])
        assert c["equals_single_device"], where


# --------------------------------------------------------------------------- in-process, one device


@pytest.mark.parametrize("initial_scale", [0.0, 0.1, 1.0])
def test_jit_init_equals_eager_init_bit_for_bit_even_for_non_finite_params(initial_scale):
    # _full_like_param makes the accumulators depend on the params under jit (so that XLA
    # places them alike): that must not leak NaN/inf, -0.0 or rounding into the values.
    import jax
    import jax.numpy as jnp
    import numpy as np

    import rmsprop_jax

    special = [np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-45, -3.0, 3e38]
    params = {
        "f32": jnp.asarray(special, jnp.float32),
        "bf16": jnp.asarray(special, jnp.bfloat16),
        "f16": jnp.asarray(special, jnp.float32).astype(jnp.float16),  # 3e38 -> inf
        "c64": jnp.asarray(special, jnp.float32) * (1 + 1j),
        "scalar": jnp.asarray(np.nan, jnp.float32),
        "empty": jnp.zeros((0, 3)),
    }
    for acc in (None, jnp.float32, jnp.bfloat16):
        opt = rmsprop_jax.rmsprop(
            0.1, initial_scale=initial_scale, centered=True, momentum=0.9, accumulator_dtype=acc
        )
        eager, jitted = opt.init(params), jax.jit(opt.init)(params)
        traced_scale = jax.jit(
            lambda p, s, acc=acc: rmsprop_jax.rmsprop(
                0.1, initial_scale=s, centered=True, momentum=0.9, accumulator_dtype=acc
            ).init(p)
        )(params, initial_scale)
        for a, b, c in zip(
            jax.tree.leaves(eager), jax.tree.leaves(jitted), jax.tree.leaves(traced_scale), strict=True
        ):
            assert a.dtype == b.dtype == c.dtype and a.shape == b.shape == c.shape
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes() == np.asarray(c).tobytes(), (
                acc,
                a,
                b,
                c,
            )
        assert eager.nu["c64"].dtype == (jnp.float32 if acc is None else jnp.dtype(acc))
