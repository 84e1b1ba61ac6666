"""The candidate pool: every view the search may choose from, and the random-copy policies users
know from Keras and fastai.

:func:`default_pool` lists size-keeping views for a model of a given input size: flips and
quarter turns, whole-pixel shifts of 1-4 px and half-pixel shifts, crops resized back, zooms of
0.85-1.15, small rotations, brightness and contrast, and, for a model trained with flips, each
geometric view combined with a flip. Training augmentations are read through the shared
vocabulary of :mod:`ttakit.augmentations`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import transforms as T
from ..augmentations import geometry, parse_augmentations
from ..errors import InvalidInputError
from ..policy import Compose, Policy, Step, View
from ._util import check_count, dedupe

__all__ = [
    "default_pool",
    "pool_with_sources",
    "random_copy_views",
    "random_copy_policy",
    "fastai_policy",
    "fastai_merge",
    "baseline_policies",
]


def _make_view(flip: bool, dx: int = 0, dy: int = 0, padding_mode: str = "constant") -> View:
    # Flip first, then shift: the order ttakit.training applies them, so names match the draws.
    steps: list[Step] = []
    if flip:
        steps.append(Step(T.HorizontalFlip(), True))
    if (dx, dy) != (0, 0):
        steps.append(Step(T.Shift([(dx, dy)], padding_mode), (dx, dy)))
    return View(steps)


def random_copy_views(train_augmentations: Sequence[dict | str], n: int = 8, seed: int = 0) -> list[View]:
    """``n`` seeded random draws of the training augmentations, each a concrete :class:`View`.

    Each draw flips horizontally with the recorded probability ``p`` and shifts by a random
    integer ``(dx, dy)`` in ``[-max_pixels, max_pixels]^2`` (``crop`` with zero padding is a shift;
    ``shift`` and ``crop`` together add up), zero fill, as :mod:`ttakit.training` does. ``mixup``
    changes no geometry. Unlike Keras/fastai, which redraw per image, one draw applies to the
    whole batch, so a copy is an invertible, nameable view; the expectation is the same.
    Draws are prefix-stable: the first k of ``n`` draws equal ``random_copy_views(..., k, seed)``.
    Draws may repeat each other or be the identity.

    Example:
        >>> [v.name for v in random_copy_views([{"name": "flip", "p": 0.5}, {"name": "shift", "max_pixels": 2}], 3)]
        ['shift(+0,-1)', 'hflip+shift(-2,-2)', 'shift(+1,+2)']
    """
    n = check_count("n", n)
    geo = geometry(train_augmentations)
    rng = np.random.default_rng(seed)
    views = []
    for _ in range(n):
        flip = bool(rng.random() < geo.flip_p)
        dx, dy = (int(v) for v in rng.integers(-geo.max_shift, geo.max_shift + 1, size=2))
        views.append(_make_view(flip, dx, dy))
    return views


def random_copy_policy(train_augmentations: Sequence[dict | str], n: int = 8, seed: int = 0) -> Policy:
    """Keras-style random-copy TTA: the mean of ``n`` random augmented copies (no plain pass)."""
    views = random_copy_views(train_augmentations, n, seed)
    return Policy(views, name=f"random-copy-{n}", merge_mode="mean", meta={"kind": "random-copy", "n": n, "seed": seed})


def fastai_policy(
    train_augmentations: Sequence[dict | str], n: int = 4, beta: float = 0.25, use_max: bool = False, seed: int = 0
) -> Policy:
    """fastai ``Learner.tta``: plain prediction plus ``n`` augmented passes.

    With ``use_max=False`` the result is ``torch.lerp(aug_mean, plain, beta)``, i.e. a weighted
    mean with weight ``beta`` on the identity view and ``(1 - beta) / n`` on each draw (merged as
    probabilities). With ``use_max=True`` it is the element-wise maximum over the plain and
    augmented probabilities (merge mode ``max``), as fastai does.

    Example:
        >>> fastai_policy(["flip"], n=4).weights
        [0.25, 0.1875, 0.1875, 0.1875, 0.1875]
    """
    n = check_count("n", n)
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta <= 1:
        raise InvalidInputError(f"Expected argument `beta` to be a number in [0, 1], but got {beta!r}")
    views = [View.identity(), *random_copy_views(train_augmentations, n, seed)]
    meta = {"kind": "fastai", "n": n, "beta": float(beta), "use_max": bool(use_max), "seed": seed}
    if use_max:
        return Policy(views, name=f"fastai-max-{n}", merge_mode="max", meta=meta)
    weights = [float(beta)] + [(1.0 - float(beta)) / n] * n
    return Policy(views, name=f"fastai-{n}", merge_mode="mean", weights=weights, meta=meta)


def fastai_merge(plain: torch.Tensor, augmented: torch.Tensor, beta: float = 0.25, use_max: bool = False) -> torch.Tensor:
    """fastai's merge verbatim: ``plain (N, C)`` and ``augmented (n, N, C)`` probabilities -> ``(N, C)``."""
    if use_max:
        return torch.stack([plain, augmented.max(0).values]).max(0).values
    return torch.lerp(augmented.mean(0), plain, beta)


def baseline_policies(train_augmentations: Sequence[dict | str], n_random: int = 8, seed: int = 0) -> dict[str, Policy]:
    """The policies a search is compared with: hflip, and for a model trained with geometric
    augmentations Keras-style random copies and fastai's ``tta`` (mean and max)."""
    out = {"hflip": Compose([T.HorizontalFlip()]).to_policy("hflip")}
    geo = geometry(train_augmentations)
    if geo.flip_p > 0 or geo.max_shift > 0:
        if n_random >= 1:
            out[f"random-copy-{n_random}"] = random_copy_policy(train_augmentations, n_random, seed)
        n_fastai = min(4, n_random)
        if n_fastai >= 1:
            out[f"fastai-{n_fastai}"] = fastai_policy(train_augmentations, n_fastai, 0.25, seed=seed)
            out[f"fastai-max-{n_fastai}"] = fastai_policy(train_augmentations, n_fastai, use_max=True, seed=seed)
    return out


def _check_numbers(name: str, values: object, positive: bool = False) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise InvalidInputError(f"Expected argument `{name}` to be a list of numbers, but got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or (positive and not v > 0):
            kind = "positive numbers" if positive else "numbers"
            raise InvalidInputError(f"Expected argument `{name}` to hold {kind}, but got {list(values)!r}")
    return [float(v) for v in values]


def pool_with_sources(
    image_size: tuple[int, int],
    train_augmentations: Sequence[dict | str] = (),
    *,
    fixed_size: bool = True,
    shifts: Sequence[int] = (1, 2, 3, 4),
    subpixel: Sequence[float] = (0.5,),
    zooms: Sequence[float] = (0.85, 0.9, 0.95, 1.05, 1.1, 1.15),
    angles: Sequence[float] = (4.0, 8.0, 12.0),
    scales: Sequence[float] = (0.9, 1.1),
    crop_fraction: float = 0.9,
    brightness: Sequence[float] = (-0.1, 0.1),
    contrast: Sequence[float] = (0.8, 1.2),
    n_random: int = 8,
    seed: int = 0,
) -> tuple[list[View], list[str]]:
    """:func:`default_pool` and, aligned with it, where each view came from (``identity``,
    ``flip``, ``rot90``, ``shift``, ``subpixel``, ``crop``, ``zoom``, ``rotate``, ``photometric``,
    ``train-aug``, ``random-copy``)."""
    if (
        not isinstance(image_size, Sequence)
        or len(image_size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 4 for v in image_size)
    ):
        raise InvalidInputError(
            f"Expected argument `image_size` to be a (height, width) pair of integers >= 4, but got {image_size!r}"
        )
    height, width = int(image_size[0]), int(image_size[1])
    augs = parse_augmentations(train_augmentations)
    geo = geometry(augs)
    n_random = check_count("n_random", n_random, minimum=0)
    subpixel = _check_numbers("subpixel", subpixel, positive=True)
    zooms = [z for z in _check_numbers("zooms", zooms, positive=True) if z != 1.0]
    angles = [a for a in _check_numbers("angles", angles, positive=True)]
    views: list[View] = []
    sources: list[str] = []

    def add(new: Sequence[View], source: str) -> None:
        views.extend(new)
        sources.extend([source] * len(new))

    def rest(transform: T.BaseTransform) -> list[View]:
        return Compose([transform]).views[1:]

    add([View.identity()], "identity")
    add(rest(T.HorizontalFlip()) + rest(T.VerticalFlip()), "flip")
    add(rest(T.Rotate90([90, 180, 270])), "rot90")
    distances = sorted({int(d) for d in shifts} | set(range(1, min(geo.max_shift, 4) + 1)))
    distances = [d for d in distances if 0 < d < min(height, width)]
    shift_views = rest(T.Shift.around(distances, directions=8)) if distances else []
    add(shift_views, "shift")
    unit = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)]
    half = [(s * ux, s * uy) for s in subpixel for ux, uy in unit]
    sub_views = rest(T.Translate(half)) if half else []
    add(sub_views, "subpixel")
    crop_h, crop_w = max(1, round(height * crop_fraction)), max(1, round(width * crop_fraction))
    if fixed_size:
        # The model takes one input size: crop, then resize back (a zoom by ~1/crop_fraction).
        resize = T.Resize([(height, width)], interpolation="bilinear")
        crops = T.FiveCrops(crop_h, crop_w)
        crop_views = [View([Step(crops, pos), Step(resize, (height, width))]) for pos in crops.params]
    else:
        add(rest(T.Scale(list(scales), interpolation="bilinear")), "scale")
        crop_views = Compose([T.FiveCrops(crop_h, crop_w)]).views
    add(crop_views, "crop")
    zoom_views = rest(T.Zoom(zooms)) if zooms else []
    add(zoom_views, "zoom")
    rotate_views = rest(T.Rotate([s * a for a in angles for s in (1, -1)])) if angles else []
    add(rotate_views, "rotate")
    if brightness:
        add(rest(T.Brightness(list(brightness))), "photometric")
    if contrast:
        add(rest(T.Contrast(list(contrast))), "photometric")
    if geo.flip_p > 0:
        # The model saw mirrored images: every geometric view is also worth trying mirrored.
        flip = Step(T.HorizontalFlip(), True)
        near = [v for v in shift_views if max(abs(p) for s in v.steps for p in s.param) <= max(geo.max_shift, 1) + 1]
        add([View([flip]), *(View([flip, *v.steps]) for v in [*near, *sub_views, *crop_views, *zoom_views, *rotate_views])], "train-aug")
    if n_random and (geo.flip_p > 0 or geo.max_shift > 0):
        add(random_copy_views(augs, n_random, seed), "random-copy")
    return dedupe(views, sources)


def default_pool(
    image_size: tuple[int, int], train_augmentations: Sequence[dict | str] = (), **options: Any
) -> list[View]:
    """The default candidate views, identity first, deduplicated by name.

    Identity; horizontal and vertical flips; rotations by 90, 180, 270 degrees; whole-pixel shifts
    by ``shifts`` (and up to the trained shift, at most 4) in 8 directions, zero fill; sub-pixel
    shifts by ``subpixel`` pixels in 8 directions (:class:`~ttakit.transforms.Translate`); five
    crops of ``crop_fraction`` resized back; zooms by ``zooms`` about the centre
    (:class:`~ttakit.transforms.Zoom`); rotations by ``+-angles`` degrees
    (:class:`~ttakit.transforms.Rotate`); brightness and contrast changes. With a trained flip,
    the flip alone and combined with the nearby shifts, sub-pixel shifts, crops, zooms and
    rotations; with trained geometry, ``n_random`` seeded random draws of the training
    augmentations (:func:`random_copy_views`).

    ``fixed_size``: a classifier with a fixed input size (a dense head, like the seed CNN) gets
    crops resized back; a model that accepts any size gets ``Scale`` views at ``scales`` and
    plain five crops.

    Args:
        image_size: ``(H, W)`` of the model's input.
        train_augmentations: a checkpoint's ``train_augmentations``.
        options: the keyword options of :func:`pool_with_sources` (``fixed_size``, ``shifts``,
            ``subpixel``, ``zooms``, ``angles``, ``scales``, ``crop_fraction``, ``brightness``,
            ``contrast``, ``n_random``, ``seed``).

    Example:
        >>> len(default_pool((28, 28)))
        67
        >>> len(default_pool((28, 28), ["flip", "shift"]))
        119
    """
    return pool_with_sources(image_size, train_augmentations, **options)[0]
