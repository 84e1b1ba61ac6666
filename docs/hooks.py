"""MkDocs hook: serve benchmarks/results/ (tables, JSON, PNGs) at benchmarks/results/ in the site.

The measured files stay where the benchmarks write them; nothing is copied into docs/. The
Markdown results become pages (their PNG links are relative, so they work as they are).
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def on_files(files: Files, config) -> Files:
    for path in sorted(RESULTS.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            files.append(
                File(
                    f"benchmarks/results/{path.name}",
                    src_dir=str(RESULTS.parent.parent),
                    dest_dir=config["site_dir"],
                    use_directory_urls=config["use_directory_urls"],
                )
            )
    return files
