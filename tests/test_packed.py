"""``packed=True`` (one flat accumulator buffer per leaf group) gives the default's numbers.

Every option combination of ``tests/test_optax_dropin.py`` (``OPTIONS``) and of
``tests/test_reference.py`` (``EXTRAS``: weight decay coupled/decoupled, constant or
scheduled, masked or not; lr placement; maximize) runs packed and per-leaf side by side
in one jit for a few steps; updates and accumulators must be equal bit for bit. Then the
layout's own concerns: mixed and complex dtypes, every mask form, optax wrappers,
Orbax, abstract init, eager == jit, errors.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from _common import gradient_oracle, make_params
from _procs import cpu_process_env
from rmsprop_jax._packed import PackedTree
from test_optax_dropin import OPTIONS, SCHEDULE
from test_reference import EXTRAS, _jax_sched, _mask, wd_schedule

OPTAX_BF16 = rmsprop_jax.Float(rounding="optax")  # round to nearest, optax's arithmetic

STEPS = 2


def _trees(dtype=jnp.float32, seed=0):
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), make_params(seed=seed))
    grads = [jax.tree.map(lambda x: jnp.asarray(x, dtype), g) for g in gradient_oracle(params, STEPS)]
    return params, grads


def _run_pairs(pairs, params, grads, jit=True):
    """Each (per-leaf, packed) pair from the same params on the same gradients, all in one jit.

    Returns, per pair and step, ``((updates, state), (updates, state))``. One jit for many
    pairs keeps the fixed cost of a compile per option combination out of CI.
    """

    def run(p, gs):
        outs = []
        for ours, packed in pairs:
            s1, s2 = ours.init(p), packed.init(p)
            p1 = p2 = p
            out = []
            for g in gs:
                u1, s1 = ours.update(g, s1, p1)
                u2, s2 = packed.update(g, s2, p2)
                p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
                out.append(((u1, s1), (u2, s2)))
            outs.append(out)
        return outs

    return (jax.jit(run) if jit else run)(params, grads)


def _run_pair(ours, packed, params, grads, jit=True):
    return _run_pairs([(ours, packed)], params, grads, jit)[0]


def _unpacked(state):
    """The state with every PackedTree replaced by its per-parameter tree."""
    return jax.tree.map(
        lambda x: x.unpack() if isinstance(x, PackedTree) else x,
        state,
        is_leaf=lambda x: isinstance(x, PackedTree),
    )


BITWISE: list[bool] = []  # per comparison: bit-identical or only within round-off (for the record)


def _assert_same(a, b, exact=True, ulps=8.0):
    """Equal bit for bit, or (``exact=False``) within ``ulps`` ulp of max(1, the leaf's largest value)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        x, y = np.asarray(x), np.asarray(y)
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            BITWISE.append(bool(np.array_equal(x, y)))
            eps = float(jnp.finfo(x.dtype).eps) if jnp.issubdtype(x.dtype, jnp.inexact) else 0.0
            # norm-wise per leaf, floored at 1 (the size of the gradients): a 0-d mu that cancels
            # to ~0.003 carries the absolute round-off of the O(1) terms it came from
            scale = max(1.0, float(np.max(np.abs(y.astype(np.complex128)), initial=0.0)))
            np.testing.assert_allclose(
                x.astype(np.complex128), y.astype(np.complex128), rtol=0, atol=ulps * eps * scale
            )


def _assert_pair_equal(out, ulps=8.0):
    """Packed vs per-leaf, every step: updates and (unpacked) state.

    The same rms_leaf ops run on a flat buffer instead of per leaf; XLA:CPU may take a
    vector path for an element in one and a scalar path in the other (rsqrt, FMA
    contraction), so a value can differ in the last bit: the allowance is a few ulp.
    """
    for (u1, s1), (u2, s2) in out:
        assert isinstance(s2.nu, PackedTree)
        _assert_same(u2, u1, exact=False, ulps=ulps)
        _assert_same(_unpacked(s2), s1, exact=False, ulps=ulps)


def _check_all(kwargs_list, make=rmsprop_jax.rmsprop):
    params, grads = _trees()
    outs = _run_pairs([(make(**kw), make(**kw, packed=True)) for kw in kwargs_list], params, grads)
    for kw, out in zip(kwargs_list, outs, strict=True):
        # Centered + bias correction from nu_0 = 0: at step 1 the variance nu^ - mu^2 is exactly
        # 0 and both sides hold rounding noise (~1e-7 g^2); 1/sqrt(v + eps), and even more
        # 1/(sqrt(v) + eps), amplify it: the update is ill-conditioned (test_reference.py has the
        # same degenerate case), so only the moments are compared tightly there.
        degenerate = kw.get("centered") and kw.get("bias_correction") and not kw.get("initial_scale")
        try:
            if degenerate:  # the moments are well-conditioned: tight; the update (and trace) is not
                for (u1, s1), (u2, s2) in out:
                    _assert_same(s2.nu.unpack(), s1.nu, exact=False)
                    _assert_same(s2.mu.unpack(), s1.mu, exact=False)
                    _assert_same(u2, u1, exact=False, ulps=3e6)  # 0.3 x the leaf's scale
            else:
                _assert_pair_equal(out)
        except AssertionError as e:
            raise AssertionError(f"packed != default for {kw}: {e}") from None


def _check(**kw):
    _check_all([kw])


def _chunks(items, n):
    return [items[i : i + n] for i in range(0, len(items), n)]


def _optax_kwargs(centered, mom, eps_in_sqrt, bias_correction, initial_scale, lr):
    momentum, nesterov = mom
    return dict(
        # the degenerate combination (see _check_all) needs an eps that bounds 1/sqrt(v + eps)
        eps=1e-3 if centered and bias_correction and not initial_scale else 1e-8,
        learning_rate=0.01 if lr == "const" else SCHEDULE,
        initial_scale=initial_scale,
        eps_in_sqrt=eps_in_sqrt,
        centered=centered,
        momentum=momentum,
        nesterov=nesterov,
        bias_correction=bias_correction,
    )


def _extra_kwargs(centered, momentum, nesterov, wd, decoupled, masked, lr_in_momentum, maximize):
    return dict(
        learning_rate=SCHEDULE,
        eps=1e-3,
        centered=centered,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=_jax_sched(wd_schedule) if wd == "sched" else wd,
        decoupled_weight_decay=decoupled,
        weight_decay_mask=_mask if masked else None,
        lr_in_momentum=lr_in_momentum,
        maximize=maximize,
    )


OPTION_CHUNKS = _chunks([_optax_kwargs(*o) for o in OPTIONS], 16)
EXTRA_CHUNKS = _chunks([_extra_kwargs(*o) for o in EXTRAS], 12)


@pytest.mark.parametrize("chunk", range(len(OPTION_CHUNKS)))
def test_packed_equals_default_on_every_optax_option(chunk):
    """All of test_optax_dropin.OPTIONS, 16 combinations per jit."""
    _check_all(OPTION_CHUNKS[chunk])


@pytest.mark.parametrize("chunk", range(len(EXTRA_CHUNKS)))
def test_packed_equals_default_on_every_extra_option(chunk):
    """All of test_reference.EXTRAS (weight decay, masks, lr placement, maximize), 12 per jit."""
    _check_all(EXTRA_CHUNKS[chunk])


def test_packed_scale_by_rms_equals_default_on_every_option():
    _check_all(
        [
            dict(decay=0.8, eps=1e-6, initial_scale=i, eps_in_sqrt=e, centered=c, bias_correction=b)
            for c, (e, b, i) in itertools.product([False, True], [(True, False, 0.0), (False, True, 0.3)])
        ],
        make=rmsprop_jax.scale_by_rms,
    )


def test_the_comparison_is_strict_enough():
    """The round-off allowance is far below a real difference: lr 0.01 vs 0.0101 fails it."""
    params, grads = _trees()
    (out,) = _run_pairs(
        [(rmsprop_jax.rmsprop(0.01), rmsprop_jax.rmsprop(0.0101, packed=True))], params, grads
    )
    with pytest.raises(AssertionError):
        _assert_pair_equal(out)


# --------------------------------------------------------------------------- dtypes and masks


def _mixed():
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(6,)), jnp.float32),
        "e": jnp.asarray(rng.normal(size=(5, 3)), jnp.bfloat16),
        "z": jnp.asarray(rng.normal(size=(3, 2)) + 1j * rng.normal(size=(3, 2)), jnp.complex64),
        "s": jnp.float32(0.7),
        "h": jnp.asarray(rng.normal(size=(7,)), jnp.float16),
    }
    grads = []
    for t in range(STEPS):
        r = np.random.default_rng(10 + t)
        grads.append(
            {
                k: jnp.asarray(
                    r.normal(size=np.shape(v))
                    + (1j * r.normal(size=np.shape(v)) if v.dtype == jnp.complex64 else 0),
                    v.dtype,
                )
                for k, v in params.items()
            }
        )
    return params, grads


@pytest.mark.parametrize("accumulator_dtype", [None, jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(
            centered=True,
            momentum=0.9,
            nesterov=True,
            weight_decay=0.01,
            weight_decay_mask=lambda p: {**{k: True for k in p}, "b": False, "s": False},
        ),
        dict(momentum=0.5, lr_in_momentum=False, weight_decay=0.01, decoupled_weight_decay=True),
    ],
    ids=["plain", "centered_nesterov_masked_wd", "torch_decoupled"],
)
def test_mixed_and_complex_dtypes(accumulator_dtype, kw):
    params, grads = _mixed()
    # Packed buffers are plain: low-precision accumulators round to nearest (optax's arithmetic).
    fmt = rmsprop_jax.Float(accumulator_dtype, rounding="optax")
    opt = rmsprop_jax.rmsprop(0.01, accumulator_dtype=fmt, **kw)
    packed = rmsprop_jax.rmsprop(0.01, accumulator_dtype=fmt, packed=True, **kw)
    out = _run_pair(opt, packed, params, grads)
    _assert_pair_equal(out)
    groups = {g.name for g in out[0][1][1].nu.layout.groups}
    assert len(groups) >= (2 if accumulator_dtype is not None else 4), groups


def _tree_mask(p):
    return {"dense": {"w": True, "b": False}, "layers": [True, (False, True)]}


@pytest.mark.parametrize(
    "mask",
    [
        _tree_mask,  # callable returning a full pytree of bools
        _tree_mask(None),  # the pytree itself
        {"dense": False, "layers": True},  # a prefix of the params tree
        lambda p: jax.tree.map(lambda x: jnp.asarray(x) > 0, p),  # per-element boolean arrays
        lambda p: {"dense": {"w": jnp.bool_(True), "b": jnp.bool_(False)}, "layers": True},  # 0-d arrays
    ],
    ids=["callable", "pytree", "prefix", "elementwise_arrays", "scalar_arrays"],
)
@pytest.mark.parametrize("decoupled", [False, True])
def test_weight_decay_masks(mask, decoupled):
    _check(
        learning_rate=0.01,
        momentum=0.9,
        weight_decay=0.1,
        decoupled_weight_decay=decoupled,
        weight_decay_mask=mask,
    )


def test_mask_that_changes_after_init_is_applied_per_element():
    """The layout groups leaves by the mask seen at init; a different mask later still applies exactly."""
    calls = []

    def mask(p):
        calls.append(1)
        first = len(calls) == 1
        return {"dense": {"w": first, "b": not first}, "layers": [True, (first, True)]}

    params, grads = _trees()
    opt = rmsprop_jax.rmsprop(0.01, weight_decay=0.1, weight_decay_mask=mask, packed=True)
    state = opt.init(params)  # layout from the first mask
    later = {"dense": {"w": False, "b": True}, "layers": [True, (False, True)]}
    ref = rmsprop_jax.rmsprop(0.01, weight_decay=0.1, weight_decay_mask=later)
    u, state = opt.update(grads[0], state, params)
    u_ref, _ = ref.update(grads[0], ref.init(params), params)
    _assert_same(u, u_ref, exact=False)


# --------------------------------------------------------------------------- state, wrappers


def test_state_nu_is_a_packed_tree_with_one_buffer_per_group():
    params, _ = _trees()
    opt = rmsprop_jax.rmsprop(0.01, centered=True, momentum=0.9, packed=True)
    state = opt.init(params)
    nu = optax.tree.get(state, "nu")
    assert isinstance(nu, PackedTree)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert [b.shape for b in nu.buffers] == [(n,)]
    assert len(jax.tree.leaves(state)) == 4  # count, nu, mu, trace: one array each
    _assert_same(nu.unpack(), rmsprop_jax.rmsprop(0.01).init(params).nu)
    assert "float32" in repr(nu)
    keys = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert any("float32" in k for k in keys), keys


def test_eager_equals_jit():
    params, grads = _trees()
    kw = dict(learning_rate=SCHEDULE, centered=True, momentum=0.9, weight_decay=0.01, weight_decay_mask=_mask)
    opt = rmsprop_jax.rmsprop(**kw, packed=True)
    eager = _run_pair(opt, opt, params, grads, jit=False)
    jitted = _run_pair(opt, opt, params, grads, jit=True)
    # Eager calls run the packed update as its own compiled program; inside a larger jit XLA
    # may fuse it differently, so the last bit can differ (the per-leaf path is bit-exact).
    for (e, _), (j, _) in zip(eager, jitted, strict=True):
        _assert_same(e[0], j[0], exact=False)
        _assert_same(_unpacked(e[1]), _unpacked(j[1]), exact=False)


def test_init_on_shape_dtype_structs_and_eval_shape():
    params, _ = _trees()
    opt = rmsprop_jax.rmsprop(0.01, momentum=0.9, packed=True)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    _assert_same(opt.init(abstract), opt.init(params))
    shapes = jax.eval_shape(opt.init, params)
    assert jax.tree.structure(shapes) == jax.tree.structure(opt.init(params))


def test_optax_wrappers():
    params, grads = _trees()

    def both(make):
        return make(False), make(True)

    cases = {
        "inject_hyperparams": both(
            lambda pk: optax.inject_hyperparams(rmsprop_jax.rmsprop)(
                learning_rate=0.01, momentum=0.9, packed=pk
            )
        ),
        "apply_if_finite": both(lambda pk: optax.apply_if_finite(rmsprop_jax.rmsprop(0.01, packed=pk), 2)),
        "multi_steps": both(
            lambda pk: optax.MultiSteps(rmsprop_jax.rmsprop(0.01, centered=True, packed=pk), 2)
        ),
        "chain_clip": both(
            lambda pk: optax.chain(optax.clip_by_global_norm(1.0), rmsprop_jax.rmsprop(0.01, packed=pk))
        ),
        "masked_none_leaves": both(
            lambda pk: optax.masked(rmsprop_jax.rmsprop(0.01, packed=pk), {"dense": True, "layers": False})
        ),
    }
    for name, (ours, packed) in cases.items():
        out = _run_pair(ours, packed, params, grads)
        for (u1, s1), (u2, s2) in out:
            _assert_same(u2, u1, exact=False)
            _assert_same(_unpacked(s2), s1, exact=False)
        if name == "inject_hyperparams":
            s = packed.init(params)
            s.hyperparams["learning_rate"] = jnp.asarray(0.02)
            u_a, _ = packed.update(grads[0], s, params)
            s_ref = ours.init(params)
            s_ref.hyperparams["learning_rate"] = jnp.asarray(0.02)
            _assert_same(u_a, ours.update(grads[0], s_ref, params)[0], exact=False)


def test_none_leaves():
    params = {"a": jnp.ones((3,)), "b": None, "c": [None, jnp.arange(4.0)]}
    grads = [jax.tree.map(lambda x, t=t: x * 0.1 + t, params) for t in range(STEPS)]
    _assert_pair_equal(
        _run_pair(rmsprop_jax.rmsprop(0.1), rmsprop_jax.rmsprop(0.1, packed=True), params, grads)
    )


def test_many_leaves_of_one_shape():
    """More leaves than the gather fan-in (16): the two-level concatenate; odd and 1-element leaves."""
    rng = np.random.default_rng(0)
    params = {
        f"p{i:03d}": jnp.asarray(rng.normal(size=(i % 7 + 1, 3 if i % 2 else 1)), jnp.float32)
        for i in range(40)
    }
    grads = [jax.tree.map(lambda x, t=t: x * 0.1 + t, params) for t in range(2)]
    kw = dict(learning_rate=0.01, centered=True, momentum=0.9)
    _assert_pair_equal(
        _run_pair(rmsprop_jax.rmsprop(**kw), rmsprop_jax.rmsprop(**kw, packed=True), params, grads)
    )


def test_big_and_small_leaves_mixed():
    """Leaves >= 16k elements are copied in with dynamic_update_slice after the small ones."""
    rng = np.random.default_rng(1)
    shapes = {"emb": (130, 128), "b": (7,), "w": (128, 129), "s": (), "v": (40,)}
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    grads = [jax.tree.map(lambda x, t=t: x * 0.1 + t, params) for t in range(2)]
    kw = dict(learning_rate=0.01, momentum=0.9, weight_decay=0.01)
    out = _run_pair(rmsprop_jax.rmsprop(**kw), rmsprop_jax.rmsprop(**kw, packed=True), params, grads)
    _assert_pair_equal(out)
    (group,) = out[0][1][1].nu.layout.groups
    assert [sorted(params)[i] for i in group.leaves] == ["b", "s", "v", "emb", "w"]


def test_orbax_save_restore_continues_bit_for_bit(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params, grads = _trees()
    opt = rmsprop_jax.rmsprop(0.01, centered=True, momentum=0.9, packed=True)
    step = jax.jit(lambda p, s, g: opt.update(g, s, p))
    state = opt.init(params)
    _, state = step(params, state, grads[0])
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", state)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(tmp_path / "ckpt", jax.eval_shape(opt.init, params))
    _assert_same(restored, state)
    _assert_same(step(params, restored, grads[1]), step(params, state, grads[1]))


# --------------------------------------------------------------------------- errors


def test_bad_packed_argument():
    with pytest.raises(ValueError, match=r"packed='yes'.*True or False"):
        rmsprop_jax.rmsprop(0.1, packed="yes")
    with pytest.raises(ValueError, match=r"packed=1 .*True or False"):
        rmsprop_jax.scale_by_rms(packed=1)


def test_wrong_gradient_structure_and_shape_are_named():
    params, grads = _trees()
    opt = rmsprop_jax.rmsprop(0.1, packed=True)
    state = opt.init(params)
    with pytest.raises(ValueError, match="gradient tree does not match"):
        opt.update({"x": jnp.ones(3)}, state, params)
    bad = jax.tree.map(lambda x: x, grads[0])
    bad["dense"]["b"] = jnp.ones(4)
    with pytest.raises(ValueError, match=r"\['dense'\]\['b'\] has shape \(4,\)"):
        opt.update(bad, state, params)


def test_sharded_params_are_refused():
    """8 fake CPU devices in a fresh process: sharded params raise, replicated ones pack."""
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np, rmsprop_jax
        from jax.sharding import NamedSharding, PartitionSpec as P
        mesh = jax.make_mesh((8,), ("x",))
        params = {"w": jax.device_put(jnp.ones((16, 4)), NamedSharding(mesh, P("x", None))), "b": jnp.ones(4)}
        opt = rmsprop_jax.rmsprop(0.1, packed=True)
        for init in (opt.init, jax.jit(opt.init)):
            try:
                init(params)
                print("NO ERROR")
            except ValueError as e:
                assert "sharded across devices" in str(e) and "packed=False" in str(e), e
                print("REFUSED")
        rep = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), params)
        s = opt.init(rep)
        u, s = jax.jit(opt.update)(rep, s, rep)
        print("REPLICATED OK", float(u["b"][0]))
        """
    )
    env = cpu_process_env(8, pythonpath=(Path(__file__).parents[1] / "src",))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    assert lines[:2] == ["REFUSED", "REFUSED"], proc.stdout
    assert lines[2].startswith("REPLICATED OK"), proc.stdout


def test_packed_refuses_8bit_leaves_and_packs_16bit_state_either_rounding() -> None:
    """8-bit leaves cannot live in packed buffers: a clear error naming the leaf. 16-bit state packs
    with stochastic rounding (the default; tests/test_seams.py checks its bits equal the per-leaf
    layout's) and with optax's round to nearest (below)."""
    big = {"w": jnp.zeros((64, 128)), "b": jnp.zeros(8)}
    with pytest.raises(ValueError, match=r"packed=True cannot store leaf \['w'\].*as 8-bit codes"):
        rmsprop_jax.rmsprop(1e-3, accumulator_dtype="int8", packed=True).init(big)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), big)
    state = rmsprop_jax.rmsprop(1e-3, packed=True).init(bf16)  # stochastic rounding by default
    assert {b.dtype for b in jax.tree.leaves(state.nu.buffers)} == {jnp.dtype(jnp.bfloat16)}
    # int8 with only small leaves (all kept float32), and optax's round to nearest, pack fine and
    # equal the per-leaf layout.
    small = {"b": jnp.zeros(8), "c": jnp.zeros((3, 5))}
    rmsprop_jax.rmsprop(1e-3, accumulator_dtype="int8", packed=True).init(small)
    g = jax.tree.map(lambda x: jnp.full_like(x, 0.5), bf16)
    outs = [
        rmsprop_jax.rmsprop(1e-3, accumulator_dtype=OPTAX_BF16, packed=packed).update(
            g, rmsprop_jax.rmsprop(1e-3, accumulator_dtype=OPTAX_BF16, packed=packed).init(bf16)
        )[0]
        for packed in (False, True)
    ]
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
