"""``rmsprop_jax.update_and_apply``: ``tx.update`` + ``optax.apply_updates`` as one step.

Where the fused 8-bit kernel steps a leaf (picked on GPUs; forced here with the private switch
``_executor.kernel_mode("pallas")``), the parameter is updated inside the kernel, so the update
is never materialized -- through the optax wrappers that pass the inner updates on unchanged;
wrappers that change them get the two calls and a warning. The result must be the two-call
version's bit for bit, for every state format and option, jitted and eager (with the fused
kernel: within one rounding of the parameter per step, see ``_same``).
On a GPU, where the kernel is compiled by Triton, see test_pallas_int8.py for the tolerance.
"""

from __future__ import annotations

import ast
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import _executor, _transform

COMPILED = jax.default_backend() == "gpu"
SHAPES = {"w": (32, 512), "odd": (10, 500), "b": (96,), "bf": (8, 1024)}
STATES: dict[str, dict[str, Any]] = {
    "float32": {},
    "bf16_sr": {"accumulator_dtype": jnp.bfloat16},
    "int8_xla": {"accumulator_dtype": "int8"},
    "int8_pallas": {"accumulator_dtype": "int8"},  # with kernel_mode("pallas"): see MODES
    # packed buffers round to nearest
    "packed": {"packed": True, "accumulator_dtype": rmsprop_jax.Float(rounding="optax")},
}
MODES = {"int8_pallas": "pallas"}  # the rest: "xla" (what this CPU picks anyway)
OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "centered_nesterov_wd": {"centered": True, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    "decoupled_wd_schedule_bc": {
        "learning_rate": optax.linear_schedule(1e-2, 1e-3, 5),
        "weight_decay": 1e-3,
        "decoupled_weight_decay": True,
        "bias_correction": True,
    },
}


def _params() -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    out = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
    out["bf"] = out["bf"].astype(jnp.bfloat16)  # a bfloat16 parameter: apply_updates casts back
    return out


def _grads(steps: int) -> list[dict[str, jax.Array]]:
    rng = np.random.default_rng(1)
    return [
        {
            k: jnp.asarray(rng.standard_normal(s) * 10.0 ** rng.uniform(-4, 1, s), p.dtype)
            for (k, s), p in zip(SHAPES.items(), _params().values(), strict=True)
        }
        for _ in range(steps)
    ]


def _opt(state: str, option: str) -> optax.GradientTransformation:
    kw = {**OPTIONS[option], **STATES[state]}
    return rmsprop_jax.rmsprop(kw.pop("learning_rate", 1e-2), **kw)


def _two_calls(opt: optax.GradientTransformation, steps: int = 4, jit: bool = True, mode: str = "xla") -> Any:
    def step(p: Any, s: Any, g: Any) -> Any:
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    return _run(opt, step, steps, jit, mode)


def _fused(opt: optax.GradientTransformation, steps: int = 4, jit: bool = True, mode: str = "xla") -> Any:
    return _run(opt, lambda p, s, g: rmsprop_jax.update_and_apply(opt, g, s, p), steps, jit, mode)


def _run(opt: optax.GradientTransformation, step: Any, steps: int, jit: bool, mode: str) -> Any:
    step = jax.jit(step) if jit else step
    params = _params()
    with _executor.kernel_mode(mode):
        state = opt.init(params)
        for g in _grads(steps):
            params, state = step(params, state, g)
    return params, state


def _same(a: Any, b: Any, rounding_steps: int = 0) -> None:
    """Bit for bit; or, with ``rounding_steps``, floats within that many roundings of their size.

    The fused kernel may contract ``p + (-lr * x)`` into one fused multiply-add where the two
    calls round the update first (as XLA itself does when both calls are in one jit): one
    rounding of the parameter per step, so a parameter near 2.5 may differ by 2.4e-7 per step.
    """
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        if COMPILED and x.dtype != np.uint8:
            np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64), rtol=1e-5, atol=1e-7)
        elif rounding_steps and jnp.issubdtype(x.dtype, jnp.floating):
            x, y, eps = x.astype(np.float64), y.astype(np.float64), float(jnp.finfo(x.dtype).eps)
            # eps * size >= one unit in the last place of the parameter along the run (which
            # moves by less than 0.5 here: a parameter that ends near 0 was rounded at its earlier size)
            size = np.maximum(np.abs(x), np.abs(y)) + 0.5
            assert np.all(np.abs(x - y) <= rounding_steps * eps * size), np.abs(x - y).max()
        elif not COMPILED:
            np.testing.assert_array_equal(x, y)


KERNEL_APPLIES = {"int8_pallas"}  # the kernel adds the update to the parameter itself


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("state", list(STATES))
def test_equals_update_then_apply_updates(state: str, option: str) -> None:
    opt, mode = _opt(state, option), MODES.get(state, "xla")
    _same(
        _two_calls(opt, mode=mode),
        _fused(opt, mode=mode),
        rounding_steps=4 if state in KERNEL_APPLIES else 0,
    )


def test_eager_equals_jitted() -> None:
    opt = _opt("int8_pallas", "centered_nesterov_wd")
    _same(_fused(opt, jit=False, mode="pallas"), _fused(opt, mode="pallas"))


INT8 = dict(accumulator_dtype="int8", centered=True, momentum=0.9)
WRAPPERS: dict[str, tuple[Any, bool]] = {  # name: (the transformation, whether the kernel applies)
    "bare": (lambda: rmsprop_jax.rmsprop(1e-2, **INT8), True),
    "inject_hyperparams": (lambda: optax.inject_hyperparams(rmsprop_jax.rmsprop)(1e-2, **INT8), True),
    "chain_clip": (
        lambda: optax.chain(optax.clip_by_global_norm(1.0), rmsprop_jax.rmsprop(1e-2, **INT8)),
        True,
    ),
    "masked": (
        lambda: optax.masked(
            rmsprop_jax.rmsprop(1e-2, **INT8), {"w": True, "odd": True, "b": False, "bf": True}
        ),
        True,
    ),
    "MultiSteps": (lambda: optax.MultiSteps(rmsprop_jax.rmsprop(1e-2, **INT8), every_k_schedule=2), False),
    "chain_then_scale": (lambda: optax.chain(rmsprop_jax.rmsprop(1e-2, **INT8), optax.scale(0.5)), False),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_the_fused_step_through_optax_wrappers(wrapper: str) -> None:
    """Which wrappers the kernel fuses through (it updates the parameter), and that every one
    equals the two calls; a wrapper that changes the updates warns once, naming its state."""
    make, fuses = WRAPPERS[wrapper]
    opt = make()
    _transform._warned.clear()
    _transform.fused_trace_log.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = _fused(opt, mode="pallas")
    log = list(_transform.fused_trace_log)
    assert log and all(n == (2 if fuses else 0) for n in log), log  # w and bf are eligible
    messages = [str(w.message) for w in caught if "update_and_apply" in str(w.message)]
    assert len(messages) == (0 if fuses else 1), messages
    _same(_two_calls(opt, mode="pallas"), fused, rounding_steps=4)


def test_scale_by_rms_and_foreign_transformations() -> None:
    for opt in (
        rmsprop_jax.scale_by_rms(decay=0.5),
        optax.adam(1e-2),
        optax.chain(optax.clip_by_global_norm(1.0), rmsprop_jax.rmsprop(1e-2)),
    ):
        _same(_two_calls(opt), _fused(opt))


def test_extra_args_are_passed_on() -> None:
    opt = optax.chain(rmsprop_jax.rmsprop(1e-2), optax.contrib.reduce_on_plateau(patience=1))
    params = _params()
    state = opt.init(params)
    new, state = rmsprop_jax.update_and_apply(opt, _grads(1)[0], state, params, value=jnp.asarray(1.0))
    assert jax.tree.structure(new) == jax.tree.structure(params)


def test_the_kernel_updates_the_parameter_in_place() -> None:
    """With the fused kernel the parameter is an input/output alias of the pallas_call."""
    opt = _opt("int8_pallas", "plain")
    params = {"w": jnp.zeros((32, 512))}
    with _executor.kernel_mode("pallas"):
        jaxpr = jax.make_jaxpr(lambda p, s, g: rmsprop_jax.update_and_apply(opt, g, s, p))(
            params, opt.init(params), params
        )
    found = [f for f in re.findall(r"input_output_aliases=(\(\(.*?\)\))", str(jaxpr)) if "(4, 0)" in f]
    assert len(found) == 1  # one pallas_call writes the parameter (the plain one is dead code)
    aliases = dict(ast.literal_eval(found[0]))
    assert aliases[4] == 0  # input 4 (the parameter) -> output 0 (the new parameter)
    assert aliases[5] == 1 and aliases[6] == 2  # codes and absmax in place too


def test_a_kernel_that_writes_the_update_instead_fails(
    monkeypatch: pytest.MonkeyPatch, fresh_caches: None
) -> None:
    """Mutation: if the kernel wrote ``u`` where the new parameter belongs, the comparison fails."""
    from rmsprop_jax import _pallas_int8

    opt = _opt("int8_pallas", "plain")
    reference = _two_calls(opt, mode="pallas")
    real = _pallas_int8.fused_step
    monkeypatch.setattr(_pallas_int8, "fused_step", lambda *a, **k: real(*a, **{**k, "apply": False}))
    with pytest.raises(AssertionError):
        _same(reference, _fused(opt, mode="pallas"))


def test_needs_params() -> None:
    opt = rmsprop_jax.rmsprop(1e-2)
    with pytest.raises(ValueError, match="needs the parameters"):
        rmsprop_jax.update_and_apply(opt, {"w": jnp.ones(3)}, opt.init({"w": jnp.ones(3)}), None)
