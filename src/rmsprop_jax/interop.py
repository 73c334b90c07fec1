"""Move a run between frameworks mid-training: optimizer state to and from optax, PyTorch and Keras 3.

:func:`from_optax` and :func:`to_optax` translate the state of ``optax.rmsprop``
(any of its options, also inside ``optax.chain``, ``inject_hyperparams``,
``MultiSteps``) to and from the state of :func:`rmsprop_jax.rmsprop` with the
same hyperparameters; the continuation is bit for bit the same (see
:func:`from_optax`). The other four functions translate between this package's
:class:`~rmsprop_jax.RmsPropState` and

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
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax._codecs import reject_quantized
from rmsprop_jax._transform import RmsPropState

__all__ = ["from_keras", "from_optax", "from_pytorch", "to_keras", "to_optax", "to_pytorch"]


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
      TypeError: not a (built) Keras 3 RMSprop.
      ValueError: counts or shapes differ.
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
      TypeError: not a (built) Keras 3 RMSprop.
      ValueError: counts, shapes or layouts (centered, momentum) do not match.
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


# --------------------------------------------------------------------------- optax


def _optax_rms_types() -> tuple[type, ...]:
    """optax's four RMSProp preconditioner states (with/without count, plain/centered).

    The ``*WithCountState`` classes (``bias_correction=True``) are not re-exported at
    optax's top level; they are read from ``optax._src.transform`` where they exist.
    """
    from optax._src import transform as optax_transform

    names = (
        "ScaleByRmsState",
        "ScaleByRmsWithCountState",
        "ScaleByRStdDevState",
        "ScaleByRStdDevWithCountState",
    )
    return tuple(t for t in (getattr(optax_transform, n, None) for n in names) if isinstance(t, type))


def _is_optax_rms(node: Any) -> bool:
    """The state of ``optax.scale_by_rms`` or ``optax.scale_by_stddev``."""
    return isinstance(node, _optax_rms_types())


def _is_optax_rmsprop_chain(node: Any) -> bool:
    """The state of ``optax.rmsprop``: the 3-tuple of its ``optax.chain``.

    ``(scale_by_rms | scale_by_stddev, EmptyState | ScaleByScheduleState, EmptyState | TraceState)``
    -- the learning rate is ``optax.scale`` (no state) or ``optax.scale_by_schedule``
    (its own count), momentum is ``optax.trace`` or ``optax.identity``.
    """
    return (
        type(node) is tuple
        and len(node) == 3
        and _is_optax_rms(node[0])
        and isinstance(node[1], (optax.EmptyState, optax.ScaleByScheduleState))
        and isinstance(node[2], (optax.EmptyState, optax.TraceState))
    )


def _is_optax_node(node: Any) -> bool:
    return _is_optax_rmsprop_chain(node) or _is_optax_rms(node)


def _concrete_int(x: Any) -> int | None:
    return None if isinstance(x, jax.core.Tracer) else int(np.asarray(x))


def _from_optax_node(node: Any, path: str, params: Any) -> RmsPropState:
    """One optax RMSProp state (a chain 3-tuple or a bare preconditioner state) as an RmsPropState."""
    rms, schedule, trace = node if _is_optax_rmsprop_chain(node) else (node, None, None)
    counts = {}
    if "count" in rms._fields:
        counts["the preconditioner's count (bias_correction=True)"] = rms.count
    if isinstance(schedule, optax.ScaleByScheduleState):
        counts["the learning-rate schedule's count"] = schedule.count
    values = {what: _concrete_int(c) for what, c in counts.items()}
    if None not in values.values() and len(set(values.values())) > 1:
        raise ValueError(
            f"optax state at {path}: its step counts disagree ({values}); an RmsPropState has one count."
        )
    nu, mu = rms.nu, getattr(rms, "mu", None)
    tr = trace.trace if isinstance(trace, optax.TraceState) else None
    if params is not None:
        want = jax.tree.structure(params)
        for what, tree in (("nu", nu), ("mu", mu), ("trace", tr)):
            if tree is None:
                continue
            got: Any = jax.tree.structure(tree)  # PyTreeDef is opaque to mypy
            if got != want:
                raise ValueError(
                    f"optax state at {path}: {what} has tree structure {got} but params has {want}."
                )
            for (kp, a), p in zip(
                jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(params), strict=True
            ):
                if np.shape(a) != np.shape(p):
                    raise ValueError(
                        f"optax state at {path}: {what}{jax.tree_util.keystr(kp)} has shape {np.shape(a)} "
                        f"but its parameter has shape {np.shape(p)}."
                    )
    # Where optax keeps no count (constant learning rate, no bias correction) none is needed:
    # such a configuration never reads it. 0 then stands for "not recorded".
    count = next(iter(counts.values())) if counts else 0
    return RmsPropState(count=jnp.asarray(count, jnp.int32), nu=nu, mu=mu, trace=tr)


def from_optax(optax_state: Any, params: Any = None) -> Any:
    """The state of an ``optax.rmsprop`` run as the state of :func:`rmsprop_jax.rmsprop`.

    Every optax RMSProp state found in ``optax_state`` is replaced by the
    :class:`~rmsprop_jax.RmsPropState` that ``rmsprop_jax`` would hold at the same
    step; everything around it (``optax.chain`` tuples, ``inject_hyperparams``'s
    count and hyperparameters, ``MultiSteps``'s accumulated gradients, ``masked``,
    ``multi_transform`` ...) is kept as it is. So the result has exactly the
    structure of the same optimizer built with ``rmsprop_jax``:

    * ``optax.rmsprop(...)`` -> ``rmsprop_jax.rmsprop(...)`` (an ``RmsPropState``);
    * ``optax.chain(a, optax.rmsprop(...), b)`` -> ``optax.chain(a, rmsprop_jax.rmsprop(...), b)``;
    * ``optax.inject_hyperparams(optax.rmsprop)(...)`` ->
      ``optax.inject_hyperparams(rmsprop_jax.rmsprop)(...)``;
    * ``optax.MultiSteps(optax.rmsprop(...), k)`` -> ``optax.MultiSteps(rmsprop_jax.rmsprop(...), k)``;
    * ``optax.scale_by_rms(...)`` / ``optax.scale_by_stddev(...)`` ->
      ``rmsprop_jax.scale_by_rms(...)`` / ``rmsprop_jax.scale_by_rms(..., centered=True)``.

    Swap the import, keep the hyperparameters, and the run continues bit for bit
    (``tests/test_interop_optax.py``; under ``optax.masked`` / ``multi_transform``,
    and for ``centered`` with ``bias_correction`` under ``MultiSteps``, the two
    libraries' compiled kernels differ by float32 round-off even without a
    conversion, so there the continuation agrees to round-off). The layouts read, for every option of
    ``optax.rmsprop`` (optax 0.2.x): the chain ``(P, L, M)`` with

    * ``P``: ``ScaleByRmsState(nu)``; ``ScaleByRStdDevState(mu, nu)`` (``centered``);
      ``ScaleByRmsWithCountState(count, nu)`` / ``ScaleByRStdDevWithCountState(count, mu, nu)``
      (``bias_correction=True``);
    * ``L``: ``EmptyState`` (constant learning rate) or ``ScaleByScheduleState(count)`` (a schedule);
    * ``M``: ``EmptyState`` (``momentum=None``) or ``TraceState(trace)`` (``nesterov`` or not).

    ``nu``, ``mu`` and ``trace`` are taken as they are: optax's momentum buffer
    already holds the learning-rate-scaled update that is added, as this
    package's does with ``lr_in_momentum=True``. ``count`` is the preconditioner's
    count or the schedule's (they must agree); where optax records none
    (constant learning rate and no bias correction) nothing reads it and it is 0.
    ``eps``, ``eps_in_sqrt``, ``initial_scale`` and ``nesterov`` leave no trace in
    the state: continue with the same values.

    A 3-tuple of exactly this shape is read as ``optax.rmsprop``'s chain even when
    it was written out by hand (``optax.chain(optax.scale_by_rms(), optax.scale(-lr),
    optax.trace(m))`` computes the same thing). Orbax checkpoints: restore them onto
    the optax optimizer's abstract state (``jax.eval_shape(optax_tx.init, params)``)
    so that the NamedTuple types come back, then convert.

    Args:
      optax_state: the optimizer state as optax returns it (or a restored copy).
      params: optional; when given, the accumulators of every RMSProp state found
        must have its tree structure and shapes (a check only; leave it out for
        ``optax.masked`` / ``multi_transform`` states, whose trees are partial).

    Returns:
      ``optax_state`` with its optax RMSProp states replaced by ``RmsPropState``\\ s.

    Raises:
      ValueError: no optax RMSProp state is found, its counts disagree, or its
        trees do not match ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, rmsprop_jax
      >>> params = {"w": jnp.ones(2)}
      >>> optax_state = optax.rmsprop(0.1, momentum=0.9).init(params)
      >>> state = rmsprop_jax.interop.from_optax(optax_state, params)
      >>> type(state).__name__, state.trace is not None
      ('RmsPropState', True)
    """
    found: list[str] = []

    def convert(path: Any, node: Any) -> Any:
        if not _is_optax_node(node):
            return node
        name = jax.tree_util.keystr(path) or "<root>"
        found.append(name)
        return _from_optax_node(node, name, params)

    out = jax.tree_util.tree_map_with_path(convert, optax_state, is_leaf=_is_optax_node)
    if not found:
        raise ValueError(
            f"no optax RMSProp state found in the {type(optax_state).__name__} given: expected the state of "
            "optax.rmsprop (a tuple (ScaleByRmsState | ScaleByRStdDevState [WithCount], EmptyState | "
            "ScaleByScheduleState, EmptyState | TraceState)) or of optax.scale_by_rms / scale_by_stddev, "
            "possibly inside optax.chain, inject_hyperparams, MultiSteps. A state restored without a "
            "target (plain dicts/lists) must be restored onto the optax optimizer's abstract state first."
        )
    return out


def _check_leaves(what: str, got: Any, want: Any) -> None:
    """``got`` must have ``want``'s tree structure, shapes and dtypes (``want`` may be abstract)."""
    got_def: Any = jax.tree.structure(got)  # PyTreeDef is opaque to mypy
    want_def = jax.tree.structure(want)
    if got_def != want_def:
        raise ValueError(f"{what}: the state has tree structure {got_def}, the optax template {want_def}.")
    for (kp, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True):
        g_sd = (np.shape(g), jnp.result_type(g))
        w_sd = (np.shape(w), jnp.result_type(w))
        if g_sd != w_sd:
            raise ValueError(
                f"{what}{jax.tree_util.keystr(kp)}: the state has shape {g_sd[0]} and dtype {g_sd[1]}, "
                f"the optax template shape {w_sd[0]} and dtype {w_sd[1]}."
            )


def _to_optax_node(state: Any, template: Any, path: str) -> Any:
    if not isinstance(state, RmsPropState):
        raise ValueError(
            f"at {path} the optax template holds an RMSProp state but the state holds a "
            f"{type(state).__name__}: the two optimizers are not built alike."
        )
    chain = _is_optax_rmsprop_chain(template)
    rms, schedule, trace = template if chain else (template, None, None)
    centered = "mu" in rms._fields
    momentum = isinstance(trace, optax.TraceState)
    if centered != (state.mu is not None):
        raise ValueError(
            f"centered mismatch at {path}: the optax template {'is' if centered else 'is not'} centered "
            f"({type(rms).__name__}), the state {'has' if state.mu is not None else 'has no'} mu."
        )
    if momentum != (state.trace is not None):
        raise ValueError(
            f"momentum mismatch at {path}: the optax template has "
            f"{'a' if momentum else 'no'} momentum trace"
            f"{'' if chain else ' (optax.scale_by_rms has none)'}, the state "
            f"{'has' if state.trace is not None else 'has no'} trace."
        )
    _check_leaves(f"{path} nu", state.nu, rms.nu)
    if centered:
        _check_leaves(f"{path} mu", state.mu, rms.mu)
    if isinstance(trace, optax.TraceState):
        _check_leaves(f"{path} trace", state.trace, trace.trace)

    def count_like(c: Any) -> jax.Array:
        return jnp.asarray(state.count, jnp.result_type(c))

    fields = {f: getattr(state, f) for f in rms._fields if f != "count"}
    if "count" in rms._fields:
        fields["count"] = count_like(rms.count)
    new_rms = type(rms)(**fields)
    if not chain:
        return new_rms
    new_schedule = (
        optax.ScaleByScheduleState(count=count_like(schedule.count))
        if isinstance(schedule, optax.ScaleByScheduleState)
        else schedule
    )
    new_trace = optax.TraceState(trace=state.trace) if state.trace is not None else trace
    return (new_rms, new_schedule, new_trace)


def to_optax(state: Any, optax_template_state: Any) -> Any:
    """The inverse of :func:`from_optax`: this package's state as the state of ``optax.rmsprop``.

    Args:
      state: the state of an optimizer built with ``rmsprop_jax`` (an
        :class:`~rmsprop_jax.RmsPropState`, or one inside the same wrappers as the
        template: ``optax.chain``, ``inject_hyperparams``, ``MultiSteps`` ...).
      optax_template_state: the state of the optax optimizer to continue with,
        e.g. ``optax_tx.init(params)`` or ``jax.eval_shape(optax_tx.init, params)``.
        Only its structure, types, shapes and dtypes are used: it says which
        layout each RMSProp state takes (centered or not, with the count of bias
        correction or not, a schedule's count or not, a momentum trace or not;
        see :func:`from_optax` for the list).

    Returns:
      A state of the template's structure and types, holding ``state``'s values:
      ``nu``, ``mu`` and ``trace`` as they are, ``count`` in every count field of
      an RMSProp state (the preconditioner's and the schedule's); everything
      outside the RMSProp states (a wrapper's count, hyperparameters, accumulated
      gradients) is taken from ``state``.

    Raises:
      ValueError: the two do not match: the tree around the RMSProp states
        differs, or an RMSProp state differs in layout (centered, momentum),
        tree structure, shape or dtype. The message names the place.

    Example:
      >>> import jax.numpy as jnp, optax, rmsprop_jax
      >>> params = {"w": jnp.ones(2)}
      >>> state = rmsprop_jax.rmsprop(0.1, centered=True).init(params)
      >>> optax_state = rmsprop_jax.interop.to_optax(state, optax.rmsprop(0.1, centered=True).init(params))
      >>> type(optax_state[0]).__name__
      'ScaleByRStdDevState'
    """
    is_ours = lambda x: isinstance(x, RmsPropState)
    t_paths, t_def = jax.tree_util.tree_flatten_with_path(optax_template_state, is_leaf=_is_optax_node)
    s_leaves, s_def = jax.tree_util.tree_flatten(state, is_leaf=lambda x: is_ours(x) or _is_optax_node(x))
    t_def, s_def = cast(Any, t_def), cast(Any, s_def)  # jaxlib ships no stubs: PyTreeDef is opaque
    if t_def != s_def:
        raise ValueError(
            "the state and the optax template differ around their RMSProp states (each shown as *):\n"
            f"  state:    {s_def}\n  template: {t_def}"
        )
    out = []
    for (kp, t), s in zip(t_paths, s_leaves, strict=True):
        name = jax.tree_util.keystr(kp) or "<root>"
        if _is_optax_node(t):
            out.append(_to_optax_node(s, t, name))
        elif is_ours(s):
            raise ValueError(f"at {name} the state holds an RmsPropState but the optax template does not.")
        else:
            _check_leaves(name, s, t)
            out.append(s)
    return t_def.unflatten(out)
