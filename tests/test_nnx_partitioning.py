"""Flax NNX's partitioning metadata on 8-bit (and float) optimizer state, on a 2 x 4 mesh.

``nnx.Optimizer`` gives every state leaf under a parameter that parameter's ``out_sharding``
and shards it at construction; an 8-bit leaf's ``absmax`` (one per block) could not take the
kernel's ``P("a", "b")`` where its dimensions do not divide. The checks run in one fresh process
(``tests/nnx_partitioning_check.py``, launched like ``tests/sharding_check.py``): 10 formats x 3
kernel shapes x {Auto, Explicit} meshes (the 8-bit, 4-bit and FP8 formats plain at three shapes,
centered with momentum at one shape), each
following the Flax NNX sharding guide, with a kernel partitioned ``("a", "b")`` and a weight
``(None, "b")``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("flax.nnx")

from test_sharding import run_on_8_devices

FORMATS = (
    "float32",
    "bf16",
    "int8",
    "int8_flat",
    "int8_rows",
    "int8_centered_momentum",
    "int4",
    "int4_centered_momentum",
    "fp8",
    "fp8_centered_momentum",
)
SHAPES = ([256, 512], [256, 1024], [256, 4096])
AXIS_TYPES = ("auto", "explicit")
ONE_SHAPE = tuple(f for f in FORMATS if f.endswith(("_centered_momentum", "_rows")))  # first shape only
MATRIX = [
    (f, s, t) for f in FORMATS for s in SHAPES for t in AXIS_TYPES if f not in ONE_SHAPE or s == SHAPES[0]
]
INT8 = [(f, s, t) for f, s, t in MATRIX if f.startswith("int8")]


@pytest.fixture(scope="module")
def report() -> dict:
    return run_on_8_devices("nnx_partitioning_check.py", "NNX_PARTITIONING_REPORT")


@pytest.fixture(scope="module")
def cases(report) -> dict:
    assert report["devices"] == 8
    return {(c["format"], tuple(c["shape"]), c["axis_type"]): c for c in report["cases"]}


def _case(cases, fmt, shape, axis_type) -> dict:
    case = cases[fmt, tuple(shape), axis_type]
    assert case["error"] is None, case["error"]
    return case


def test_the_whole_matrix_ran(cases):
    assert sorted(cases) == sorted((f, tuple(s), t) for f, s, t in MATRIX)


@pytest.mark.parametrize(("fmt", "shape", "axis_type"), MATRIX)
def test_construction_and_steps_work_and_every_spec_divides_its_leaf(cases, fmt, shape, axis_type):
    case = _case(cases, fmt, shape, axis_type)
    assert case["undivided"] == [], case["specs"]
    if axis_type == "explicit":  # the steps keep the placement the metadata names (Auto: XLA's choice)
        assert case["param_specs"] == {"kernel": "P('a', 'b')", "w": "P(None, 'b')"}
        assert case["actual_like_specs"], (case["specs"], case["actual"])


@pytest.mark.parametrize(("fmt", "shape", "axis_type"), MATRIX)
def test_params_and_state_equal_the_steps_without_a_mesh_bit_for_bit(cases, fmt, shape, axis_type):
    case = _case(cases, fmt, shape, axis_type)
    assert case["paths_equal"]
    assert case["equal_no_mesh"], case["unequal"]


def _expected_absmax(name, fmt, shape, axis_type) -> list:
    """absmax's [shape, spec]: it divides, and stays with its parameter's shards (Auto) or where
    the quantizer puts it (Explicit: the column axis moves to the rows where shards cut blocks).
    The default layout="auto" tiles (16 x 16) a leaf whose column shards cut its row blocks: its
    absmax takes the parameter's own spec."""
    blocks, explicit = shape[1] // 256, axis_type == "explicit"
    param = "P('a', 'b')" if name == "kernel" else "P(None, 'b')"
    if fmt not in ("int8_flat", "int8_rows") and blocks % 4:
        return [[shape[0] // 16, shape[1] // 16], param]
    if fmt == "int8_flat":
        if name == "kernel":
            return [[shape[0] * blocks], "P(('a', 'b'),)" if explicit else "P('a',)"]
        return [[shape[0] * blocks], "P('b',)" if explicit else "P(None,)"]
    if blocks % 4 == 0:  # the column shards hold whole blocks: absmax is split like the parameter
        return [[shape[0], blocks], "P('a', 'b')" if name == "kernel" else "P(None, 'b')"]
    if name == "kernel":
        return [[shape[0], blocks], "P('a', None)"]
    return [[shape[0], blocks], "P('b', None)" if explicit else "P(None, None)"]


@pytest.mark.parametrize(("fmt", "shape", "axis_type"), INT8)
def test_codes_keep_the_parameters_spec_and_absmax_gets_one_that_fits(cases, fmt, shape, axis_type):
    specs = _case(cases, fmt, shape, axis_type)["specs"]
    kinds = ["nu", "mu", "trace"] if fmt == "int8_centered_momentum" else ["nu"]
    for kind in kinds:
        for name, spec in (("kernel", "P('a', 'b')"), ("w", "P(None, 'b')")):
            assert specs[f"opt_state/{kind}/{name}/codes"] == [shape, spec]
            assert specs[f"opt_state/{kind}/{name}/absmax"] == _expected_absmax(name, fmt, shape, axis_type)


def test_float_state_keeps_the_parameters_partitioning(cases):
    for fmt in ("float32", "bf16"):
        specs = _case(cases, fmt, SHAPES[0], "auto")["specs"]
        assert specs["opt_state/nu/kernel"] == [SHAPES[0], "P('a', 'b')"]
        assert specs["opt_state/nu/w"] == [SHAPES[0], "P(None, 'b')"]


def test_the_comparison_can_fail(cases):
    (case,) = [c for c in cases.values() if "equal_wrong_lr" in c]
    assert case["equal_wrong_lr"] is False
