"""Public names do not move: everything ``ttakit.__all__`` exports imports, and so does every
``import ttakit...`` / ``from ttakit... import ...`` line the README and docs/*.md show."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import ttakit

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"```(?:python|py|pycon)?\n(.*?)```", re.S)
IMPORT = re.compile(r"^\s*(?:>>>\s*|\.\.\.\s*)?((?:from\s+ttakit[\w.]*\s+import\s+.+)|(?:import\s+ttakit[\w.]*(?:\s+as\s+\w+)?))\s*$")


def _doc_files() -> list[Path]:
    return [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))] if p.is_file()]


def _import_lines(text: str) -> list[str]:
    """The ttakit import statements of a Markdown file's code blocks (parenthesised ones joined)."""
    found = []
    for block in FENCE.findall(text):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            match = IMPORT.match(lines[i])
            if match:
                statement = match.group(1)
                while statement.count("(") > statement.count(")") and i + 1 < len(lines):
                    i += 1
                    statement += " " + re.sub(r"^\s*(?:\.\.\.\s*)?", "", lines[i])
                found.append(statement.split("#")[0].strip())
            i += 1
    return found


def _doc_imports() -> list[tuple[str, str]]:
    return [(p.relative_to(ROOT).as_posix(), line) for p in _doc_files() for line in _import_lines(p.read_text())]


@pytest.mark.parametrize("name", ttakit.__all__)
def test_every_exported_name_imports(name: str) -> None:
    assert getattr(ttakit, name) is not None


def test_documented_imports_work() -> None:
    failures = []
    for source, line in _doc_imports():
        try:
            tree = ast.parse(line)
        except SyntaxError:
            continue  # a fragment, not a statement
        for node in tree.body:
            try:
                if isinstance(node, ast.ImportFrom):
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        if alias.name != "*" and not hasattr(module, alias.name):
                            importlib.import_module(f"{node.module}.{alias.name}")  # a submodule
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        importlib.import_module(alias.name)
            except ImportError as exc:
                failures.append(f"{source}: {line}: {exc}")
    assert failures == []


def test_the_import_parser_reads_the_shapes_docs_use() -> None:
    text = "```python\nimport ttakit as tta\nfrom ttakit.search import (\n    default_pool,\n)\n>>> from ttakit import merge\n```"
    assert _import_lines(text) == ["import ttakit as tta", "from ttakit.search import ( default_pool, )",
                                   "from ttakit import merge"]
