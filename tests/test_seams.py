"""The seams: every state format under every common optax wrapper, with float32, bfloat16 and
mixed parameters; and inside Flax NNX's ``nnx.Optimizer`` (with an Orbax round trip).

The matrices are generated from ``FORMATS``: a new format is covered by adding it there.
``optax.rmsprop`` passes every wrapper x dtype case; for float32 state on float32 parameters
ours must equal it bit for bit under the same wrapper.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax

FORMATS: dict[str, dict[str, Any]] = {
    "float32": {},
    "centered_momentum": {"centered": True, "momentum": 0.9},
    "bf16_sr": {"accumulator_dtype": jnp.bfloat16},
    "int8": {"accumulator_dtype": "int8"},
    "int8_centered_momentum": {"accumulator_dtype": "int8", "centered": True, "momentum": 0.9},
    "int4": {"accumulator_dtype": "int4"},
    "int4_centered_momentum": {"accumulator_dtype": "int4", "centered": True, "momentum": 0.9},
    "fp8": {"accumulator_dtype": "fp8"},
    "fp8_centered_momentum": {"accumulator_dtype": "fp8", "centered": True, "momentum": 0.9},
    "packed": {"packed": True},
    "packed_centered_momentum": {"packed": True, "centered": True, "momentum": 0.9},
}
# Formats whose numbers equal optax.rmsprop's on float32 parameters bit for bit; the packed ones
# equal it within float32 round-off (their documented contract: XLA may fuse the flat buffer's
# kernel differently, and does under lookahead and MultiSteps); the others are lossy.
EXACT = {"float32", "centered_momentum"}
ROUND_OFF = {"packed", "packed_centered_momentum"}
ULPS = 8.0  # tests/test_packed.py's allowance: 8 ulp of max(1, the leaf's largest value)

WRAPPERS: dict[str, Any] = {
    "masked": lambda make: optax.masked(make(1e-2), {"w": True, "b": False}),
    "multi_transform": lambda make: optax.multi_transform(
        {True: make(1e-2), False: optax.sgd(1e-2)}, {"w": True, "b": False}
    ),
    "apply_if_finite": lambda make: optax.apply_if_finite(make(1e-2), max_consecutive_errors=3),
    "MultiSteps": lambda make: optax.MultiSteps(make(1e-2), every_k_schedule=2),
    "inject_hyperparams": lambda make: optax.inject_hyperparams(make)(learning_rate=1e-2),
    "chain_clip": lambda make: optax.chain(optax.clip_by_global_norm(1.0), make(1e-2)),
    "lookahead": lambda make: optax.lookahead(make(1e-2), sync_period=2, slow_step_size=0.5),
}
DTYPES = {
    "float32": {"w": jnp.float32, "b": jnp.float32},
    "bfloat16": {"w": jnp.bfloat16, "b": jnp.bfloat16},
    "mixed": {"w": jnp.bfloat16, "b": jnp.float32},
}


def _factory(fmt: str) -> Any:
    kw = FORMATS[fmt]

    def make(learning_rate: Any) -> optax.GradientTransformation:
        return rmsprop_jax.rmsprop(learning_rate, **kw)

    return make


def _optax_factory(fmt: str) -> Any:
    kw = {k: v for k, v in FORMATS[fmt].items() if k in ("centered", "momentum")}
    return lambda learning_rate: optax.rmsprop(learning_rate, **kw)


def _tree(dtypes: dict[str, Any], seed: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    shapes = {"w": (64, 128), "b": (64,)}  # w is 8-bit (8192 >= 4096 elements), b stays float32
    return {k: jnp.asarray(rng.standard_normal(shapes[k]), dtypes[k]) for k in shapes}


def _train(tx: optax.GradientTransformation, wrapper: str, dtypes: dict[str, Any], steps: int = 4) -> Any:
    params = _tree(dtypes, 0)
    if wrapper == "lookahead":
        params = optax.LookaheadParams.init_synced(params)
    state = tx.init(params)
    init_types = _types(state)

    @jax.jit
    def step(params: Any, state: Any, g: Any) -> Any:
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    for i in range(steps):
        params, state = step(params, state, _tree(dtypes, i + 1))
    assert _types(state) == init_types  # no silent promotion, no structure change
    return params, state


def _types(state: Any) -> Any:
    return jax.tree.structure(state), [(jnp.result_type(x), jnp.shape(x)) for x in jax.tree.leaves(state)]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_under_every_wrapper(fmt: str, wrapper: str, dtype: str) -> None:
    params, _ = _train(WRAPPERS[wrapper](_factory(fmt)), wrapper, DTYPES[dtype])
    for leaf in jax.tree.leaves(params):
        assert bool(jnp.all(jnp.isfinite(leaf.astype(jnp.float32))))
        assert leaf.dtype in (jnp.float32, jnp.bfloat16)
    if dtype == "float32" and fmt in EXACT | ROUND_OFF:
        want, _ = _train(WRAPPERS[wrapper](_optax_factory(fmt)), wrapper, DTYPES[dtype])
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
            x, y = np.asarray(x), np.asarray(y)
            if fmt in EXACT:
                np.testing.assert_array_equal(x, y)
            else:
                atol = ULPS * float(np.finfo(np.float32).eps) * max(1.0, float(np.abs(y).max()))
                np.testing.assert_allclose(x, y, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_optax_passes_the_same_matrix(dtype: str) -> None:
    """The baseline the issue measured: optax.rmsprop under every wrapper."""
    for wrapper in WRAPPERS:
        _train(WRAPPERS[wrapper](_optax_factory("float32")), wrapper, DTYPES[dtype], steps=2)


def test_injected_bfloat16_hyperparameters_are_used_as_given() -> None:
    """inject_hyperparams casts float hyperparameters to the params' dtype: lr 1e-3 arrives as
    bfloat16 0.000999451, and the step uses that value (in float32 arithmetic)."""
    params = {"w": jnp.ones(8, jnp.bfloat16)}
    tx = optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=1e-3)
    state = tx.init(params)
    assert state.hyperparams["learning_rate"].dtype == jnp.bfloat16
    u, _ = jax.jit(tx.update)({"w": jnp.ones(8, jnp.bfloat16)}, state, params)
    lr = float(jnp.asarray(1e-3, jnp.bfloat16))
    assert lr == pytest.approx(0.000999451, abs=1e-9)
    # one step from nu = 0, decay 0.9 (bf16 0.8984375): u = -lr * g / sqrt((1 - decay) g^2 + eps)
    decay = float(jnp.asarray(0.9, jnp.bfloat16))
    want = -lr / np.sqrt((1 - decay) + float(jnp.asarray(1e-8, jnp.bfloat16)))
    np.testing.assert_allclose(np.asarray(u["w"], np.float32), want, rtol=8e-3)  # u is bfloat16
    # and a float32 hyperparameter dtype keeps 0.001 exactly
    tx32 = optax.inject_hyperparams(rmsprop_jax.rmsprop, hyperparam_dtype=jnp.float32)(learning_rate=1e-3)
    assert tx32.init(params).hyperparams["learning_rate"].dtype == jnp.float32


def test_packed_with_low_precision_params_under_defaults_equals_per_leaf() -> None:
    """packed=True keeps stochastically rounded buffers: same bits as the per-leaf state."""
    params = _tree(DTYPES["mixed"], 0)
    outs = []
    for packed in (False, True):
        tx = rmsprop_jax.rmsprop(1e-2, centered=True, momentum=0.9, packed=packed)
        state = tx.init(params)
        step = jax.jit(tx.update)
        for i in range(3):
            u, state = step(_tree(DTYPES["mixed"], i + 1), state, params)
        outs.append((u, state.nu.unpack() if packed else state.nu, state.mu.unpack() if packed else state.mu))
    for x, y in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    assert outs[1][1]["w"].dtype == jnp.bfloat16


# --------------------------------------------------------------------------- Flax NNX

NNX_FORMATS = [
    "float32",
    "centered_momentum",
    "bf16_sr",
    "int8",
    "int8_centered_momentum",
    "int4_centered_momentum",
    "fp8_centered_momentum",
    "packed",
]
NNX_WRAPPERS: dict[str, Any] = {
    "bare": lambda make: make(1e-2),
    "inject_hyperparams": lambda make: optax.inject_hyperparams(make)(learning_rate=1e-2),
    "MultiSteps": lambda make: optax.MultiSteps(make(1e-2), every_k_schedule=2),
    "chain_clip": lambda make: optax.chain(optax.clip_by_global_norm(1.0), make(1e-2)),
    "MultiSteps_chain_inject": lambda make: optax.MultiSteps(
        optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(make)(learning_rate=1e-2)),
        every_k_schedule=2,
    ),
}


@pytest.mark.parametrize("wrapper", list(NNX_WRAPPERS))
@pytest.mark.parametrize("fmt", NNX_FORMATS)
def test_nnx_optimizer_every_format_and_wrapper(fmt: str, wrapper: str, tmp_path: Any) -> None:
    """nnx.Optimizer + nnx.jit, four steps, an Orbax round trip of nnx.state(optimizer), one more
    step: bit for bit the same transformation driven by hand on nnx.split params."""
    nnx = pytest.importorskip("flax.nnx")
    ocp = pytest.importorskip("orbax.checkpoint")

    class Model(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            self.l1 = nnx.Linear(64, 128, rngs=rngs)  # kernel 8192 elements: 8-bit
            self.l2 = nnx.Linear(128, 4, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            return self.l2(jax.nn.relu(self.l1(x)))

    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 64)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(1).standard_normal((16, 4)), jnp.float32)

    def loss(model: Any) -> Any:
        return jnp.mean((model(x) - y) ** 2)

    tx = NNX_WRAPPERS[wrapper](_factory(fmt))
    model = Model(nnx.Rngs(0))
    graphdef, params0 = nnx.split(model, nnx.Param)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model: Any, optimizer: Any) -> Any:
        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    # by hand, on the pure params
    pure = nnx.as_pure(params0)
    state = tx.init(pure)

    @jax.jit
    def hand(p: Any, s: Any) -> Any:
        g = jax.grad(lambda p: loss(nnx.merge(graphdef, p)))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(4):
        step(model, optimizer)
        pure, state = hand(pure, state)

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "opt", nnx.state(optimizer))
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(optimizer))
    restored = checkpointer.restore(tmp_path / "opt", abstract)
    nnx.update(optimizer, restored)
    step(model, optimizer)
    pure, state = hand(pure, state)

    got = nnx.as_pure(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(pure), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
