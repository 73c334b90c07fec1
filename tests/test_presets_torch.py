"""presets.pytorch reproduces torch.optim.RMSprop step for step, compared live (CPU, float32)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from _parity import (
    TOL,
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

torch = pytest.importorskip("torch")

PARAMS = initial_params()
GRADS = gradient_sequence()
LRS = learning_rates()

# Each case: torch.optim.RMSprop keyword arguments (besides lr, which changes every step).
CASES = {
    "defaults": {},
    "momentum": {"momentum": 0.9},
    "centered_momentum": {"alpha": 0.9, "momentum": 0.8, "centered": True},
    "weight_decay_maximize": {"weight_decay": 0.05, "maximize": True, "momentum": 0.5},
    "eps_1e-2": {"eps": 1e-2, "alpha": 0.9},
}


def run_torch(kwargs: dict, foreach: bool = False) -> dict[str, np.ndarray]:
    """torch.optim.RMSprop on float32 tensors; group['lr'] is set before every step."""
    ps = [torch.tensor(PARAMS[k], requires_grad=True) for k in leaf_names()]
    opt = torch.optim.RMSprop(ps, lr=float(LRS[0]), foreach=foreach, **kwargs)
    out = {k: [] for k in leaf_names()}
    for t in range(len(LRS)):
        opt.param_groups[0]["lr"] = float(LRS[t])
        for p, k in zip(ps, leaf_names(), strict=True):
            p.grad = torch.tensor(GRADS[k][t])
        opt.step()
        for p, k in zip(ps, leaf_names(), strict=True):
            out[k].append(p.detach().numpy().copy())
    return {k: np.stack(v) for k, v in out.items()}


@functools.cache
def torch_traj(case: str) -> dict[str, np.ndarray]:
    return run_torch(CASES[case])


def ref_config(kwargs: dict) -> RefConfig:
    """The reference written from torch's algorithm box, independently of the preset."""
    m = kwargs.get("momentum", 0)
    return RefConfig(
        lr=lambda t: float(LRS[t]),
        decay=kwargs.get("alpha", 0.99),
        eps=kwargs.get("eps", 1e-8),
        eps_in_sqrt=False,
        centered=kwargs.get("centered", False),
        momentum=m if m else None,
        weight_decay=kwargs.get("weight_decay", 0.0),
        lr_in_momentum=False,
        maximize=kwargs.get("maximize", False),
    )


@functools.cache
def preset_traj(case: str) -> dict[str, np.ndarray]:
    """The preset's trajectory for a case (computed once, shared by the comparisons)."""
    return run_jax(presets.pytorch(lr=lr_schedule(LRS), **CASES[case]), PARAMS, GRADS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_preset_matches_torch(case):
    ours = preset_traj(case)
    assert_close(f"pytorch[{case}] vs torch", rel_err(ours, torch_traj(case), PARAMS))


@pytest.mark.parametrize("case", sorted(CASES))
def test_preset_matches_reference(case):
    ours = preset_traj(case)
    ref = run_reference(ref_config(CASES[case]), PARAMS, GRADS)
    assert_close(f"pytorch[{case}] vs reference", rel_err(ours, ref, PARAMS))
    # and torch itself agrees with the reference (the yardstick is right about torch)
    assert_close(f"torch[{case}] vs reference", rel_err(torch_traj(case), ref, PARAMS))


def test_foreach_implementation_agrees():
    """torch's multi-tensor path is the same algorithm (so the preset matches both)."""
    foreach = run_torch(CASES["centered_momentum"], foreach=True)
    assert_close("pytorch vs torch foreach", rel_err(preset_traj("centered_momentum"), foreach, PARAMS))


def _mapped(**overrides):
    """The preset's mapping onto rmsprop() with one choice changed."""
    kw = dict(
        decay=0.99,
        eps=1e-8,
        eps_in_sqrt=False,
        lr_in_momentum=False,
        initial_scale=0.0,
    )
    kw.update(overrides)
    return rmsprop(lr_schedule(LRS), **kw)


def test_mutations_fail_the_comparison():
    """Wrong variants are caught: eps on the wrong side, accumulator init 1, lr inside momentum."""
    errs = {
        "eps inside the root": rel_err(
            run_jax(_mapped(decay=0.9, eps=1e-2, eps_in_sqrt=True), PARAMS, GRADS),
            torch_traj("eps_1e-2"),
            PARAMS,
        ),
        "accumulator init 1": rel_err(
            run_jax(_mapped(initial_scale=1.0), PARAMS, GRADS), torch_traj("defaults"), PARAMS
        ),
        "lr inside momentum": rel_err(
            run_jax(_mapped(momentum=0.9, lr_in_momentum=True), PARAMS, GRADS),
            torch_traj("momentum"),
            PARAMS,
        ),
    }
    # the unmutated mapping passes (so the mutation, not the harness, is what fails)
    assert_close("mapping", rel_err(run_jax(_mapped(), PARAMS, GRADS), torch_traj("defaults"), PARAMS))
    for name, err in errs.items():
        assert_discriminates(name, err)


def test_lr_schedule_is_what_separates_lr_placement():
    """With a constant lr the two placements agree, so the varying lr in the cases is necessary."""
    const = rmsprop(1e-2, decay=0.99, eps=1e-8, eps_in_sqrt=False, momentum=0.9, lr_in_momentum=False)
    inside = rmsprop(1e-2, decay=0.99, eps=1e-8, eps_in_sqrt=False, momentum=0.9, lr_in_momentum=True)
    a, b = run_jax(const, PARAMS, GRADS), run_jax(inside, PARAMS, GRADS)
    assert rel_err(a, b, PARAMS) <= TOL


def test_works_with_inject_hyperparams():
    """The presets are plain factories: optax.inject_hyperparams can make lr a state entry."""
    import optax

    kw = CASES["centered_momentum"]
    opt = optax.inject_hyperparams(presets.pytorch, static_args=("momentum", "centered"))(lr=1e-2, **kw)
    plain = presets.pytorch(lr=1e-2, **kw)
    a, b = run_jax(opt, PARAMS, GRADS), run_jax(plain, PARAMS, GRADS)
    assert rel_err(a, b, PARAMS) <= TOL


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.0}, "alpha=1.0"),
        ({"alpha": -0.1}, "alpha=-0.1"),
        ({"momentum": 1.5}, "momentum=1.5"),
        ({"weight_decay": -1.0}, "weight_decay=-1.0"),
        ({"eps": -1.0}, "eps=-1.0"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"lr": float("nan")}, "lr=nan"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        presets.pytorch(**kwargs)
