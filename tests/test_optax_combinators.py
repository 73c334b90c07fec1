"""rmsprop_jax inside optax's combinators, wrappers, tree utilities and schedules.

Each test compares against an independent way of computing the same thing
(the transformation applied by hand to the relevant subtree, the mean gradient,
a run without the bad step, ...), so a combinator that silently did nothing, or
an rmsprop state that broke it, fails.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax

RTOL = 1e-6  # float32 round-off where two programs compute the same math in a different order


def _params() -> dict[str, Any]:
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {
        "encoder": {"w": jax.random.normal(k1, (5, 3)), "b": jnp.zeros(3)},
        "head": {"w": jax.random.normal(k2, (3, 2)), "b": jax.random.normal(k3, (2,))},
    }


def _grads(step: int, scale: float = 1.0) -> dict[str, Any]:
    """Deterministic, step-dependent gradients with the params' structure."""
    keys = jax.random.split(jax.random.key(100 + step), 4)
    leaves, treedef = jax.tree.flatten(_params())
    return treedef.unflatten(
        [scale * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
    )


def _run(tx: optax.GradientTransformation, grads: list[Any], params: Any = None) -> tuple[Any, Any]:
    params = _params() if params is None else params
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in grads:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _assert_trees_close(got: Any, want: Any, rtol: float = RTOL, atol: float = 0.0) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


def _assert_trees_differ(a: Any, b: Any) -> None:
    assert any(
        not np.allclose(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# --------------------------------------------------------------------------- chain + clip


def test_chain_with_clip_by_global_norm_equals_rmsprop_on_clipped_gradients() -> None:
    max_norm = 0.5
    grads = [_grads(t, scale=3.0) for t in range(5)]
    assert all(float(optax.tree.norm(g)) > 4 * max_norm for g in grads)  # clipping is active

    chained, _ = _run(optax.chain(optax.clip_by_global_norm(max_norm), rmsprop_jax.rmsprop(1e-2)), grads)

    def clip(g: Any) -> Any:
        return jax.tree.map(lambda x: x * (max_norm / optax.tree.norm(g)), g)

    by_hand, _ = _run(rmsprop_jax.rmsprop(1e-2), [clip(g) for g in grads])
    _assert_trees_close(chained, by_hand)
    # With eps > 0, RMSProp is not scale-invariant in its first step: clipping changes the result.
    unclipped, _ = _run(rmsprop_jax.rmsprop(1e-2, eps=1.0), grads)
    clipped_eps, _ = _run(
        optax.chain(optax.clip_by_global_norm(max_norm), rmsprop_jax.rmsprop(1e-2, eps=1.0)), grads
    )
    _assert_trees_differ(unclipped, clipped_eps)


# --------------------------------------------------------------------------- masked / multi_transform


def test_masked_applies_rmsprop_to_the_masked_subtree_only() -> None:
    grads = [_grads(t) for t in range(4)]
    mask = {"encoder": {"w": True, "b": False}, "head": {"w": True, "b": False}}
    tx = optax.masked(rmsprop_jax.rmsprop(1e-2, momentum=0.9), mask)
    params, state = _run(tx, grads)

    # Masked-in leaves: as if rmsprop ran on those leaves alone.
    sub = lambda tree: {"encoder": tree["encoder"]["w"], "head": tree["head"]["w"]}
    alone, _ = _run(rmsprop_jax.rmsprop(1e-2, momentum=0.9), [sub(g) for g in grads], params=sub(_params()))
    _assert_trees_close(sub(params), alone)
    # Masked-out leaves: optax.masked passes the raw gradient through (p - sum of grads).
    for name in ("encoder", "head"):
        want = _params()[name]["b"] + sum(g[name]["b"] for g in grads)
        np.testing.assert_allclose(np.asarray(params[name]["b"]), np.asarray(want), rtol=RTOL)
    # The inner RMSProp state holds accumulators only for the masked-in leaves.
    nu = optax.tree.get(state, "nu")
    assert isinstance(nu["encoder"]["b"], optax.MaskedNode)
    assert nu["encoder"]["w"].shape == (5, 3)


def test_multi_transform_freezes_one_subtree_and_treats_another_differently() -> None:
    grads = [_grads(t) for t in range(4)]
    labels = {"encoder": "frozen", "head": {"w": "rms", "b": "sgd"}}
    tx = optax.multi_transform(
        {
            "frozen": optax.set_to_zero(),
            "rms": rmsprop_jax.rmsprop(1e-2, centered=True),
            "sgd": optax.sgd(0.1),
        },
        labels,
    )
    params, _ = _run(tx, grads)
    init = _params()
    _assert_trees_close(params["encoder"], init["encoder"], rtol=0.0)  # frozen: bit-for-bit unchanged
    alone, _ = _run(
        rmsprop_jax.rmsprop(1e-2, centered=True), [g["head"]["w"] for g in grads], init["head"]["w"]
    )
    np.testing.assert_allclose(np.asarray(params["head"]["w"]), np.asarray(alone), rtol=RTOL)
    want_b = init["head"]["b"] - 0.1 * sum(g["head"]["b"] for g in grads)
    np.testing.assert_allclose(np.asarray(params["head"]["b"]), np.asarray(want_b), rtol=RTOL)
    _assert_trees_differ(params["head"], init["head"])


# --------------------------------------------------------------------------- MultiSteps


@pytest.mark.parametrize(
    "kwargs", [{}, {"centered": True, "momentum": 0.9}], ids=["plain", "centered_momentum"]
)
def test_multisteps_accumulation_equals_one_step_on_the_mean_gradient(kwargs: dict[str, Any]) -> None:
    k = 4
    micro = [_grads(t) for t in range(2 * k)]
    tx = optax.MultiSteps(rmsprop_jax.rmsprop(1e-2, **kwargs), every_k_schedule=k)
    params = _params()
    state = tx.init(params)
    step = jax.jit(tx.update)
    trajectory = []
    for g in micro:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(params)
    # Between emissions the params do not move.
    for t in (0, 1, 2, 4, 5, 6):
        _assert_trees_close(trajectory[t], trajectory[0] if t < k else trajectory[k - 1], rtol=0.0)

    mean = lambda gs: jax.tree.map(lambda *x: sum(x) / len(x), *gs)
    want, want_state = _run(rmsprop_jax.rmsprop(1e-2, **kwargs), [mean(micro[:k]), mean(micro[k:])])
    _assert_trees_close(params, want, rtol=1e-5, atol=1e-7)
    assert int(state.inner_opt_state.count) == 2
    _assert_trees_close(state.inner_opt_state.nu, want_state.nu, rtol=1e-5, atol=1e-9)
    # Mutation check: the sum instead of the mean is a different step.
    total = lambda gs: jax.tree.map(lambda *x: sum(x), *gs)
    wrong, _ = _run(rmsprop_jax.rmsprop(1e-2, eps=0.1, **kwargs), [total(micro[:k]), total(micro[k:])])
    right, _ = _run(rmsprop_jax.rmsprop(1e-2, eps=0.1, **kwargs), [mean(micro[:k]), mean(micro[k:])])
    _assert_trees_differ(wrong, right)


# --------------------------------------------------------------------------- apply_if_finite


def test_apply_if_finite_skips_a_nan_step_and_leaves_the_rmsprop_state_untouched() -> None:
    grads = [_grads(t) for t in range(4)]
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _grads(99))
    tx = optax.apply_if_finite(rmsprop_jax.rmsprop(1e-2, momentum=0.9), max_consecutive_errors=3)
    params, state = _run(tx, [grads[0], grads[1], bad, grads[2], grads[3]])
    want, want_state = _run(rmsprop_jax.rmsprop(1e-2, momentum=0.9), grads)
    _assert_trees_close(params, want, rtol=0.0)
    assert int(state.total_notfinite) == 1
    assert int(state.notfinite_count) == 0  # reset by the finite steps after it
    assert int(state.inner_state.count) == 4
    _assert_trees_close(state.inner_state.nu, want_state.nu, rtol=0.0)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


# --------------------------------------------------------------------------- inject_hyperparams


def _injected_loop(lrs: list[float]) -> tuple[Any, list[int]]:
    """A jitted train step driven by inject_hyperparams; lr (and once decay) changed between calls."""
    traces: list[int] = []
    tx = optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=1e-2, decay=0.9, momentum=None)
    params = _params()
    state = tx.init(params)

    @jax.jit
    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any, Any]:
        traces.append(1)  # runs once per trace
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    ref_state = rmsprop_jax.rmsprop(1.0).init(params)  # lr 1: the preconditioned gradient itself
    for t, lr in enumerate(lrs):
        # float32 arrays like the ones init() made (a weakly typed jnp.asarray(0.5) would retrace)
        state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
        if t == 3:
            state.hyperparams["decay"] = jnp.asarray(0.5, jnp.float32)  # another hyperparameter, same trace
        g = _grads(t)
        params, state, updates = step(params, state, g)
        decay = 0.5 if t >= 3 else 0.9
        unit, ref_state = rmsprop_jax.rmsprop(1.0, decay=decay).update(g, ref_state, params)
        _assert_trees_close(updates, jax.tree.map(lambda u, lr=lr: lr * u, unit), rtol=1e-5)
    assert int(state.inner_state.count) == len(lrs)
    return step, traces


LRS = [1e-2, 1e-3, 0.5, 0.0, 3e-2]


def test_inject_hyperparams_changes_the_learning_rate_at_runtime_without_retracing() -> None:
    _, traces = _injected_loop(LRS)
    assert len(traces) == 1


def test_inject_hyperparams_loop_compiles_once_like_optax() -> None:
    """One XLA compile for the whole loop, not one per committed/uncommitted mix of state arrays."""
    step, _ = _injected_loop(LRS)
    assert step._cache_size() == 1


def test_optax_rmsprop_inject_hyperparams_loop_compiles_once() -> None:
    """The baseline: the same loop with optax.rmsprop compiles once."""
    tx = optax.inject_hyperparams(optax.rmsprop)(learning_rate=1e-2, decay=0.9)
    params = _params()
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t, lr in enumerate(LRS):
        state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
        _, state = step(_grads(t), state, params)
    assert step._cache_size() == 1


def test_inject_hyperparams_with_a_schedule_follows_it() -> None:
    schedule = optax.linear_schedule(1e-2, 1e-3, transition_steps=4)
    tx = optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=schedule)
    params, state = _run(tx, [_grads(t) for t in range(3)])
    np.testing.assert_allclose(float(state.hyperparams["learning_rate"]), float(schedule(2)), rtol=1e-6)
    want, _ = _run(rmsprop_jax.rmsprop(schedule), [_grads(t) for t in range(3)])
    _assert_trees_close(params, want, rtol=1e-5)


# --------------------------------------------------------------------------- optax.tree utilities


def test_optax_tree_utilities_find_the_accumulators_by_name() -> None:
    params = _params()
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=1e-2, centered=True, momentum=0.9),
    )
    _, state = _run(tx, [_grads(t) for t in range(3)], params)
    # "count" exists twice (inject_hyperparams' own and RmsPropState's): filter by the state's type.
    with pytest.raises(KeyError, match="multiple values for 'count'"):
        optax.tree.get(state, "count")
    in_rms = lambda path, _: getattr(path[-1], "tuple_name", None) == "RmsPropState"
    assert int(optax.tree.get(state, "count", filtering=in_rms)) == 3
    for name in ("nu", "mu", "trace"):
        acc = optax.tree.get(state, name)
        assert jax.tree.structure(acc) == jax.tree.structure(params), name
    nu = optax.tree.get(state, "nu")
    assert all(bool(jnp.all(x > 0)) for x in jax.tree.leaves(nu))
    (path, _), *rest = optax.tree.get_all_with_path(state, "nu")
    assert not rest and path[-1].tuple_name == "RmsPropState"
    # tree.set replaces an accumulator by name; nothing else changes
    reset = optax.tree.set(state, nu=jax.tree.map(jnp.zeros_like, nu))
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(optax.tree.get(reset, "nu")))
    _assert_trees_close(optax.tree.get(reset, "trace"), optax.tree.get(state, "trace"), rtol=0.0)
    # the default configuration has no mu/trace: the fields are None
    plain = rmsprop_jax.rmsprop(1e-2).init(params)
    assert optax.tree.get(plain, "mu") is None and optax.tree.get(plain, "trace") is None


# --------------------------------------------------------------------------- schedules in training


def _digits_problem() -> tuple[Any, Any, Any]:
    sklearn = pytest.importorskip("sklearn.datasets")
    data = sklearn.load_digits()
    x = jnp.asarray(data.data / 16.0, jnp.float32)
    y = jnp.asarray(data.target)
    params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
    return params, x, y


def _softmax_loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = x @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.parametrize(
    "schedule",
    [
        optax.warmup_cosine_decay_schedule(0.0, 3e-2, warmup_steps=20, decay_steps=200, end_value=1e-4),
        optax.exponential_decay(3e-2, transition_steps=20, decay_rate=0.7),
    ],
    ids=["warmup_cosine", "exponential_decay"],
)
def test_optax_schedules_drive_a_training_run(schedule: optax.Schedule) -> None:
    params, x, y = _digits_problem()
    steps = 200
    tx = rmsprop_jax.rmsprop(schedule, momentum=0.5)
    unit = rmsprop_jax.rmsprop(1.0, momentum=None)

    @jax.jit
    def train(params: Any) -> tuple[Any, jax.Array, jax.Array]:
        def body(carry, _):  # type: ignore[no-untyped-def]
            p, s, us = carry
            loss, g = jax.value_and_grad(_softmax_loss)(p, x, y)
            updates, s = tx.update(g, s, p)
            return (optax.apply_updates(p, updates), s, us), loss

        (p, s, _), losses = jax.lax.scan(
            body, (params, tx.init(params), unit.init(params)), None, length=steps
        )
        return p, s, losses

    trained, state, losses = train(params)
    assert int(state.count) == steps
    assert float(losses[-1]) < 0.2 * float(losses[0])
    acc = float(jnp.mean(jnp.argmax(x @ trained["w"] + trained["b"], -1) == y))
    assert acc > 0.9, acc

    # The lr used at step t is schedule(t): the first update is -schedule(0) * g / sqrt(nu + eps).
    g0 = jax.grad(_softmax_loss)(params, x, y)
    u0, _ = rmsprop_jax.rmsprop(schedule).update(g0, rmsprop_jax.rmsprop(schedule).init(params), params)
    v0, _ = unit.update(g0, unit.init(params), params)
    _assert_trees_close(u0, jax.tree.map(lambda v: float(schedule(0)) * v, v0), rtol=1e-6)
