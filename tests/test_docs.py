"""The docs build, and every ```python and ```bash block in README.md and docs/ runs.

Blocks run page by page, top to bottom, in a fresh temporary folder: ```python blocks share one
namespace per page (a block may use what an earlier block defined), ```bash blocks run under
``bash -euo pipefail`` with this interpreter's folder first on PATH (so ``ttakit`` is the
project's). Blocks not meant to run (``make demo``, ``pip install``, torchrun on a cluster, output)
use another fence: ```console or ```text.

A page states what it needs in an HTML comment, words separated by commas:

- ``<!-- docs-test: slow -->``: its blocks train or search (deselect with ``-m "not slow"``);
- ``<!-- docs-test: after=getting-started.md -->``: it starts in a copy of the folder that page's
  blocks left (its ``runs/cnn``, ``photos/``), so guides need not train again;
- ``<!-- docs-test: fashion-mnist -->``: it reads Fashion-MNIST (skipped without it, except
  under ``CI=true``, where such a skip fails: see conftest.py). ``slow`` pages read it too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md", *DOCS.rglob("*.md")])
RUN = {"python", "bash"}
NOT_RUN = {"console", "text", "json", "yaml", "csv", "toml", "html", ""}

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")


@dataclass
class Block:
    lang: str
    code: str
    line: int


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, dedented (fences inside list items)."""
    found = []
    for match in _FENCE.finditer(text):
        lang = match.group("info").strip().split(" ")[0].lower()
        indent = match.group("indent")
        body = "".join(
            line[len(indent) :] if line.startswith(indent) else line
            for line in match.group("body").splitlines(keepends=True)
        )
        found.append(Block(lang, textwrap.dedent(body), text.count("\n", 0, match.start()) + 1))
    return found


def directives(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for match in _DIRECTIVE.finditer(text):
        for word in match.group(1).split(","):
            key, _, value = word.strip().partition("=")
            out[key] = value
    return out


def rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def runnable_pages() -> list:
    params = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        if not any(b.lang in RUN for b in blocks(text)):
            continue
        marks = [pytest.mark.slow] if "slow" in directives(text) else []
        params.append(pytest.param(page, id=rel(page), marks=marks))
    return params


def fashion_mnist_available() -> bool:
    try:
        from ttakit.data import load_dataset

        load_dataset("fashion-mnist", split="test")
    except Exception:  # noqa: BLE001  any failure to read it means: not installed here
        return False
    return True


def run_blocks(page: Path, workdir: Path) -> None:
    """Run the page's python and bash blocks in order, in ``workdir``."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("MPLBACKEND", "Agg")
    # one torch thread per command: on a shared 2-core machine, two threads per process under
    # contention ran the examples about twice as slowly
    env.setdefault("OMP_NUM_THREADS", "1")
    namespace: dict = {"__name__": "__docs__"}
    old = Path.cwd()
    os.chdir(workdir)
    try:
        for block in blocks(page.read_text(encoding="utf-8")):
            where = f"{rel(page)}:{block.line}"
            started = time.perf_counter()
            if block.lang == "python":
                try:
                    exec(compile(block.code, where, "exec"), namespace)  # noqa: S102
                except Exception as error:  # noqa: BLE001
                    pytest.fail(f"{where}: the python block failed: {error!r}\n{block.code}")
            elif block.lang == "bash":
                done = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", block.code],
                    cwd=workdir,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                if done.returncode != 0:
                    pytest.fail(
                        f"{where}: the bash block exited {done.returncode}\n{block.code}\n"
                        f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
                    )
            if block.lang in RUN:
                print(f"{where}: {block.lang} block ran in {time.perf_counter() - started:.1f} s")
    finally:
        os.chdir(old)


_DONE: dict[Path, Path] = {}


def page_folder(page: Path, factory) -> Path:
    """Run ``page`` once per session (after the page it continues from) and return its folder."""
    if page in _DONE:
        return _DONE[page]
    text = page.read_text(encoding="utf-8")
    wants = directives(text)
    if ("slow" in wants or "fashion-mnist" in wants) and not fashion_mnist_available():
        pytest.skip(f"Fashion-MNIST not found: {rel(page)} trains on it (make setup installs it)")
    workdir = factory.mktemp(page.stem)
    if wants.get("after"):
        before = page_folder((page.parent / wants["after"]).resolve(), factory)
        shutil.copytree(before, workdir, symlinks=True, dirs_exist_ok=True)
    run_blocks(page, workdir)
    _DONE[page] = workdir
    return workdir


@pytest.mark.parametrize("page", runnable_pages())
def test_code_blocks_run(page, tmp_path_factory):
    page_folder(page, tmp_path_factory)


# --------------------------------------------------------------------------- rules on the text


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_fence_runs_or_says_it_does_not(page):
    """``python``/``bash`` run; anything meant for a shell but not to run is ``console``/``text``."""
    for block in blocks(page.read_text(encoding="utf-8")):
        assert block.lang in RUN | NOT_RUN, (
            f"{rel(page)}:{block.line}: fence language {block.lang!r}: use python or bash (run by "
            f"tests/test_docs.py), or console/text for blocks that do not run"
        )


def test_readme_is_short_and_starts_with_the_two_make_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    first = blocks(text)[0].code.splitlines()
    assert first[0].startswith("make demo") and first[1].startswith("make test")


def test_cited_result_files_exist():
    for page in PAGES:
        for name in re.findall(r"benchmarks/results/([\w.*-]+\w)", page.read_text(encoding="utf-8")):
            if "*" not in name:
                assert (ROOT / "benchmarks" / "results" / name).is_file(), f"{rel(page)} cites {name}"


def resolves(dotted: str) -> bool:
    """Whether ``ttakit.a.b`` names an importable module or an attribute of one."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


def test_python_names_in_the_docs_exist():
    """Every ``ttakit.x.y`` a page names imports (``ttakit.json`` is a metadata file, ``ttakit.md`` a page)."""
    missing = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for dotted in sorted(set(re.findall(r"\bttakit(?:\.[A-Za-z_]\w*)+", text))):
            if dotted not in ("ttakit.json", "ttakit.md") and not resolves(dotted):
                missing.append(f"{rel(page)}: {dotted}")
    assert not missing, "names that do not import: " + ", ".join(missing)


def test_api_reference_lists_exactly_what_ttakit_exports():
    import ttakit

    table = (DOCS / "reference" / "ttakit.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\| \[?`([\w]+)`", table, re.MULTILINE)
    assert listed == list(ttakit.__all__)


# --------------------------------------------------------------------------- the site builds


def test_docs_build_strict(tmp_path):
    """``mkdocs build --strict``: broken links, missing references and bad docstrings fail."""
    if shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None:
        try:
            import mkdocs  # noqa: F401
        except ImportError:
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail("mkdocs is not installed (pip install -e '.[dev]')")
            pytest.skip("mkdocs is not installed (pip install -e '.[dev]')")
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "benchmarks" / "results" / "recipes.png").is_file()
    assert time.perf_counter() - started < 120
