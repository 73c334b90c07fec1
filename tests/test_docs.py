"""The documentation site builds with warnings as errors, documents every public name, and its
user guide's code examples run.

``make docs`` runs the same build into ``docs/_build``; here it goes to a temporary
directory. A broken cross-reference, a docstring napoleon cannot parse, a notebook
that does not render: each is a warning, and so a failure. Skipped only where Sphinx
is not installed (the ``test`` extra includes the ``docs`` extra, so CI runs it).

Every ```python block of the guide pages (``docs/*.md``) is executed: the blocks of one page in
order, in one namespace, so an example that no longer matches the code fails here. A block that
needs a GPU or several hosts is marked by ``<!-- skip -->`` on the line before its fence.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("myst_nb")
pytest.importorskip("furo")

import rmsprop_jax

DOCS = Path(__file__).resolve().parents[1] / "docs"
os.environ.setdefault("KERAS_BACKEND", "jax")  # the porting page's Keras example (as the Keras tests do)

# The user guide: these pages must exist and hold examples (other pages may hold none).
GUIDE = ["equations", "porting", "low_memory", "performance", "sharding", "reliability"]
_BLOCK = re.compile(r"^(<!-- skip -->[ \t]*\n)?```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def _python_blocks(text: str) -> list[tuple[bool, str]]:
    """(skipped, code) for every ```python block of a MyST page, in order."""
    return [(bool(skip), code) for skip, code in _BLOCK.findall(text)]


def _pages_with_code() -> list[str]:
    return sorted(p.stem for p in DOCS.glob("*.md") if _python_blocks(p.read_text(encoding="utf-8")))


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
    assert "ν" in (site / "equations.html").read_text(encoding="utf-8")  # the guide's equations block
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


def test_guide_pages_exist_and_hold_examples() -> None:
    pages = _pages_with_code()
    for page in GUIDE:
        assert page in pages, f"docs/{page}.md is missing or has no python example"
        blocks = _python_blocks((DOCS / f"{page}.md").read_text(encoding="utf-8"))
        assert any(not skipped for skipped, _ in blocks), f"docs/{page}.md runs none of its examples"
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for page in GUIDE:
        assert f"\n{page}\n" in index, f"docs/{page}.md is not in the index's toctree"


def test_guide_argument_table_lists_every_argument() -> None:
    """docs/equations.md's table names every argument of rmsprop(), in signature order."""
    import inspect

    section = (DOCS / "equations.md").read_text(encoding="utf-8").split("## Every argument", 1)[1]
    rows = re.findall(r"^\| `(\w+)` \|", section.split("\n## ", 1)[0], re.M)
    assert rows == list(inspect.signature(rmsprop_jax.rmsprop).parameters)


def test_block_extraction_honours_skip_markers() -> None:
    """Mutation check of the extractor: a skip marker skips the next block only; others all run."""
    text = "a\n\n```python\nx = 1\n```\n\n<!-- skip -->\n```python\ngpu()\n```\n```python\ny = x\n```\n"
    text += "```bash\nmake docs\n```\n"
    assert _python_blocks(text) == [(False, "x = 1\n"), (True, "gpu()\n"), (False, "y = x\n")]


@pytest.mark.parametrize("page", _pages_with_code())
def test_guide_examples_run(page: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Every un-skipped ```python block of docs/<page>.md runs, in order, in one namespace."""
    blocks = _python_blocks((DOCS / f"{page}.md").read_text(encoding="utf-8"))
    namespace: dict[str, object] = {"__name__": f"docs_{page}"}
    start = time.perf_counter()
    ran = 0
    for i, (skipped, code) in enumerate(blocks):
        if skipped:
            continue
        exec(compile(code, f"docs/{page}.md[block {i}]", "exec"), namespace)
        ran += 1
    assert ran, f"docs/{page}.md: every example is skipped"
    with capsys.disabled():
        print(f"\n  docs/{page}.md: {ran} of {len(blocks)} blocks ran in {time.perf_counter() - start:.1f} s")
