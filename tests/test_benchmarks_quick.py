"""The benchmark suite's quick mode (``python -m benchmarks.run --quick``) runs end to end and
writes well-formed outputs for every section.

No timing is asserted: only that every figure the suite promises is there, finite and consistent
with itself, so the suite cannot rot. The suite and this test use rmsprop_jax's public API only.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUANTIZED = {"int8": 1.0, "int4": 0.5, "fp8": 1.0}  # the quantized formats: bytes per code


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_quick_json_is_complete(quick_run: Path) -> None:
    data = json.loads((quick_run / "results.json").read_text())
    assert data["quick"] is True and data["section"] == "step"
    assert {"platform", "cpu_model", "cpu_cores", "jax", "optax", "git_commit"} <= set(data["machine"])
    workloads = {g["workload"] for g in data["groups"]}
    assert workloads == {"large_leaf", "leaves_512", "leaves_2000", "transformer"}
    assert {g["config"] for g in data["groups"]} == {"plain", "centered_momentum_wd"}
    assert len(data["groups"]) == 8
    for g in data["groups"]:
        impls = g["impls"]
        for key in ("rmsprop_jax/donated", "optax/donated", "rmsprop_jax/not_donated", "optax/not_donated"):
            st = impls[key]
            assert 0 < st["p25_ms"] <= st["median_ms"] <= st["p75_ms"], (g["workload"], key, st)
            assert st["n"] == data["settings"]["rounds"] * data["settings"]["steps_per_round"]
            assert st["compile_s"] > 0 and st["lower_s"] > 0
            assert st["temp_bytes"] is None or st["temp_bytes"] >= 0
            assert math.isfinite(st["gbps"]) and 0 < st["fraction_of_bound"]
        # State: nu (+ mu and trace for the centered momentum config), float32.
        expected_state = 4 if g["config"] == "plain" else 12
        assert impls["optax/donated"]["state_bytes_per_param"] == pytest.approx(expected_state)
        assert impls["rmsprop_jax/donated"]["state_bytes_per_param"] == pytest.approx(
            expected_state, rel=1e-2
        )
        assert g["triad"]["flat"]["gbps"] > 0 and g["bound_ms"] > 0
        assert g["ratios"]["donated_vs_optax"] > 0 and g["ratios"]["compile_donated_vs_optax"] > 0
        assert g["numerics_vs_optax"]["bit_identical"], g["numerics_vs_optax"]
        if g["num_leaves"] > 1:
            assert "rmsprop_jax/one_leaf_same_size" in impls
    transformer = next(g for g in data["groups"] if g["workload"] == "transformer")
    assert transformer["num_leaves"] > 10
    ts = data["training_step"]
    assert {"two_jits", "one_jit", "one_jit_donated"} <= set(ts["variants"])


@pytest.mark.slow
def test_quick_markdown_and_plot(quick_run: Path) -> None:
    md = (quick_run / "results.md").read_text()
    assert "| workload | config | rmsprop_jax donated |" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) >= 3 * (8 + 1)  # three tables of 8 groups, each with its header
    assert "nan" not in md.lower()
    png = (quick_run / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
@pytest.mark.parametrize("name", ["results", "lowmem", "manyleaf", "lowmem_quality"])
def test_render_rebuilds_outputs_from_json(quick_run: Path, tmp_path: Path, name: str) -> None:
    """``--render`` rebuilds each section's .md and .png (the step section through the file entry
    point, in a subprocess; the others in this process, which saves a JAX start-up each)."""
    argv = ["--render", str(quick_run / f"{name}.json"), "--out", str(tmp_path)]
    if name == "results":
        cmd = [sys.executable, "benchmarks/run.py", *argv]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        sys.path.insert(0, str(ROOT))
        try:
            from benchmarks import run
        finally:
            sys.path.remove(str(ROOT))
        assert run.main(argv) == 0
    assert (tmp_path / f"{name}.md").read_text() == (quick_run / f"{name}.md").read_text()
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000


@pytest.mark.slow
def test_quick_lowmem_section(quick_run: Path) -> None:
    """The low-memory section (benchmarks/lowmem.py): bytes per parameter, step-cost ratios, nu error."""
    data = json.loads((quick_run / "lowmem.json").read_text())
    assert set(data["modes"]) == {"float32", "bf16_sr", "int8", "int4", "int4_nearest", "fp8", "fp8_nearest"}
    assert data["torchao"] is None  # --quick leaves the torchao comparison (torch.compile) out
    assert {(g["workload"], g["config"]) for g in data["groups"]} == {
        (w, c)
        for w in ("large_leaf", "leaves_512", "leaves_2000", "transformer")
        for c in ("plain", "centered_momentum_wd")
    }
    for g in data["groups"]:
        accumulators = 1 if g["config"] == "plain" else 3
        b = {mode: v["bytes_per_param"] for mode, v in g["bytes"].items()}
        assert b["float32"] == pytest.approx(4 * accumulators, rel=1e-3)
        assert b["bf16_sr"] == pytest.approx(2 * accumulators, rel=1e-2)
        if g["workload"] == "leaves_2000":  # every leaf below 4096 elements: float32 kept
            for mode in QUANTIZED:
                assert g["bytes"][mode]["quantized_share"] == 0
                assert b[mode] == pytest.approx(b["float32"])
            continue
        # codes (1 byte, or half a byte for int4) per element + float32 scales per block / row / column
        for mode, code_bytes in QUANTIZED.items():
            assert g["bytes"][mode]["quantized_share"] > 0.9
            assert code_bytes * accumulators < b[mode] < 1.2 * accumulators * (code_bytes + 4 / 128)
        if g["workload"] != "large_leaf":  # --quick times the large leaf only
            assert g["cost"] is None
            continue
        assert set(g["cost"]) == set(data["modes"]) | {"int8_apply"}
        for mode, c in g["cost"].items():
            assert c["median_ms"] > 0 and c["ratio_to_float32"] > 0, (g["workload"], mode, c)
        # decoded nu after the same steps: float32 exact, the lossy formats close (int4: 16 linear
        # levels per block of 128 of this 1-D leaf, measured 0.18)
        assert g["cost"]["float32"]["nu_rel_err"] == 0
        for m, c in g["cost"].items():
            assert m == "float32" or 0 < c["nu_rel_err"] < (0.25 if m.startswith("int4") else 0.05), (m, c)
    md = (quick_run / "lowmem.md").read_text()
    header = "| workload | config | float32 | bf16_sr | int8 | int4 | int4_nearest | fp8 | fp8_nearest |"
    assert header in md and "nan" not in md.lower()
    assert (quick_run / "lowmem.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_manyleaf_section(quick_run: Path) -> None:
    """The many-leaf section: every layout, both configs, the three figures and the packed check."""
    data = json.loads((quick_run / "manyleaf.json").read_text())
    groups = data["manyleaf"]["groups"]
    assert {g["config"] for g in groups} == {"plain", "centered_momentum_wd"}
    for g in groups:
        impls = g["impls"]
        for name in ("default", "packed", "optax", "optax.flatten", "one_leaf"):
            st = impls[name]
            assert st["dispatched"]["median_ms"] > 0 and st["in_loop"]["median_ms"] > 0, (name, st)
            assert st["compile_s"] > 0 and st["kernels"] > 0 and st["arrays_in"] > 0, (name, st)
        # packed: one array per accumulator group instead of one per leaf at the jit boundary
        assert impls["packed"]["arrays_in"] < impls["default"]["arrays_in"]
        assert impls["packed"]["kernels"] < impls["default"]["kernels"]
        for layout in ("default", "packed", "optax.flatten", "one_leaf"):
            assert all(v > 0 for v in g["vs_optax"][layout].values()), g["vs_optax"]
        assert g["packed_vs_default"]["max_abs_diff_params"] < 1e-5, g["packed_vs_default"]
    md = (quick_run / "manyleaf.md").read_text()
    assert "| tree | config | measure |" in md and "nan" not in md.lower()
    assert (quick_run / "manyleaf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_quality_section(quick_run: Path) -> None:
    """The quality section: every (model, config, format) trained, accuracies and losses finite."""
    data = json.loads((quick_run / "lowmem_quality.json").read_text())
    nearest = ("int4_nearest", "fp8_nearest")
    formats = ("float32", "bf16_sr", *QUANTIZED, *nearest, *(f"{m}_all" for m in QUANTIZED))
    assert set(data["modes"]) == set(formats)
    seen = {(r["model"], r["config"], r["mode"]) for r in data["runs"]}
    assert seen == {("cnn", "plain", f) for f in ("float32", "int8_all")} | {
        ("quadratic", c, f) for c in ("plain", "centered_momentum") for f in formats
    }
    for r in data["runs"]:
        if r["model"] == "quadratic":
            assert math.isfinite(r["final_loss"]) and r["final_loss"] < r["initial_loss"], r
        else:
            assert 0.5 < r["test_acc"][-1] <= 1, (r["config"], r["mode"], r["test_acc"])
        if r["mode"].endswith("_all"):  # every leaf quantized
            assert r["quantized_share"] > 0.99
    md = (quick_run / "lowmem_quality.md").read_text()
    assert "| model | config | state |" in md and "nan" not in md.lower()
    assert (quick_run / "lowmem_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmarks_use_the_public_api_only() -> None:
    """No module of the suite reaches a private name of rmsprop_jax (they break at refactors);
    dunder attributes such as ``__version__`` are public."""
    import re

    offenders = []
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        text = path.read_text()
        if re.search(r"rmsprop_jax\._(?!_)|from rmsprop_jax import _(?!_)|from rmsprop_jax\._", text):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
