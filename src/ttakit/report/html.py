"""One ``report.html`` per run: the tables, the plots (embedded), the lessons and the commands that
made them, in one self-contained file a person can open from disk or send.

It replaces nothing: ``evaluate``, ``search`` and ``audit`` keep writing their Markdown, JSON and
PNGs for scripts; the HTML page is built from the same Markdown (a small converter for what ttakit
writes: headings, pipe tables, lists, code, emphasis, images) and every PNG of the run's folder,
embedded as data URIs. No script, no network.

Example:
    >>> page = markdown_to_html("# Title\\n\\n| a | b |\\n| :-- | --: |\\n| x | 1 |")
    >>> "<table>" in page and "<td>x</td>" in page
    True
"""

from __future__ import annotations

import base64
import html
import os
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_write_text

__all__ = ["markdown_to_html", "record_command", "write_audit_report", "write_html_report"]

_COMMAND: list[str] | None = None


def record_command(argv: Sequence[str]) -> None:
    """Remember the command line of this process (the CLI calls it), for the reports' commands."""
    global _COMMAND
    _COMMAND = [str(a) for a in argv]


def _command_line() -> str | None:
    if _COMMAND is None:
        return None
    return "ttakit " + " ".join(shlex.quote(a) for a in _COMMAND)


def _inline(text: str, folder: Path | None) -> str:
    """Escape ``text`` and render inline Markdown: code, bold, italics, images, links."""
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for part in parts:
        if len(part) >= 2 and part.startswith("`") and part.endswith("`"):
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        s = html.escape(part, quote=False)
        s = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", lambda m: _image_tag(m.group(2), m.group(1), folder), s)
        s = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", lambda m: f'<a href="{html.escape(m.group(2))}">{m.group(1)}</a>', s)
        s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
        s = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"<em>\1</em>", s)
        out.append(s)
    return "".join(out)


def _data_uri(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    kind = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}.get(
        path.suffix.lower())
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}" if kind else None


def _image_tag(src: str, alt: str, folder: Path | None) -> str:
    src = html.unescape(src)
    path = Path(src) if Path(src).is_absolute() or folder is None else folder / src
    uri = _data_uri(path)
    if uri is None:
        return f"<em>[image {html.escape(src)} missing]</em>"
    return f'<img src="{uri}" alt="{html.escape(html.unescape(alt))}">'


def _cells(line: str) -> list[str]:
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", body)]


def markdown_to_html(markdown: str, folder: str | os.PathLike | None = None) -> str:
    """HTML for the Markdown ttakit writes; images (``![alt](file.png)``) relative to ``folder``
    are embedded."""
    base = Path(folder) if folder is not None else None
    lines = markdown.splitlines()
    out: list[str] = []
    para: list[str] = []
    i = 0

    def flush() -> None:
        if para:
            out.append("<p>" + _inline(" ".join(para), base) + "</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            code = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                code.append(lines[i])
                i += 1
            out.append("<pre><code>" + html.escape("\n".join(code)) + "</code></pre>")
            i += 1
            continue
        heading = re.match(r"(#{1,6})\s+(.*)", stripped)
        if heading:
            flush()
            level = len(heading.group(1))
            out.append(f"<h{level}>{_inline(heading.group(2), base)}</h{level}>")
            i += 1
            continue
        if stripped.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?",
                                                                             lines[i + 1].strip()):
            flush()
            header = _cells(stripped)
            aligns = ["right" if c.endswith(":") and not c.startswith(":") else "left" for c in _cells(lines[i + 1])]
            i += 2
            body = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                body.append(_cells(lines[i]))
                i += 1
            head = "".join(f"<th>{_inline(h, base)}</th>" for h in header)
            rows = "".join(
                "<tr>" + "".join(
                    f'<td class="num">{_inline(c, base)}</td>' if k < len(aligns) and aligns[k] == "right"
                    else f"<td>{_inline(c, base)}</td>" for k, c in enumerate(r)) + "</tr>"
                for r in body)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            continue
        item = re.match(r"(\s*)([-*]|\d+\.)\s+(.*)", line)
        if item:
            flush()
            tag = "ol" if item.group(2)[0].isdigit() else "ul"
            entries = []
            while i < len(lines):
                m = re.match(r"(\s*)([-*]|\d+\.)\s+(.*)", lines[i])
                if m:
                    entries.append(m.group(3))
                elif lines[i].startswith("  ") and lines[i].strip() and entries:
                    entries[-1] += " " + lines[i].strip()
                else:
                    break
                i += 1
            out.append(f"<{tag}>" + "".join(f"<li>{_inline(e, base)}</li>" for e in entries) + f"</{tag}>")
            continue
        if not stripped:
            flush()
        else:
            para.append(stripped)
        i += 1
    flush()
    return "\n".join(out)


_STYLE = """
body{font:15px/1.5 system-ui,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f0f0ee;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #ddd;margin:6px 0}pre{background:#f6f6f4;padding:8px;overflow-x:auto}
code{background:#f3f3f1;padding:0 3px}h1{font-size:24px}h2{font-size:19px;margin-top:28px}
.figure{margin:12px 0}.caption{font-size:13px;color:#555}footer{margin-top:32px;font-size:12px;color:#666}
"""


def write_html_report(
    folder: str | os.PathLike,
    markdown: str,
    *,
    title: str | None = None,
    images: Sequence[str | os.PathLike] | None = None,
    commands: Sequence[str] = (),
    name: str = "report.html",
) -> Path:
    """Write ``folder/report.html`` from ``markdown`` and the plots.

    Args:
        markdown: the run's Markdown report (its images are embedded).
        images: PNGs to embed under "Plots" (default: every PNG in ``folder`` the Markdown does not
            already show), in name order.
        commands: commands to show beside the one that made the run (next steps, say).
    """
    folder = Path(folder)
    body = markdown_to_html(markdown, folder)
    shown = set(re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", markdown))
    if images is None:
        images = sorted(p for p in folder.glob("*.png") if p.name not in shown and not p.name.startswith("."))
    figures = []
    for image in images:
        path = Path(image)
        uri = _data_uri(path if path.is_absolute() else folder / path)
        if uri:
            figures.append(f'<div class="figure"><img src="{uri}" alt="{html.escape(path.name)}">'
                           f'<div class="caption">{html.escape(path.name)}</div></div>')
    if title is None:
        match = re.search(r"^#\s+(.*)$", markdown, flags=re.M)
        title = re.sub(r"[`*]", "", match.group(1)) if match else "ttakit report"
    made_by = _command_line()
    all_commands = ([made_by] if made_by else []) + [c for c in commands if c]
    parts = [
        "<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
        body,
    ]
    if figures:
        parts += ["<h2>Plots</h2>", *figures]
    if all_commands:
        parts += ["<h2>Commands</h2>", "<pre><code>" + html.escape("\n".join(all_commands)) + "</code></pre>"]
    parts += [
        "<footer>Written by ttakit; the same results are in this folder as Markdown, JSON and PNG files"
        f"{'' if made_by else ' (made from Python, not the command line)'}.</footer>",
        "</body>", "</html>", "",
    ]
    return atomic_write_text(folder / name, "\n".join(parts))


def write_audit_report(out_dir: str | os.PathLike, result: dict[str, Any]) -> Path:
    """``report.html`` of ``ttakit audit``: what was flagged, the contact sheet, the next steps."""
    from .tables import markdown_table

    out = Path(out_dir)
    rows = result.get("rows") or []
    lines = [
        f"# Audit of `{result.get('data')}` ({result.get('split')} split)",
        "",
        f"{result.get('n_images')} images scored by {result.get('scored_by')}; TTA policy `{result.get('policy')}`; "
        f"methods {', '.join(result.get('methods') or [])}; {result.get('n_flagged_images')} images flagged.",
        "",
        *([f"**Warning:** {result['warning']}", ""] if result.get("warning") else []),
        "## Flagged images",
        "",
        markdown_table(rows) if rows else "Nothing was flagged.",
        "",
        "## Lessons",
        "",
        "- Look before you remove: open `review.html` in this folder (it works offline), decide image by image "
        "(keep, relabel, remove), export `decisions.csv` and apply it with `ttakit audit-apply`.",
        f"- Flags, `issues.csv`, the contact sheet, `--write-clean` and the review page's order use the rule "
        f"`--mislabel-by {result.get('mislabel_by', 'others')}`; the default, `others` (the probability of every "
        "class but the label), is the one `benchmarks/audit.py` measures best on flipped labels.",
        "- Cleaning never touches the held-out test rows; score a retrained model on them only.",
        "",
        "## Outputs",
        "",
        "- [review.html](review.html): the review page",
        "- `issues.csv`: one row per flag; `audit.json`: these numbers",
    ]
    if result.get("clean"):
        removed = result.get("removed_what") or "the flagged images"
        lines.append(f"- `{result['clean']}`: the data without {removed}")
    if result.get("contact_sheet") and Path(result["contact_sheet"]).parent == out:
        lines += ["", "## Contact sheet", "", f"![contact sheet]({Path(result['contact_sheet']).name})"]
    data = shlex.quote(str(result.get("data")))
    commands = [
        f"ttakit audit-apply ~/Downloads/decisions.csv --data {data} --model {shlex.quote(str(result.get('model')))} "
        f"--out {shlex.quote(str(out / 'applied'))}",
    ]
    return write_html_report(out, "\n".join(lines), images=[], commands=commands)


if __name__ == "__main__":  # pragma: no cover - `python -m ttakit.report.html FOLDER`: rebuild from results.md
    target = Path(sys.argv[1])
    md = next((target / n for n in ("results.md", "search.md") if (target / n).exists()), None)
    print(write_html_report(target, md.read_text() if md else "# ttakit report"))
