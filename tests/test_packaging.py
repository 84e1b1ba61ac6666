"""Packaging: the version lives in one place, ``import ttakit`` stays light, ``python -m ttakit``
runs the command line, drawing without matplotlib says what to install, and (slow) the wheel
builds without warnings and works from a fresh virtual environment."""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import ttakit
from ttakit import _version
from ttakit.cli import main

from ._fixtures import write_halves_npz

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "ttakit"
# Modules an `import ttakit` must not load: optional extras and heavy imports a function needs.
HEAVY = ("matplotlib", "keras", "onnx", "onnxruntime", "onnxscript", "cleanlab", "sklearn", "h5py",
         "selenium", "ray", "PIL", "tensorflow", "jax", "ensemble_boxes", "pycocotools")
_LOADED = "import json, sys; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(HEAVY))))"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    env.update(extra)
    return env


def _python(code: str, cwd: Path, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", code], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------- the version, one place


def test_version_is_written_in_one_place():
    assert ttakit.__version__ == _version.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", _version.__version__)
    # _version imports nothing, so any module can import it without a cycle
    tree = ast.parse((SRC / "_version.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ttakit._version.__version__"}
    changelog = (ROOT / "CHANGELOG.md").read_text()
    first = re.search(r"^## \[(\d+\.\d+\.\d+)\]", changelog, re.MULTILINE)
    assert first and first.group(1) == _version.__version__, "CHANGELOG.md starts with this release"


def test_policy_takes_the_version_from_version_module_not_the_package():
    # `from . import __version__` in policy.py needs ttakit/__init__ half-run: an import cycle
    tree = ast.parse((SRC / "policy.py").read_text())
    sources = {(n.module, n.level) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               and any(a.name == "__version__" for a in n.names)}
    assert sources == {("_version", 1)}


def test_installed_metadata_matches_the_source():
    try:
        installed = metadata.version("ttakit")
    except metadata.PackageNotFoundError:
        pytest.skip("ttakit is not installed (run from a source tree without `pip install -e .`)")
    assert installed == ttakit.__version__, "the installed ttakit is stale: rerun `make setup`"


# --------------------------------------------------------------------------- a light import


def test_import_ttakit_loads_no_optional_or_heavy_module(tmp_path):
    done = _python(f"HEAVY = {HEAVY!r}\nimport ttakit\n{_LOADED}", tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_job_and_report_modules_import_without_matplotlib(tmp_path):
    # The modules that draw import matplotlib inside the functions that draw, and the CLI's --help
    # builds every parser without importing it.
    code = (
        f"HEAVY = {HEAVY!r}\n"
        "import contextlib, io\n"
        "import ttakit.report, ttakit.jobs.evaluate, ttakit.jobs.demo, ttakit.jobs.audit, ttakit.jobs.lr_find, ttakit.report.html\n"
        "from ttakit.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
        f"{_LOADED}"
    )
    done = _python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "matplotlib" not in json.loads(done.stdout)


# --------------------------------------------------------------------------- python -m ttakit


def test_python_dash_m_runs_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ttakit", "--version"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ttakit {ttakit.__version__}"
    done = subprocess.run([sys.executable, "-m", "ttakit", "--help"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ttakit ") and "predict" in done.stdout
    done = subprocess.run([sys.executable, "-m", "ttakit", "nonsense"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


# --------------------------------------------------------------------------- drawing without matplotlib


@pytest.fixture
def no_matplotlib(monkeypatch):
    """`import matplotlib` (and any submodule) raises ImportError, as where ttakit[plots] is absent."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


@pytest.mark.parametrize("command", [
    ["evaluate", "CKPT", "--out", "OUT"],
    ["search", "CKPT", "--out", "OUT/policy.json"],
    ["audit", "CKPT", "--data", "DATA", "--out", "OUT"],
    ["lr-find", "--data", "DATA", "--out", "OUT/lr.png"],
    ["demo", "--quick", "--out", "OUT"],
])
def test_a_drawing_command_without_matplotlib_says_what_to_install(no_matplotlib, capsys, tmp_path, command):
    # before any work: the checkpoint and data named here do not even exist
    args = [a.replace("CKPT", str(tmp_path / "ckpt")).replace("DATA", str(tmp_path / "d.npz"))
            .replace("OUT", str(tmp_path / "out")) for a in command]
    assert main(["--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"ttakit {command[0]}: error:" in err and "pip install 'ttakit[plots]'" in err, err


def test_evaluate_no_plots_does_not_need_matplotlib(no_matplotlib, capsys, tmp_path):
    assert main(["--no-progress", "evaluate", str(tmp_path / "missing"), "--no-plots", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "ttakit[plots]" not in err and "missing" in err, err  # it got as far as the checkpoint


def test_plot_functions_without_matplotlib_raise_one_clear_error(no_matplotlib, tmp_path):
    from ttakit.predictors import MissingExtraError
    from ttakit.report.plots import plot_lr_find, plot_policy_metrics
    from ttakit.training.lr_find import LRFindResult

    with pytest.raises(MissingExtraError, match=re.escape("pip install 'ttakit[plots]'")):
        plot_policy_metrics([{"name": "none", "accuracy": 0.9, "nll": 0.3}], tmp_path / "p.png")
    result = object.__new__(LRFindResult)  # the import is checked before the result is read
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'ttakit[plots]'")):
        plot_lr_find(result, tmp_path / "lr.png")


# --------------------------------------------------------------------------- the wheel (slow)


def _copy_sources(dest: Path) -> Path:
    """What the sdist is made of, copied, so the build writes nothing into the working tree."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".hypothesis")
    shutil.copytree(ROOT / "src", dest / "src", ignore=ignore)
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`python -m build` (sdist, then the wheel from the sdist) with the installed setuptools:
    --no-isolation, so the test needs no network."""
    pytest.importorskip("build", reason="the build package comes with ttakit[dev]: rerun `make setup`")
    root = tmp_path_factory.mktemp("build")
    source = _copy_sources(root / "source")
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(root / "dist"), str(source)],
                          cwd=root, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    wheels = list((root / "dist").glob("ttakit-*.whl"))
    sdists = list((root / "dist").glob("ttakit-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list((root / "dist").iterdir())
    return wheels[0], sdists[0], done.stdout + done.stderr


@pytest.mark.slow
def test_build_makes_a_wheel_and_an_sdist_without_warnings(built):
    wheel, sdist, log = built
    noisy = [line for line in log.splitlines() if re.search(r"deprecat|warning", line, re.IGNORECASE)]
    assert not noisy, "\n".join(noisy)
    assert wheel.name == f"ttakit-{ttakit.__version__}-py3-none-any.whl"
    assert sdist.name == f"ttakit-{ttakit.__version__}.tar.gz"
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        info = f"ttakit-{ttakit.__version__}.dist-info"
        meta = whl.read(f"{info}/METADATA").decode()
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
    for needed in ("ttakit/__init__.py", "ttakit/__main__.py", "ttakit/_version.py", "ttakit/py.typed",
                   "ttakit/search/__init__.py", "ttakit/models/__init__.py", "ttakit/data/__init__.py",
                   "ttakit/report/review_page.html", "ttakit/report/review_page.css", "ttakit/report/review_page.js",
                   f"{info}/licenses/LICENSE"):
        assert needed in names, needed
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]
    assert "License-Expression: MIT" in meta and f"Version: {ttakit.__version__}" in meta
    core = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not [line for line in core if "matplotlib" in line], core  # plots are the ttakit[plots] extra
    assert 'Requires-Dist: matplotlib>=3.6; extra == "plots"' in meta
    assert "ttakit = ttakit.cli:main" in entry_points


def _core_closure(wheel: Path) -> set[str]:
    """The distributions the wheel's core requirements need, found among those installed here."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as whl:
        info = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        meta = whl.read(info).decode()
    todo = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    seen: set[str] = set()
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = metadata.distribution(req.name).metadata["Name"]
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        todo.extend(metadata.distribution(name).requires or [])
    return seen


def _deps_folder(wheel: Path, dest: Path) -> Path:
    """Links to the installed torch, numpy, ... (the wheel's core dependencies and theirs, nothing
    else: no matplotlib, no ttakit) so the fresh venv downloads nothing."""
    dest.mkdir()
    for name in _core_closure(wheel):
        dist = metadata.distribution(name)
        site = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            if top != "__pycache__" and (site / top).exists() and not (dest / top).exists():
                (dest / top).symlink_to(site / top)
    return dest


@pytest.fixture(scope="module")
def venv(built, tmp_path_factory):
    """A fresh venv holding the wheel, next to the torch already installed (a .pth file points at
    links to the installed core dependencies); pip resolves the wheel's requirements offline."""
    wheel = built[0]
    root = tmp_path_factory.mktemp("venv")
    deps = _deps_folder(wheel, root / "deps")
    env_dir = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=300)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "_ttakit_test_deps.pth").write_text(f"{deps}\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
                           "--no-cache-dir", "--disable-pip-version-check", str(wheel)],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return env_dir, Path(purelib)


def _ttakit(env_dir: Path, cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(env_dir / "bin" / "ttakit"), *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)
    if ok:
        assert done.returncode == 0, f"ttakit {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.slow
def test_the_wheel_works_from_a_fresh_venv(venv, tmp_path):
    from PIL import Image

    env_dir, purelib = venv
    python = str(env_dir / "bin" / "python")
    where = _python(
        f"HEAVY = {HEAVY!r}\nimport importlib.metadata, importlib.util, json, ttakit\n"
        "print(json.dumps([ttakit.__file__, ttakit.__version__, importlib.metadata.version('ttakit'),"
        " importlib.util.find_spec('matplotlib') is None]))\n" + _LOADED,
        tmp_path, python=python,
    )
    assert where.returncode == 0, where.stderr
    first, loaded = where.stdout.strip().splitlines()
    file, version, installed, no_matplotlib = json.loads(first)
    assert Path(file).is_relative_to(purelib), file  # the wheel's copy, not the source tree
    assert version == installed == ttakit.__version__
    assert no_matplotlib, "the core install must not need matplotlib"
    assert json.loads(loaded) == []

    assert _ttakit(env_dir, tmp_path, "--version").stdout.strip() == f"ttakit {ttakit.__version__}"
    assert "predict" in _ttakit(env_dir, tmp_path, "--help").stdout
    done = subprocess.run([python, "-m", "ttakit", "--version"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == f"ttakit {ttakit.__version__}", done.stderr

    # train in seconds on a tiny .npz, then predict on 20 PNGs
    data = write_halves_npz(tmp_path / "halves.npz", n=96, size=8)
    _ttakit(env_dir, tmp_path, "--no-progress", "train", "--data", str(data), "--epochs", "1",
            "--batch-size", "16", "--out", "ckpt")
    assert (tmp_path / "ckpt" / "checkpoint.json").exists()
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        pixels = rng.uniform(0, 50, size=(8, 8))
        pixels[:, :4] += 180 if i % 2 == 0 else 0
        pixels[:, 4:] += 0 if i % 2 == 0 else 180
        Image.fromarray(pixels.astype(np.uint8)).save(images / f"img{i:02d}.png")
    _ttakit(env_dir, tmp_path, "--no-progress", "predict", "ckpt", "images", "--policy", "hflip", "--out", "preds.csv")
    with open(tmp_path / "preds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20
    assert sorted(Path(r["path"]).name for r in rows) == [f"img{i:02d}.png" for i in range(20)]

    # a drawing command in a core install: one line naming the extra, before any work
    done = _ttakit(env_dir, tmp_path, "--no-progress", "evaluate", "ckpt", "--out", "ev", ok=False)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "pip install 'ttakit[plots]'" in done.stderr
    assert not (tmp_path / "ev").exists()


def test_the_deps_folder_holds_the_core_dependencies_only(tmp_path):
    # the fresh venv above must not see an optional extra nor the source tree's ttakit
    whl = tmp_path / "ttakit-0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("ttakit-0.dist-info/METADATA", "Name: ttakit\nRequires-Dist: numpy>=1.24\n"
                   'Requires-Dist: matplotlib>=3.6; extra == "plots"\n')
    closure = _core_closure(whl)
    assert "numpy" in closure and "matplotlib" not in closure and "ttakit" not in closure
