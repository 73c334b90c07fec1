"""Move a run between frameworks mid-training: optimizer state to and from PyTorch and Keras 3.

The four functions translate between this package's :class:`~rmsprop_jax.RmsPropState`
and

* a ``torch.optim.RMSprop`` ``state_dict()`` (keys ``square_avg``, ``grad_avg``,
  ``momentum_buffer``, ``step``), for :func:`rmsprop_jax.presets.pytorch`;
* a built Keras 3 ``keras.optimizers.RMSprop`` (its ``velocity``,
  ``average_gradient`` and ``momentum`` variables and ``iterations``), for
  :func:`rmsprop_jax.presets.keras`.

Continue with the preset of the same hyperparameters and the run goes on exactly
as it would have in the source framework (``tests/test_interop.py`` checks this).

Leaves are matched by position: the leaves of ``params`` (in
``jax.tree.leaves`` order) correspond to PyTorch's parameter ids in
``param_groups`` order, or to the variables the Keras optimizer was built with,
in order. Shapes must agree leaf for leaf; a layout difference between
frameworks (PyTorch ``Linear`` weights are ``(out, in)``, Flax ``Dense`` kernels
``(in, out)``) must be transposed by the caller, on the state as on the weights.

Neither torch nor keras is imported at import time: the ``from_*`` functions
accept anything ``numpy.asarray`` understands (tensors are detached and moved to
the CPU); only :func:`to_pytorch` imports torch, to build tensors.
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rmsprop_jax._state_codec import reject_quantized
from rmsprop_jax._transform import RmsPropState

__all__ = ["from_keras", "from_pytorch", "to_keras", "to_pytorch"]


def _numpy(x: Any) -> np.ndarray:
    """A torch tensor, keras/jax array or array-like as a NumPy array (no torch import needed)."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu()
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        try:
            x = x.numpy()
        except (TypeError, RuntimeError):
            pass
    return np.asarray(x)


def _leaves(params: Any) -> tuple[list[tuple[str, Any]], Any]:
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    named = [(jax.tree_util.keystr(p) or "<root>", leaf) for p, leaf in paths_leaves]
    for name, leaf in named:
        dtype = jnp.dtype(leaf.dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"params leaf {name} has dtype {dtype}; state conversion supports real floating "
                "parameters only (PyTorch stores complex RMSprop state as real views)."
            )
    return named, treedef


def _as_leaf(value: Any, leaf: Any, what: str, name: str) -> jax.Array:
    arr = _numpy(value)
    if tuple(arr.shape) != tuple(np.shape(leaf)):
        raise ValueError(
            f"{what} for params leaf {name} has shape {tuple(arr.shape)}, but the leaf has shape "
            f"{tuple(np.shape(leaf))}. Leaves are matched by position; transpose layouts that differ "
            "between frameworks (e.g. torch Linear (out, in) vs flax Dense (in, out)) first."
        )
    # Copy: on CPU, jnp.asarray may alias the buffer, which torch keeps updating in place.
    return jnp.array(np.array(arr, copy=True), dtype=leaf.dtype, copy=True)


# --------------------------------------------------------------------------- PyTorch


def _torch_groups(state_dict: Any, n: int) -> tuple[list[Any], bool, bool]:
    """Parameter ids in order, and the (single) centered / momentum setting of the groups."""
    if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
        raise ValueError(
            "state_dict must be torch.optim.RMSprop.state_dict(): a dict with 'state' and 'param_groups', "
            f"got {type(state_dict).__name__}"
            + (f" with keys {sorted(state_dict)}." if isinstance(state_dict, dict) else ".")
        )
    groups = state_dict["param_groups"]
    ids = [pid for g in groups for pid in g["params"]]
    if len(ids) != n:
        raise ValueError(
            f"the PyTorch optimizer has {len(ids)} parameters (over {len(groups)} param_groups) "
            f"but params has {n} leaves; they are matched by position and must be as many."
        )
    centered = {bool(g.get("centered", False)) for g in groups}
    momentum = {float(g.get("momentum", 0)) > 0 for g in groups}
    if len(centered) > 1 or len(momentum) > 1:
        raise ValueError(
            "param_groups disagree on 'centered' or on whether momentum > 0; an RmsPropState has one "
            "layout for all leaves: convert each group separately."
        )
    return ids, centered.pop() if centered else False, momentum.pop() if momentum else False


def from_pytorch(state_dict: dict[str, Any], params: Any) -> RmsPropState:
    """``torch.optim.RMSprop(...).state_dict()`` as the state of :func:`presets.pytorch`.

    Args:
      state_dict: the PyTorch optimizer's ``state_dict()``. Parameters without
        state (never stepped) get zero accumulators.
      params: the parameters of the JAX model (a pytree whose leaves correspond,
        in order, to the PyTorch optimizer's parameters).

    Returns:
      An :class:`RmsPropState` with ``count = step``, ``nu = square_avg``,
      ``mu = grad_avg`` (``centered``) and ``trace = momentum_buffer``
      (``momentum > 0``), in the parameters' dtypes: the state of
      ``presets.pytorch(...)`` with the same ``centered`` and ``momentum``.

    Raises:
      ValueError: the number of parameters, a shape, the parameters' steps, or
        the groups' layouts do not match.
    """
    named, treedef = _leaves(params)
    ids, centered, momentum = _torch_groups(state_dict, len(named))
    nus, mus, traces, steps = [], [], [], set()
    for pid, (name, leaf) in zip(ids, named, strict=True):
        entry = state_dict["state"].get(pid, {})
        for key in (
            "square_avg",
            *(["grad_avg"] if centered else []),
            *(["momentum_buffer"] if momentum else []),
        ):
            if entry and key not in entry:
                raise ValueError(f"PyTorch state of parameter {pid} (leaf {name}) lacks {key!r}.")
        zeros = np.zeros(np.shape(leaf))
        nus.append(_as_leaf(entry.get("square_avg", zeros), leaf, "square_avg", name))
        if centered:
            mus.append(_as_leaf(entry.get("grad_avg", zeros), leaf, "grad_avg", name))
        if momentum:
            traces.append(_as_leaf(entry.get("momentum_buffer", zeros), leaf, "momentum_buffer", name))
        if entry:
            steps.add(int(_numpy(entry["step"]).item()))
    if len(steps) > 1:
        raise ValueError(
            f"the PyTorch parameters have taken different numbers of steps {sorted(steps)}; an "
            "RmsPropState has one step count."
        )
    return RmsPropState(
        count=jnp.asarray(steps.pop() if steps else 0, jnp.int32),
        nu=treedef.unflatten(nus),
        mu=treedef.unflatten(mus) if centered else None,
        trace=treedef.unflatten(traces) if momentum else None,
    )


def to_pytorch(state: RmsPropState, state_dict: dict[str, Any]) -> dict[str, Any]:
    """This package's state as a ``torch.optim.RMSprop`` ``state_dict``, ready for ``load_state_dict``.

    Args:
      state: the state of ``presets.pytorch(...)``.
      state_dict: the target optimizer's current ``state_dict()`` (it provides
        the parameter ids and hyperparameters; its ``state`` is replaced).

    Returns:
      A new state dict (the argument is not modified) whose ``state`` holds
      ``step``, ``square_avg`` and, as the groups require, ``grad_avg`` and
      ``momentum_buffer``, as CPU tensors.

    Raises:
      ValueError: counts, shapes or layouts (centered, momentum) do not match.
    """
    import torch  # the only function here that needs it

    reject_quantized(state, "to_pytorch")
    nus = jax.tree.leaves(state.nu)
    ids, centered, momentum = _torch_groups(state_dict, len(nus))
    if centered and state.mu is None:
        raise ValueError("the PyTorch optimizer is centered but the state has no mu (centered=False).")
    if momentum and state.trace is None:
        raise ValueError("the PyTorch optimizer has momentum > 0 but the state has no momentum trace.")
    if not momentum and state.trace is not None:
        raise ValueError("the state has a momentum trace but the PyTorch optimizer has momentum=0.")
    if not centered and state.mu is not None:
        raise ValueError("the state is centered (has mu) but the PyTorch optimizer is not.")
    mus = jax.tree.leaves(state.mu) if centered else [None] * len(nus)
    traces = jax.tree.leaves(state.trace) if momentum else [None] * len(nus)
    scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    step = torch.tensor(float(np.asarray(state.count)), dtype=scalar_dtype)

    def tensor(x: Any) -> Any:
        return torch.from_numpy(np.array(x))

    new_state = {}
    for pid, nu, mu, tr in zip(ids, nus, mus, traces, strict=True):
        entry = {"step": step.clone(), "square_avg": tensor(nu)}
        if centered:
            entry["grad_avg"] = tensor(mu)
        if momentum:
            entry["momentum_buffer"] = tensor(tr)
        new_state[pid] = entry
    return {"state": new_state, "param_groups": copy.deepcopy(state_dict["param_groups"])}


# --------------------------------------------------------------------------- Keras 3


def _keras_slots(optimizer: Any, n: int) -> tuple[list[Any], list[Any], list[Any]]:
    if not hasattr(optimizer, "_velocities") or not hasattr(optimizer, "iterations"):
        raise TypeError(
            f"expected a Keras 3 keras.optimizers.RMSprop, got {type(optimizer).__name__}; "
            "if it is one, build it first: optimizer.build(model.trainable_variables)."
        )
    velocities = list(optimizer._velocities)
    if len(velocities) != n:
        raise ValueError(
            f"the Keras optimizer was built with {len(velocities)} variables but params has {n} leaves; "
            "they are matched by position and must be as many."
        )
    if any(v is None for v in velocities):
        raise ValueError("the Keras optimizer has variables without state (overwrite_with_gradient).")
    return velocities, list(optimizer._average_gradients), list(optimizer._momentums)


def from_keras(optimizer: Any, params: Any) -> RmsPropState:
    """A built Keras 3 ``keras.optimizers.RMSprop``'s variables as the state of :func:`presets.keras`.

    Args:
      optimizer: the Keras optimizer, built (it has taken a step, or
        ``optimizer.build(variables)`` was called).
      params: the JAX parameters; their leaves correspond, in order, to the
        variables the optimizer was built with.

    Returns:
      An :class:`RmsPropState` with ``count = iterations``, ``nu = velocity``,
      ``mu = average_gradient`` (``centered``) and ``trace = -momentum``
      (``momentum > 0``; Keras's buffer holds the lr-scaled step that is
      *subtracted*, this package's holds the update that is *added*).

    Raises:
      TypeError: not a (built) Keras 3 RMSprop. ValueError: counts or shapes differ.
    """
    named, treedef = _leaves(params)
    velocities, averages, momentums = _keras_slots(optimizer, len(named))
    nu = [
        _as_leaf(v.numpy(), leaf, "velocity", name) for v, (name, leaf) in zip(velocities, named, strict=True)
    ]
    mu = [
        _as_leaf(v.numpy(), leaf, "average_gradient", name)
        for v, (name, leaf) in zip(averages, named, strict=False)
    ]
    tr = [
        -_as_leaf(v.numpy(), leaf, "momentum", name)
        for v, (name, leaf) in zip(momentums, named, strict=False)
    ]
    return RmsPropState(
        count=jnp.asarray(int(_numpy(optimizer.iterations.numpy()).item()), jnp.int32),
        nu=treedef.unflatten(nu),
        mu=treedef.unflatten(mu) if averages else None,
        trace=treedef.unflatten(tr) if momentums else None,
    )


def to_keras(state: RmsPropState, optimizer: Any) -> None:
    """Assign this package's state to a built Keras 3 ``keras.optimizers.RMSprop``, in place.

    Args:
      state: the state of ``presets.keras(...)`` with the same ``centered`` and
        ``momentum`` as the optimizer.
      optimizer: the Keras optimizer, built with the model's variables.

    Raises:
      TypeError: not a (built) Keras 3 RMSprop. ValueError: counts, shapes or
      layouts (centered, momentum) do not match.
    """
    reject_quantized(state, "to_keras")
    nus = jax.tree.leaves(state.nu)
    velocities, averages, momentums = _keras_slots(optimizer, len(nus))
    if bool(averages) != (state.mu is not None):
        raise ValueError(
            f"centered mismatch: the Keras optimizer is {'' if averages else 'not '}centered, the state "
            f"{'has' if state.mu is not None else 'has no'} mu."
        )
    if bool(momentums) != (state.trace is not None):
        raise ValueError(
            f"momentum mismatch: the Keras optimizer has {'a' if momentums else 'no'} momentum buffer, the "
            f"state {'has' if state.trace is not None else 'has no'} trace."
        )
    pairs = [(velocities, nus, 1.0, "velocity")]
    if averages:
        pairs.append((averages, jax.tree.leaves(state.mu), 1.0, "average_gradient"))
    if momentums:
        pairs.append((momentums, jax.tree.leaves(state.trace), -1.0, "momentum"))
    for variables, values, _, what in pairs:
        for i, (var, val) in enumerate(zip(variables, values, strict=True)):
            if tuple(var.shape) != tuple(np.shape(val)):
                raise ValueError(
                    f"{what} variable {i} has shape {tuple(var.shape)} but the state leaf has shape "
                    f"{tuple(np.shape(val))}."
                )
    for variables, values, sign, _ in pairs:
        for var, val in zip(variables, values, strict=True):
            var.assign(np.asarray(sign * np.asarray(val), dtype=np.dtype(var.dtype)))
    optimizer.iterations.assign(int(np.asarray(state.count)))
