"""Argument validation: the one checker used by :func:`rmsprop`, :func:`scale_by_rms`, the format
values and the presets.

Every check raises a ``ValueError`` that names the argument, its value and what is allowed. A
value that is traced (``optax.inject_hyperparams`` under ``jit``) or a schedule cannot be checked
at construction and passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def traced(value: Any) -> bool:
    """Schedules and traced values cannot be checked at construction."""
    return callable(value) or isinstance(value, jax.core.Tracer)


def concrete(x: Any) -> float | None:
    """``x`` as a Python float if it is a concrete real scalar, else ``None`` (traced: unchecked).

    A 0-d array of any real dtype is a scalar, bfloat16 and float16 included: that is what
    ``optax.inject_hyperparams`` hands over for bfloat16 parameters (it casts injected
    hyperparameters to the parameters' dtype unless given ``hyperparam_dtype``).
    """
    if traced(x):
        return None
    arr = np.asarray(x)
    dtype = jnp.dtype(arr.dtype)
    if arr.shape != () or jnp.issubdtype(dtype, jnp.complexfloating) or not jnp.issubdtype(dtype, jnp.number):
        raise ValueError(f"expected a real scalar number, got {x!r} of shape {arr.shape}")
    return float(arr.astype(np.float64))


def number(name: str, value: Any, ok: Callable[[float], bool], allowed: str) -> None:
    """A real scalar (or schedule / traced value) with ``ok(value)``."""
    try:
        v = concrete(value)
    except ValueError as e:
        raise ValueError(f"{name}={value!r} is invalid: {e}; allowed: {allowed}.") from None
    if v is not None and not (math.isfinite(v) and ok(v)):
        raise ValueError(f"{name}={value!r} is out of range; allowed: {allowed}.")


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r} is not a bool; allowed: True or False.")
    return bool(value)


def integer(name: str, value: Any, lo: int, hi: int | None, allowed: str) -> int:
    """A Python/NumPy integer (not a bool) in ``[lo, hi)``."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok or value < lo or (hi is not None and value >= hi):
        raise ValueError(f"{name}={value!r} is invalid; allowed: {allowed}.")
    return int(value)


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid; allowed: {' or '.join(repr(a) for a in allowed)}.")
    return value


def static_zero(x: Any) -> bool:
    """True for ``None`` and for a concrete zero: the option is statically off."""
    if x is None:
        return True
    if traced(x):
        return False
    return float(np.asarray(x).astype(np.float64)) == 0.0


def core(decay: Any, eps: Any, initial_scale: Any) -> None:
    """The arguments :func:`rmsprop` and :func:`scale_by_rms` share."""
    number("decay", decay, lambda v: 0 <= v < 1, "0 <= decay < 1")
    number("eps", eps, lambda v: v >= 0, "eps >= 0")
    number("initial_scale", initial_scale, lambda v: v >= 0, "initial_scale >= 0")
