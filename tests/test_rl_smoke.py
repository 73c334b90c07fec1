"""CI's smoke run of the MinAtar DQN benchmark (``benchmarks/rl``): a couple of thousand frames, one
seed, every optimizer of the full runs.

"It trains" is asserted on a fixed batch: with the target network frozen (no target update in the
run), the Huber TD loss of the final online network on the first 512 transitions of the replay
buffer must be below 0.75x that of the initial network (the target network still holds the
initial weights). Measured on the 2-core CPU: 0.02 for every optimizer at init, 0.0005 (Adam) to
0.016 (DQN 2015's centered RMSProp) after 2,000 frames. A learning rate of 0 must fail the same
check, and nothing may be NaN. The full runs are ``python -m benchmarks.rl.run``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.rl import run  # noqa: E402
from benchmarks.rl.dqn import DQNConfig, QNetwork, make_train, td_loss  # noqa: E402

import rmsprop_jax  # noqa: E402

CFG = dataclasses.replace(
    DQNConfig(log_every=500).scaled(2000), replay_start=200, target_update=10**9
)  # epsilon 1 -> 0.1 over the first 400 frames; the target network never updated


def _fixed_batch_td(params, target_params, buffer, n: int = 512) -> float:
    one = lambda tree: jax.tree.map(lambda x: x[0], tree)  # seed 0 of the vmapped state
    b = one(buffer)
    batch = (b.obs[:n], b.action[:n], b.reward[:n], b.next_obs[:n], b.terminated[:n].astype(jnp.float32))
    return float(td_loss(QNetwork(3), one(params), one(target_params), batch, CFG.gamma))


def _smoke(optimizer: optax.GradientTransformation):
    states, history = jax.jit(make_train("Breakout-MinAtar", optimizer, CFG, num_seeds=1))(
        jax.random.PRNGKey(0)
    )
    for leaf in jax.tree.leaves((states.params, states.opt_state, history)):
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.inexact):
            assert np.all(np.isfinite(leaf.astype(np.float32)))
    assert int(np.asarray(history.updates).sum()) == CFG.frames - CFG.replay_start
    assert int(np.asarray(history.episodes).sum()) > 0
    before = _fixed_batch_td(states.target_params, states.target_params, states.buffer)
    after = _fixed_batch_td(states.params, states.target_params, states.buffer)
    return before, after, history


def _assert_trains(before: float, after: float) -> None:
    assert after < 0.75 * before, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(run.OPTIMIZERS))
def test_every_optimizer_of_the_full_runs_trains(name: str, tmp_path: Path) -> None:
    before, after, history = _smoke(run.OPTIMIZERS[name]())
    _assert_trains(before, after)
    # the runner's summary, table and plot accept what the loop produced
    summary = run.summarize(history, CFG)
    assert len(summary["frames"]) == CFG.frames // CFG.log_every
    assert np.isfinite(summary["final_return_mean"])
    results = {"frames": CFG.frames, "seeds": 1, "final_window_frames": summary["final_window_frames"]}
    results |= {"machine": "test", "runs": {"Breakout-MinAtar": {name: summary | {"compile_s": 0.0}}}}
    results["runs"]["Breakout-MinAtar"][name]["s_per_100k_frames"] = 0.0
    json.dumps(results)
    assert name in run.table(results)
    run.plot(results, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0


@pytest.mark.slow
def test_the_check_fails_when_nothing_is_learned() -> None:
    """The mutation: learning rate 0 leaves the fixed-batch loss exactly where it was."""
    before, after, _ = _smoke(rmsprop_jax.presets.pytorch(lr=0.0, alpha=0.95, centered=True, eps=0.01))
    assert after == before
    with pytest.raises(AssertionError):
        _assert_trains(before, after)


def test_int8_run_stores_the_hidden_layer_in_8_bits() -> None:
    """MinAtar's net has one leaf of >= 4096 elements (the 1024 x 128 hidden layer): it is the one
    the 8-bit run quantizes, in both accumulators of centered RMSProp; the conv (36 x 16) and the
    output layer stay float32."""
    params = QNetwork(3).init(jax.random.PRNGKey(0), jnp.zeros((10, 10, 4)))
    found = run.quantized_leaves(run.OPTIMIZERS["rmsprop_torch_minatar_int8"](), params)
    assert found == [
        ".nu['params']['Dense_0']['kernel'] (1024, 128)",
        ".mu['params']['Dense_0']['kernel'] (1024, 128)",
    ]


def test_im2col_network_is_minatar_conv() -> None:
    """QNetwork's matmul convolution equals flax's 3x3 VALID nn.Conv with the reshaped kernel."""
    x = jax.random.uniform(jax.random.PRNGKey(1), (7, 10, 10, 4))
    params = QNetwork(3).init(jax.random.PRNGKey(0), x[0])
    kernel = params["params"]["conv"]["kernel"].reshape(3, 3, 4, 16)  # (36, 16) -> HWIO
    conv = nn.Conv(16, (3, 3), strides=1, padding="VALID")
    conv_params = {"params": {"kernel": kernel, "bias": params["params"]["conv"]["bias"]}}
    h = jnp.concatenate([x[..., i : i + 8, j : j + 8, :] for i in range(3) for j in range(3)], -1)
    ours = nn.Dense(16).apply({"params": params["params"]["conv"]}, h)
    np.testing.assert_allclose(ours, conv.apply(conv_params, x), rtol=1e-5, atol=1e-5)
    wrong = conv.apply({"params": {**conv_params["params"], "kernel": kernel.transpose(1, 0, 2, 3)}}, x)
    assert not np.allclose(ours, wrong, rtol=1e-5, atol=1e-5)  # the comparison can fail


@pytest.mark.slow
def test_interleaved_timing_reports_ratios() -> None:
    names = ["rmsprop_torch_minatar", "adam_rainbow"]
    t = run.time_interleaved("Breakout-MinAtar", DQNConfig(log_every=100).scaled(100), 1, 1, names)
    assert t["ratio_to_rmsprop_torch_minatar"]["rmsprop_torch_minatar"] == 1.0
    assert all(v > 0 and np.isfinite(v) for v in t["s_per_100k_frames_median"].values())
    meta = {"frames": 100, "seeds": 1, "final_window_frames": 100, "machine": "test"}
    assert "ratio to rmsprop_torch_minatar" in run.table({"runs": {}, "timing": t} | meta)
