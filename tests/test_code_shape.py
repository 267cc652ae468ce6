"""The house rules a reader relies on, read from the source with `ast` (nothing is imported): no
function of the package or the analysis longer than MAX_FUNCTION_LINES, and no statement kept from
the formatter with `# fmt: skip`: the code is as `ruff format` writes it (a data table may sit
between `# fmt: off` and `# fmt: on`)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "moe_impl").rglob("*.py"), *(ROOT / "analysis").rglob("*.py")])
MAX_FUNCTION_LINES = 80


def long_functions(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_the_sources_are_found():
    assert len(SOURCES) > 100


def test_no_function_is_longer_than_the_limit():
    found = [entry for path in SOURCES for entry in long_functions(path)]
    assert not found, "\n".join(found)


def test_the_reader_counts_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    path = tmp_path / "probe.py"
    path.write_text(f"def f():\n{body}\n", encoding="utf-8")
    assert long_functions(path, tmp_path) == [f"probe.py:1 f ({MAX_FUNCTION_LINES + 1} lines)"]


def test_no_statement_skips_the_formatter():
    marker = "# fmt: skip"
    tests = sorted((ROOT / "tests").rglob("*.py"))
    found = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in [*SOURCES, *tests]
        if path.name != Path(__file__).name
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if line.rstrip().endswith(marker)
    ]
    assert not found, f"{len(found)} `{marker}`: " + ", ".join(found[:20])
