"""The demo's entry point, ``python -m rmsprop_jax.demo``, at small settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flax.nnx")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from rmsprop_jax import demo


def test_demo_one_epoch_prints_the_table_and_writes_the_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nested" / "out"
    rows = demo.main(["--epochs", "1", "--seed", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| optimizer | lr | test accuracy | test loss | final train loss | s/epoch |" in printed
    for name in demo.OPTIMIZERS:
        assert f"| {name} |" in printed
    assert [r["name"] for r in rows] == list(demo.OPTIMIZERS)
    for r in rows:
        # One epoch of a CNN on digits is far better than chance (10 %) for all three optimizers.
        assert 0.5 < r["test_acc"] <= 1.0, r
        assert r["test_loss"] > 0 and r["s_per_epoch"] > 0
    png = out / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_demo_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--epochs", "--seed", "--out"):
        assert option in text


def test_demo_rejects_a_nonpositive_epoch_count(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        demo.main(["--epochs", "0"])
    assert exc.value.code == 2
    assert "--epochs: must be >= 1, got 0" in capsys.readouterr().err


def test_demo_runs_as_a_module() -> None:
    """``python -m rmsprop_jax.demo --help`` works from a fresh interpreter (the README's command)."""
    src = str(Path(demo.__file__).resolve().parents[1])
    proc = subprocess.run(
        [sys.executable, "-m", "rmsprop_jax.demo", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m rmsprop_jax.demo" in proc.stdout
