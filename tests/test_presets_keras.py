"""presets.keras reproduces Keras 3's keras.optimizers.RMSprop step for step, live on the JAX backend."""

from __future__ import annotations

import functools
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

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
from reference import RefConfig
from rmsprop_jax import presets, rmsprop

keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":
    pytest.skip(
        f"keras was imported with the {keras.backend.backend()!r} backend, not jax", allow_module_level=True
    )

PARAMS = initial_params()
GRADS = gradient_sequence()
LRS = learning_rates()

# keras.optimizers.RMSprop keyword arguments (besides learning_rate, which changes every step).
CASES = {
    "defaults": {},
    "momentum": {"momentum": 0.9},
    "centered_momentum": {"momentum": 0.8, "centered": True},
    "weight_decay_momentum": {"weight_decay": 0.05, "momentum": 0.5},
    "eps_1e-2": {"epsilon": 1e-2},
}


class TableSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """learning_rate = lrs[iterations]: changes every step."""

    def __init__(self, lrs: np.ndarray):
        self.lrs = np.asarray(lrs, np.float32)

    def __call__(self, step):
        return keras.ops.take(keras.ops.convert_to_tensor(self.lrs), step)


def make_keras(kwargs: dict, params: dict[str, np.ndarray] = PARAMS):
    variables = [keras.Variable(params[k], name=k) for k in leaf_names()]
    opt = keras.optimizers.RMSprop(learning_rate=TableSchedule(LRS), **kwargs)
    return opt, variables


def run_keras(kwargs: dict) -> dict[str, np.ndarray]:
    opt, variables = make_keras(kwargs)
    out = {k: [] for k in leaf_names()}
    for t in range(len(LRS)):
        opt.apply([GRADS[k][t] for k in leaf_names()], variables)
        for v, k in zip(variables, leaf_names(), strict=True):
            out[k].append(np.asarray(v.numpy()))
    return {k: np.stack(v) for k, v in out.items()}


@functools.cache
def keras_traj(case: str) -> dict[str, np.ndarray]:
    return run_keras(CASES[case])


def ref_config(kwargs: dict) -> RefConfig:
    """The reference written from Keras's update_step, independently of the preset."""
    m = kwargs.get("momentum", 0.0)
    return RefConfig(
        lr=lambda t: float(LRS[t]),
        decay=kwargs.get("rho", 0.9),
        eps=kwargs.get("epsilon", 1e-7),
        eps_in_sqrt=True,
        centered=kwargs.get("centered", False),
        momentum=m if m else None,
        weight_decay=kwargs.get("weight_decay") or 0.0,
        decoupled_weight_decay=True,
        lr_in_momentum=True,
    )


def err(opt, case: str) -> float:
    """Error of an optax optimizer's trajectory against Keras's for a case."""
    return rel_err(run_jax(opt, PARAMS, GRADS), keras_traj(case), PARAMS)


def preset(case: str):
    return presets.keras(learning_rate=lr_schedule(LRS), **CASES[case])


@functools.cache
def preset_traj(case: str) -> dict[str, np.ndarray]:
    """The preset's trajectory for a case (computed once, shared by the comparisons)."""
    return run_jax(preset(case), PARAMS, GRADS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_preset_matches_keras(case):
    assert_close(f"keras[{case}] vs keras", rel_err(preset_traj(case), keras_traj(case), PARAMS))


@pytest.mark.parametrize("case", sorted(CASES))
def test_preset_matches_reference(case):
    ref = run_reference(ref_config(CASES[case]), PARAMS, GRADS)
    assert_close(f"keras[{case}] vs reference", rel_err(preset_traj(case), ref, PARAMS))
    assert_close(f"Keras[{case}] vs reference", rel_err(keras_traj(case), ref, PARAMS))


def _mapped(**overrides):
    """The preset's mapping onto rmsprop() with one choice changed."""
    kw = dict(decay=0.9, eps=1e-7, eps_in_sqrt=True, lr_in_momentum=True, initial_scale=0.0)
    kw.update(overrides)
    return rmsprop(lr_schedule(LRS), **kw)


def test_mutations_fail_the_comparison():
    """eps outside the root, accumulator init 1, lr outside momentum, coupled decay: all caught."""
    wd = dict(momentum=0.5, weight_decay=0.05)
    assert_close(
        "mapping",
        rel_err(
            run_jax(_mapped(decoupled_weight_decay=True, **wd), PARAMS, GRADS),
            keras_traj("weight_decay_momentum"),
            PARAMS,
        ),
    )
    errs = {
        "eps outside the root": rel_err(
            run_jax(_mapped(eps=1e-2, eps_in_sqrt=False), PARAMS, GRADS), keras_traj("eps_1e-2"), PARAMS
        ),
        "accumulator init 1": rel_err(
            run_jax(_mapped(initial_scale=1.0), PARAMS, GRADS), keras_traj("defaults"), PARAMS
        ),
        "lr outside momentum": rel_err(
            run_jax(_mapped(momentum=0.9, lr_in_momentum=False), PARAMS, GRADS),
            keras_traj("momentum"),
            PARAMS,
        ),
        "coupled weight decay": rel_err(
            run_jax(_mapped(decoupled_weight_decay=False, **wd), PARAMS, GRADS),
            keras_traj("weight_decay_momentum"),
            PARAMS,
        ),
    }
    for name, err in errs.items():
        assert_discriminates(name, err)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": 1.0}, "rho=1.0"),
        ({"rho": -0.5}, "rho=-0.5"),
        ({"momentum": -0.1}, "momentum=-0.1"),
        ({"epsilon": -1.0}, "epsilon=-1.0"),
        ({"learning_rate": -1.0}, "learning_rate=-1.0"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        presets.keras(**kwargs)
