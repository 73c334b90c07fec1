"""optax's own sharding-in-types tests (``optax/_src/sharding_test.py``), driven against
``rmsprop_jax.rmsprop`` and ``scale_by_rms`` in every state format, on 8 CPU devices.

The checks run in one fresh process (``tests/optax_sharding_check.py``, which says where they come
from). optax skips them on jax >= 0.10 because it compares version strings; here they run.
"""

from __future__ import annotations

import pytest

from test_sharding import run_on_8_devices

CASES = [
    "optax.rmsprop",
    "rmsprop",
    "scale_by_rms",
    "rmsprop_centered_momentum_wd",
    "rmsprop_bf16_stochastic",
    "rmsprop_float32_state",
    "rmsprop_int8",
    "rmsprop_int8_flat_centered",
    "rmsprop_int4",
    "rmsprop_int4_centered_momentum",
    "rmsprop_fp8",
    "rmsprop_fp8_centered_momentum",
]


@pytest.fixture(scope="module")
def report() -> dict:
    return run_on_8_devices("optax_sharding_check.py", "OPTAX_SHARDING_REPORT")


def test_every_transformation_ran_on_8_devices(report):
    assert report["devices"] == 8
    assert list(report["cases"]) == CASES
    assert not {n: c["error"] for n, c in report["cases"].items() if c["error"]}


@pytest.mark.parametrize("name", CASES)
def test_state_sharding_type_init_match_update(report, name):
    assert report["cases"][name]["init_match_update"], report["cases"][name]


@pytest.mark.parametrize("name", CASES)
def test_state_sharding_type_preserved_with_jit(report, name):
    case = report["cases"][name]
    assert case["jit_init_types_equal"] and case["jit_update_types_equal"], case


def test_the_8bit_cases_store_8bit_codes_sharded(report):
    """The min_size=0 cases really quantize the (2, 8, 4) leaf, so the 8-bit codec is what ran."""
    for name in ("rmsprop_int8", "rmsprop_int8_flat_centered"):
        case = report["cases"][name]
        assert case["quantized"], case
        assert any("uint8" in t or "int8" in t for t in case["state_types"]), case


def test_the_check_can_fail(report):
    """A transformation whose update replicates the state fails init_match_update."""
    assert report["mutant"]["error"] is None, report["mutant"]
    assert not report["mutant"]["init_match_update"], report["mutant"]
    assert any("x" in t for t in report["cases"]["rmsprop"]["state_types"])  # the real state is sharded
