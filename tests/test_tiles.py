"""layout='tiles': the tile quantizer against a NumPy reference, and on 8 devices no collective in
the compiled update for row, column, 2-D and replicated shardings (Auto and Explicit meshes)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsprop_jax
from test_sharding import run_on_8_devices


def _reference_tiles(x: np.ndarray, th: int, tw: int):
    """float64 NumPy: zero-pad to whole tiles, each tile as a row-major block of th * tw."""
    r, c = x.shape
    nr, nc = -(-r // th), -(-c // tw)
    xp = np.zeros((nr * th, nc * tw), np.float64)
    xp[:r, :c] = x
    return xp.reshape(nr, th, nc, tw).transpose(0, 2, 1, 3).reshape(nr, nc, th * tw)


@pytest.mark.parametrize("shape", [(32, 48), (40, 50), (17, 300)])
def test_tiles_equal_each_tile_quantized_as_one_block(shape):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    codes, absmax = rmsprop_jax.quantize_blockwise(jnp.asarray(x), axis=(-2, -1))
    tiles = _reference_tiles(x, 16, 16)
    assert absmax.shape == tiles.shape[:2]
    np.testing.assert_array_equal(np.asarray(absmax), np.abs(tiles).max(-1).astype(np.float32))
    ctiles = _reference_tiles(np.asarray(codes).astype(np.float64), 16, 16)
    inside = _reference_tiles(np.ones(shape), 16, 16) > 0  # padding is not stored
    for i in range(tiles.shape[0]):
        for j in range(tiles.shape[1]):  # one tile = one bitsandbytes block (flat layout: checked live)
            rc, _ = rmsprop_jax.quantize_blockwise(jnp.asarray(tiles[i, j], jnp.float32))
            m = inside[i, j]
            np.testing.assert_array_equal(ctiles[i, j][m], np.asarray(rc)[m].astype(np.float64))
    back = rmsprop_jax.dequantize_blockwise(codes, absmax, axis=(-2, -1))
    assert float(jnp.max(jnp.abs(back - x))) <= 0.1 * float(np.abs(x).max())


def test_tile_shapes_and_vector_fallback():
    from rmsprop_jax import _quantize as Q

    assert Q.tile_shape(256) == (16, 16) and Q.tile_shape(128) == (8, 16)
    leaf = rmsprop_jax.Int8(layout="tiles", min_size=0).quantized((4096,))
    assert leaf.layout == "rows"
    with pytest.raises(ValueError, match="layout"):
        rmsprop_jax.Int8(layout="tile")


@pytest.mark.parametrize("fmt", [rmsprop_jax.Int8, rmsprop_jax.Int4, rmsprop_jax.Fp8])
def test_tiled_update_compiles_without_a_transpose(fmt):
    """Tiles are a view of the leaf in its own layout: no transpose in and out (the update of a
    (1024, 512) leaf was ~2.5x the rows layout's with one; ~1.3x without)."""
    opt = rmsprop_jax.rmsprop(1e-3, momentum=0.9, centered=True, accumulator_dtype=fmt(layout="tiles"))
    p = {"w": jnp.ones((1000, 500))}  # padded to whole tiles
    hlo = jax.jit(opt.update).lower(p, opt.init(p), p).compile().as_text()
    assert " transpose(" not in hlo


@pytest.fixture(scope="module")
def report() -> dict:
    return run_on_8_devices("tiles_check.py", "TILES_REPORT")


def _tiled(report: dict, fmt: str) -> dict:
    return {k: v for k, v in report.items() if k.startswith(f"tiles/{fmt}/")}


@pytest.mark.parametrize(("fmt", "cases"), [("int8", 24), ("fp8", 12), ("int4", 6)])
def test_tiled_state_is_sharded_like_the_parameter_and_equals_one_device(report, fmt, cases):
    tiles = _tiled(report, fmt)
    assert len(tiles) == cases
    assert not [k for k, v in tiles.items() if not v["equal"]]
    for k, v in tiles.items():
        for name, q in v["state"].items():
            assert q["codes_spec"] == v["param_spec"], (k, name, v)
            if q["layout"] == "tiles":  # (a rank-1 scale is a vector: not the parameter's spec)
                assert q["absmax_spec"] == v["param_spec"], (k, name, v)
        if fmt == "int4":
            assert [q["layout"] for q in v["state"].values()] == ["rank1", "tiles", "tiles"], (k, v["state"])


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_tiled_updates_have_no_collective(report, fmt):
    assert {k: v["collectives"] for k, v in _tiled(report, fmt).items() if v["collectives"]} == {}


def test_int4_tiled_update_moves_only_the_rank1_statistics(report):
    """The rank-1 second moment needs its per-axis maxima of the whole leaf: an all-gather and an
    all-reduce of float32 vectors (Explicit). Auto's partitioner also permutes the (R + C,) scale
    vector between devices, as it does for layout='rows'. No 2-D array and no code moves."""
    for k, v in _tiled(report, "int4").items():
        ops = {op for op, *_ in v["collectives"]}
        allowed = {"all-gather", "all-reduce"} | ({"collective-permute"} if "/auto/" in k else set())
        assert ops <= allowed, (k, v["collectives"])
        types = {t for _, *ts in v["collectives"] for t in ts}
        assert all(re.fullmatch(r"f32\[\d+\]", t) for t in types), (k, types)
        if "/explicit/" in k:
            assert ops == {"all-gather", "all-reduce"}, (k, v["collectives"])


def test_rows_layout_on_columns_communicates(report):  # the mutant: the check can fail
    for mode in ("auto", "explicit"):
        assert report[f"rows/int8/{mode}/cols/float32/plain"]["collectives"]


def test_narrow_shards_warn_naming_the_leaf(report):
    """A (32, 16) leaf whose 16 columns are cut in 8 shards of 2: init warns, naming the leaf and why."""
    (message,) = report["warning"]
    assert "['kernel']" in message and "(32, 16)" in message and "layout='tiles'" in message
    assert "16 columns over 8 shards" in message


@pytest.mark.parametrize("mode", ["auto", "explicit"])
def test_auto_layout_gives_tiles_only_where_row_blocks_cut_the_shards(report, mode):
    """The default ``layout="auto"``: a (256, 128) leaf whose 128-wide rows (one partial block of
    256 each) are cut by column or 2-D shards gets tiles; row-sharded and replicated, its 128 whole
    flat blocks; either way the update has no collective and equals one device in that layout bit
    for bit."""
    auto = {k: v for k, v in report.items() if k.startswith("auto/") and f"/{mode}/" in k}
    assert len(auto) == 8
    for k, v in auto.items():
        assert {q["layout"] for q in v["state"].values()} == {v["want"]}, (k, v["state"])
        assert v["equal"] and not v["collectives"], (k, v)
        assert all(q["codes_spec"] == v["param_spec"] for q in v["state"].values()), (k, v["state"])
