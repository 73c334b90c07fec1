"""Orbax: save params + RMSProp state, restore onto an abstract target, continue bit-for-bit.

A checkpoint taken after ``N`` steps and restored onto a ``jax.ShapeDtypeStruct``
tree (from ``jax.eval_shape``) must continue exactly as the run that was never
interrupted: same params, same ``count``/``nu``/``mu``/``trace``, bit for bit;
both in this process and in a fresh Python process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ocp = pytest.importorskip("orbax.checkpoint")
pytest.importorskip("sklearn")

import rmsprop_jax  # noqa: E402
from rmsprop_jax import _examples as ex  # noqa: E402

N = 10  # steps before and after the checkpoint
BATCH = 64

CONFIGS: dict[str, dict[str, Any]] = {
    # every state field populated, a schedule so that `count` matters after the restore
    "centered_momentum_schedule": dict(
        learning_rate=optax.exponential_decay(3e-3, transition_steps=5, decay_rate=0.8),
        centered=True,
        momentum=0.9,
        nesterov=True,
    ),
    # optax's defaults: mu and trace are None in the state
    "default": dict(learning_rate=1e-3),
}


def _init_params() -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "w1": jax.random.normal(k1, (64, 32)) / 8.0,
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(k2, (32, 10)) / np.sqrt(32.0),
        "b2": jnp.zeros(10),
    }


def _loss(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ params["w2"] + params["b2"], y).mean()


def _batches() -> tuple[jax.Array, jax.Array]:
    """2N fixed minibatches of flattened digits, shape (2N, BATCH, 64)."""
    data = ex.digits(val_fraction=0.0)
    idx = np.random.default_rng(0).permutation(len(data.x_train))[: 2 * N * BATCH]
    x = data.x_train[idx].reshape(2 * N, BATCH, 64)
    return jnp.asarray(x), jnp.asarray(data.y_train[idx].reshape(2 * N, BATCH))


def _make_run(tx: optax.GradientTransformation):  # type: ignore[no-untyped-def]
    @jax.jit
    def run(params: Any, state: Any, xs: jax.Array, ys: jax.Array) -> tuple[Any, Any]:
        def step(carry, batch):  # type: ignore[no-untyped-def]
            p, s = carry
            grads = jax.grad(_loss)(p, *batch)
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        return jax.lax.scan(step, (params, state), (xs, ys))[0]

    return run


def _abstract_target(tx: optax.GradientTransformation) -> Any:
    target = jax.eval_shape(lambda: {"params": _init_params(), "opt_state": tx.init(_init_params())})
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(target))
    return target


def _save(directory: Path, tree: Any) -> None:
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory, tree)


def _restore_and_continue(config: str, directory: Path) -> Any:
    """Restore the checkpoint onto an abstract target and run the remaining N steps."""
    tx = rmsprop_jax.rmsprop(**CONFIGS[config])
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(directory, _abstract_target(tx))
    assert isinstance(restored["opt_state"], rmsprop_jax.RmsPropState)
    assert int(restored["opt_state"].count) == N
    xs, ys = _batches()
    params, state = _make_run(tx)(restored["params"], restored["opt_state"], xs[N:], ys[N:])
    return {"params": params, "opt_state": state}


def _assert_bitwise_equal(got: Any, want: Any) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for path, g, w in zip(
        [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(want)[0]],
        jax.tree.leaves(got),
        jax.tree.leaves(want),
        strict=True,
    ):
        assert np.asarray(g).dtype == np.asarray(w).dtype, path
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=path)


@pytest.fixture(scope="module")
def uninterrupted_and_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Per config: the 2N-step result and a checkpoint taken after N steps."""
    xs, ys = _batches()
    out = {}
    for config, kwargs in CONFIGS.items():
        tx = rmsprop_jax.rmsprop(**kwargs)
        run = _make_run(tx)
        params, state = _init_params(), tx.init(_init_params())
        half = run(params, state, xs[:N], ys[:N])
        full = run(*half, xs[N:], ys[N:])
        directory = tmp_path_factory.mktemp(config) / "ckpt"
        _save(directory, {"params": half[0], "opt_state": half[1]})
        out[config] = ({"params": full[0], "opt_state": full[1]}, directory, half)
    return out


@pytest.mark.parametrize("config", list(CONFIGS))
def test_restore_onto_abstract_target_continues_bit_for_bit(
    config: str, uninterrupted_and_checkpoints: dict[str, Any]
) -> None:
    want, directory, half = uninterrupted_and_checkpoints[config]
    got = _restore_and_continue(config, directory)
    _assert_bitwise_equal(got, want)
    # The check has teeth: the restored run really moved on from the checkpoint.
    assert not np.array_equal(np.asarray(got["params"]["w1"]), np.asarray(half[0]["w1"]))
    assert int(got["opt_state"].count) == 2 * N


def test_restore_without_the_optimizer_state_does_not_continue_bit_for_bit(
    uninterrupted_and_checkpoints: dict[str, Any],
) -> None:
    """Mutation check: resuming with a fresh optimizer state (only params restored) differs."""
    want, directory, _ = uninterrupted_and_checkpoints["centered_momentum_schedule"]
    tx = rmsprop_jax.rmsprop(**CONFIGS["centered_momentum_schedule"])
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(directory, _abstract_target(tx))
    xs, ys = _batches()
    params, _ = _make_run(tx)(restored["params"], tx.init(restored["params"]), xs[N:], ys[N:])
    assert not np.array_equal(np.asarray(params["w1"]), np.asarray(want["params"]["w1"]))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_restore_in_a_fresh_process_continues_bit_for_bit(
    config: str, uninterrupted_and_checkpoints: dict[str, Any], tmp_path: Path
) -> None:
    want, directory, _ = uninterrupted_and_checkpoints[config]
    result = tmp_path / "resumed.npz"
    code = (
        "import sys, numpy as np, jax, test_orbax as t\n"
        f"tree = t._restore_and_continue({config!r}, t.Path({str(directory)!r}))\n"
        "leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]\n"
        f"np.savez({str(result)!r}, *leaves)\n"
    )
    here = Path(__file__).resolve().parent
    src = here.parent / "src"
    path = os.pathsep.join([str(here), str(src), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(result) as npz:
        got_leaves = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    want_leaves = jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves, strict=True):
        assert g.dtype == np.asarray(w).dtype
        np.testing.assert_array_equal(g, np.asarray(w))
