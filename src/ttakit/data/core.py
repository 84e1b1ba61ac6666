"""The in-memory data set type shared by every loader, plus splits and normalization stats."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import DataError, InvalidInputError


@dataclass
class ImageDataset:
    """Images and labels held as tensors.

    Attributes:
        images: ``(N, C, H, W)`` float32 in ``[0, 1]``.
        labels: ``(N,)`` int64 class indices into ``classes``.
        classes: class names, ``len(classes) == num_classes``.
        name: where the data came from, e.g. ``"fashion-mnist/test"``.
        skipped: files a loader could not read, as ``"path: reason"`` lines (never silent).
        files: the file each row came from (image folders: relative to the folder), or None.

    Example:
        >>> ds = ImageDataset(torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]), ["a", "b"])
        >>> len(ds), ds.channels, ds.image_size
        (4, 1, (8, 8))
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = ""
    skipped: list[str] = field(default_factory=list)
    files: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.ndim != 4:
            shape = tuple(self.images.shape) if isinstance(self.images, torch.Tensor) else type(self.images).__name__
            raise InvalidInputError(f"images must be a (N, C, H, W) tensor, got {shape}")
        if not isinstance(self.labels, torch.Tensor) or self.labels.ndim != 1:
            raise InvalidInputError("labels must be a (N,) integer tensor")
        if self.images.shape[0] != self.labels.shape[0]:
            raise InvalidInputError(
                f"images and labels differ in length: {self.images.shape[0]} images, {self.labels.shape[0]} labels"
            )
        self.labels = self.labels.long()
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise DataError(
                f"labels must lie in [0, {len(self.classes) - 1}] for {len(self.classes)} classes, "
                f"got range [{int(self.labels.min())}, {int(self.labels.max())}]"
            )
        if self.files is not None and len(self.files) != len(self.labels):
            raise InvalidInputError(
                f"files must name one file per image: {len(self.files)} files for {len(self.labels)} images"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: torch.Tensor | Sequence[int], name: str | None = None) -> ImageDataset:
        """A new data set holding the rows at ``indices`` (in that order)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        files = [self.files[i] for i in index.tolist()] if self.files is not None else None
        return ImageDataset(self.images[index], self.labels[index], list(self.classes), name or self.name, files=files)

    def head(self, n: int | None) -> ImageDataset:
        """The first ``n`` rows (all rows when ``n`` is None or larger than the data set)."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise InvalidInputError(f"limit must be a positive number of images, got {n}")
        files = self.files[:n] if self.files is not None else None
        return ImageDataset(self.images[:n], self.labels[:n], list(self.classes), self.name, files=files)


def train_val_split(
    dataset: ImageDataset, val_fraction: float = 0.1, seed: int = 0, stratified: bool = True
) -> tuple[ImageDataset, ImageDataset]:
    """Carve a validation split from ``dataset`` with a fixed seed.

    Stratified by class by default, so a small split still holds every class in proportion.
    Returns ``(train, val)``; the two are disjoint and together hold every row.
    """
    if not 0.0 < val_fraction < 1.0:
        raise InvalidInputError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    train_index, val_index = stratified_indices(dataset.labels, val_fraction, seed, stratified, "val_fraction")
    base = dataset.name or "data"
    return dataset.subset(train_index, f"{base}[train]"), dataset.subset(val_index, f"{base}[val]")


def stratified_indices(
    labels: torch.Tensor, fraction: float, seed: int = 0, stratified: bool = True, name: str = "fraction"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of the rows of ``labels`` ``(N,)`` into ``(keep, held)`` sorted index tensors.

    ``held`` holds ``round(fraction * n_c)`` rows of each class ``c`` (stratified) or
    ``round(fraction * N)`` rows overall; the two are disjoint and together hold every row.
    The same labels, fraction and seed always give the same split.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise InvalidInputError(f"{name} must lie strictly between 0 and 1, got {fraction!r}")
    n = len(labels)
    generator = torch.Generator().manual_seed(seed)
    if stratified:
        held_parts = []
        for cls in torch.unique(labels):
            members = torch.nonzero(labels == cls).flatten()
            members = members[torch.randperm(len(members), generator=generator)]
            held_parts.append(members[: int(round(len(members) * fraction))])
        held_index = torch.cat(held_parts) if held_parts else torch.zeros(0, dtype=torch.long)
    else:
        held_index = torch.randperm(n, generator=generator)[: int(round(n * fraction))]
    if len(held_index) == 0 or len(held_index) == n:
        raise DataError(f"{name}={fraction} of {n} images leaves an empty split; use more images or another fraction")
    is_held = torch.zeros(n, dtype=torch.bool)
    is_held[held_index] = True
    return torch.nonzero(~is_held).flatten(), torch.nonzero(is_held).flatten()


def normalization_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of ``images`` ``(N, C, H, W)``.

    Compute these on training data only and reuse them at test time.
    """
    if images.ndim != 4:
        raise InvalidInputError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    flat = images.transpose(0, 1).reshape(images.shape[1], -1).double()
    mean = flat.mean(dim=1)
    std = flat.std(dim=1).clamp_min(1e-6)
    return [float(m) for m in mean], [float(s) for s in std]
