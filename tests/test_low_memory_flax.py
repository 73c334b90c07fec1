"""8-bit and stochastically rounded state inside Flax NNX's ``nnx.Optimizer``.

``nnx.Optimizer`` stores what ``update`` returns through ``nnx.state``, which turns
the ``QuantizedLeaf`` NamedTuples of an int8 state into ``nnx.State`` mappings; the
second step used to fail with "the gradient tree does not match the optimizer
state". Here a few steps through ``nnx.Optimizer`` (eager and under ``nnx.jit``)
must equal the same transformation driven by hand on the same gradients, bit for bit.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
import pytest

import rmsprop_jax

nnx = pytest.importorskip("flax.nnx")


class Net(nnx.Module):
    def __init__(self, rngs: Any) -> None:
        self.big = nnx.Linear(96, 64, rngs=rngs)  # 6144-element kernel: quantized
        self.small = nnx.Linear(64, 10, rngs=rngs)  # 640 elements: float32 (below 4096)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.small(jnp.tanh(self.big(x)))


def loss(model: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


FORMATS = {
    "int8_centered_momentum": {"accumulator_dtype": "int8", "centered": True, "momentum": 0.9},
    "int4_centered_momentum": {"accumulator_dtype": "int4", "centered": True, "momentum": 0.9},
    "fp8_centered_momentum": {"accumulator_dtype": "fp8", "centered": True, "momentum": 0.9},
    "bf16_sr": {"accumulator_dtype": rmsprop_jax.Float(jnp.bfloat16, rounding="stochastic")},
}


CASES = [(f, jit) for f in FORMATS if f != "bf16_sr" for jit in (False, True)] + [("bf16_sr", True)]


@pytest.mark.parametrize(
    ("fmt", "jit"), CASES, ids=[f"{f}-{'nnx_jit' if jit else 'eager'}" for f, jit in CASES]
)
def test_nnx_optimizer_matches_functional_steps(fmt: str, jit: bool) -> None:
    tx = rmsprop_jax.rmsprop(1e-2, **FORMATS[fmt])
    key = jax.random.key(0)
    batches = [
        (jax.random.normal(jax.random.fold_in(key, i), (16, 96)), jnp.arange(16) % 10) for i in range(4)
    ]

    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def nnx_step(model: Any, optimizer: Any, x: jax.Array, y: jax.Array) -> None:
        optimizer.update(model, nnx.grad(loss)(model, x, y))

    step = nnx.jit(nnx_step) if jit else nnx_step

    ref_model = Net(nnx.Rngs(0))
    graphdef, params = nnx.split(ref_model, nnx.Param)
    state = tx.init(params)

    def ref_step(params: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any]:
        grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p), x, y))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    if jit:  # compiled like the nnx step: gradient, update and apply in one program
        ref_step = jax.jit(ref_step)
    for x, y in batches:
        step(model, optimizer, x, y)
        params, state = ref_step(params, state, x, y)

    got = jax.tree.leaves(nnx.state(model, nnx.Param))
    want = jax.tree.leaves(params)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert jnp.array_equal(a, b), float(jnp.max(jnp.abs(a - b)))
    if fmt != "bf16_sr":  # the big kernel's state really is quantized
        nu = optimizer.opt_state.nu
        codes = jax.tree.leaves(nnx.as_pure(nu["big"]["kernel"]))
        want = jnp.float8_e4m3fn if fmt.startswith("fp8") else jnp.uint8
        assert any(c.dtype == want for c in codes)
