"""ttakit: test-time augmentation for image models."""

__version__ = "0.1.0"
