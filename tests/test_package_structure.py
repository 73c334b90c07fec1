"""The package's shape: a small typed public API, no import cycle, Pallas loaded only on demand,
one executor that chooses the strategy, and ``decode`` for every stored format."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax

SRC = Path(rmsprop_jax.__file__).resolve().parent


def _internal_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rmsprop_jax"):
            if node.module == "rmsprop_jax":
                out |= {f"rmsprop_jax.{a.name}" for a in node.names}
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("rmsprop_jax.")}
    return out


def test_no_import_cycle() -> None:
    modules = {f"rmsprop_jax.{p.stem}": p for p in SRC.glob("*.py") if p.stem != "__init__"}
    graph = {m: {d for d in _internal_imports(p) if d in modules} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, f"import cycle: {' -> '.join([*stack, m])}"
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, [*stack, m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
    # the layering the design asks for
    assert graph["rmsprop_jax._update"] == set()
    assert "rmsprop_jax._executor" not in graph["rmsprop_jax._codecs"]
    assert "rmsprop_jax._pallas_int8" not in set().union(*graph.values())  # imported lazily only


def test_import_loads_no_pallas_or_triton() -> None:
    code = (
        "import sys, jax; before = set(sys.modules); import rmsprop_jax; "
        "new = sorted(m for m in set(sys.modules) - before if 'pallas' in m or 'triton' in m); "
        "print(new); assert not new, new"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_rmsprop_signature_has_one_storage_argument_and_no_kernel_choice() -> None:
    params = inspect.signature(rmsprop_jax.rmsprop).parameters
    assert len(params) == 16
    assert "accumulator_dtype" in params
    for gone in ("quantization", "stochastic_rounding", "rounding_seed", "kernel"):
        assert gone not in params
    assert not hasattr(rmsprop_jax, "Blockwise")
    assert "kernel" not in {f.name for f in rmsprop_jax.Int8.__dataclass_fields__.values()}


@pytest.mark.parametrize(
    "accumulator_dtype",
    [None, jnp.float32, jnp.bfloat16, jnp.float16, "int8", rmsprop_jax.Int8(block_size=64, layout="flat")],
)
def test_decode_reads_every_format(accumulator_dtype: object) -> None:
    params = {"w": jnp.linspace(-1, 1, 64 * 128).reshape(64, 128), "b": jnp.ones(5)}
    opt = rmsprop_jax.rmsprop(0.1, centered=True, momentum=0.9, accumulator_dtype=accumulator_dtype)
    grads = jax.tree.map(lambda p: 0.5 * p + 0.25, params)
    _, state = opt.update(grads, opt.init(params), params)
    want = 0.1 * jax.tree.map(lambda g: g * g, grads)["w"]  # (1 - 0.9) g^2
    for kind in ("nu", "mu", "trace"):
        for name, leaf in optax.tree.get(state, kind).items():
            x = rmsprop_jax.decode(leaf)
            assert x.shape == params[name].shape and x.dtype == jnp.float32
    nu = rmsprop_jax.decode(optax.tree.get(state, "nu")["w"])
    np.testing.assert_allclose(np.asarray(nu), np.asarray(want), rtol=0.03, atol=1e-6)


def test_decode_refuses_what_is_not_a_stored_leaf() -> None:
    with pytest.raises(ValueError, match="floating dtype"):
        rmsprop_jax.decode(jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="lost its layout"):
        rmsprop_jax.decode({"codes": jnp.zeros(3, jnp.uint8), "absmax": jnp.ones(1)})


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("int3", "accumulator_dtype='int3' is not a dtype"),
        (jnp.int32, "is not a floating dtype"),
        (object(), "is not a dtype"),
    ],
)
def test_bad_accumulator_dtype_names_the_argument_and_the_allowed_values(value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        rmsprop_jax.rmsprop(1e-3, accumulator_dtype=value)
    assert "rmsprop_jax.Float" in str(info.value) and "'int8'" in str(info.value)


def test_presets_take_the_same_format_values() -> None:
    params = {"w": jnp.zeros((64, 128))}
    for make in (
        lambda a: rmsprop_jax.presets.pytorch(accumulator_dtype=a),
        lambda a: rmsprop_jax.presets.keras(accumulator_dtype=a),
        lambda a: rmsprop_jax.presets.dqn_2015(accumulator_dtype=a),
    ):
        assert isinstance(make("int8").init(params).nu["w"], rmsprop_jax.QuantizedLeaf)
        assert make(jnp.bfloat16).init(params).nu["w"].dtype == jnp.bfloat16
    leaf = rmsprop_jax.presets.bitsandbytes(optim_bits=8).init(params).nu["w"]
    assert (leaf.block_size, leaf.layout) == (256, "flat")
