"""Terminal and Markdown tables."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InvalidInputError

if TYPE_CHECKING:  # matplotlib is the optional extra ttakit[plots], imported only to draw
    pass


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _scalar(value: Any) -> Any:
    # 0-d tensors and NumPy scalars show up in result rows; treat them as numbers.
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _cell(value: Any, floatfmt: str) -> str:
    value = _scalar(value)
    if value is None:
        return "-"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if _is_number(value):
        return format(float(value), floatfmt)
    return str(value)


def _columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> list[str]:
    if (
        not isinstance(rows, Sequence)
        or isinstance(rows, (str, bytes))
        or not all(isinstance(r, Mapping) for r in rows)
    ):
        raise InvalidInputError(
            f"Expected argument `rows` to be a list of dicts, but got {type(rows).__name__}"
        )
    if columns is not None:
        if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
            raise InvalidInputError(
                f"Expected argument `columns` to be a list of column names, but got {columns!r}"
            )
        return list(columns)
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(str(key), None)
    return list(seen)


def _grid(
    rows: Sequence[Mapping[str, Any]], columns: list[str], floatfmt: str
) -> tuple[list[list[str]], list[list[bool]], list[bool]]:
    """Cells as text, whether each cell is numeric, and whether each column is numeric."""
    try:
        format(0.5, floatfmt)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"Expected argument `floatfmt` to be a float format spec like '.4f', but got {floatfmt!r}"
        ) from exc
    text = [[_cell(row.get(col), floatfmt) for col in columns] for row in rows]
    numeric = [[_is_number(_scalar(row.get(col))) for col in columns] for row in rows]
    col_numeric = []
    for j, col in enumerate(columns):
        present = [numeric[i][j] for i, row in enumerate(rows) if _scalar(row.get(col)) is not None]
        col_numeric.append(bool(present) and all(present))
    return text, numeric, col_numeric


def format_table(
    rows: list[dict],
    columns: list[str] | None = None,
    floatfmt: str = ".4f",
    title: str | None = None,
) -> str:
    """An aligned plain-text table for a terminal.

    Columns are separated by two spaces; numbers are right-aligned, text left-aligned, and
    a header is right-aligned when every value in its column is a number. ``None`` and
    missing keys show as ``-``. Floats use ``floatfmt``; ints and bools print as they are.

    Args:
        rows: one dict per row.
        columns: the columns in order; default every key, in order of first appearance.
        floatfmt: format spec for floats, e.g. ``".4f"`` or ``".2%"``.
        title: an optional line above the header.

    Returns:
        The table without a trailing newline; lines carry no trailing spaces. With no
        columns at all, just the title (or ``""``).
    """
    cols = _columns(rows, columns)
    if not cols:
        return "" if title is None else str(title)
    text, numeric, col_numeric = _grid(rows, cols, floatfmt)
    widths = [max([len(c)] + [len(r[j]) for r in text]) for j, c in enumerate(cols)]

    def line(cells: list[str], right: list[bool]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return "  ".join(parts).rstrip()

    out = [] if title is None else [str(title)]
    out.append(line(cols, col_numeric))
    out.append("  ".join("-" * w for w in widths))
    for cells, num in zip(text, numeric, strict=True):
        out.append(
            line(cells, [n or (c == "-" and cn) for n, c, cn in zip(num, cells, col_numeric, strict=True)])
        )
    return "\n".join(out)


def markdown_table(
    rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".4f"
) -> str:
    """A GitHub-flavoured Markdown table, padded so the source is readable too.

    Numeric columns (every value a number or ``None``) are right-aligned (``---:``), others
    left-aligned (``:---``). ``None`` and missing keys show as ``-``; ``|`` in text is
    escaped and newlines become spaces.

    Args:
        rows: one dict per row.
        columns: the columns in order; default every key, in order of first appearance.
        floatfmt: format spec for floats.

    Returns:
        The table without a trailing newline (``""`` when there are no columns).
    """
    cols = _columns(rows, columns)
    if not cols:
        return ""
    text, _, col_numeric = _grid(rows, cols, floatfmt)

    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\r\n", " ").replace("\n", " ")

    header = [esc(c) for c in cols]
    body = [[esc(c) for c in r] for r in text]
    widths = [max([3, len(h)] + [len(r[j]) for r in body]) for j, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, col_numeric, strict=True)]
        return "| " + " | ".join(parts) + " |"

    rule = [
        "-" * (w - 1) + ":" if num else ":" + "-" * (w - 1) for w, num in zip(widths, col_numeric, strict=True)
    ]
    out = [line(header), "| " + " | ".join(rule) + " |"]
    out.extend(line(r) for r in body)
    return "\n".join(out)


def format_mean_std(mean: float, std: float | None, fmt: str = ".2f", scale: float = 1.0) -> str:
    """``mean ± std`` as text, both multiplied by ``scale``, e.g. ``"91.52 ± 0.31"``.

    Args:
        mean: the mean.
        std: the standard deviation; ``None`` prints the mean alone.
        fmt: format spec for both numbers (a ``+`` flag applies to the mean only).
        scale: factor applied to both, e.g. 100 for accuracy in percent.

    Example:
        >>> format_mean_std(0.91523, 0.0031, scale=100)
        '91.52 ± 0.31'
    """
    if not _is_number(_scalar(mean)):
        raise InvalidInputError(f"Expected argument `mean` to be a number, but got {mean!r}")
    if std is not None and not _is_number(_scalar(std)):
        raise InvalidInputError(f"Expected argument `std` to be a number or None, but got {std!r}")
    try:
        m = format(float(_scalar(mean)) * scale, fmt)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"Expected argument `fmt` to be a float format spec like '.2f', but got {fmt!r}"
        ) from exc
    if std is None:
        return m
    # a sign flag ("+.2f") is for the mean; a spread is never signed
    return f"{m} ± {format(float(_scalar(std)) * scale, fmt.replace('+', '', 1))}"


# --------------------------------------------------------------------------- results files


def plural(n: int, noun: str, plural_form: str | None = None) -> str:
    """``plural(1, "image")`` is ``"1 image"``, ``plural(2, "image")`` ``"2 images"``.

    Example:
        >>> plural(1, "image"), plural(119, "candidate"), plural(2, "pass", "passes")
        ('1 image', '119 candidates', '2 passes')
    """
    return f"{n} {noun if n == 1 else (plural_form or noun + 's')}"
