"""The straightforward per-leaf loop, op by op: what ``_executor.run`` must reproduce bit for bit.

No nested ``jit``, no kernel, no packed layout: each leaf's ``step_leaf`` traced inline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rmsprop_jax import _executor, _quantize


def run_reference(
    flags: Any,
    scalars: Any,
    gs: Sequence[Any],
    ps: Sequence[Any] | None,
    masks: Sequence[Any],
    nus: Sequence[Any],
    mus: Sequence[Any],
    traces: Sequence[Any],
    codecs: Sequence[Any] | None = None,
    rounding: tuple[Any, Any] | None = None,
    apply: bool = False,
) -> _executor.Result:
    n = len(gs)
    ps = ps if ps is not None else [None] * n
    codecs = codecs if codecs is not None else [_executor._PLAIN3] * n
    keys = None if rounding is None else _quantize.leaf_keys(*rounding, n)
    outs = []
    for i, (g, p, nu, mu, tr, mask, cs) in enumerate(
        zip(gs, ps, nus, mus, traces, masks, codecs, strict=True)
    ):
        rnd = None if keys is None or cs == _executor._PLAIN3 else keys[i]
        outs.append(_executor.step_leaf(flags, scalars, cs, g, p, nu, mu, tr, mask, rnd, apply))
    cols = list(zip(*outs, strict=True)) or [()] * 4
    return _executor.Result(*(list(c) for c in cols), kernel=[False] * n)  # type: ignore[arg-type]
