"""Griffe extension for the API reference: read ttakit's docstrings as Google style.

ttakit's docstrings title their doctests ``Example:`` and cross-reference with Sphinx roles
(``:func:`greedy_search```), and document related arguments on one line (``mean, std: ...``);
griffe's Google parser knows ``Examples:``, Markdown and one argument a line. This rewrites the
three when the docs are built; the source stays as it is.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`~?([^`]+)`")


def _short(match: re.Match) -> str:
    return f"`{match.group(1).split('.')[-1] if match.group(0).count('~') else match.group(1)}`"


_NAMES = re.compile(r"^(\s+)(\w+(?:,\s*\w+)+):\s(.*)$")


def _split_names(text: str) -> str:
    """``a, b: text`` in an argument list -> ``a: text`` and ``b: as for ``a``.``."""
    lines = text.splitlines()
    for j in range(len(lines) - 1, 0, -1):  # a list of names wrapped onto the next line
        if re.match(r"^\s+\w+(?:,\s*\w+)*,$", lines[j - 1]):
            lines[j - 1 : j + 1] = [f"{lines[j - 1]} {lines[j].strip()}"]
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _NAMES.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent, names, rest = match.group(1), [n.strip() for n in match.group(2).split(",")], match.group(3)
        out.append(f"{indent}{names[0]}: {rest}")
        i += 1
        while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > len(indent):
            out.append(lines[i])
            i += 1
        out.extend(f"{indent}{name}: as for ``{names[0]}``." for name in names[1:])
    return "\n".join(out)


class GoogleExamples(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _split_names(_ROLE.sub(_short, text))
