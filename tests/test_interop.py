"""State import/export: a run moved mid-training between PyTorch or Keras 3 and JAX continues identically."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
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
)
from rmsprop_jax import RmsPropState, interop, presets

torch = pytest.importorskip("torch")

N = 60  # steps in the source framework before the move
PARAMS = initial_params()
GRADS = gradient_sequence()
LRS = learning_rates()
FIRST = {k: v[:N] for k, v in GRADS.items()}
REST = {k: v[N:] for k, v in GRADS.items()}

TORCH_KW = {"alpha": 0.9, "momentum": 0.8, "centered": True, "weight_decay": 0.01}
KERAS_KW = {"momentum": 0.8, "centered": True, "weight_decay": 0.01}


# --------------------------------------------------------------------------- PyTorch


def torch_opt(params: dict[str, np.ndarray]):
    ps = [torch.tensor(params[k], requires_grad=True) for k in leaf_names()]
    return ps, torch.optim.RMSprop(ps, lr=float(LRS[0]), **TORCH_KW)


def torch_steps(ps, opt, grads, start: int) -> dict[str, np.ndarray]:
    out = {k: [] for k in leaf_names()}
    for t in range(len(grads[leaf_names()[0]])):
        opt.param_groups[0]["lr"] = float(LRS[start + t])
        for p, k in zip(ps, leaf_names(), strict=True):
            p.grad = torch.tensor(grads[k][t])
        opt.step()
        for p, k in zip(ps, leaf_names(), strict=True):
            out[k].append(p.detach().numpy().copy())
    return {k: np.stack(v) for k, v in out.items()}


def test_torch_to_jax_continues_identically():
    ps, opt = torch_opt(PARAMS)
    mid = {k: v[-1] for k, v in torch_steps(ps, opt, FIRST, 0).items()}
    state = interop.from_pytorch(opt.state_dict(), mid)
    assert int(state.count) == N
    continued_torch = torch_steps(ps, opt, REST, N)
    continued_jax = run_jax(presets.pytorch(lr_schedule(LRS), **TORCH_KW), mid, REST, state=state)
    assert_close("torch -> jax continuation", rel_err(continued_jax, continued_torch, mid))
    # the moved state matters: restarting from a fresh state is far off
    fresh = run_jax(presets.pytorch(lr_schedule(LRS), **TORCH_KW), mid, REST)
    assert_discriminates("fresh state instead of the imported one", rel_err(fresh, continued_torch, mid))


def test_jax_to_torch_continues_identically():
    opt = presets.pytorch(lr_schedule(LRS), **TORCH_KW)
    first, state = run_jax(opt, PARAMS, FIRST, return_state=True)
    mid = {k: v[-1] for k, v in first.items()}
    ps, topt = torch_opt(mid)
    topt.load_state_dict(interop.to_pytorch(state, topt.state_dict()))
    continued_torch = torch_steps(ps, topt, REST, N)
    continued_jax = run_jax(opt, mid, REST, state=state)
    assert_close("jax -> torch continuation", rel_err(continued_torch, continued_jax, mid))


def test_torch_round_trip_is_exact():
    ps, opt = torch_opt(PARAMS)
    torch_steps(ps, opt, FIRST, 0)
    sd = opt.state_dict()
    back = interop.to_pytorch(interop.from_pytorch(sd, PARAMS), sd)
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            np.testing.assert_array_equal(back["state"][pid][key].numpy(), value.numpy(), err_msg=key)


def test_torch_mismatches_raise():
    ps, opt = torch_opt(PARAMS)
    torch_steps(ps, opt, {k: v[:2] for k, v in FIRST.items()}, 0)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match=r"4 parameters .* but params has 3 leaves"):
        interop.from_pytorch(sd, {k: PARAMS[k] for k in leaf_names()[:3]})
    bad = dict(PARAMS, w=PARAMS["w"].T)
    with pytest.raises(ValueError, match=r"square_avg for params leaf \['w'\] has shape \(4, 3\).*\(3, 4\)"):
        interop.from_pytorch(sd, bad)
    state = interop.from_pytorch(sd, PARAMS)
    no_momentum = torch.optim.RMSprop([torch.tensor(PARAMS[k]) for k in leaf_names()], centered=True)
    with pytest.raises(ValueError, match="momentum=0"):
        interop.to_pytorch(state, no_momentum.state_dict())
    with pytest.raises(ValueError, match="'state' and 'param_groups'"):
        interop.from_pytorch({"square_avg": 1}, PARAMS)


# --------------------------------------------------------------------------- Keras 3


@pytest.fixture(scope="module")
def keras():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip(f"keras runs on the {keras.backend.backend()!r} backend, not jax")
    return keras


def keras_opt(keras, params: dict[str, np.ndarray]):
    class Table(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return keras.ops.take(keras.ops.convert_to_tensor(LRS), step)

    variables = [keras.Variable(params[k], name=k) for k in leaf_names()]
    opt = keras.optimizers.RMSprop(learning_rate=Table(), **KERAS_KW)
    opt.build(variables)
    return variables, opt


def keras_steps(variables, opt, grads) -> dict[str, np.ndarray]:
    out = {k: [] for k in leaf_names()}
    for t in range(len(grads[leaf_names()[0]])):
        opt.apply([grads[k][t] for k in leaf_names()], variables)
        for v, k in zip(variables, leaf_names(), strict=True):
            out[k].append(np.asarray(v.numpy()))
    return {k: np.stack(v) for k, v in out.items()}


def test_keras_to_jax_continues_identically(keras):
    variables, opt = keras_opt(keras, PARAMS)
    mid = {k: v[-1] for k, v in keras_steps(variables, opt, FIRST).items()}
    state = interop.from_keras(opt, mid)
    assert int(state.count) == N
    continued_keras = keras_steps(variables, opt, REST)
    continued_jax = run_jax(presets.keras(lr_schedule(LRS), **KERAS_KW), mid, REST, state=state)
    assert_close("keras -> jax continuation", rel_err(continued_jax, continued_keras, mid))
    # the sign convention of the momentum buffer matters
    flipped = state._replace(trace=jax.tree.map(lambda x: -x, state.trace))
    wrong = run_jax(presets.keras(lr_schedule(LRS), **KERAS_KW), mid, REST, state=flipped)
    assert_discriminates("momentum buffer with Keras's sign", rel_err(wrong, continued_keras, mid))


def test_jax_to_keras_continues_identically(keras):
    opt = presets.keras(lr_schedule(LRS), **KERAS_KW)
    first, state = run_jax(opt, PARAMS, FIRST, return_state=True)
    mid = {k: v[-1] for k, v in first.items()}
    variables, kopt = keras_opt(keras, mid)
    interop.to_keras(state, kopt)
    assert int(kopt.iterations.numpy()) == N
    continued_keras = keras_steps(variables, kopt, REST)
    continued_jax = run_jax(opt, mid, REST, state=state)
    assert_close("jax -> keras continuation", rel_err(continued_keras, continued_jax, mid))


def test_keras_mismatches_raise(keras):
    _, opt = keras_opt(keras, PARAMS)
    with pytest.raises(ValueError, match="built with 4 variables but params has 2 leaves"):
        interop.from_keras(opt, {"a": PARAMS["b"], "b": PARAMS["k"]})
    state = interop.from_keras(opt, PARAMS)
    with pytest.raises(ValueError, match="momentum mismatch"):
        interop.to_keras(state._replace(trace=None), opt)
    bad = state._replace(nu=dict(state.nu, w=state.nu["w"].T))
    with pytest.raises(ValueError, match=r"velocity variable .* shape \(4, 3\)"):
        interop.to_keras(bad, opt)
    with pytest.raises(TypeError, match=r"keras\.optimizers\.RMSprop"):
        interop.from_keras(object(), PARAMS)


def test_from_pytorch_accepts_plain_arrays():
    """No torch needed to read a state dict: anything numpy-convertible works."""
    sd = {
        "state": {0: {"step": np.float32(3), "square_avg": np.ones((2,), np.float32)}},
        "param_groups": [{"params": [0], "momentum": 0, "centered": False}],
    }
    state = interop.from_pytorch(sd, {"p": np.zeros(2, np.float32)})
    assert isinstance(state, RmsPropState) and int(state.count) == 3 and state.trace is None
    np.testing.assert_array_equal(np.asarray(state.nu["p"]), [1.0, 1.0])
