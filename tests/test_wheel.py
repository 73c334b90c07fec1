"""The distribution: ``python -m build`` makes an sdist and a wheel that ``twine check`` accepts, and the
wheel installed into a fresh virtual environment -- without the source tree on the path -- imports,
runs an update and the demo's ``--help``.

The fresh environment gets the wheel with ``--no-deps`` and no index; its dependencies (jax, optax,
flax ...) are made visible by a ``.pth`` file pointing at this test environment's site-packages, so
nothing is downloaded. A directory named in a ``.pth`` file is only appended to ``sys.path`` (its own
``.pth`` files, such as the editable install's, are not processed), and the test asserts that
``rmsprop_jax`` is imported from the fresh environment, with no directory of this checkout on
``sys.path``.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("build")
pytest.importorskip("hatchling")
pytest.importorskip("twine")

import rmsprop_jax

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False, **kwargs)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdist + wheel of this checkout (the wheel is built from the sdist, so the sdist must be complete).

    ``--no-isolation``: the build backend (hatchling, in the test extra) is taken from this environment
    instead of being downloaded into a throw-away one.
    """
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)])
    return out


def _one(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_twine_check_passes(dist: Path) -> None:
    files = [str(_one(dist, "*.whl")), str(_one(dist, "*.tar.gz"))]
    proc = _run([sys.executable, "-m", "twine", "check", "--strict", *files])
    assert proc.stdout.count("PASSED") == 2, proc.stdout


def test_the_version_lives_in_one_place(dist: Path) -> None:
    """The file names and metadata carry ``rmsprop_jax.__version__``; no other file states it."""
    version = rmsprop_jax.__version__
    assert _one(dist, "*.whl").name == f"rmsprop_jax-{version}-py3-none-any.whl"
    assert _one(dist, "*.tar.gz").name == f"rmsprop_jax-{version}.tar.gz"
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dynamic = ["version"]' in pyproject and f'"{version}"' not in pyproject


def test_sdist_and_wheel_contents(dist: Path) -> None:
    with tarfile.open(_one(dist, "*.tar.gz")) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for required in (
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "src/rmsprop_jax/__init__.py",
        "src/rmsprop_jax/py.typed",
    ):
        assert required in names, required
    assert "tests/reference.py" in names
    for excluded in (".venv/", "notebooks/", "benchmarks/", "docs/", "dist/", ".ci/"):
        assert not any(n.startswith(excluded) for n in names), excluded
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)

    with zipfile.ZipFile(_one(dist, "*.whl")) as whl:
        wheel_names = set(whl.namelist())
        metadata = whl.read(f"rmsprop_jax-{rmsprop_jax.__version__}.dist-info/METADATA").decode()
    modules = {p.name for p in (ROOT / "src" / "rmsprop_jax").glob("*.py")}
    assert {f"rmsprop_jax/{m}" for m in modules} | {"rmsprop_jax/py.typed"} <= wheel_names
    assert not any(n.startswith(("tests/", "notebooks/", "src/")) for n in wheel_names)
    # Core dependencies only jax and optax; the README is the long description.
    requires = sorted(
        line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and ";" not in line
    )
    assert [r.split()[1].split(">")[0] for r in requires] == ["jax", "optax"], requires
    assert "Description-Content-Type: text/markdown" in metadata
    assert "License-Expression: Apache-2.0" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel_names)


PROBE = """
import json, sys, importlib.metadata
import jax.numpy as jnp, optax
import rmsprop_jax
opt = rmsprop_jax.rmsprop(0.1)
params = {"w": jnp.array([1.0, -2.0])}
updates, state = opt.update({"w": jnp.array([0.5, 0.5])}, opt.init(params), params)
print(json.dumps({
    "file": rmsprop_jax.__file__,
    "version": rmsprop_jax.__version__,
    "dist_version": importlib.metadata.version("rmsprop-jax"),
    "new_w": optax.apply_updates(params, updates)["w"].tolist(),
    "count": int(state.count),
    "sys_path": sys.path,
}))
"""


def test_wheel_installs_into_a_fresh_venv_and_runs(dist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
    _run([*pip, "install", "--no-deps", "--no-index", "-q", str(_one(dist, "*.whl"))])
    new_site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    )
    assert (new_site / "rmsprop_jax" / "__init__.py").exists()
    # The dependencies: this environment's site-packages, appended after the fresh one's.
    (new_site / "_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n", encoding="utf-8")

    # No source tree: isolated mode (no PYTHONPATH, no user site, no script dir), run from elsewhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    probe = json.loads(
        _run([str(python), "-I", "-c", PROBE], env=env, cwd=cwd).stdout.strip().splitlines()[-1]
    )

    assert Path(probe["file"]).resolve().is_relative_to(new_site.resolve()), probe["file"]
    # Nothing of the checkout on the path, except this environment's site-packages (the test venv may
    # live inside the checkout, as `make test`'s .venv does).
    deps = {Path(p).resolve() for p in site.getsitepackages()}
    in_checkout = [
        p
        for p in probe["sys_path"]
        if p and Path(p).resolve().is_relative_to(ROOT.resolve()) and Path(p).resolve() not in deps
    ]
    assert not in_checkout, in_checkout
    # ... nor any other copy of the package (the editable install's source directory, say).
    others = [p for p in probe["sys_path"] if p and (Path(p) / "rmsprop_jax" / "__init__.py").exists()]
    assert [Path(p).resolve() for p in others] == [new_site.resolve()], others
    assert probe["version"] == probe["dist_version"] == rmsprop_jax.__version__
    assert probe["count"] == 1
    assert probe["new_w"] == pytest.approx([0.6837723, -2.3162277], abs=1e-6)  # the rmsprop doctest's numbers

    demo = _run([str(python), "-I", "-m", "rmsprop_jax.demo", "--help"], env=env, cwd=cwd)
    assert "usage:" in demo.stdout and "--epochs" in demo.stdout
