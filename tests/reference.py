"""Independent float64 NumPy RMSProp, written from the published equations.

Never import the package's math here: this file is the yardstick it is measured
against. One class, one array at a time, every step spelled out.

Sources:
  * Hinton, Srivastava, Swersky, lecture 6e (2012): MeanSquare(w, t) =
    0.9 MeanSquare(w, t-1) + 0.1 (dE/dw)^2, and divide the gradient by
    sqrt(MeanSquare(w, t)).
  * Graves (2013), arXiv:1308.0850, eqs. 38-41 (the centered form):
        n_i = aleph n_i + (1 - aleph) e_i^2
        g_i = aleph g_i + (1 - aleph) e_i
        D_i = beth D_i - gimel e_i / sqrt(n_i - g_i^2 + daleth)
        w_i = w_i + D_i
    with aleph = 0.95, beth = 0.9, gimel = 1e-4, daleth = 1e-4.
  * The extras (weight decay, lr placement, maximize, bias correction) as stated
    in rmsprop_jax.rmsprop's docstring and the README's equations, which follow
    PyTorch's torch.optim.RMSprop algorithm box, Keras 3's RMSprop.update_step
    and AdamW (Loshchilov & Hutter, 2019) for decoupled decay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class RefConfig:
    lr: float | Callable[[int], float] = 1e-2
    decay: float = 0.9
    eps: float = 1e-8
    initial_scale: float = 0.0
    eps_in_sqrt: bool = True
    centered: bool = False
    momentum: float | None = None
    nesterov: bool = False
    bias_correction: bool = False
    weight_decay: float | Callable[[int], float] = 0.0
    decoupled_weight_decay: bool = False
    lr_in_momentum: bool = True
    maximize: bool = False

    def at(self, value: float | Callable[[int], float], t: int) -> float:
        """A constant, or a schedule evaluated at step t (0 for the first step)."""
        return float(value(t)) if callable(value) else float(value)


class ReferenceRMSProp:
    """RMSProp on one float64 array. ``step(grad)`` returns the new parameter."""

    def __init__(self, param: np.ndarray, cfg: RefConfig, decay_this_leaf: bool = True):
        self.cfg = cfg
        self.p = np.array(param, dtype=np.complex128 if np.iscomplexobj(param) else np.float64)
        self.ms = np.full(self.p.shape, cfg.initial_scale, dtype=np.float64)  # MeanSquare
        self.mg = np.zeros_like(self.p)  # mean gradient (centered)
        self.buf = np.zeros_like(self.p)  # momentum buffer
        self.t = 0
        self.decay_this_leaf = decay_this_leaf

    def step(self, grad: np.ndarray) -> np.ndarray:
        c = self.cfg
        lr = c.at(c.lr, self.t)
        wd = c.at(c.weight_decay, self.t) if self.decay_this_leaf else 0.0
        self.t += 1
        e = np.array(grad, dtype=self.p.dtype)
        if c.maximize:
            e = -e
        if not c.decoupled_weight_decay:
            e = e + wd * self.p  # L2 penalty wd/2 |p|^2 folded into the gradient

        rho = c.decay
        self.ms = rho * self.ms + (1 - rho) * np.abs(e) ** 2
        if c.centered:
            self.mg = rho * self.mg + (1 - rho) * e
        ms, mg = self.ms, self.mg
        if c.bias_correction:
            ms = ms / (1 - rho**self.t)
            mg = mg / (1 - rho**self.t)
        var = ms - np.abs(mg) ** 2 if c.centered else ms
        var = np.maximum(var, 0.0)  # a variance: >= 0 in exact arithmetic, so rounding may not push it below
        if c.eps_in_sqrt:
            step = e / np.sqrt(var + c.eps)
        else:
            step = e / (np.sqrt(var) + c.eps)

        if c.momentum is None:
            delta = -lr * step
        elif c.lr_in_momentum:
            self.buf = c.momentum * self.buf - lr * step
            delta = self.buf if not c.nesterov else c.momentum * self.buf - lr * step
        else:
            self.buf = c.momentum * self.buf + step
            delta = -lr * (self.buf if not c.nesterov else c.momentum * self.buf + step)

        if c.decoupled_weight_decay:
            delta = delta - lr * wd * self.p
        self.p = self.p + delta
        return self.p


def run_reference(
    params: list[np.ndarray],
    grads: list[list[np.ndarray]],
    cfg: RefConfig,
    decay_mask: list[bool] | None = None,
) -> list[list[np.ndarray]]:
    """Trajectories of several leaves: ``out[t][i]`` is leaf i after step t+1.

    ``grads[t][i]`` is the gradient of leaf i at step t (fixed, not recomputed
    from the parameters, so both sides see exactly the same sequence).
    """
    mask = decay_mask or [True] * len(params)
    opts = [ReferenceRMSProp(p, cfg, m) for p, m in zip(params, mask, strict=True)]
    return [[o.step(g) for o, g in zip(opts, gs, strict=True)] for gs in grads]


def graves_2013_step(w, n, g, d, e, aleph=0.95, beth=0.9, gimel=1e-4, daleth=1e-4):
    """Eqs. 38-41 of Graves (2013) verbatim; returns (w, n, g, D)."""
    n = aleph * n + (1 - aleph) * e**2
    g = aleph * g + (1 - aleph) * e
    d = beth * d - gimel * e / np.sqrt(n - g**2 + daleth)
    return w + d, n, g, d


def _rank1_scale(x: np.ndarray) -> np.ndarray:
    """``min`` over the axes ``d`` of ``x``'s maximum over every other axis, broadcast over ``x``."""
    scale = None
    for d in range(x.ndim):
        stat = x.max(axis=tuple(i for i in range(x.ndim) if i != d))
        b = stat.reshape([-1 if i == d else 1 for i in range(x.ndim)])
        scale = b if scale is None else np.minimum(scale, b)
    assert scale is not None
    return scale


def rank1_4bit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """4-bit rank-1 normalized quantization of a non-negative ``x`` of rank >= 2, in float64, from
    Li et al. 2023 (Sec. 4.2, "rank-1 normalization") and lpmm's ``get_sm3_statistics`` /
    ``_compute_sm3_scale_tensor``: the scale of ``x[i, j, ...]`` is the minimum over the axes of
    that axis' slice maximum; the normalized value goes to the nearest of the linear map without
    zero, ``(k + 1) / 16`` (ties up; values below 1/16 to 1/16). Returns ``(codes, decoded)``."""
    x = np.asarray(x, np.float64)
    scale = _rank1_scale(x)
    v = np.divide(x, scale, out=np.zeros_like(x), where=scale > 0)
    codes = np.clip(np.floor(16 * v + 0.5) - 1, 0, 15).astype(np.int64)
    return codes, (codes + 1) / 16 * scale


def rank1_normalized(x: np.ndarray) -> np.ndarray:
    """The normalized values ``x / min_d(max over the other axes)`` of :func:`rank1_4bit`, in float64
    (0 where the scale is 0), for locating the elements that lie on a rounding boundary."""
    x = np.asarray(x, np.float64)
    scale = _rank1_scale(x)
    return np.divide(x, scale, out=np.zeros_like(x), where=scale > 0)


def fp8_e4m3_round_toward_zero(v: np.ndarray) -> np.ndarray:
    """float8_e4m3fn's value of float32 ``v`` (``|v| <= 448``) rounded toward zero, in float64: the
    largest-magnitude e4m3 value not beyond ``v`` (3 mantissa bits, exponents -6..8, subnormals
    ``k * 2**-9``), from the format's definition (OCP 8-bit floating point, 2023)."""
    v = np.asarray(v, np.float64)
    a = np.abs(v)
    e = np.frexp(a)[1] - 1.0  # a = m * 2**e with 1 <= m < 2 (exact, unlike log2)
    e = np.maximum(e, -6)  # below 2**-6 the spacing stays 2**-9 (subnormals)
    step = 2.0 ** (e - 3)
    q = np.floor(a / step) * step
    return np.sign(v) * np.where(a > 0, q, 0.0)
