"""The one place ttakit's version is written: pyproject.toml reads it (``dynamic = ["version"]``),
``ttakit.__version__``, ``ttakit --version`` and the policy files' ``ttakit_version`` import it.
This module imports nothing, so any module may import it without an import cycle."""

__version__ = "0.2.0"
