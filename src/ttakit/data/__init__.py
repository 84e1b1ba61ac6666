"""Data sets as tensors: Fashion-MNIST, CIFAR-10, image folders, NumPy archives."""

from .core import ImageDataset, normalization_stats, train_val_split

__all__ = ["ImageDataset", "normalization_stats", "train_val_split"]
