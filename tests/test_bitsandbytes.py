"""presets.bitsandbytes against bitsandbytes 0.50.2's RMSprop8bit / RMSprop32bit, live on this CPU.

Same gradient sequence on both sides (a per-element drift plus 50 % noise, so every
parameter moves), a learning rate that changes every step, leaves above and below
``min_8bit_size`` (4096) and sizes that are not multiples of 256, 110 steps. Checked:
the stored 8-bit codes equal bitsandbytes' ``state1`` element for element, ``absmax``
and float32 states agree to float32 rounding, and the parameters agree per element
(99.9th percentile of |difference| / motion <= 1e-4). Each deliberately wrong variant
(block 2048, a linear map, the unsigned map, quantizing small leaves, nu rounded to
the nearest code including 0) must fail the same comparison.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import _quantize

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")

SHAPES = {"a": (70, 73), "b": (5000,), "c": (32, 256), "small": (10, 10), "just_below": (4095,)}
STEPS = 110
TOL = 1e-4


@functools.cache
def _problem() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], np.ndarray]:
    rng = np.random.default_rng(0)
    p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    drift = {k: rng.choice([-1.0, 1.0], s) * np.exp(rng.uniform(-3, 3, s)) for k, s in SHAPES.items()}
    grads = []
    for t in range(STEPS):
        scale = 0.1 + 2 * rng.random()
        g = {
            k: (drift[k] * (1 + 0.5 * rng.standard_normal(s)) * scale).astype(np.float32)
            for k, s in SHAPES.items()
        }
        if t == 5:
            g["a"][:3] = 0.0  # whole zero rows: tiny and zero values inside a block
        grads.append(g)
    lrs = (1e-3 * (1 + 0.5 * np.sin(np.arange(STEPS)))).astype(np.float32)
    return p0, grads, lrs


@functools.cache
def _bnb(bits: int, weight_decay: float) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    p0, grads, lrs = _problem()
    tp = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in p0.items()}
    cls = bnb.optim.RMSprop8bit if bits == 8 else bnb.optim.RMSprop32bit
    opt = cls(list(tp.values()), lr=float(lrs[0]), alpha=0.99, eps=1e-8, weight_decay=weight_decay)
    for t in range(STEPS):
        opt.param_groups[0]["lr"] = float(lrs[t])
        for k, p in tp.items():
            p.grad = torch.from_numpy(grads[t][k].copy())
        opt.step()
    state = {
        k: {n: v.numpy().copy() for n, v in opt.state[p].items() if torch.is_tensor(v)} for k, p in tp.items()
    }
    return {k: p.detach().numpy().copy() for k, p in tp.items()}, state


def _lr_schedule() -> Any:
    lrs = jnp.asarray(_problem()[2])
    return lambda count: lrs[count]


def _ours(opt: optax.GradientTransformation) -> tuple[dict[str, Any], Any]:
    p0, grads, _ = _problem()
    params = {k: jnp.asarray(v) for k, v in p0.items()}

    @jax.jit
    def run(params: Any, grads: Any) -> Any:
        def step(carry: Any, g: Any) -> Any:
            params, state = carry
            u, state = opt.update(g, state, params)
            return (optax.apply_updates(params, u), state), None

        return jax.lax.scan(step, (params, opt.init(params)), grads)[0]

    stacked = {k: jnp.asarray(np.stack([g[k] for g in grads])) for k in SHAPES}
    return run(params, stacked)


def _compare(ours: tuple[dict[str, Any], Any], theirs: tuple[dict[str, np.ndarray], dict[str, Any]]) -> dict:
    """Raises AssertionError unless codes are equal and the parameters agree; returns the figures."""
    (params, state), (tparams, tstate) = ours, theirs
    p0 = _problem()[0]
    figures = {}
    for k in SHAPES:
        nu, ref = state.nu[k], tstate[k]
        if ref["state1"].dtype == np.uint8:
            assert isinstance(nu, rmsprop_jax.QuantizedLeaf), (
                f"{k}: bitsandbytes quantizes this leaf, we did not"
            )
            differ = int((np.asarray(nu.codes).reshape(-1) != ref["state1"].reshape(-1)).sum())
            assert differ == 0, f"{k}: {differ} of {ref['state1'].size} codes differ from bitsandbytes'"
            np.testing.assert_allclose(np.asarray(nu.absmax), ref["absmax1"], rtol=1e-6, err_msg=k)
        else:
            assert not isinstance(nu, rmsprop_jax.QuantizedLeaf), f"{k}: bitsandbytes keeps this leaf float32"
            np.testing.assert_allclose(np.asarray(nu), ref["state1"], rtol=1e-5, err_msg=k)
        motion = np.abs(tparams[k] - p0[k])
        rel = np.abs(np.asarray(params[k]) - tparams[k]) / np.maximum(motion, 1e-30)
        figures[k] = float(np.percentile(rel, 99.9))
        assert figures[k] <= TOL, f"{k}: 99.9th percentile of |diff| / motion = {figures[k]:.3g} > {TOL}"
    return figures


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_preset_reproduces_bitsandbytes_step_for_step(bits: int, weight_decay: float) -> None:
    opt = rmsprop_jax.presets.bitsandbytes(
        lr=_lr_schedule(), alpha=0.99, eps=1e-8, weight_decay=weight_decay, optim_bits=bits
    )
    figures = _compare(_ours(opt), _bnb(bits, weight_decay))
    print(f"bits={bits} wd={weight_decay}: p99.9 |diff|/motion per leaf", figures)


def _int8(**blockwise: Any) -> optax.GradientTransformation:
    cfg = {"block_size": 256, "min_size": 4096, "layout": "flat"} | blockwise
    return rmsprop_jax.rmsprop(
        _lr_schedule(),
        decay=0.99,
        eps=1e-8,
        eps_in_sqrt=False,
        accumulator_dtype=rmsprop_jax.Int8(**cfg),
    )


def test_rmsprop_int8_flat_equals_the_preset() -> None:
    """The preset is an argument mapping: rmsprop(accumulator_dtype='int8', layout='flat') is bnb."""
    _compare(_ours(_int8()), _bnb(8, 0.0))


def _linear_map(signed: bool) -> np.ndarray:
    return np.linspace(-1.0, 1.0, 256, dtype=np.float32)


def _lut_for(code: np.ndarray) -> np.ndarray:
    mid = np.float32(0.5) * (code[:-1] + code[1:])
    pts = np.float32(-1) + np.float32(2) * np.arange(65536, dtype=np.float32) / np.float32(65535)
    return np.searchsorted(mid, pts, side="left").astype(np.uint8)


@functools.partial(jax.jit, static_argnames=("block_size", "signed", "axis"))
def _nearest_quantize(x: Any, *, block_size: int = 256, signed: bool = True, axis: Any = None) -> Any:
    """Plain nearest-code rounding (0 -> the exact-zero code 127): the rule bnb does NOT use."""
    xb, n = _quantize._blocks(x.astype(jnp.float32), block_size, axis)
    absmax = jnp.max(jnp.abs(xb), axis=-1)
    v = xb / jnp.where(absmax == 0, 1, absmax)[..., None]
    code = jnp.asarray(_quantize.create_dynamic_map(signed))
    codes = jnp.argmin(jnp.abs(v[..., None] - code), axis=-1).astype(jnp.uint8)
    return codes.reshape(*codes.shape[:-2], -1)[..., :n].reshape(x.shape), absmax


MUTANTS = ["block 2048", "linear map", "unsigned map", "small leaves quantized", "nearest incl. 0"]


@pytest.mark.parametrize("mutant", MUTANTS)
def test_wrong_variants_fail_the_comparison(
    mutant: str, monkeypatch: pytest.MonkeyPatch, fresh_caches
) -> None:
    if mutant == "block 2048":
        opt = _int8(block_size=2048)
    elif mutant == "unsigned map":
        opt = _int8(signed=False)
    elif mutant == "small leaves quantized":
        opt = _int8(min_size=0)
    elif mutant == "linear map":
        linear = _linear_map(True)
        monkeypatch.setattr(_quantize, "_dynamic_map_np", lambda signed, *a: linear)
        monkeypatch.setattr(_quantize, "_lut_np", lambda signed: _lut_for(linear))
        opt = _int8()
    else:
        monkeypatch.setattr(_quantize, "quantize_blockwise", _nearest_quantize)
        opt = _int8()
    with pytest.raises(AssertionError):
        _compare(_ours(opt), _bnb(8, 0.0))


def test_preset_arguments_as_bitsandbytes() -> None:
    import inspect

    ours = inspect.signature(rmsprop_jax.presets.bitsandbytes).parameters
    theirs = inspect.signature(bnb.optim.RMSprop).parameters
    for name, p in theirs.items():
        if name in ("params", "args"):
            continue
        assert name in ours and ours[name].default == p.default, name
    with pytest.raises(NotImplementedError, match="Centered"):
        rmsprop_jax.presets.bitsandbytes(centered=True)
    with pytest.raises(NotImplementedError, match="Centered"):
        bnb.optim.RMSprop8bit([torch.nn.Parameter(torch.ones(2))], centered=True)
    with pytest.raises(NotImplementedError, match="alpha"):
        rmsprop_jax.presets.bitsandbytes(alpha=0)
    with pytest.raises(ValueError, match="optim_bits=16"):
        rmsprop_jax.presets.bitsandbytes(optim_bits=16)


def test_momentum_is_ignored_with_a_warning_as_bitsandbytes_ignores_it() -> None:
    with pytest.warns(UserWarning, match="momentum=0.9 is ignored"):
        with_m = rmsprop_jax.presets.bitsandbytes(lr=_lr_schedule(), momentum=0.9, optim_bits=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rmsprop_jax.presets.bitsandbytes(momentum=0)
    # bitsandbytes with momentum=0.9 gives exactly its momentum=0 result ...
    p0, grads, lrs = _problem()
    res = []
    for m in (0.0, 0.9):
        tp = torch.nn.Parameter(torch.from_numpy(p0["b"].copy()))
        opt = bnb.optim.RMSprop8bit([tp], lr=float(lrs[0]), momentum=m)
        for t in range(5):
            tp.grad = torch.from_numpy(grads[t]["b"].copy())
            opt.step()
        res.append(tp.detach().numpy().copy())
    np.testing.assert_array_equal(res[0], res[1])
    # ... and so does the preset
    _compare(_ours(with_m), _bnb(8, 0.0))
