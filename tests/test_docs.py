"""The API reference site builds with warnings as errors, and documents every public name.

``make docs`` runs the same build into ``docs/_build``; here it goes to a temporary
directory. A broken cross-reference, a docstring napoleon cannot parse, a notebook
that does not render: each is a warning, and so a failure. Skipped only where Sphinx
is not installed (the ``test`` extra includes the ``docs`` extra, so CI runs it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("myst_nb")
pytest.importorskip("furo")

import rmsprop_jax

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _build(srcdir: Path, outdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", str(srcdir), str(outdir)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "html"
    proc = _build(DOCS, out)
    assert proc.returncode == 0, f"sphinx-build -W failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "WARNING" not in proc.stderr, proc.stderr[-6000:]
    return out


def _ids(page: Path) -> set[str]:
    return set(re.findall(r'id="([^"]+)"', page.read_text(encoding="utf-8")))


def test_every_public_name_is_documented(site: Path) -> None:
    api = _ids(site / "api.html")
    for name in rmsprop_jax.__all__:
        if name in ("interop", "presets", "__version__"):
            continue
        assert f"rmsprop_jax.{name}" in api, f"rmsprop_jax.{name} is missing from the API page"
    for module in (rmsprop_jax.presets, rmsprop_jax.interop):
        ids = _ids(site / f"{module.__name__.rsplit('.', 1)[1]}.html")
        for name in module.__all__:
            assert f"{module.__name__}.{name}" in ids, f"{module.__name__}.{name} is not documented"


def test_arguments_equations_and_notebooks_are_rendered(site: Path) -> None:
    api = (site / "api.html").read_text(encoding="utf-8")
    for argument in ("eps_in_sqrt", "weight_decay_mask", "lr_in_momentum", "accumulator_dtype"):
        assert argument in api
    assert "ν" in (site / "equations.html").read_text(encoding="utf-8")  # the README's equations block
    for notebook in sorted((DOCS.parent / "notebooks").glob("*.ipynb")):
        page = site / "notebooks" / f"{notebook.stem}.html"
        assert page.exists(), f"{notebook.name} is not rendered"
    # committed outputs, not re-executed: the CNN/RNN notebook's plots are there
    assert "<img" in (site / "notebooks" / "02_cnn_rnn.html").read_text(encoding="utf-8")


def test_a_broken_reference_fails_the_build(tmp_path: Path) -> None:
    """Mutation check: the same configuration on a page that names a function that does not exist."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(DOCS / "conf.py", src / "conf.py")
    (src / "index.md").write_text("# t\n\nSee {py:func}`rmsprop_jax.no_such_function`.\n", encoding="utf-8")
    proc = _build(src, tmp_path / "out")
    assert proc.returncode != 0
    assert "no_such_function" in proc.stderr
