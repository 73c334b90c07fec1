"""The README's Python code blocks (the quickstart and state-format sections) run as written.

Only the sections this test names are executed; the blocks of one section run in order in one
namespace. The user guide's examples (docs/*.md) are run by tests/test_docs.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ["quickstart", "state"]


def _blocks(section: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- section: {section} -->(.*?)<!-- /section: {section} -->", text, re.S)
    assert match, f"README has no section {section!r}"
    return re.findall(r"```python\n(.*?)```", match.group(1), re.S)


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_section_code_runs(section: str) -> None:
    pytest.importorskip("flax")
    pytest.importorskip("orbax.checkpoint")
    pytest.importorskip("equinox")
    blocks = _blocks(section)
    assert blocks, f"section {section!r} has no python code blocks"
    namespace: dict[str, object] = {"__name__": f"readme_{section}"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md[{section} block {i}]", "exec"), namespace)


def test_readme_quickstart_really_trains(capsys: pytest.CaptureFixture[str]) -> None:
    """The plain-optax quickstart prints a small final loss (it is not just syntax)."""
    namespace: dict[str, object] = {"__name__": "readme_quickstart"}
    exec(compile(_blocks("quickstart")[0], "README.md[quickstart block 0]", "exec"), namespace)
    loss = float(namespace["loss"])  # type: ignore[arg-type]
    assert loss < 1e-2, loss
    assert "('count', 'nu', 'mu', 'trace')" in capsys.readouterr().out


def _option_rows(text: str, heading: str) -> list[str]:
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(\w+)` \|", section, re.M)


def test_readme_option_table_lists_every_argument() -> None:
    """The README's one table of options names every argument of rmsprop(), in signature order."""
    import inspect

    import rmsprop_jax

    rows = _option_rows(README.read_text(encoding="utf-8"), "## Every option of `rmsprop()`")
    assert rows == list(inspect.signature(rmsprop_jax.rmsprop).parameters)
