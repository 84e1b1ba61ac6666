"""Bridges from ttakit to other runtimes: :mod:`ttakit.integrations.ray` (Ray Data batch
inference, ``pip install "ttakit[ray]"``). Each bridge imports its runtime only when used."""

__all__ = ["ray"]
