"""Sliding-window tiles as a view: the image is cut into overlapping tiles (as MONAI's sliding-window
inference places them), the model runs on every tile, and masks are merged back with a uniform or
Gaussian window; boxes found on tiles map back to the image (for detection, as SAHI slices)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import functional as F
from ._transform_base import DualTransform, _require_size, register_transform
from .errors import InvalidInputError


def _check_tile_size(given: object) -> tuple[int, int]:
    size = (given, given) if isinstance(given, int) and not isinstance(given, bool) else given
    if (
        isinstance(size, (str, bytes))
        or not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise InvalidInputError(f"size must be a positive integer or a (height, width) pair of them, got {given!r}")
    return int(size[0]), int(size[1])


def _check_overlap(overlap: object) -> float:
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise InvalidInputError(f"overlap must be a fraction of the tile in [0, 1), got {overlap!r}")
    return float(overlap)


@register_transform
class Tiles(DualTransform):
    """Sliding-window inference as a view: cut each image into overlapping tiles of ``size``.

    Tiles are placed as MONAI's ``sliding_window_inference`` places them: stride
    ``int(tile * (1 - overlap))`` per axis, the last tile flush with the far edge, so every pixel
    is covered. The view ``"tiles"`` turns ``(B, C, H, W)`` into ``(B * T, C, th, tw)``
    (image-major: row ``b * T + t`` is tile ``t`` of image ``b``); the engine runs them in passes
    of at most ``max_batch`` images. With ``full_image=True`` the identity view ``"full"`` comes
    first (whole-image prediction beside the tiles, as SAHI does for detection).

    Targets: masks (overlaps averaged with a uniform window or MONAI's Gaussian importance map,
    sigma = 0.125 * tile side) and boxes (each tile's boxes mapped to the image, tile-major per
    image). Keypoints and class labels are refused.

    Args:
        size: tile ``(height, width)``, or one integer for square tiles.
        overlap: fraction of the tile shared with the next one, in ``[0, 1)``.
        weighting: ``"uniform"`` or ``"gaussian"``: how overlapping tile predictions are weighted.
        full_image: add the whole image as a first, identity view.

    Compose it with other transforms to run TTA inside tiled inference:
    ``Compose([Tiles(256, 0.25), HorizontalFlip()])`` flips every tile.

    Example:
        >>> Tiles(4, 0.5).apply_aug_image(torch.zeros(2, 3, 6, 8)).shape
        torch.Size([12, 3, 4, 4])
    """

    identity_param = "full"
    targets = frozenset({"image", "mask", "boxes"})
    uses_input_size = True
    multiplies_batch = True  # one image becomes T tiles: the engine splits such views into passes
    loses_pixels = False  # every pixel is in some tile

    def __init__(
        self,
        size: int | tuple[int, int],
        overlap: float = 0.25,
        weighting: str = "uniform",
        full_image: bool = False,
    ):
        self.tile_size = _check_tile_size(size)
        self.overlap = _check_overlap(overlap)
        if weighting not in F.TILE_WEIGHTINGS:
            raise InvalidInputError(f"weighting must be one of {', '.join(F.TILE_WEIGHTINGS)}, got {weighting!r}")
        self.weighting = weighting
        if not isinstance(full_image, bool):
            raise InvalidInputError(f"full_image must be True or False, got {full_image!r}")
        self.full_image = full_image
        super().__init__("tiles", ["full", "tiles"] if full_image else ["tiles"])

    def origins(self, size: tuple[int, int]) -> list[tuple[int, int]]:
        """The tiles' ``(top, left)`` on an image of ``size = (H, W)``."""
        return F.tile_origins(size, self.tile_size, self.overlap)

    def _check_param(self, tiles: object) -> bool:
        if tiles not in ("full", "tiles"):
            raise InvalidInputError(f"Tiles' parameter must be 'full' or 'tiles', got {tiles!r}")
        return tiles == "tiles"

    def apply_aug_image(self, image, tiles="tiles", **kwargs):
        """``image: (B, C, H, W)`` -> ``(B * T, C, th, tw)`` (``"tiles"``) or ``image`` (``"full"``)."""
        if not self._check_param(tiles):
            return image
        return F.tile(image, self.origins(tuple(image.shape[-2:])), self.tile_size)

    def apply_deaug_mask_weighted(self, mask, weight=None, tiles="tiles", input_size=None, **kwargs):
        """``mask: (B * T, C', th, tw)`` -> ``(values (B, C', H, W), weight)``: see
        :func:`ttakit.functional.untile_mask`."""
        if not self._check_param(tiles):
            return mask, weight
        size = _require_size(self, input_size)
        window = F.tile_window(self.tile_size, self.weighting, device=mask.device)
        return F.untile_mask(mask, self.origins(size), size, window, weight)

    def apply_deaug_mask(self, mask, tiles="tiles", input_size=None, **kwargs):
        """``mask: (B * T, C', th, tw)`` -> ``(B, C', H, W)``: overlaps averaged with the window."""
        return self.apply_deaug_mask_weighted(mask, None, tiles=tiles, input_size=input_size)[0]

    def apply_deaug_boxes(self, boxes, tiles="tiles", input_size=None, **kwargs):
        """``boxes: (B * T, N, 4)`` normalised xyxy on each tile -> ``(B, T * N, 4)`` normalised on
        the image, tile-major per image (entry ``t * N + n`` is box ``n`` of tile ``t``)."""
        if not self._check_param(tiles):
            return boxes
        size = _require_size(self, input_size)
        origins = self.origins(size)
        n_tiles = len(origins)
        if boxes.ndim != 3 or boxes.shape[0] % n_tiles:
            raise InvalidInputError(
                f"boxes must have shape (B * {n_tiles}, N, 4): one row per tile of each image, got {tuple(boxes.shape)}"
            )
        grouped = boxes.reshape(-1, n_tiles, *boxes.shape[1:])
        mapped = [
            F.boxes_uncrop(grouped[:, t], top, left, self.tile_size, size) for t, (top, left) in enumerate(origins)
        ]
        return torch.cat(mapped, dim=1)

    def apply_deaug_label(self, label, *args, **kwargs):
        raise self.refuse("label")

    def apply_deaug_keypoints(self, keypoints, *args, **kwargs):
        raise self.refuse("keypoints")

    def is_identity(self, param):
        return param == "full"

    def step_name(self, param):
        if self.is_identity(param):
            return None
        th, tw = self.tile_size
        return f"tiles{th}x{tw}-o{self.overlap:g}" + ("-gauss" if self.weighting == "gaussian" else "")

    def get_args(self):
        return {
            "size": list(self.tile_size),
            "overlap": self.overlap,
            "weighting": self.weighting,
            "full_image": self.full_image,
        }
