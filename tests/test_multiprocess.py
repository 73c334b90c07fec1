"""Two processes under ``jax.distributed`` (2 x 4 CPU devices, gloo) against one process with 8.

``tests/multiprocess_check.py`` starts both workers and the reference in fresh processes (each
needs its device count in ``XLA_FLAGS`` before JAX starts, and the workers a coordinator): a
(512, 256) matrix and its bias sharded by rows over all 8 devices, every state format (float32,
8-bit, 4-bit, FP8, plain and centered with momentum, and bfloat16 with stochastic rounding), 3
jitted training steps each. Every shard of the params and the state on every worker's device
must equal the one-process run's array at its index, bit for bit.
"""

from __future__ import annotations

import pytest

from multiprocess_check import drive

CONFIGS = {
    "float32",
    "float32_centered_momentum",
    "int8",
    "int8_centered_momentum",
    "int4",
    "int4_centered_momentum",
    "fp8",
    "fp8_centered_momentum",
    "bf16_stochastic",
}
CODES = {"int8": "uint8", "int4": "uint8", "fp8": "float8_e4m3fn"}
# Int4's rank-1 second moment needs each axis' maxima across shards: float32 vectors (the
# (512 + 256,) scale and its row or column maxima), never a matrix.
RANK1_OPS = {"all-gather", "all-reduce", "collective-permute"}


@pytest.fixture(scope="module")
def report() -> dict:
    return drive()


def test_two_processes_of_four_devices_and_one_of_eight(report):
    assert report["process_counts"] == {"0": 2, "1": 2, "ref": 1}
    assert report["shards_per_process"] == {"0": 4, "1": 4, "ref": 8}
    assert set(report["cases"]) == CONFIGS


def test_the_state_is_in_its_format(report):
    for name, case in report["cases"].items():
        leaves = case["leaves"]
        fmt = name.split("_")[0]
        if fmt in CODES:
            codes = [p for p in leaves if p.startswith("[1].nu['w']") and p.endswith(".codes")]
            assert codes and leaves[codes[0]] == CODES[fmt], (name, leaves)
            assert leaves["[1].nu['b']"] == "float32", (name, leaves)  # under min_size
        elif fmt == "bf16":
            assert leaves["[1].nu['w']"] == "bfloat16", leaves
        else:
            assert leaves["[1].nu['w']"] == "float32", leaves


def test_every_shard_on_every_process_equals_one_process_bit_for_bit(report):
    for name, case in report["cases"].items():
        assert not case["uncovered"], (name, case["uncovered"])
        assert not case["mismatch"], (name, case["mismatch"])


def test_the_step_compiles_alike_in_both_layouts_of_the_devices(report):
    for name, case in report["cases"].items():
        c = case["collectives"]
        assert c["0"] == c["1"] == c["ref"], (name, c)


def test_rows_sharding_needs_no_collective_except_int4_rank1_maxima(report):
    for name, case in report["cases"].items():
        ops = case["collectives"]["0"]
        if not name.startswith("int4"):
            assert not ops, (name, ops)
            continue
        assert ops and {op for op, *_ in ops} <= RANK1_OPS, (name, ops)
        for _, *types in ops:
            assert all(t.startswith("f32[") and "," not in t for t in types), (name, ops)
            assert all(int(t[4:-1]) <= 512 + 256 for t in types), (name, ops)
