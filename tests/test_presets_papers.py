"""Paper presets reproduce verbatim transcriptions of their sources: Graves 2013, DQN 2015, Hinton 2012."""

from __future__ import annotations

import numpy as np
import pytest

from _parity import (
    assert_close,
    assert_discriminates,
    gradient_sequence,
    initial_params,
    leaf_names,
    learning_rates,
    lr_schedule,
    rel_err,
    run_jax,
    run_reference,
)
from reference import RefConfig, graves_2013_step
from rmsprop_jax import presets, rmsprop

# The papers' learning rates are small (DQN: 2.5e-4), so the parameters move ~1e-2 in 160 steps. Started
# at |p| ~ 1, float32 rounding of p itself (ulp 1e-7 per step) would then dominate the error; starting at
# |p| ~ 1e-2 makes the comparison measure the optimizer, not the storage of p.
PARAMS = {k: (1e-2 * v).astype(np.float32) for k, v in initial_params().items()}
GRADS = gradient_sequence()
LRS = learning_rates()


def transcribe(step_fn, n_state: int) -> dict[str, np.ndarray]:
    """Run a per-leaf float64 step function ``(w, e, *state) -> (w, *state)`` on every leaf."""
    out = {}
    for k in leaf_names():
        w = PARAMS[k].astype(np.float64)
        state = [np.zeros_like(w) for _ in range(n_state)]
        traj = []
        for e in GRADS[k].astype(np.float64):
            w, *state = step_fn(w, e, *state)
            traj.append(w)
        out[k] = np.stack(traj)
    return out


# --------------------------------------------------------------------------- Graves (2013)


def graves_verbatim() -> dict[str, np.ndarray]:
    def step(w, e, n, g, d):
        return graves_2013_step(w, n, g, d, e)  # returns (w, n, g, D): eqs. 38-41

    return transcribe(step, 3)


def test_graves_2013_matches_equations_38_to_41():
    assert_close(
        "graves_2013 vs eqs. 38-41",
        rel_err(run_jax(presets.graves_2013(), PARAMS, GRADS), graves_verbatim(), PARAMS),
    )


def test_graves_2013_with_schedule_matches_reference():
    """The lr enters the buffer (eq. 40): checked with an lr that changes every step."""
    ref = run_reference(
        RefConfig(lr=lambda t: float(LRS[t]), decay=0.95, eps=1e-4, centered=True, momentum=0.9),
        PARAMS,
        GRADS,
    )
    ours = run_jax(presets.graves_2013(learning_rate=lr_schedule(LRS)), PARAMS, GRADS)
    assert_close("graves_2013 (schedule) vs reference", rel_err(ours, ref, PARAMS))
    wrong = rmsprop(lr_schedule(LRS), 0.95, 1e-4, centered=True, momentum=0.9, lr_in_momentum=False)
    assert_discriminates("graves: lr outside momentum", rel_err(run_jax(wrong, PARAMS, GRADS), ref, PARAMS))


def test_graves_2013_mutations_fail():
    verbatim = graves_verbatim()
    errs = {
        "daleth outside the root": rmsprop(1e-4, 0.95, 1e-4, eps_in_sqrt=False, centered=True, momentum=0.9),
        "not centered": rmsprop(1e-4, 0.95, 1e-4, centered=False, momentum=0.9),
        "accumulator init 1": rmsprop(1e-4, 0.95, 1e-4, initial_scale=1.0, centered=True, momentum=0.9),
    }
    for name, opt in errs.items():
        assert_discriminates(name, rel_err(run_jax(opt, PARAMS, GRADS), verbatim, PARAMS))


# --------------------------------------------------------------------------- DQN (2015)


def dqn_lua_step(w, grad, g, g2, lr=0.00025):
    """NeuralQLearner.lua, qLearnMinibatch, transcribed; ``dw`` there is the negative gradient."""
    dw = -grad
    g = g * 0.95 + 0.05 * dw  # self.g:mul(0.95):add(0.05, self.dw)
    tmp = dw * dw  # self.tmp:cmul(self.dw, self.dw)
    g2 = g2 * 0.95 + 0.05 * tmp  # self.g2:mul(0.95):add(0.05, self.tmp)
    tmp = g * g  # self.tmp:cmul(self.g, self.g)
    tmp = -tmp  # self.tmp:mul(-1)
    tmp = tmp + g2  # self.tmp:add(self.g2)
    tmp = tmp + 0.01  # self.tmp:add(0.01)
    tmp = np.sqrt(tmp)  # self.tmp:sqrt()
    deltas = lr * dw / tmp  # self.deltas:mul(0):addcdiv(self.lr, self.dw, self.tmp)
    return w + deltas, g, g2  # self.w:add(self.deltas)


def test_dqn_2015_matches_deepmind_code():
    lua = transcribe(dqn_lua_step, 2)
    assert_close(
        "dqn_2015 vs NeuralQLearner.lua", rel_err(run_jax(presets.dqn_2015(), PARAMS, GRADS), lua, PARAMS)
    )
    wrong = {
        "min squared gradient outside the root": rmsprop(
            0.00025, 0.95, 0.01, eps_in_sqrt=False, centered=True
        ),
        "not centered": rmsprop(0.00025, 0.95, 0.01),
        "gradient momentum as a momentum buffer": rmsprop(0.00025, 0.95, 0.01, momentum=0.95),
    }
    for name, opt in wrong.items():
        assert_discriminates(name, rel_err(run_jax(opt, PARAMS, GRADS), lua, PARAMS))


def test_dqn_2015_needs_equal_decays():
    with pytest.raises(
        ValueError, match=r"gradient_momentum=0\.9 differs from squared_gradient_momentum=0\.95"
    ):
        presets.dqn_2015(gradient_momentum=0.9)


# --------------------------------------------------------------------------- Hinton (2012)


def hinton_slide_step(w, e, mean_square, lr=1e-3):
    mean_square = 0.9 * mean_square + 0.1 * e**2  # MeanSquare(w, t)
    return w - lr * e / np.sqrt(mean_square), mean_square


def test_hinton_2012_matches_the_slide():
    slide = transcribe(hinton_slide_step, 1)
    assert_close(
        "hinton_2012 vs lecture 6e", rel_err(run_jax(presets.hinton_2012(1e-3), PARAMS, GRADS), slide, PARAMS)
    )
    wrong = {
        "eps 1e-2 added": presets.hinton_2012(1e-3, eps=1e-2),
        "accumulator init 1": rmsprop(1e-3, 0.9, 0.0, initial_scale=1.0),
    }
    for name, opt in wrong.items():
        assert_discriminates(name, rel_err(run_jax(opt, PARAMS, GRADS), slide, PARAMS))


def test_hinton_2012_zero_gradient_is_a_zero_step():
    import jax.numpy as jnp

    opt = presets.hinton_2012(0.1)
    p = {"w": jnp.array([1.0, 2.0])}
    u, _ = opt.update({"w": jnp.zeros(2)}, opt.init(p), p)
    np.testing.assert_array_equal(np.asarray(u["w"]), [0.0, 0.0])


# --------------------------------------------------------------------------- all presets vs reference


@pytest.mark.parametrize(
    ("make", "cfg"),
    [
        (lambda lr: presets.graves_2013(lr), RefConfig(decay=0.95, eps=1e-4, centered=True, momentum=0.9)),
        (lambda lr: presets.dqn_2015(lr), RefConfig(decay=0.95, eps=0.01, centered=True)),
        (lambda lr: presets.hinton_2012(lr), RefConfig(decay=0.9, eps=0.0)),
        (lambda lr: presets.hinton_2012(lr, decay=0.5, eps=1e-3), RefConfig(decay=0.5, eps=1e-3)),
    ],
    ids=["graves", "dqn", "hinton", "hinton_custom"],
)
def test_paper_presets_match_reference_with_schedule(make, cfg):
    cfg.lr = lambda t: float(LRS[t])
    ours = run_jax(make(lr_schedule(LRS)), PARAMS, GRADS)
    assert_close("paper preset vs reference", rel_err(ours, run_reference(cfg, PARAMS, GRADS), PARAMS))


@pytest.mark.parametrize(
    ("fn", "kwargs", "match"),
    [
        (presets.graves_2013, {"decay": 1.0}, "decay=1.0"),
        (presets.graves_2013, {"momentum": 1.0}, "momentum=1.0"),
        (
            presets.dqn_2015,
            {"squared_gradient_momentum": 1.2, "gradient_momentum": 1.2},
            "squared_gradient_momentum=1.2",
        ),
        (presets.dqn_2015, {"min_squared_gradient": -1.0}, "min_squared_gradient=-1.0"),
        (presets.hinton_2012, {"learning_rate": 0.1, "decay": -0.1}, "decay=-0.1"),
        (presets.hinton_2012, {"learning_rate": 0.1, "eps": -1.0}, "eps=-1.0"),
    ],
)
def test_bad_arguments_raise(fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)
