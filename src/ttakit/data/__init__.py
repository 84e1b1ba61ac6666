"""Data sets as tensors: Fashion-MNIST, CIFAR-10, image folders, NumPy archives; canvases of
Fashion-MNIST items for segmentation and detection."""

from .canvases import Canvases, load_fashion_canvases, make_canvases
from .cifar10 import load_cifar10
from .core import ImageDataset, normalization_stats, stratified_indices, train_val_split
from .fashion_mnist import FASHION_MNIST_CLASSES, ensure_fashion_mnist, load_fashion_mnist
from .image_folder import list_image_files, load_image_folder, load_images
from .npz import load_npz
from .registry import list_datasets, load_dataset, register_dataset
from .splits import SPLITS, Splits, dataset_sha256, has_own_test_split, load_split, make_splits

__all__ = [
    "Canvases",
    "load_fashion_canvases",
    "make_canvases",
    "FASHION_MNIST_CLASSES",
    "ImageDataset",
    "SPLITS",
    "Splits",
    "dataset_sha256",
    "has_own_test_split",
    "load_split",
    "make_splits",
    "stratified_indices",
    "ensure_fashion_mnist",
    "list_datasets",
    "list_image_files",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "load_image_folder",
    "load_images",
    "load_npz",
    "normalization_stats",
    "register_dataset",
    "train_val_split",
]
