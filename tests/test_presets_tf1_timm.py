"""presets.tensorflow_v1 and presets.timm_tf reproduce recorded TensorFlow 1 and timm trajectories.

The trajectories were recorded by ``tests/fixtures/record_tf1_timm.py`` (TensorFlow
2.21 ``tf.compat.v1.train.RMSPropOptimizer``; timm 1.0.31 ``RMSpropTF`` on torch
2.13) into ``tests/fixtures/tf1_timm_trajectories.npz``, together with the
starting parameters, the gradients and the per-step learning rates they saw.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from _parity import (
    assert_close,
    assert_discriminates,
    leaf_names,
    lr_schedule,
    rel_err,
    run_jax,
    run_reference,
)
from reference import RefConfig
from rmsprop_jax import presets, rmsprop

FIXTURE = Path(__file__).parent / "fixtures" / "tf1_timm_trajectories.npz"
_DATA = np.load(FIXTURE)
META = json.loads(str(_DATA["meta"]))
PARAMS = {k: _DATA[f"params__{k}"] for k in leaf_names()}
GRADS = {k: _DATA[f"grads__{k}"] for k in leaf_names()}
LRS = _DATA["lrs"]
TF1_CASES: dict[str, dict] = META["tf1_cases"]
TIMM_CASES: dict[str, dict] = META["timm_cases"]


def recorded(framework: str, case: str) -> dict[str, np.ndarray]:
    return {k: _DATA[f"{framework}__{case}__{k}"] for k in leaf_names()}


def err(opt, framework: str, case: str) -> float:
    return rel_err(run_jax(opt, PARAMS, GRADS), recorded(framework, case), PARAMS)


def tf1_preset(case: str):
    return presets.tensorflow_v1(lr_schedule(LRS), **TF1_CASES[case])


def timm_preset(case: str):
    kwargs = {k: v for k, v in TIMM_CASES[case].items() if k != "foreach"}
    return presets.timm_tf(lr=lr_schedule(LRS), **kwargs)


@functools.cache
def preset_traj(framework: str, case: str) -> dict[str, np.ndarray]:
    """The preset's trajectory for a recorded case (computed once, shared by the comparisons)."""
    opt = tf1_preset(case) if framework == "tf1" else timm_preset(case)
    return run_jax(opt, PARAMS, GRADS)


def test_fixture_is_small_and_long_enough():
    assert FIXTURE.stat().st_size < 1_000_000
    assert len(LRS) >= 150 and len(np.unique(LRS)) == len(LRS)  # the lr changes every step
    assert {k: v.shape[1:] for k, v in GRADS.items()} == {k: v.shape for k, v in PARAMS.items()}


# --------------------------------------------------------------------------- TensorFlow 1


def tf1_ref_config(kwargs: dict) -> RefConfig:
    """The reference written from ApplyRMSProp / ApplyCenteredRMSProp, independently of the preset."""
    m = kwargs.get("momentum", 0.0)
    return RefConfig(
        lr=lambda t: float(LRS[t]),
        decay=kwargs.get("decay", 0.9),
        eps=kwargs.get("epsilon", 1e-10),
        initial_scale=1.0,
        eps_in_sqrt=True,
        centered=kwargs.get("centered", False),
        momentum=m if m else None,
        lr_in_momentum=True,
    )


@pytest.mark.parametrize("case", sorted(TF1_CASES))
def test_tensorflow_v1_matches_recording(case):
    assert_close(
        f"tensorflow_v1[{case}] vs TF1", rel_err(preset_traj("tf1", case), recorded("tf1", case), PARAMS)
    )


@pytest.mark.parametrize("case", sorted(TF1_CASES))
def test_tensorflow_v1_matches_reference(case):
    ref = run_reference(tf1_ref_config(TF1_CASES[case]), PARAMS, GRADS)
    assert_close(f"tensorflow_v1[{case}] vs reference", rel_err(preset_traj("tf1", case), ref, PARAMS))
    assert_close(f"TF1[{case}] vs reference", rel_err(recorded("tf1", case), ref, PARAMS))


def _tf1_mapped(**overrides):
    kw = dict(decay=0.9, eps=1e-10, initial_scale=1.0, eps_in_sqrt=True, lr_in_momentum=True)
    kw.update(overrides)
    return rmsprop(lr_schedule(LRS), **kw)


def test_tensorflow_v1_mutations_fail_the_comparison():
    assert_close("mapping", err(_tf1_mapped(momentum=0.9), "tf1", "momentum"))
    errs = {
        "accumulator init 0": err(_tf1_mapped(initial_scale=0.0), "tf1", "defaults"),
        "eps outside the root": err(_tf1_mapped(eps=1e-2, eps_in_sqrt=False), "tf1", "eps_1e-2"),
        "lr outside momentum": err(_tf1_mapped(momentum=0.9, lr_in_momentum=False), "tf1", "momentum"),
    }
    for name, e in errs.items():
        assert_discriminates(name, e)


# --------------------------------------------------------------------------- timm


def timm_ref_config(kwargs: dict) -> RefConfig:
    """The reference written from timm's _single_tensor_rmsprop_tf, independently of the preset."""
    m = kwargs.get("momentum", 0.0)
    return RefConfig(
        lr=lambda t: float(LRS[t]),
        decay=kwargs.get("alpha", 0.9),
        eps=kwargs.get("eps", 1e-10),
        initial_scale=1.0,
        eps_in_sqrt=True,
        centered=kwargs.get("centered", False),
        momentum=m if m else None,
        weight_decay=kwargs.get("weight_decay", 0.0),
        decoupled_weight_decay=kwargs.get("decoupled_decay", False),
        lr_in_momentum=kwargs.get("lr_in_momentum", True),
    )


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_timm_tf_matches_recording(case):
    assert_close(
        f"timm_tf[{case}] vs timm", rel_err(preset_traj("timm", case), recorded("timm", case), PARAMS)
    )


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_timm_tf_matches_reference(case):
    ref = run_reference(timm_ref_config(TIMM_CASES[case]), PARAMS, GRADS)
    assert_close(f"timm_tf[{case}] vs reference", rel_err(preset_traj("timm", case), ref, PARAMS))
    assert_close(f"timm[{case}] vs reference", rel_err(recorded("timm", case), ref, PARAMS))


def _timm_mapped(**overrides):
    kw = dict(decay=0.9, eps=1e-10, initial_scale=1.0, eps_in_sqrt=True, lr_in_momentum=True)
    kw.update(overrides)
    return rmsprop(lr_schedule(LRS), **kw)


def test_timm_tf_mutations_fail_the_comparison():
    wd = dict(momentum=0.5, weight_decay=0.05)
    assert_close("mapping", err(_timm_mapped(decoupled_weight_decay=True, **wd), "timm", "decoupled_decay"))
    errs = {
        "accumulator init 0": err(_timm_mapped(initial_scale=0.0), "timm", "defaults"),
        "eps outside the root": err(_timm_mapped(eps=1e-2, eps_in_sqrt=False), "timm", "eps_1e-2"),
        "lr outside momentum": err(_timm_mapped(momentum=0.9, lr_in_momentum=False), "timm", "momentum"),
        "lr inside momentum": err(
            _timm_mapped(momentum=0.9, lr_in_momentum=True), "timm", "momentum_lr_outside"
        ),
        "coupled decay": err(_timm_mapped(decoupled_weight_decay=False, **wd), "timm", "decoupled_decay"),
        "decoupled decay": err(_timm_mapped(decoupled_weight_decay=True, **wd), "timm", "weight_decay"),
    }
    for name, e in errs.items():
        assert_discriminates(name, e)


@pytest.mark.parametrize(
    ("fn", "kwargs", "match"),
    [
        (presets.tensorflow_v1, {"learning_rate": 0.1, "decay": 1.0}, "decay=1.0"),
        (presets.tensorflow_v1, {"learning_rate": 0.1, "momentum": -0.5}, "momentum=-0.5"),
        (presets.tensorflow_v1, {"learning_rate": 0.1, "epsilon": -1.0}, "epsilon=-1.0"),
        (presets.timm_tf, {"lr": -0.1}, "lr=-0.1"),
        (presets.timm_tf, {"alpha": 1.5}, "alpha=1.5"),
        (presets.timm_tf, {"weight_decay": -0.1}, "weight_decay=-0.1"),
    ],
)
def test_bad_arguments_raise(fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)
