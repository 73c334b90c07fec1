"""Shared pytest configuration.

Hypothesis runs under a fixed, derandomized profile so that CI is deterministic
(the same examples on every run and machine) and bounded in time. Select another
profile with ``HYPOTHESIS_PROFILE=dev`` (more examples, random) when hunting bugs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import jax
import pytest
from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,  # jit compiles make the first example of a test slow
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", derandomize=True, max_examples=25, database=None, **_COMMON)
settings.register_profile("dev", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def clear_caches() -> None:
    """Every compiled function the package caches: JAX's and the executor's own."""
    from rmsprop_jax import _executor

    jax.clear_caches()
    _executor._leaf_fn.cache_clear()
    _executor._packed_fn.cache_clear()


@pytest.fixture
def fresh_caches() -> Iterator[None]:
    """For a test that monkeypatches what a step traces (codecs, tables, kernels): nothing compiled
    before it may serve it, and nothing it compiled may serve a later test."""
    clear_caches()
    yield
    clear_caches()
