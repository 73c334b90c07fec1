"""layout='tiles': the tile quantizer against a NumPy reference, and on 8 devices no collective in
the compiled update for row, column, 2-D and replicated shardings (Auto and Explicit meshes)."""

from __future__ import annotations

import warnings

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


def test_narrow_shards_warn_naming_the_leaf():
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs 2 devices")
    mesh = jax.make_mesh((2,), ("m",))
    w = jax.device_put(
        jnp.ones((32, 16)), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "m"))
    )
    opt = rmsprop_jax.rmsprop(1e-3, accumulator_dtype=rmsprop_jax.Int8(layout="tiles", min_size=0))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt.init({"kernel": w})
    assert any("['kernel']" in str(r.message) and "tiles" in str(r.message) for r in rec)


@pytest.fixture(scope="module")
def report() -> dict:
    return run_on_8_devices("tiles_check.py", "TILES_REPORT")


def test_tiled_updates_have_no_collective_and_equal_one_device(report):
    tiles = {k: v for k, v in report.items() if k.startswith("tiles/")}
    assert len(tiles) == 32
    bad = {k: v for k, v in tiles.items() if v["collectives"] or not v["equal"]}
    assert not bad, bad
    for k, v in tiles.items():
        assert v["codes_spec"] == v["param_spec"] == v["absmax_spec"], (k, v)


def test_rows_layout_on_columns_communicates(report):  # the mutant: the check can fail
    for mode in ("auto", "explicit"):
        assert report[f"rows/{mode}/cols/float32/plain"]["collectives"]
