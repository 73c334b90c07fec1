"""Issue 12, in training: a bfloat16 model with the default accumulators trains like float32.

Notebook 02's digits CNN (``rmsprop_jax._examples``), its parameters cast to
bfloat16, so that the gradients and the default accumulators are bfloat16 too.

* Under the default (stochastic rounding for bfloat16 accumulators) the test
  accuracy equals the float32 run's within 0.5 points. Accuracy is the mean of
  the last 3 epochs' evaluations, averaged over 2 seeds. Measured first (2-core CPU,
  seeds 0-4, 8 epochs, bfloat16 default minus float32, same seed): last-3-epoch
  means +0.09, +0.28, +0.19, +0.28, -0.09 points; single final evaluations 0,
  +0.28, 0, +0.28, +0.56 (one image of this 360-image test set is 0.28 points). At
  decay 0.99, bfloat16 *parameters* alone (float32 accumulators) moved a final
  evaluation by up to 1.4 points, hence the averaging.
* Round to nearest (``accumulator_dtype=Float(rounding="optax")``, optax's numbers) shows its gap
  where it lives: in the second moment. Each run carries a *shadow* float32
  accumulation of the very same bfloat16 gradients; at decay 0.99 round to nearest
  ends with a mean nu well below it (the stall: the step too large), stochastic
  rounding within 2 % of it. Its accuracy is reported, not asserted (the stall
  inflates the step by ~10 % at this decay, which this model tolerates).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax

pytest.importorskip("flax")
pytest.importorskip("sklearn")

from rmsprop_jax import _examples as ex

LR = 1e-3


def shadowed(tx: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
    """``tx``, plus a float32 RMSProp fed the same gradients whose updates are discarded."""
    shadow = rmsprop_jax.rmsprop(LR, decay)
    f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)

    def init(params: Any) -> tuple[Any, Any]:
        return tx.init(params), shadow.init(f32(params))

    def update(grads: Any, state: tuple[Any, Any], params: Any = None) -> tuple[Any, tuple[Any, Any]]:
        updates, inner = tx.update(grads, state[0], params)
        _, shadow_state = shadow.update(f32(grads), state[1])
        return updates, (inner, shadow_state)

    return optax.GradientTransformation(init, update)  # type: ignore[arg-type]


def nu_ratio(opt_state: Any) -> float:
    """mean(nu of the tested optimizer) / mean(nu of its float32 shadow), over all elements."""
    inner, shadow = opt_state
    nu = jnp.concatenate([x.astype(jnp.float32).ravel() for x in jax.tree.leaves(inner.nu)])
    ref = jnp.concatenate([x.ravel() for x in jax.tree.leaves(shadow.nu)])
    return float(jnp.mean(nu) / jnp.mean(ref))


@pytest.fixture(scope="module")
def data() -> ex.Digits:
    return ex.digits(split_seed=0)


def late_accuracy(data: ex.Digits, dtype: Any, tx: optax.GradientTransformation, seed: int) -> float:
    model = ex.make_model("cnn", seed=seed, param_dtype=dtype)
    _, _, hist = ex.fit(model, tx, data, epochs=8, seed=seed, eval_on="test")
    return 100 * float(np.mean(hist.test_acc[-3:]))


@pytest.mark.slow
def test_bf16_cnn_default_reaches_float32_accuracy(data: ex.Digits) -> None:
    seeds = (0, 1)
    tx_f32, tx_default = rmsprop_jax.rmsprop(LR), rmsprop_jax.rmsprop(LR)  # one compile per model dtype
    acc_f32 = np.mean([late_accuracy(data, jnp.float32, tx_f32, s) for s in seeds])
    acc_bf16 = np.mean([late_accuracy(data, jnp.bfloat16, tx_default, s) for s in seeds])
    print(f"float32 {acc_f32:.2f} %, bfloat16 default {acc_bf16:.2f} %")
    assert abs(acc_bf16 - acc_f32) <= 0.5, (acc_f32, acc_bf16)


@pytest.mark.parametrize(
    ("rounding", "low", "high"),
    [("stochastic", 0.98, 1.02), ("optax", 0.0, 0.97)],
    ids=["default_stochastic", "round_to_nearest"],
)
def test_bf16_cnn_second_moment_against_float32_shadow(
    data: ex.Digits, rounding: str, low: float, high: float
) -> None:
    decay = 0.99
    fmt = rmsprop_jax.Float(rounding=rounding)
    tx = shadowed(rmsprop_jax.rmsprop(LR, decay, accumulator_dtype=fmt), decay)
    model = ex.make_model("cnn", seed=0, param_dtype=jnp.bfloat16)
    _, opt, hist = ex.fit(model, tx, data, epochs=4, seed=0, eval_on="test")
    leaves = jax.tree.leaves(opt.opt_state[0].nu)
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    ratio = nu_ratio(opt.opt_state)
    print(
        f"rounding={rounding}: nu / float32 nu = {ratio:.4f}, test accuracy {100 * hist.test_acc[-1]:.2f} %"
    )
    assert low <= ratio <= high, ratio
