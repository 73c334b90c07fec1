"""Sphinx configuration of the API reference (``make docs``; ``tests/test_docs.py`` builds it with ``-W``).

The API pages are generated from the docstrings (Google style, read by napoleon) of the names in
``rmsprop_jax.__all__`` and its submodules' ``__all__``: a new public function appears without
editing these pages. Notebooks are rendered from their committed outputs, never executed.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # document this checkout, whatever is installed

import rmsprop_jax  # noqa: E402

project = "rmsprop-jax"
author = "rmsprop-jax developers"
copyright = "rmsprop-jax developers"
release = version = rmsprop_jax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
root_doc = "index"

# autodoc / napoleon: the signature shows the annotations; Google-style sections become fields.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" as fields: NamedTuple fields are not described twice

# Every cross-reference must resolve (warnings are errors: a broken reference fails the build),
# except those into other projects: without network access there is no intersphinx inventory.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(optax|jax|jaxlib|numpy|np|torch|keras|flax|equinox|orbax)(\..*)?"),
    (
        r"py:.*",
        r"(collections\.abc\.)?(Any|Callable|NamedTuple|TypeAlias|ArrayTree|ScalarOrSchedule|MaskOrFn|Array)",
    ),
    (r"py:.*", r"(rmsprop_jax\._\w+\..*)"),  # private aliases in signatures
]

# Notebooks: rendered from the outputs committed with them (CI executes them separately, with nbmake).
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"rmsprop-jax {release}"


def _skip_namedtuple_aliases(app, what, name, obj, skip, options):  # type: ignore[no-untyped-def]
    """NamedTuple fields document themselves as "Alias for field number i": the class says more."""
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


def _resolve_in_package(app, env, node, contnode):  # type: ignore[no-untyped-def]
    """Docstrings say :func:`rmsprop`, :class:`RmsPropState` or :func:`presets.keras` from any module of
    the package (as its own docs and ``help()`` read best); resolve such names against ``rmsprop_jax``.
    A name that is in neither place stays unresolved, and the build fails on it."""
    if node.get("refdomain") != "py":
        return None
    target = "rmsprop_jax." + node["reftarget"].lstrip("~.")
    domain = env.get_domain("py")
    if target not in domain.objects:
        return None
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], target, node, contnode)


def setup(app):  # type: ignore[no-untyped-def]
    app.connect("autodoc-skip-member", _skip_namedtuple_aliases)
    app.connect("missing-reference", _resolve_in_package)
