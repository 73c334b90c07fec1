"""The update executor (``_executor.run``) against the straightforward per-leaf loop.

``run`` traces ``rms_leaf`` once per leaf signature (a nested ``jax.jit``)
instead of op by op. It must not change a single bit: every comparison here is
bitwise, on many-leaf trees mixing shapes, float32/bfloat16/float16/complex64
leaves, ``None`` leaves and ``optax.MaskedNode``, across the option space
(static, array and callable weight-decay masks, schedules, array
hyperparameters, accumulator dtypes), three steps in a ``lax.scan``. A
deliberately wrong executor must fail the same comparison. Then the public
transformation against ``optax.rmsprop`` / ``scale_by_rms`` / ``scale_by_stddev``,
also bitwise.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from reference_executor import run_reference
from rmsprop_jax import _executor
from rmsprop_jax._update import rms_leaf

STEPS = 3


def _params() -> dict[str, Any]:
    rng = np.random.default_rng(0)

    def f(*shape: int, dtype: Any = jnp.float32) -> jax.Array:
        x = rng.standard_normal(shape)
        if np.dtype(dtype).kind == "c":
            x = x + 1j * rng.standard_normal(shape)
        return jnp.asarray(x, dtype)

    return {
        "dense": {"w": f(5, 3), "b": f(3)},
        "same_shape": [f(3) for _ in range(6)],  # many leaves sharing one signature
        "emb_bf16": f(4, 6, dtype=jnp.bfloat16),
        "half": f(7, dtype=jnp.float16),
        "cplx": f(3, 2, dtype=jnp.complex64),
        "scalar": f(),
        "empty": f(0, 4),
        "none": None,
        "masked": optax.MaskedNode(),
        "deep": {"a": {"b": f(2, 2), "c": f(2, 2)}},
    }


def _grads(params: Any) -> Any:
    """STEPS gradients per leaf, stacked on a leading axis; one leaf is all zeros (v == 0)."""
    rng = np.random.default_rng(1)
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for i, p in enumerate(leaves):
        x = rng.standard_normal((STEPS, *p.shape)) * 0.3
        if jnp.iscomplexobj(p):
            x = x + 1j * rng.standard_normal((STEPS, *p.shape)) * 0.3
        if i == 1:
            x = np.zeros_like(x)
        out.append(jnp.asarray(x, p.dtype))
    return treedef.unflatten(out)


def _mask_tree(params: Any, array_mask: bool) -> Any:
    m = jax.tree.map(lambda _: True, params)
    m["dense"]["b"] = False
    m["same_shape"][2] = False
    m["half"] = False
    if array_mask:  # a per-element mask on one leaf
        m["dense"]["w"] = jnp.asarray(np.arange(15).reshape(5, 3) % 2 == 0)
    return m


PARAMS = _params()
GRADS = _grads(PARAMS)

COMBOS: dict[str, dict[str, Any]] = {
    "plain": {},
    "centered_nesterov_masked_wd": dict(
        centered=True,
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-2,
        weight_decay_mask=_mask_tree(PARAMS, False),
    ),
    "pytorch_like": dict(
        eps_in_sqrt=False,
        momentum=0.5,
        lr_in_momentum=False,
        maximize=True,
        bias_correction=True,
        initial_scale=0.1,
        weight_decay=1e-3,
    ),
    "decoupled_schedules_array_mask_f32_acc": dict(
        learning_rate=optax.linear_schedule(0.1, 0.01, 3),
        weight_decay=optax.exponential_decay(1e-2, 1, 0.5),
        decoupled_weight_decay=True,
        weight_decay_mask=_mask_tree(PARAMS, True),
        accumulator_dtype=jnp.float32,
        centered=True,
    ),
    "eps0_array_hyperparams_callable_mask": dict(
        learning_rate=jnp.asarray(0.05),
        decay=jnp.asarray(0.8),
        eps=0.0,
        momentum=jnp.asarray(0.3),
        weight_decay=jnp.asarray(1e-2),
        weight_decay_mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
        accumulator_dtype=jnp.bfloat16,
    ),
}


def _run(opt: optax.GradientTransformation, params: Any = PARAMS, grads: Any = GRADS) -> Any:
    """STEPS steps in one jit: the updates of every step and the final state."""

    @jax.jit
    def go(params: Any, grads: Any) -> Any:
        def body(carry: Any, g: Any) -> Any:
            p, s = carry
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), u

        (_, s), us = jax.lax.scan(body, (params, opt.init(params)), grads)
        return us, s

    return go(params, grads)


def _bits(x: Any) -> np.ndarray:
    return np.atleast_1d(np.asarray(x)).view(np.uint8)


def _assert_bitwise(a: Any, b: Any) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for i, (x, y) in enumerate(zip(la, lb, strict=True)):
        assert x.dtype == y.dtype and x.shape == y.shape, (i, x.dtype, y.dtype, x.shape, y.shape)
        assert np.array_equal(_bits(x), _bits(y)), f"leaf {i} ({x.dtype}{list(x.shape)}) differs"


def _with_executor(executor: Any, make: Any) -> Any:
    """Build and trace an optimizer while ``_transform`` uses ``executor``."""
    saved = _executor.run
    _executor.run = executor
    try:
        return make()
    finally:
        _executor.run = saved


def _rmsprop(kw: dict[str, Any]) -> optax.GradientTransformation:
    kw = dict(kw)
    return rmsprop_jax.rmsprop(kw.pop("learning_rate", 0.05), **kw)


@pytest.mark.parametrize("name", list(COMBOS))
def test_executor_bitwise_equals_per_leaf_loop(name: str) -> None:
    kw = COMBOS[name]
    fast = _run(_rmsprop(kw))
    slow = _with_executor(run_reference, lambda: _run(_rmsprop(kw)))
    _assert_bitwise(fast, slow)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(fast))


def test_scale_by_rms_executor_bitwise() -> None:
    make = lambda: _run(rmsprop_jax.scale_by_rms(0.7, 1e-6, centered=True, bias_correction=True))
    _assert_bitwise(make(), _with_executor(run_reference, make))


def test_eager_update_equals_jitted_reference() -> None:
    """Outside any jit the executor runs its jitted leaf function; still the same bits."""
    kw = COMBOS["centered_nesterov_masked_wd"]
    opt = _rmsprop(kw)
    g0 = jax.tree.map(lambda g: g[0], GRADS)
    eager = opt.update(g0, opt.init(PARAMS), PARAMS)
    ref_opt = _rmsprop(kw)
    jitted = _with_executor(
        run_reference,
        lambda: jax.jit(ref_opt.update)(g0, ref_opt.init(PARAMS), PARAMS),
    )
    _assert_bitwise(eager, jitted)


def test_eager_equals_jit_where_op_by_op_would_not() -> None:
    """Centered with |g|^2 beyond float32: op by op gives NaN, XLA's fused code 0 (optax too).

    Eager updates run the compiled leaf function, so they equal the jitted ones here as well.
    """
    opt = rmsprop_jax.rmsprop(1e-3, centered=True)
    g, state = jnp.asarray([1e21, -1e21]), opt.init(jnp.zeros(2))
    _assert_bitwise(opt.update(g, state), jax.jit(opt.update)(g, state))


def test_wrong_executor_fails_the_comparison() -> None:
    """Mutation check: an executor that ignores static weight-decay masks must be caught."""

    def mask_ignoring(flags: Any, scalars: Any, gs: Any, ps: Any, masks: Any, *rest: Any, **kw: Any) -> Any:
        masks = [True if m is False else m for m in masks]
        return run_reference(flags, scalars, gs, ps, masks, *rest, **kw)

    kw = COMBOS["centered_nesterov_masked_wd"]
    fast = _run(_rmsprop(kw))
    wrong = _with_executor(mask_ignoring, lambda: _run(_rmsprop(kw)))
    with pytest.raises(AssertionError, match="differs"):
        _assert_bitwise(fast, wrong)


def test_rms_leaf_traced_once_per_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """200 leaves of two shapes: rms_leaf is traced twice, not 200 times."""
    calls = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return rms_leaf(*args, **kwargs)

    monkeypatch.setattr(_executor, "rms_leaf", counting)
    params = {f"a{i}": jnp.ones(4) for i in range(150)} | {f"b{i}": jnp.ones((2, 3)) for i in range(50)}
    opt = rmsprop_jax.rmsprop(0.0123456)  # a learning rate no other test uses: a fresh cache entry
    jax.jit(opt.update).lower(params, opt.init(params), params)
    assert len(calls) == 2


# --------------------------------------------------------------------------- vs optax


def _float_params() -> dict[str, Any]:
    rng = np.random.default_rng(2)
    return {
        f"l{i}": jnp.asarray(rng.standard_normal(s), jnp.float32)
        for i, s in enumerate([(3, 4), (4,), (), (5,)] * 8)
    }


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: rmsprop_jax.rmsprop(0.01), lambda: optax.rmsprop(0.01)),
        (
            lambda: rmsprop_jax.rmsprop(0.01, 0.95, 1e-6, 0.1, centered=True, momentum=0.9, nesterov=True),
            lambda: optax.rmsprop(0.01, 0.95, 1e-6, 0.1, centered=True, momentum=0.9, nesterov=True),
        ),
        (
            lambda: rmsprop_jax.rmsprop(
                0.01,
                centered=True,
                momentum=0.9,
                weight_decay=1e-3,
                weight_decay_mask=lambda p: {k: v.ndim > 1 for k, v in p.items()},
            ),
            lambda: optax.chain(
                optax.add_decayed_weights(1e-3, mask=lambda p: {k: v.ndim > 1 for k, v in p.items()}),
                optax.rmsprop(0.01, centered=True, momentum=0.9),
            ),
        ),
        (lambda: rmsprop_jax.scale_by_rms(0.9, 1e-7), lambda: optax.scale_by_rms(0.9, 1e-7)),
        (
            lambda: rmsprop_jax.scale_by_rms(0.9, 1e-7, centered=True),
            lambda: optax.scale_by_stddev(0.9, 1e-7),
        ),
    ],
    ids=["plain", "centered_nesterov", "coupled_wd_masked", "scale_by_rms", "scale_by_stddev"],
)
def test_bitwise_equal_to_optax(ours: Any, theirs: Any) -> None:
    params = _float_params()
    grads = _grads(params)
    a, b = _run(ours(), params, grads), _run(theirs(), params, grads)
    _assert_bitwise(a[0], b[0])  # the updates of every step; state layouts differ
    nu_a, nu_b = optax.tree.get(a[1], "nu"), optax.tree.get(b[1], "nu")
    _assert_bitwise(nu_a, nu_b)
