"""The benchmark suite (``python -m benchmarks.run``; see README.md here).

Importing the package puts the checkout's ``src/`` on ``sys.path`` when ``rmsprop_jax`` is
not installed (a fresh clone), so every module here runs with ``python -m benchmarks.<name>``
or as a file (whose two-line preamble makes this package importable first).
"""

import sys
from pathlib import Path

try:
    import rmsprop_jax  # noqa: F401
except ImportError:  # a fresh clone without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
