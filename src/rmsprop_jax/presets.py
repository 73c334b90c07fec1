r"""Framework-exact RMSProp: one preset per source, each a pure mapping onto :func:`rmsprop`.

Porting a recipe between frameworks silently changes RMSProp. The libraries
disagree on four things, and each changes the trajectory:

.. code-block:: text

    preset          eps            nu_0  lr vs buffer   weight decay            decay  momentum  centered
    pytorch         outside, 1e-8  0     outside        coupled (L2)            0.99   optional  optional
    keras           inside, 1e-7   0     inside         decoupled, x lr         0.9    optional  optional
    tensorflow_v1   inside, 1e-10  1     inside         none                    0.9    optional  optional
    timm_tf         inside, 1e-10  1     inside (flag)  coupled or decoupled    0.9    optional  optional
    graves_2013     inside, 1e-4   0     inside         none                    0.95   0.9       always
    dqn_2015        inside, 0.01   0     (no buffer)    none                    0.95   none      always
    bitsandbytes    outside, 1e-8  0     (no buffer)    coupled (L2)            0.99   ignored   refused
    hinton_2012     none (0)       0     (no buffer)    none                    0.9    none      never

Every preset except :func:`bitsandbytes` (which has its own ``optim_bits``) also takes a
keyword-only ``accumulator_dtype``: how the state is stored, with :func:`rmsprop`'s values
(``"int8"``, ``jnp.bfloat16``, ...); the default keeps each parameter's dtype.

Each function takes the source's own argument names and defaults and returns
an :func:`rmsprop_jax.rmsprop` transformation that reproduces the source step
for step (the tests compare them live against ``torch.optim.RMSprop`` and Keras 3,
and against recorded TensorFlow 1 and timm trajectories). Every learning-rate
argument also accepts an optax schedule, evaluated at the step count (0 first),
which is what PyTorch's ``group["lr"]`` and a Keras ``LearningRateSchedule`` see.

"lr inside the buffer" means :math:`b_t = m b_{t-1} + \alpha_t u_t,\ \Delta_t = -b_t`;
"outside" means :math:`b_t = m b_{t-1} + u_t,\ \Delta_t = -\alpha_t b_t`. The two
agree while the learning rate is constant and differ as soon as it changes.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax.numpy as jnp
import optax

from rmsprop_jax import _validate
from rmsprop_jax._formats import Int8
from rmsprop_jax._transform import ScalarOrSchedule, rmsprop

__all__ = [
    "bitsandbytes",
    "dqn_2015",
    "graves_2013",
    "hinton_2012",
    "keras",
    "pytorch",
    "tensorflow_v1",
    "timm_tf",
]


# Preset-specific arguments are validated by rmsprop()'s own checker, under the source's names.
_traced = _validate.traced
_number = _validate.number


def _lr(name: str, lr: Any) -> None:
    _number(name, lr, lambda v: v >= 0, f"{name} >= 0, or an optax schedule")


def _eps(name: str, eps: Any) -> None:
    _number(name, eps, lambda v: v >= 0, f"{name} >= 0")


def _momentum_or_none(name: str, momentum: Any) -> Any:
    """The sources use ``momentum=0`` for "no buffer"; :func:`rmsprop` uses ``None``."""
    _number(name, momentum, lambda v: 0 <= v < 1, f"0 <= {name} < 1")
    return None if not _traced(momentum) and float(momentum) == 0.0 else momentum


def _weight_decay_or_none(name: str, weight_decay: Any) -> Any:
    if weight_decay is None:
        return None
    _number(name, weight_decay, lambda v: v >= 0, f"{name} >= 0 (or None)")
    if not _traced(weight_decay) and float(weight_decay) == 0.0:
        return None
    return weight_decay


def pytorch(
    lr: ScalarOrSchedule = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0,
    momentum: float = 0,
    centered: bool = False,
    maximize: bool = False,
    *,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""``torch.optim.RMSprop`` (PyTorch 2.x), step for step.

    .. code-block:: text

        input: lr (gamma), alpha, eps, weight_decay (lambda), momentum (mu), centered, maximize
        init:  v_0 <- 0 (square_avg), g^ave_0 <- 0 (grad_avg), b_0 <- 0 (momentum_buffer)
        for t = 1, 2, ...:
            g_t <- -g_t                                    if maximize
            g_t <- g_t + lambda * theta_{t-1}              if lambda != 0   (coupled, L2)
            v_t <- alpha * v_{t-1} + (1 - alpha) * g_t^2
            if centered:
                g^ave_t <- alpha * g^ave_{t-1} + (1 - alpha) * g_t
                d_t <- sqrt(v_t - (g^ave_t)^2) + eps
            else:
                d_t <- sqrt(v_t) + eps                     <- eps OUTSIDE the root
            if mu > 0:
                b_t <- mu * b_{t-1} + g_t / d_t            <- lr OUTSIDE the buffer
                theta_t <- theta_{t-1} - gamma * b_t
            else:
                theta_t <- theta_{t-1} - gamma * g_t / d_t

    Source: ``torch/optim/rmsprop.py`` (the docstring's algorithm box and
    ``_single_tensor_rmsprop``), checked live against torch 2.13 in
    ``tests/test_presets_torch.py``.

    Differs from the others: eps outside the root (like none of TF1/timm/Keras 3),
    the default ``alpha=0.99`` (everyone else uses 0.9), and the learning rate
    applied after the momentum buffer, so the buffer holds unscaled steps and a
    changing learning rate rescales the whole accumulated velocity at once.
    ``weight_decay`` is an L2 term added to the gradient (it goes through the
    second moment), not AdamW-style decay.

    Args:
      lr: learning rate :math:`\gamma` (float or optax schedule).
      alpha: smoothing constant of the squared-gradient average, in [0, 1).
        (PyTorch also accepts ``alpha=1``, which freezes the average at 0; it
        is rejected here.)
      eps: added to the root of the average, >= 0.
      weight_decay: L2 coefficient added to the gradient, >= 0.
      momentum: momentum factor in [0, 1); 0 means no buffer.
      centered: divide by the root of the variance estimate.
      maximize: ascend instead of descend.

    The implementation knobs ``foreach``, ``capturable`` and ``differentiable``
    change no numbers and have no counterpart here.

    .. warning::
      Complex parameters: PyTorch runs RMSprop on ``view_as_real`` views, so the
      real and imaginary parts get separate accumulators; this preset (like
      optax) uses one accumulator of :math:`|g|^2` per complex entry. To
      reproduce PyTorch there, optimise the real and imaginary parts as separate
      real leaves.
    """
    _lr("lr", lr)
    _number("alpha", alpha, lambda v: 0 <= v < 1, "0 <= alpha < 1")
    _eps("eps", eps)
    return rmsprop(
        lr,
        decay=alpha,
        eps=eps,
        initial_scale=0.0,
        eps_in_sqrt=False,
        centered=centered,
        momentum=_momentum_or_none("momentum", momentum),
        weight_decay=_weight_decay_or_none("weight_decay", weight_decay),
        decoupled_weight_decay=False,
        lr_in_momentum=False,
        maximize=maximize,
        accumulator_dtype=accumulator_dtype,
    )


def keras(
    learning_rate: ScalarOrSchedule = 1e-3,
    rho: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-7,
    centered: bool = False,
    weight_decay: ScalarOrSchedule | None = None,
    *,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Keras 3 ``keras.optimizers.RMSprop``, step for step.

    .. code-block:: text

        input: learning_rate (eta), rho, momentum (m), epsilon, centered, weight_decay (lambda)
        init:  velocity_0 <- 0, average_gradient_0 <- 0, momentum_0 <- 0
        for t = 1, 2, ...:
            theta <- theta - eta_t * lambda * theta        if lambda  (decoupled, before the step)
            velocity_t <- rho * velocity_{t-1} + (1 - rho) * g_t^2
            if centered:
                average_gradient_t <- rho * average_gradient_{t-1} + (1 - rho) * g_t
                denominator <- velocity_t - average_gradient_t^2 + epsilon
            else:
                denominator <- velocity_t + epsilon        <- eps INSIDE the root
            increment <- eta_t * g_t / sqrt(denominator)   <- lr INSIDE the buffer
            if m > 0:
                momentum_t <- m * momentum_{t-1} + increment
                theta <- theta - momentum_t
            else:
                theta <- theta - increment

    Source: ``keras/src/optimizers/rmsprop.py`` (``RMSprop.update_step``) and
    ``keras/src/optimizers/base_optimizer.py`` (``_apply_weight_decay``, run
    before ``update_step`` with the same learning rate), Keras 3.15; checked live
    on the JAX backend in ``tests/test_presets_keras.py``.

    Differs from the others: Keras 3 puts epsilon *inside* the root (unlike
    PyTorch), initialises the accumulator to 0 (unlike TF1's 1), keeps the
    learning rate inside the momentum buffer, and its ``weight_decay`` is
    decoupled and scaled by the learning rate (AdamW-style, ``theta -= eta *
    lambda * theta``), never seen by the second moment. Because the update itself
    does not depend on ``theta``, decaying before or beside the step is the same.

    Args:
      learning_rate: :math:`\eta` (float or optax schedule; a Keras
        ``LearningRateSchedule`` called with ``iterations`` maps to an optax
        schedule called with the step count).
      rho: discounting factor of the squared-gradient average, in [0, 1).
      momentum: in [0, 1); 0 means no buffer.
      epsilon: added to the average under the root, >= 0.
      centered: divide by the root of the variance estimate.
      weight_decay: decoupled, lr-scaled decay coefficient, or ``None``.

    Keras's other base-optimizer arguments (clipping, EMA, loss scaling,
    gradient accumulation) are separate optax transformations
    (``optax.clip_by_global_norm``, ``optax.ema``, ``optax.MultiSteps``); per-variable
    ``exclude_from_weight_decay`` is :func:`rmsprop`'s ``weight_decay_mask``.
    """
    _lr("learning_rate", learning_rate)
    _number("rho", rho, lambda v: 0 <= v < 1, "0 <= rho < 1")
    _eps("epsilon", epsilon)
    return rmsprop(
        learning_rate,
        decay=rho,
        eps=epsilon,
        initial_scale=0.0,
        eps_in_sqrt=True,
        centered=centered,
        momentum=_momentum_or_none("momentum", momentum),
        weight_decay=_weight_decay_or_none("weight_decay", weight_decay),
        decoupled_weight_decay=True,
        lr_in_momentum=True,
        accumulator_dtype=accumulator_dtype,
    )


def tensorflow_v1(
    learning_rate: ScalarOrSchedule,
    decay: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-10,
    centered: bool = False,
    *,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""TensorFlow 1 ``tf.compat.v1.train.RMSPropOptimizer``, step for step.

    The kernels are ``tf.raw_ops.ApplyRMSProp`` and ``ApplyCenteredRMSProp``:

    .. code-block:: text

        input: learning_rate (lr), decay (rho), momentum (m), epsilon, centered
        init:  ms_0 <- 1 (slot "rms": ONES), mg_0 <- 0, mom_0 <- 0
        for t = 1, 2, ...:
            ms_t <- ms_{t-1} + (g_t^2 - ms_{t-1}) * (1 - rho)
            if centered:
                mg_t <- mg_{t-1} + (g_t - mg_{t-1}) * (1 - rho)
                denom <- ms_t - mg_t^2 + epsilon
            else:
                denom <- ms_t + epsilon                     <- eps INSIDE the root
            mom_t <- m * mom_{t-1} + lr_t * g_t / sqrt(denom)   <- lr INSIDE the buffer
            var <- var - mom_t

    Source: ``tensorflow/python/training/rmsprop.py`` (``_create_slots``: the
    ``rms`` slot uses ``ones_initializer``) and
    ``tensorflow/core/kernels/training_ops.cc`` (``ApplyRMSProp``,
    ``ApplyCenteredRMSProp``); checked against trajectories recorded with
    TensorFlow 2.21's ``tf.compat.v1.train.RMSPropOptimizer``
    (``tests/fixtures/record_tf1_timm.py``).

    Differs from the others: the accumulator starts at **1**, not 0, so the
    first steps are about ``lr * g`` instead of ``lr * g / |g|`` (a recipe
    tuned in TF1 takes much smaller early steps than the same numbers in
    PyTorch or Keras); the default epsilon is tiny (1e-10) and inside the root.
    No weight decay (TF1 recipes add an L2 loss term instead). The
    ``use_locking`` and ``name`` arguments change no numbers.

    Args:
      learning_rate: required, as in TF1 (float or optax schedule).
      decay: discounting factor of the squared-gradient average, in [0, 1).
      momentum: in [0, 1); 0 means no buffer (TF1 keeps a buffer that then
        equals the update, which is the same thing).
      epsilon: added to the average under the root, >= 0.
      centered: divide by the root of the variance estimate.
    """
    _lr("learning_rate", learning_rate)
    _number("decay", decay, lambda v: 0 <= v < 1, "0 <= decay < 1")
    _eps("epsilon", epsilon)
    return rmsprop(
        learning_rate,
        decay=decay,
        eps=epsilon,
        initial_scale=1.0,
        eps_in_sqrt=True,
        centered=centered,
        momentum=_momentum_or_none("momentum", momentum),
        lr_in_momentum=True,
        accumulator_dtype=accumulator_dtype,
    )


def timm_tf(
    lr: ScalarOrSchedule = 1e-2,
    alpha: float = 0.9,
    eps: float = 1e-10,
    weight_decay: float = 0,
    momentum: float = 0.0,
    centered: bool = False,
    decoupled_decay: bool = False,
    lr_in_momentum: bool = True,
    *,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""timm's ``timm.optim.RMSpropTF`` ("PyTorch RMSprop with TensorFlow epsilon"), step for step.

    .. code-block:: text

        input: lr, alpha, eps, weight_decay (lambda), momentum (m), centered,
               decoupled_decay, lr_in_momentum
        init:  square_avg_0 <- 1 (ONES, as TF1), grad_avg_0 <- 0, momentum_buffer_0 <- 0
        for t = 1, 2, ...:
            if lambda != 0:
                theta <- theta * (1 - lr_t * lambda)       if decoupled_decay
                g_t <- g_t + lambda * theta                otherwise (coupled, L2)
            square_avg_t <- square_avg_{t-1} + (g_t^2 - square_avg_{t-1}) * (1 - alpha)
            if centered:
                grad_avg_t <- grad_avg_{t-1} + (g_t - grad_avg_{t-1}) * (1 - alpha)
                avg <- sqrt(square_avg_t - grad_avg_t^2 + eps)
            else:
                avg <- sqrt(square_avg_t + eps)            <- eps INSIDE the root
            if m > 0:
                if lr_in_momentum:                         (TF style, the default)
                    b_t <- m * b_{t-1} + lr_t * g_t / avg;  theta <- theta - b_t
                else:                                      (PyTorch style)
                    b_t <- m * b_{t-1} + g_t / avg;         theta <- theta - lr_t * b_t
            else:
                theta <- theta - lr_t * g_t / avg

    Source: ``timm/optim/rmsprop_tf.py`` (timm 1.0.31, ``_single_tensor_rmsprop_tf``);
    checked against trajectories recorded with timm's ``RMSpropTF`` on torch 2.13
    (``tests/fixtures/record_tf1_timm.py``).

    Differs from the others: TF1's numerics (ones init, eps inside the root,
    lr inside the buffer by default) with PyTorch's argument names, PyTorch's
    coupled weight decay by default, and the choice of decoupled decay
    (``theta *= 1 - lr * lambda``, like Keras 3) or PyTorch's lr placement.
    Its default ``alpha`` is 0.9, not PyTorch's 0.99.

    Args:
      lr: learning rate (float or optax schedule).
      alpha: smoothing constant, in [0, 1).
      eps: added to the average under the root, >= 0.
      weight_decay: decay coefficient, >= 0.
      momentum: in [0, 1); 0 means no buffer.
      centered: divide by the root of the variance estimate.
      decoupled_decay: decay the weights directly, scaled by lr (AdamW-style).
      lr_in_momentum: the learning rate enters the buffer (TF) or scales it (PyTorch).

    timm's ``caution`` (Cautious Optimizers) and ``corrected_weight_decay``
    options are not covered.
    """
    _lr("lr", lr)
    _number("alpha", alpha, lambda v: 0 <= v < 1, "0 <= alpha < 1")
    _eps("eps", eps)
    return rmsprop(
        lr,
        decay=alpha,
        eps=eps,
        initial_scale=1.0,
        eps_in_sqrt=True,
        centered=centered,
        momentum=_momentum_or_none("momentum", momentum),
        weight_decay=_weight_decay_or_none("weight_decay", weight_decay),
        decoupled_weight_decay=bool(decoupled_decay),
        lr_in_momentum=bool(lr_in_momentum),
        accumulator_dtype=accumulator_dtype,
    )


def graves_2013(
    learning_rate: ScalarOrSchedule = 1e-4,
    decay: float = 0.95,
    momentum: float = 0.9,
    eps: float = 1e-4,
    *,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Graves (2013), *Generating Sequences With Recurrent Neural Networks*, eqs. 38-41.

    .. code-block:: text

        n_i <- aleph * n_i + (1 - aleph) * e_i^2                      (38)
        g_i <- aleph * g_i + (1 - aleph) * e_i                        (39)
        D_i <- beth * D_i - gimel * e_i / sqrt(n_i - g_i^2 + daleth)  (40)
        w_i <- w_i + D_i                                              (41)

        aleph = 0.95 (decay), beth = 0.9 (momentum),
        gimel = 1e-4 (learning_rate), daleth = 1e-4 (eps)

    The paper's constants are the defaults. The paper names its constants with
    Hebrew letters; the arguments here use the descriptive names above.

    Source: A. Graves, arXiv:1308.0850, section 4 (the handwriting-prediction
    network), eqs. 38-41; checked against a verbatim transcription in
    ``tests/reference.py`` (``graves_2013_step``).

    Differs from the others: this is where the centered form comes from; it is
    always centered, always has momentum, eps sits inside the root together
    with the variance, and the learning rate enters the momentum buffer (as in
    TF1 and Keras). The accumulators start at 0.

    Args:
      learning_rate: gimel (float or optax schedule).
      decay: aleph, in [0, 1).
      momentum: beth, in [0, 1).
      eps: daleth, >= 0.
    """
    _lr("learning_rate", learning_rate)
    _number("decay", decay, lambda v: 0 <= v < 1, "0 <= decay < 1")
    _number("momentum", momentum, lambda v: 0 <= v < 1, "0 <= momentum < 1")
    _eps("eps", eps)
    return rmsprop(
        learning_rate,
        decay=decay,
        eps=eps,
        initial_scale=0.0,
        eps_in_sqrt=True,
        centered=True,
        momentum=momentum,
        lr_in_momentum=True,
        accumulator_dtype=accumulator_dtype,
    )


def dqn_2015(
    learning_rate: ScalarOrSchedule = 0.00025,
    squared_gradient_momentum: float = 0.95,
    gradient_momentum: float = 0.95,
    min_squared_gradient: float = 0.01,
    *,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The RMSProp of DQN (Mnih et al., *Nature* 2015), as in DeepMind's released code.

    .. code-block:: text

        g   <- gradient_momentum * g + (1 - gradient_momentum) * dw
        g2  <- squared_gradient_momentum * g2 + (1 - squared_gradient_momentum) * dw^2
        w   <- w - learning_rate * dw / sqrt(g2 - g^2 + min_squared_gradient)

        learning_rate = 0.00025, squared_gradient_momentum = 0.95,
        gradient_momentum = 0.95, min_squared_gradient = 0.01

    Source: Mnih et al. (2015), "Human-level control through deep reinforcement
    learning", Nature 518, Extended Data Table 1 (the names and values of the
    arguments). The table does not state the update; it is the one in DeepMind's
    released Lua/Torch7 code (``dqn/NeuralQLearner.lua``, ``qLearnMinibatch``):
    ``g``, ``g2`` start at 0 and are updated with 0.95/0.05,
    ``tmp = sqrt(g2 - g^2 + 0.01)``, ``deltas = lr * dw / tmp``, ``w += deltas``
    (``dw`` there is the negative gradient, so this is descent). Our reading:
    "gradient momentum" is the decay of the mean-gradient average of the
    centered form, *not* a momentum buffer (``deltas`` is reset every step), and
    "min squared gradient" is added under the root, not used as a floor.

    Differs from the others: centered with no momentum, and a large eps (0.01)
    inside the root, which bounds the step by ``lr * |dw| / 0.1``.

    Args:
      learning_rate: float or optax schedule.
      squared_gradient_momentum: decay of the squared-gradient average, in [0, 1).
      gradient_momentum: decay of the gradient average; must equal
        ``squared_gradient_momentum`` (as in the paper), because :func:`rmsprop`
        has one decay for both averages.
      min_squared_gradient: added under the root, >= 0.
    """
    _lr("learning_rate", learning_rate)
    _number(
        "squared_gradient_momentum",
        squared_gradient_momentum,
        lambda v: 0 <= v < 1,
        "0 <= squared_gradient_momentum < 1",
    )
    _number("gradient_momentum", gradient_momentum, lambda v: 0 <= v < 1, "0 <= gradient_momentum < 1")
    if (
        not _traced(gradient_momentum)
        and not _traced(squared_gradient_momentum)
        and float(gradient_momentum) != float(squared_gradient_momentum)
    ):
        raise ValueError(
            f"gradient_momentum={gradient_momentum!r} differs from "
            f"squared_gradient_momentum={squared_gradient_momentum!r}; allowed: equal values "
            "(the paper uses 0.95 for both; rmsprop() has a single decay for both averages)."
        )
    _number("min_squared_gradient", min_squared_gradient, lambda v: v >= 0, "min_squared_gradient >= 0")
    return rmsprop(
        learning_rate,
        decay=squared_gradient_momentum,
        eps=min_squared_gradient,
        initial_scale=0.0,
        eps_in_sqrt=True,
        centered=True,
        momentum=None,
        accumulator_dtype=accumulator_dtype,
    )


def hinton_2012(
    learning_rate: ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 0.0,
    *,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""RMSProp as introduced in Hinton's *Neural Networks for Machine Learning*, lecture 6e (2012).

    .. code-block:: text

        MeanSquare(w, t) = 0.9 MeanSquare(w, t-1) + 0.1 (dE/dw(t))^2
        w <- w - learning_rate * dE/dw(t) / sqrt(MeanSquare(w, t) + eps)

    Source: G. Hinton, N. Srivastava, K. Swersky, lecture 6e, "rmsprop: Divide
    the gradient by a running average of its recent magnitude" (Coursera, 2012),
    slide "rmsprop". The slide gives the decay 0.9 and no epsilon, no learning
    rate and no initial value. Our reading: ``learning_rate`` is required (no
    default, as on the slide), ``eps`` defaults to 0 (exactly the slide) and,
    if set, goes inside the root (as in optax); MeanSquare starts at 0. With
    eps = 0 a zero gradient gives a zero step (never NaN), and every step is
    bounded by ``learning_rate / sqrt(1 - decay)``.

    Differs from the others: no eps by default, no momentum, not centered, no
    weight decay: the bare algorithm the others extend.

    Args:
      learning_rate: float or optax schedule; required.
      decay: in [0, 1); 0.9 on the slide.
      eps: added under the root, >= 0; 0 on the slide.
    """
    _lr("learning_rate", learning_rate)
    _number("decay", decay, lambda v: 0 <= v < 1, "0 <= decay < 1")
    _eps("eps", eps)
    return rmsprop(
        learning_rate,
        decay=decay,
        eps=eps,
        initial_scale=0.0,
        eps_in_sqrt=True,
        accumulator_dtype=accumulator_dtype,
    )


def bitsandbytes(
    lr: ScalarOrSchedule = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0,
    momentum: float = 0,
    centered: bool = False,
    optim_bits: int = 32,
    min_8bit_size: int = 4096,
) -> optax.GradientTransformationExtraArgs:
    r"""``bitsandbytes.optim.RMSprop`` (0.50.2): ``RMSprop8bit`` (``optim_bits=8``) and
    ``RMSprop32bit`` (``optim_bits=32``, the default), step for step.

    .. code-block:: text

        input: lr (gamma), alpha, eps, weight_decay (lambda), optim_bits, min_8bit_size
        init:  v_0 <- 0 (state1)
        for t = 1, 2, ...:
            g_t <- g_t + lambda * theta_{t-1}              (coupled, L2)
            v <- dequantize(state1)                        8-bit: codes + absmax per 256 elements
            v_t <- alpha * v + (1 - alpha) * g_t^2         float32
            theta_t <- theta_{t-1} - gamma * g_t / (sqrt(v_t) + eps)   <- eps OUTSIDE the root,
                                                              from the UNQUANTIZED v_t
            state1 <- quantize_blockwise(v_t)              8-bit: signed dynamic map, blocks of 256
                                                              over the flattened tensor

    8-bit state is used for tensors of at least ``min_8bit_size`` elements; smaller
    ones keep float32 (``RMSprop32bit``'s update). The stored codes and ``absmax``
    are bitsandbytes' ``state1`` / ``absmax1``: the quantizer is its CPU kernel's,
    code for code (:func:`rmsprop_jax.quantize_blockwise`), with the blocks laid over
    the flattened leaf (``Int8(layout="flat")``). Source:
    ``bitsandbytes/optim/rmsprop.py``, ``optim/optimizer.py`` (``Optimizer1State``) and
    ``backends/cpu/ops.py``; checked live against bitsandbytes 0.50.2 in
    ``tests/test_bitsandbytes.py`` (codes equal, parameters within 1e-4 of their motion).

    Where bitsandbytes departs from PyTorch's ``RMSprop`` with the same arguments,
    this preset does what bitsandbytes does:

    * ``momentum`` is accepted and **silently ignored** by bitsandbytes' RMSprop kernels:
      no buffer exists. Here it is ignored too, with a ``UserWarning`` when non-zero
      (``rmsprop_jax.rmsprop(..., momentum=m, lr_in_momentum=False,
      accumulator_dtype="int8")`` gives PyTorch's momentum with 8-bit buffers).
    * ``centered=True`` and ``alpha=0`` raise ``NotImplementedError``, as in
      bitsandbytes (``rmsprop_jax.rmsprop(..., centered=True, accumulator_dtype="int8")``
      is the centered variant with 8-bit state).
    * The state is float32 (or 8-bit) whatever the parameters' dtype.

    Args:
      lr: learning rate :math:`\gamma` (float or optax schedule).
      alpha: smoothing constant of the squared-gradient average, in (0, 1).
      eps: added to the root of the average, >= 0.
      weight_decay: L2 coefficient added to the gradient, >= 0.
      momentum: ignored (see above).
      centered: must be ``False`` (see above).
      optim_bits: 32 or 8.
      min_8bit_size: smallest tensor (elements) with 8-bit state.
    """
    if alpha == 0:
        raise NotImplementedError("RMSprop with alpha==0.0 is not supported! (as in bitsandbytes)")
    if centered:
        raise NotImplementedError(
            "Centered RMSprop is not supported! (bitsandbytes refuses centered=True; use "
            "rmsprop_jax.rmsprop(..., centered=True, accumulator_dtype='int8') for centered 8-bit RMSProp)"
        )
    _lr("lr", lr)
    _number("alpha", alpha, lambda v: 0 < v < 1, "0 < alpha < 1")
    _eps("eps", eps)
    _number("momentum", momentum, lambda v: 0 <= v < 1, "0 <= momentum < 1 (ignored, as in bitsandbytes)")
    if _traced(momentum) or float(momentum) != 0.0:
        warnings.warn(
            f"momentum={momentum!r} is ignored: bitsandbytes' RMSprop accepts momentum and applies none; "
            "this preset reproduces that. For momentum use rmsprop_jax.rmsprop(..., momentum=...).",
            UserWarning,
            stacklevel=2,
        )
    if optim_bits not in (8, 32) or isinstance(optim_bits, bool):
        raise ValueError(f"optim_bits={optim_bits!r} is invalid; allowed: 8 or 32.")
    _validate.integer("min_8bit_size", min_8bit_size, 0, None, "an integer >= 0")
    eight = optim_bits == 8
    return rmsprop(
        lr,
        decay=alpha,
        eps=eps,
        initial_scale=0.0,
        eps_in_sqrt=False,
        weight_decay=_weight_decay_or_none("weight_decay", weight_decay),
        decoupled_weight_decay=False,
        accumulator_dtype=Int8(block_size=256, min_size=min_8bit_size, layout="flat")
        if eight
        else jnp.float32,
    )
