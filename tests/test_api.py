"""The transformation's contract: state pytree, tree shapes, jit, schedules, inject_hyperparams, extras."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import RmsPropState


def _params():
    return {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,)), "nested": [jnp.full((4,), 2.0), jnp.array(1.5)]}


def _grads(seed=0):
    key = jax.random.key(seed)
    leaves, treedef = jax.tree.flatten(_params())
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])


def test_is_an_optax_transformation_with_namedtuple_state():
    opt = rmsprop_jax.rmsprop(0.1, centered=True, momentum=0.9)
    assert isinstance(opt, optax.GradientTransformation)
    state = opt.init(_params())
    assert isinstance(state, RmsPropState)
    assert state.count.dtype == jnp.int32 and state.count.shape == ()
    for field in ("nu", "mu", "trace"):
        assert jax.tree.structure(getattr(state, field)) == jax.tree.structure(_params())
    # optax's tree utilities find the accumulators by name
    assert optax.tree.get(state, "nu") is state.nu
    plain = rmsprop_jax.rmsprop(0.1).init(_params())
    assert plain.mu is None and plain.trace is None  # unused buffers cost nothing


def test_chains_with_optax_and_counts_steps():
    opt = optax.chain(optax.clip_by_global_norm(1.0), rmsprop_jax.rmsprop(0.1))
    params, state = _params(), opt.init(_params())
    for i in range(3):
        updates, state = opt.update(_grads(i), state, params)
        params = optax.apply_updates(params, updates)
    assert int(state[1].count) == 3
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


class Pair(NamedTuple):
    a: jax.Array
    b: jax.Array | None


def test_none_leaves_and_masked_nodes_pass_through():
    params = {"x": Pair(jnp.ones(3), None), "frozen": optax.MaskedNode(), "y": None}
    grads = {"x": Pair(jnp.full(3, 0.5), None), "frozen": optax.MaskedNode(), "y": None}
    opt = rmsprop_jax.rmsprop(0.1, momentum=0.9)
    updates, _state = opt.update(grads, opt.init(params), params)
    assert updates["x"].b is None and updates["y"] is None
    assert isinstance(updates["frozen"], optax.MaskedNode)
    assert updates["x"].a.shape == (3,)


def test_inside_optax_masked_and_multi_transform():
    params = {"enc": jnp.ones(3), "dec": jnp.ones(2)}
    grads = {"enc": jnp.ones(3), "dec": jnp.ones(2)}
    opt = optax.masked(rmsprop_jax.rmsprop(0.1), {"enc": True, "dec": False})
    updates, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_array_equal(updates["dec"], grads["dec"])  # masked out: passed through
    assert not np.allclose(updates["enc"], grads["enc"])


def test_abstract_init_on_shape_dtype_structs():
    params = _params()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    opt = rmsprop_jax.rmsprop(0.1, centered=True, momentum=0.5)
    state = opt.init(abstract)
    concrete = opt.init(params)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == jax.tree.map(
        lambda a: (a.shape, a.dtype), concrete
    )
    # and jax.eval_shape(init) gives the same abstract state
    shapes = jax.eval_shape(opt.init, params)
    assert jax.tree.structure(shapes) == jax.tree.structure(concrete)


def test_jit_equals_eager_and_second_call_does_not_recompile():
    opt = rmsprop_jax.rmsprop(0.05, centered=True, momentum=0.9, nesterov=True, weight_decay=1e-3)
    params = _params()
    step = jax.jit(opt.update)
    state_e = state_j = opt.init(params)
    for i in range(4):
        u_e, state_e = opt.update(_grads(i), state_e, params)
        u_j, state_j = step(_grads(i), state_j, params)
        for a, b in zip(jax.tree.leaves((u_e, state_e)), jax.tree.leaves((u_j, state_j)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert step._cache_size() == 1


def test_schedule_is_read_at_the_step_count():
    def schedule(count):
        return 0.1 * (count + 1)

    opt = rmsprop_jax.rmsprop(schedule, decay=0.0, eps=0.0)
    params = {"w": jnp.zeros(1)}
    state = opt.init(params)
    for t in range(3):
        # decay=0, eps=0: the preconditioned gradient is sign(g) = 1; the update is -lr(t)
        updates, state = opt.update({"w": jnp.ones(1)}, state, params)
        np.testing.assert_allclose(updates["w"], [-0.1 * (t + 1)], rtol=1e-6)


def test_inject_hyperparams_changes_lr_without_recompiling():
    opt = optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=0.1, momentum=0.9, weight_decay=0.01)
    params = _params()
    state = opt.init(params)
    step = jax.jit(opt.update)
    u1, state = step(_grads(), state, params)
    for name in ("learning_rate", "momentum", "weight_decay"):
        state.hyperparams[name] = jnp.zeros_like(state.hyperparams[name])
    u2, state = step(_grads(), state, params)
    assert step._cache_size() == 1
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(u2))
    assert any(float(jnp.max(jnp.abs(x))) > 0.0 for x in jax.tree.leaves(u1))


def test_inject_hyperparams_defaults_do_not_need_params():
    """Like optax.rmsprop, an injected rmsprop without weight decay works without params."""
    opt = optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=0.1)
    updates, _ = opt.update(_grads(), opt.init(_params()))
    assert jax.tree.structure(updates) == jax.tree.structure(_params())


def test_lr_placement_matters_only_when_lr_changes():
    def run(lr, inside):
        opt = rmsprop_jax.rmsprop(lr, momentum=0.9, lr_in_momentum=inside)
        params = _params()
        state = opt.init(params)
        for i in range(10):
            u, state = opt.update(_grads(i), state, params)
            params = optax.apply_updates(params, u)
        return params

    def diff(a, b):
        return max(
            float(jnp.max(jnp.abs(x - y)))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )

    assert diff(run(0.05, True), run(0.05, False)) < 1e-6
    decaying = optax.exponential_decay(0.05, transition_steps=1, decay_rate=0.7)
    assert diff(run(decaying, True), run(decaying, False)) > 1e-3


def test_maximize_ascends():
    opt_min = rmsprop_jax.rmsprop(0.1)
    opt_max = rmsprop_jax.rmsprop(0.1, maximize=True)
    params = _params()
    u_min, _ = opt_min.update(_grads(), opt_min.init(params), params)
    u_max, _ = opt_max.update(_grads(), opt_max.init(params), params)
    for a, b in zip(jax.tree.leaves(u_min), jax.tree.leaves(u_max), strict=True):
        np.testing.assert_allclose(a, -b)


@pytest.mark.parametrize("decoupled", [False, True])
def test_weight_decay_mask_exempts_leaves(decoupled):
    params = {"w": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    zero = {"w": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}
    mask = lambda p: {"w": True, "bias": False}
    opt = rmsprop_jax.rmsprop(0.1, weight_decay=0.5, decoupled_weight_decay=decoupled, weight_decay_mask=mask)
    updates, _ = opt.update(zero, opt.init(params), params)
    assert float(jnp.max(jnp.abs(updates["bias"]))) == 0.0  # exempt: zero gradient, zero update
    assert float(jnp.min(jnp.abs(updates["w"]))) > 0.0  # decayed towards zero
    assert float(jnp.max(updates["w"])) < 0.0
    if decoupled:  # p <- p - lr * wd * p
        np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * params["w"], rtol=1e-6)


def test_weight_decay_mask_as_array_leaves_and_schedule():
    params = {"w": jnp.ones(2), "b": jnp.ones(2)}
    zero = {"w": jnp.zeros(2), "b": jnp.zeros(2)}
    wd = optax.constant_schedule(0.5)
    opt = rmsprop_jax.rmsprop(
        0.1,
        weight_decay=wd,
        decoupled_weight_decay=True,
        weight_decay_mask={"w": jnp.array(True), "b": False},
    )
    updates, _ = jax.jit(opt.update)(zero, opt.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.05, -0.05], rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], [0.0, 0.0])


def test_weight_decay_needs_params():
    opt = rmsprop_jax.rmsprop(0.1, weight_decay=0.1)
    with pytest.raises(ValueError, match=r"weight_decay=0\.1 needs the parameters"):
        opt.update(_grads(), opt.init(_params()))


def test_update_without_params_when_no_weight_decay():
    opt = rmsprop_jax.rmsprop(0.1, weight_decay=0.0)  # statically off
    updates, _ = opt.update(_grads(), opt.init(_params()))
    assert jax.tree.structure(updates) == jax.tree.structure(_params())


def test_flax_nnx_state_is_a_pytree_it_accepts():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, rmsprop_jax.rmsprop(0.1, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    x = jnp.ones((4, 3))
    losses = [float(step(model, optimizer, x)) for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0]


def test_tree_mismatch_names_both_structures():
    opt = rmsprop_jax.rmsprop(0.1)
    state = opt.init({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"gradients: .*'b'.*\n.*state.nu: .*'a'"):
        opt.update({"b": jnp.ones(2)}, state)
    with pytest.raises(ValueError, match=r"gradient leaf \['a'\] has shape \(3,\).*shape \(2,\)"):
        opt.update({"a": jnp.ones(3)}, state)


def test_integer_params_are_rejected_with_their_path():
    with pytest.raises(TypeError, match=r"params leaf \['step'\] has dtype int32"):
        rmsprop_jax.rmsprop(0.1).init({"w": jnp.ones(2), "step": jnp.zeros((), jnp.int32)})
