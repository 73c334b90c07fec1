"""The fused Pallas kernel for 8-bit leaves, which the executor picks on GPUs (forced here with
the private switch ``_executor.kernel_mode("pallas")``).

It must reproduce the XLA path (itself bitsandbytes-exact: test_bitsandbytes.py)
under every option. On CPU Pallas interprets the kernel with XLA's own arithmetic, so the codes,
absmax, updates and parameters are compared bit for bit. Compiled by Triton on a GPU, the
arithmetic of ``rms_leaf`` may contract into different fused multiply-adds; there the test
allows a last-bit difference (codes: at most 1 in 10^4 off, by one; updates: 1e-6 relative).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import Int8, QuantizedLeaf, _executor, _pallas_int8

COMPILED = jax.default_backend() == "gpu"
SHAPES = {"w": (64, 512), "v": (3, 4096), "odd": (10, 500), "b": (96,)}  # odd: XLA path (500 % 256)
CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "centered_momentum_nesterov_bc": {
        "centered": True,
        "momentum": 0.9,
        "nesterov": True,
        "bias_correction": True,
    },
    "eps_outside_maximize_momentum": {"eps_in_sqrt": False, "maximize": True, "momentum": 0.5},
    "decoupled_wd_schedule": {
        "learning_rate": optax.cosine_decay_schedule(3e-2, 10),
        "weight_decay": 1e-2,
        "decoupled_weight_decay": True,
    },
}


def _run(kernel: str, config: dict[str, Any], layout: str = "rows", steps: int = 5, jit: bool = True):
    kw = dict(config)
    lr = kw.pop("learning_rate", 1e-2)
    with _executor.kernel_mode(kernel):
        return _steps(rmsprop_jax.rmsprop(lr, accumulator_dtype=Int8(layout=layout), **kw), steps, jit)


def _steps(opt: optax.GradientTransformation, steps: int, jit: bool) -> Any:
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
    state = opt.init(params)
    update = jax.jit(opt.update) if jit else opt.update
    updates = []
    for _ in range(steps):
        # Gradients spanning six decades inside each block, so the codes use the whole map.
        g = {
            k: jnp.asarray(rng.standard_normal(s) * 10.0 ** rng.uniform(-5, 1, s), jnp.float32)
            for k, s in SHAPES.items()
        }
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        updates.append(u)
    return params, state, updates


def _compare(a: Any, b: Any) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        if not COMPILED:
            np.testing.assert_array_equal(x, y)
        elif x.dtype == np.uint8:
            diff = np.abs(x.astype(int) - y.astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() <= 1e-4
        else:
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_kernel_reproduces_the_xla_path(config: str) -> None:
    _compare(_run("xla", CONFIGS[config]), _run("pallas", CONFIGS[config]))


def test_flat_layout() -> None:
    cfg = {"momentum": 0.9, "centered": True}
    _compare(_run("xla", cfg, layout="flat"), _run("pallas", cfg, layout="flat"))


def test_eager_equals_jitted() -> None:
    _compare(_run("pallas", CONFIGS["plain"], jit=False), _run("pallas", CONFIGS["plain"]))


def _pallas_calls(kernel: str, shapes: dict[str, tuple[int, ...]], **kw: Any) -> int:
    opt = rmsprop_jax.rmsprop(1e-2, accumulator_dtype="int8", **kw)
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    with _executor.kernel_mode(kernel):
        jaxpr = str(jax.make_jaxpr(opt.update)(params, opt.init(params), params))
    return jaxpr.count("pallas_call")


def test_the_kernel_runs_once_per_eligible_leaf() -> None:
    # w and v are whole blocks; odd (rows of 500) and b (below min_size) keep the XLA path.
    assert _pallas_calls("pallas", SHAPES) == 2
    assert _pallas_calls("pallas", SHAPES, momentum=0.9, centered=True) == 2
    assert _pallas_calls("xla", SHAPES) == 0
    # automatic: the kernel only on GPUs (this test's CPU keeps XLA)
    assert _pallas_calls("auto", SHAPES) == (2 if COMPILED else 0)
    # A static weight-decay mask is baked in; an array mask keeps the XLA path.
    assert _pallas_calls("pallas", {"w": (64, 512)}, weight_decay=1e-2, weight_decay_mask={"w": True}) == 1
    mask = {"w": jnp.asarray(True)}
    assert _pallas_calls("pallas", {"w": (64, 512)}, weight_decay=1e-2, weight_decay_mask=mask) == 0


def test_a_wrong_table_in_the_kernel_fails(monkeypatch: pytest.MonkeyPatch, fresh_caches: None) -> None:
    """Mutation: the kernel quantizing with the unsigned map's LUT must not pass the comparison."""
    real = _pallas_int8._tables
    reference = _run("xla", CONFIGS["plain"])
    monkeypatch.setattr(_pallas_int8, "_tables", lambda signed: (real(signed)[0], real(not signed)[1]))
    with pytest.raises(AssertionError):
        _compare(reference, _run("pallas", CONFIGS["plain"]))


def test_state_types_and_shapes() -> None:
    _, state, _ = _run("pallas", CONFIGS["centered_momentum_nesterov_bc"], steps=1)
    quantized = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, QuantizedLeaf))]
    leaves = [x for x in quantized if isinstance(x, QuantizedLeaf)]
    assert len(leaves) == 9  # nu, mu, trace of w, v and odd
    for x in leaves:
        assert x.codes.dtype == jnp.uint8 and x.absmax.dtype == jnp.float32


@pytest.mark.parametrize(
    ("shape", "block", "layout", "ok"),
    [
        ((64, 512), 256, "rows", True),
        ((10, 500), 256, "rows", False),
        ((10, 500), 256, "flat", False),
        ((8, 32), 256, "flat", True),
        ((4096,), 100, "flat", False),  # not a power of two: Triton blocks are
        ((0, 256), 256, "rows", False),
    ],
)
def test_eligibility(shape: tuple[int, ...], block: int, layout: str, ok: bool) -> None:
    axis = Int8(layout=layout).axis
    assert _executor._kernel_eligible(shape, block, axis) is ok


def test_rows_per_instance_divide_the_blocks() -> None:
    assert _pallas_int8._rows(1024, 32) == 32
    assert _pallas_int8._rows(48, 32) == 16
    assert _pallas_int8._rows(7, 32) == 1


def test_bad_kernel_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="kernel mode 'cuda' is invalid"):
        with _executor.kernel_mode("cuda"):
            pass
    monkeypatch.setenv("RMSPROP_JAX_KERNEL", "cuda")
    with pytest.raises(ValueError, match="RMSPROP_JAX_KERNEL='cuda' is invalid"):
        _executor._mode()


def test_the_automatic_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule: 8-bit, eligible, static mask, a GPU backend, and not sharded (or unknown)."""
    from rmsprop_jax._codecs import PLAIN, Quantized

    q = Quantized()
    codes = QuantizedLeaf(jnp.zeros((64, 512), jnp.uint8), jnp.zeros((64, 2)))
    g = jnp.zeros((64, 512))
    three = (q, PLAIN, PLAIN)
    assert not _executor.use_kernel(three, g, (codes, None, None), True)  # CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _executor.use_kernel(three, g, (codes, None, None), True)
    assert not _executor.use_kernel(three, g, (codes, None, None), jnp.asarray(True))  # array mask
    assert not _executor.use_kernel((PLAIN, PLAIN, PLAIN), g, (g, None, None), True)  # float state
    odd = jnp.zeros((10, 500))
    assert not _executor.use_kernel(three, odd, (codes, None, None), True)  # rows of 500
    # a tracer with several devices: its sharding is unknown in an Auto mesh, so XLA
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    seen = []
    jax.make_jaxpr(lambda x: seen.append(_executor.use_kernel(three, x, (codes, None, None), True)))(g)
    assert seen == [False]
    with _executor.kernel_mode("xla"):
        assert not _executor.use_kernel(three, g, (codes, None, None), True)
