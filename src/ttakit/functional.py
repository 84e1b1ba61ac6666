"""Pure tensor operations for test-time augmentation and their inverses.

Conventions
-----------
* Images and masks are ``(B, C, H, W)`` tensors (NCHW).
* Keypoints are ``(B, N, 2)`` tensors of ``(x, y)`` *normalised* to ``[0, 1]`` by the width and
  height of the image they refer to (``x`` to the right, ``y`` down, the image spanning
  ``[0, 1] x [0, 1]`` edge to edge).
* Boxes are ``(B, N, 4)`` tensors of normalised ``(x1, y1, x2, y2)`` corners.
* Shifts are ``(dx, dy)`` whole pixels: content moves ``dx`` to the right and ``dy`` down.

No function modifies its input. Most return a new tensor; a few return a view of the input
(:func:`crop`) or the input itself when there is nothing to do (a same-size :func:`resize`, a
zero :func:`shift`), so write into a result only after ``.clone()``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .errors import InvalidInputError

__all__ = [
    "INTERPOLATION_MODES",
    "PADDING_MODES",
    "CROP_POSITIONS",
    "check_image",
    "check_points",
    "hflip",
    "vflip",
    "rot90",
    "resize",
    "scaled_size",
    "scale",
    "unscale",
    "crop",
    "crop_origin",
    "shift",
    "unshift_mask",
    "TILE_WEIGHTINGS",
    "uncrop_mask",
    "shift_coverage",
    "tile_origins",
    "tile_window",
    "tile",
    "untile_mask",
    "add",
    "multiply",
    "brightness",
    "contrast",
    "keypoints_hflip",
    "keypoints_vflip",
    "keypoints_rot90",
    "keypoints_shift",
    "keypoints_uncrop",
    "boxes_from_corners",
    "boxes_hflip",
    "boxes_vflip",
    "boxes_rot90",
    "boxes_shift",
    "boxes_uncrop",
    "normalize_interpolation",
]

INTERPOLATION_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
# ttach documents "linear"; for 4-D tensors F.interpolate calls that "bilinear".
_INTERPOLATION_ALIASES = {"linear": "bilinear", "lenear": "bilinear"}
PADDING_MODES = ("constant", "reflect", "replicate", "circular")
CROP_POSITIONS = ("lt", "lb", "rb", "rt", "center")

PaddingMode = Literal["constant", "reflect", "replicate", "circular"]


def check_image(x: object, name: str = "image") -> torch.Tensor:
    """Validate an NCHW image batch and return it.

    Raises :class:`~ttakit.errors.InvalidInputError` for a non-tensor, a tensor whose rank is not 4,
    an integer tensor, or one that looks like NHWC (channels last).
    """
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        hint = ""
        if x.ndim == 3:  # (C, H, W) one image, or (B, H, W) grayscale images?
            batch = f" (a batch of {x.shape[0]} grayscale images (B, H, W): add the channel axis with x.unsqueeze(1))"
            single = f" (one {x.shape[0]}-channel image (C, H, W): add the batch axis with x.unsqueeze(0))"
            hint = single if x.shape[0] == 1 else single + " or" + batch if x.shape[0] in (3, 4) else batch
        raise InvalidInputError(f"{name} must have shape (B, C, H, W), got {x.ndim}-D shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise InvalidInputError(
            f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert with x.float() / 255"
        )
    channels, width = x.shape[1], x.shape[3]
    if width in (1, 3, 4) and channels > 4 and x.shape[2] > 4:
        raise InvalidInputError(
            f"{name} looks channels-last (NHWC) with shape {tuple(x.shape)}; ttakit expects (B, C, H, W): "
            f"use x.permute(0, 3, 1, 2)"
        )
    return x


def check_points(x: object, size: int = 2, name: str = "keypoints") -> torch.Tensor:
    """Validate a ``(B, N, size)`` tensor of normalised points (``size=2``) or boxes (``size=4``)."""
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor of shape (B, N, {size}), got {type(x).__name__}")
    if x.ndim < 2 or x.shape[-1] != size or not x.is_floating_point():
        raise InvalidInputError(
            f"{name} must be a floating-point tensor of shape (B, N, {size}), got shape {tuple(x.shape)} "
            f"and dtype {x.dtype}"
        )
    return x


# --------------------------------------------------------------------------- geometry: images


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left-right. ``x: (..., H, W)``; its own inverse."""
    return x.flip(-1)


def vflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror top-bottom. ``x: (..., H, W)``; its own inverse."""
    return x.flip(-2)


def rot90(x: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Rotate by ``k`` quarter turns as ``torch.rot90(x, k, (-2, -1))`` (counter-clockwise on screen).

    ``x: (..., H, W)`` -> ``(..., W, H)`` for odd ``k``. The inverse is ``rot90(y, -k)``.
    """
    return torch.rot90(x, k % 4, (-2, -1))


def normalize_interpolation(mode: str, align_corners: bool | None = None) -> str:
    """Map an interpolation name to the one ``F.interpolate`` accepts for 4-D tensors.

    ``"linear"`` (as ttach documents it) becomes ``"bilinear"``. ``align_corners`` is only valid
    with ``bilinear``/``bicubic``.
    """
    canonical = _INTERPOLATION_ALIASES.get(mode, mode)
    if canonical not in INTERPOLATION_MODES:
        raise InvalidInputError(
            f"interpolation must be one of {', '.join(INTERPOLATION_MODES)} (or 'linear'), got {mode!r}"
        )
    if align_corners is not None and canonical not in ("bilinear", "bicubic"):
        raise InvalidInputError(
            f"align_corners={align_corners} only applies to 'bilinear' or 'bicubic' interpolation, "
            f"got interpolation={mode!r}; leave align_corners=None"
        )
    return canonical


def resize(
    x: torch.Tensor, size: tuple[int, int], interpolation: str = "nearest", align_corners: bool | None = None
) -> torch.Tensor:
    """Resize ``x: (B, C, H, W)`` to ``size = (h, w)``."""
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise InvalidInputError(f"size must be positive (height, width), got {tuple(size)}")
    if (h, w) == tuple(x.shape[-2:]):
        return x
    mode = normalize_interpolation(interpolation, align_corners)
    return F.interpolate(x, size=(h, w), mode=mode, align_corners=align_corners)


def scaled_size(size: tuple[int, int], factor: float) -> tuple[int, int]:
    """The size ttach's ``Scale`` produces: ``(int(h * factor), int(w * factor))``."""
    h, w = int(size[0] * factor), int(size[1] * factor)
    if h < 1 or w < 1:
        raise InvalidInputError(
            f"scale {factor} turns a {size[0]}x{size[1]} image into {h}x{w}; use a larger scale or image"
        )
    return h, w


def scale(
    x: torch.Tensor, factor: float, interpolation: str = "nearest", align_corners: bool | None = None
) -> torch.Tensor:
    """Scale the spatial size of ``x: (B, C, H, W)`` by ``factor`` (sizes truncated as in ttach).

    Invert with :func:`resize` back to the recorded ``(H, W)``, never with ``1 / factor``: that does
    not round-trip odd sizes (``int(5 * 0.5) = 2``, ``int(2 / 0.5) = 4``).
    """
    return resize(x, scaled_size(tuple(x.shape[-2:]), factor), interpolation, align_corners)


def unscale(
    x: torch.Tensor, factor: float, interpolation: str = "nearest", align_corners: bool | None = None
) -> torch.Tensor:
    """ttach's inverse of :func:`scale`, for when the input size was not recorded: scale
    ``x: (B, C, H', W')`` by ``1 / factor``, i.e. to ``(int(H' * (1 / factor)), int(W' * (1 / factor)))``.

    Exact whenever ``scale`` did not truncate (``H * factor`` whole, as for ``H=4``, ``factor=2``);
    otherwise off by the truncation (``H=5``, ``factor=0.5``: ``5 -> 2 -> 4``). Prefer
    :func:`resize` to the recorded size, as :class:`ttakit.Transformer` does.
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise InvalidInputError(f"factor must be a positive number, got {factor!r}")
    return scale(x, 1 / factor, interpolation, align_corners)


def crop_origin(size: tuple[int, int], crop_size: tuple[int, int], position: str) -> tuple[int, int]:
    """Top-left ``(top, left)`` of a named crop (``lt``, ``lb``, ``rb``, ``rt``, ``center``) as ttach places it."""
    (h, w), (ch, cw) = size, crop_size
    if ch > h or cw > w or ch < 1 or cw < 1:
        raise InvalidInputError(f"crop of {ch}x{cw} does not fit an image of {h}x{w}; crop size must be 1..image size")
    if position == "lt":
        return 0, 0
    if position == "lb":
        return h - ch, 0
    if position == "rb":
        return h - ch, w - cw
    if position == "rt":
        return 0, w - cw
    if position == "center":
        return h // 2 - ch // 2, w // 2 - cw // 2
    raise InvalidInputError(f"crop position must be one of {', '.join(CROP_POSITIONS)}, got {position!r}")


def crop(x: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """Crop ``x: (B, C, H, W)`` to ``(B, C, height, width)`` starting at ``(top, left)``."""
    h, w = x.shape[-2:]
    if top < 0 or left < 0 or top + height > h or left + width > w:
        raise InvalidInputError(f"crop ({top}, {left}, {height}, {width}) falls outside a {h}x{w} image")
    return x[..., top : top + height, left : left + width]


def shift(x: torch.Tensor, dx: int, dy: int, padding_mode: PaddingMode = "constant") -> torch.Tensor:
    """Translate ``x: (B, C, H, W)`` by whole pixels: content moves ``dx`` right and ``dy`` down.

    The uncovered border is filled by ``padding_mode`` (zeros, reflection, edge replication, or
    wrap-around for ``"circular"``). The shape is unchanged.
    """
    dx, dy = int(dx), int(dy)
    if dx == 0 and dy == 0:
        return x
    h, w = x.shape[-2:]
    if abs(dx) >= w or abs(dy) >= h:
        raise InvalidInputError(f"shift ({dx}, {dy}) is as large as the {h}x{w} image; use |dx| < W and |dy| < H")
    if padding_mode == "circular":
        return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    if padding_mode == "constant":
        # Copy into zeros: cheaper than pad-then-slice and allocates only the output.
        out = torch.zeros_like(x)
        out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
            ..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
        ]
        return out
    if padding_mode not in PADDING_MODES:
        raise InvalidInputError(f"padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}")
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode=padding_mode)
    return padded[..., max(-dy, 0) : max(-dy, 0) + h, max(-dx, 0) : max(-dx, 0) + w]


def unshift_mask(mask: torch.Tensor, dx: int, dy: int, padding_mode: PaddingMode = "constant") -> torch.Tensor:
    """Map a dense prediction ``mask: (B, C, H, W)`` made on a shifted image back to the original frame.

    Exact for every pixel the shifted view saw. The ``|dx|``/``|dy|`` wide strip it never saw
    is filled with the nearest prediction it made (edge replication), so a merge over views is
    not biased towards zero there. With ``padding_mode="circular"`` the inverse is exact everywhere.
    """
    return shift(mask, -dx, -dy, "circular" if padding_mode == "circular" else "replicate")


# --------------------------------------------------------------------------- masks and tiles
# Views that lose pixels (crops, shifts with padding) map a mask back by pasting it into the full
# frame together with a weight map ``(1, 1, H, W)`` saying which pixels the view saw; tiles merge
# overlapping tile predictions with a per-pixel window (uniform, or MONAI's Gaussian importance map).

TILE_WEIGHTINGS = ("uniform", "gaussian")


def uncrop_mask(mask: torch.Tensor, top: int, left: int, size: tuple[int, int]) -> torch.Tensor:
    """Paste ``mask: (B, C, h, w)`` predicted on a crop at ``(top, left)`` into a zero frame of
    ``size = (H, W)``: ``(B, C, H, W)``. Pixels outside the crop are 0 (unseen: weight them 0)."""
    h, w = int(mask.shape[-2]), int(mask.shape[-1])
    height, width = int(size[0]), int(size[1])
    if top < 0 or left < 0 or top + h > height or left + w > width:
        raise InvalidInputError(f"a {h}x{w} mask at ({top}, {left}) falls outside a {height}x{width} image")
    out = mask.new_zeros(*mask.shape[:-2], height, width)
    out[..., top : top + h, left : left + w] = mask
    return out


def shift_coverage(weight: torch.Tensor, dx: int, dy: int, padding_mode: PaddingMode = "constant") -> torch.Tensor:
    """The weight map ``(..., H, W)`` of a view shifted by ``(dx, dy)``, in the original frame: the
    ``|dx|``/``|dy|`` strip the view never saw gets 0 (none with ``"circular"``, which wraps)."""
    if padding_mode == "circular":
        return shift(weight, -dx, -dy, "circular")
    return shift(weight, -dx, -dy, "constant")


def _axis_starts(length: int, tile: int, overlap: float) -> list[int]:
    # MONAI's dense_patch_slices on one axis: stride int(tile * (1 - overlap)) (at least 1), the
    # last tile moved back flush with the far edge.
    if tile == length:
        return [0]
    stride = max(1, int(tile * (1 - overlap)))
    starts, start = [], 0
    while start + tile < length:
        starts.append(start)
        start += stride
    starts.append(length - tile)
    return starts


def tile_origins(size: tuple[int, int], tile_size: tuple[int, int], overlap: float) -> list[tuple[int, int]]:
    """Top-left ``(top, left)`` of the tiles of ``tile_size = (th, tw)`` covering an image of
    ``size = (H, W)``, row by row, as MONAI's sliding-window inference places them: stride
    ``int(t * (1 - overlap))`` per axis, the last tile flush with the far edge, every pixel covered.

    Example:
        >>> tile_origins((10, 6), (4, 6), 0.5)
        [(0, 0), (2, 0), (4, 0), (6, 0)]
    """
    (h, w), (th, tw) = (int(size[0]), int(size[1])), (int(tile_size[0]), int(tile_size[1]))
    if th > h or tw > w:
        raise InvalidInputError(
            f"tiles of {th}x{tw} do not fit an image of {h}x{w}; use tiles at most the image size"
        )
    if not 0 <= overlap < 1:
        raise InvalidInputError(f"overlap must be a fraction of the tile in [0, 1), got {overlap!r}")
    return [(top, left) for top in _axis_starts(h, th, overlap) for left in _axis_starts(w, tw, overlap)]


def tile_window(
    tile_size: tuple[int, int], weighting: str = "uniform", dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """The ``(th, tw)`` weight of each pixel of a tile when overlapping tiles are merged: ones
    (``"uniform"``) or MONAI's Gaussian importance map (``"gaussian"``: sigma = 0.125 * tile side,
    peak 1 at the centre, clamped below at the smallest value or 1e-3, whichever is larger, so
    no pixel is left unweighted)."""
    th, tw = int(tile_size[0]), int(tile_size[1])
    if weighting == "uniform":
        return torch.ones(th, tw, dtype=dtype, device=device)
    if weighting != "gaussian":
        raise InvalidInputError(f"weighting must be one of {', '.join(TILE_WEIGHTINGS)}, got {weighting!r}")
    axes = []
    for side in (th, tw):
        x = torch.arange(side, dtype=torch.float32, device=device) - (side - 1) / 2.0
        axes.append(torch.exp(x**2 / (-2 * (0.125 * side) ** 2)))
    window = axes[0][:, None] * axes[1][None, :]
    floor = max(float(window.min()), 1e-3)
    return window.clamp(min=floor).to(dtype)


def tile(x: torch.Tensor, origins: list[tuple[int, int]], tile_size: tuple[int, int]) -> torch.Tensor:
    """Cut ``x: (B, C, H, W)`` into tiles at ``origins``: ``(B * T, C, th, tw)``, image-major (row
    ``b * T + t`` is tile ``t`` of image ``b``)."""
    th, tw = int(tile_size[0]), int(tile_size[1])
    tiles = torch.stack([x[..., top : top + th, left : left + tw] for top, left in origins], dim=1)
    return tiles.reshape(-1, *tiles.shape[2:])


def untile_mask(
    tiles: torch.Tensor,
    origins: list[tuple[int, int]],
    size: tuple[int, int],
    window: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge tile predictions back into the frame: the inverse of :func:`tile` for masks.

    Args:
        tiles: ``(B * T, C, th, tw)`` predictions, image-major as :func:`tile` cuts them.
        origins: the T tiles' ``(top, left)``.
        size: the image's ``(H, W)``.
        window: ``(th, tw)`` per-pixel tile weight (:func:`tile_window`).
        weight: what each tile saw: None (all of it), or ``(1, 1, th, tw)`` / ``(B * T, 1, th, tw)``.

    Returns:
        ``(values (B, C, H, W), weight)``: ``values`` the window-weighted mean over the tiles that
        saw each pixel (0 where none did); ``weight`` None when ``weight`` was None (tiles cover
        every pixel), else ``(1 or B, 1, H, W)`` in ``[0, 1]``: the window weight of the tiles that
        saw the pixel over that of all tiles covering it.
    """
    n_tiles = len(origins)
    if tiles.shape[0] % n_tiles:
        raise InvalidInputError(
            f"tiles must hold B * {n_tiles} rows (one per tile of each image), got shape {tuple(tiles.shape)}"
        )
    b, th, tw = tiles.shape[0] // n_tiles, int(tiles.shape[-2]), int(tiles.shape[-1])
    grouped = tiles.reshape(b, n_tiles, *tiles.shape[1:])
    window = window.to(device=tiles.device, dtype=tiles.dtype if tiles.is_floating_point() else torch.float32)
    per_tile = None
    if weight is not None:
        rows = 1 if weight.shape[0] == 1 else b
        per_tile = weight.reshape(rows, -1, 1, th, tw).expand(rows, n_tiles, 1, th, tw).to(window.dtype)
    h, w = int(size[0]), int(size[1])
    values = grouped.new_zeros(b, *grouped.shape[2:-2], h, w, dtype=window.dtype)
    total = window.new_zeros(1 if per_tile is None else per_tile.shape[0], 1, h, w)
    full = window.new_zeros(1, 1, h, w) if per_tile is not None else None
    for t, (top, left) in enumerate(origins):
        area = (..., slice(top, top + th), slice(left, left + tw))
        tile_weight = window if per_tile is None else window * per_tile[:, t]
        values[area] += grouped[:, t] * tile_weight
        total[area] += tile_weight
        if full is not None:
            full[area] += window
    seen = total > 0
    values = torch.where(seen, values / torch.where(seen, total, torch.ones_like(total)), torch.zeros_like(values))
    return values, (None if full is None else total / full)


# --------------------------------------------------------------------------- photometric


def add(x: torch.Tensor, value: float) -> torch.Tensor:
    """``x + value``."""
    return x + value


def multiply(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x * factor``."""
    return x * factor


def brightness(x: torch.Tensor, delta: float, clip: bool = True) -> torch.Tensor:
    """Add ``delta`` to every pixel of ``x: (B, C, H, W)``; clamp to ``[0, 1]`` when ``clip``."""
    out = x + delta
    return out.clamp(0.0, 1.0) if clip else out


def contrast(x: torch.Tensor, factor: float, clip: bool = True) -> torch.Tensor:
    """Scale each image's deviation from its per-channel mean by ``factor``. ``x: (B, C, H, W)``."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    out = (x - mean) * factor + mean
    return out.clamp(0.0, 1.0) if clip else out


# --------------------------------------------------------------------------- keypoints (B, N, 2)


def _xy(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_points(points)
    return points[..., 0], points[..., 1]


def keypoints_hflip(points: torch.Tensor) -> torch.Tensor:
    """Keypoints of a left-right mirrored image. ``points: (B, N, 2)`` normalised; self-inverse."""
    x, y = _xy(points)
    return torch.stack([1.0 - x, y], dim=-1)


def keypoints_vflip(points: torch.Tensor) -> torch.Tensor:
    """Keypoints of a top-bottom mirrored image. ``points: (B, N, 2)`` normalised; self-inverse."""
    x, y = _xy(points)
    return torch.stack([x, 1.0 - y], dim=-1)


def keypoints_rot90(points: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Keypoints of an image rotated by :func:`rot90` with ``k``. ``points: (B, N, 2)`` normalised.

    Coordinates are normalised by the size of the image they refer to, so this holds for
    non-square images too (the rotated image is ``W x H``). The inverse is ``k -> -k``.
    """
    k %= 4
    x, y = _xy(points)
    if k == 0:
        return points.clone()
    if k == 1:
        xy = (y, 1.0 - x)
    elif k == 2:
        xy = (1.0 - x, 1.0 - y)
    else:
        xy = (1.0 - y, x)
    return torch.stack(xy, dim=-1)


def keypoints_shift(points: torch.Tensor, dx: int, dy: int, size: tuple[int, int]) -> torch.Tensor:
    """Keypoints of an image of ``size = (H, W)`` shifted by ``(dx, dy)`` pixels. Inverse: ``-dx, -dy``."""
    check_points(points)
    h, w = size
    offset = points.new_tensor([dx / w, dy / h])
    return points + offset


def keypoints_uncrop(
    points: torch.Tensor, top: int, left: int, crop_size: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Map keypoints normalised to a crop back to the full image of ``size = (H, W)``."""
    check_points(points)
    (ch, cw), (h, w) = crop_size, size
    factor = points.new_tensor([cw / w, ch / h])
    offset = points.new_tensor([left / w, top / h])
    return points * factor + offset


# --------------------------------------------------------------------------- boxes (B, N, 4)


def boxes_from_corners(corner_a: torch.Tensor, corner_b: torch.Tensor) -> torch.Tensor:
    """Boxes ``(..., 4)`` spanning two opposite corners ``(..., 2)`` given in any order."""
    low = torch.minimum(corner_a, corner_b)
    high = torch.maximum(corner_a, corner_b)
    return torch.cat([low, high], dim=-1)


def _map_boxes(boxes: torch.Tensor, point_map) -> torch.Tensor:
    check_points(boxes, 4, "boxes")
    # Every op here maps axis-aligned boxes to axis-aligned boxes, so mapping two corners is exact.
    return boxes_from_corners(point_map(boxes[..., 0:2]), point_map(boxes[..., 2:4]))


def boxes_hflip(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes of a left-right mirrored image. ``boxes: (B, N, 4)`` normalised xyxy; self-inverse."""
    return _map_boxes(boxes, keypoints_hflip)


def boxes_vflip(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes of a top-bottom mirrored image. ``boxes: (B, N, 4)`` normalised xyxy; self-inverse."""
    return _map_boxes(boxes, keypoints_vflip)


def boxes_rot90(boxes: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Boxes of an image rotated by :func:`rot90` with ``k``. Inverse: ``k -> -k``."""
    return _map_boxes(boxes, lambda p: keypoints_rot90(p, k))


def boxes_shift(boxes: torch.Tensor, dx: int, dy: int, size: tuple[int, int]) -> torch.Tensor:
    """Boxes of an image of ``size = (H, W)`` shifted by ``(dx, dy)`` pixels."""
    return _map_boxes(boxes, lambda p: keypoints_shift(p, dx, dy, size))


def boxes_uncrop(
    boxes: torch.Tensor, top: int, left: int, crop_size: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Map boxes normalised to a crop back to the full image of ``size = (H, W)``."""
    return _map_boxes(boxes, lambda p: keypoints_uncrop(p, top, left, crop_size, size))


# =========================================================================== search views (helper B)
# Sub-pixel shifts, small rotations and zooms that keep the image size, resampled through
# ``grid_sample``. One affine map in pixel coordinates (x right, y down, pixel centres at
# ``i + 0.5``) drives both the image and the exact keypoint inverse:
#     p_out = c + scale * R(angle) (p_in - c) + (dx, dy),    c = (W / 2, H / 2)
# where ``R(angle)`` turns content counter-clockwise on screen (as :func:`rot90`).

import math  # noqa: E402


def _rotation(angle: float) -> tuple[float, float, float, float]:
    # (x, y) -> (x cos + y sin, -x sin + y cos): counter-clockwise on screen with y pointing down
    rad = math.radians(float(angle))
    cos, sin = math.cos(rad), math.sin(rad)
    return cos, sin, -sin, cos


def affine(
    x: torch.Tensor, angle: float = 0.0, scale: float = 1.0, dx: float = 0.0, dy: float = 0.0
) -> torch.Tensor:
    """Rotate by ``angle`` degrees (counter-clockwise on screen), scale by ``scale`` about the
    centre and translate by ``(dx, dy)`` pixels (may be fractional) ``x: (B, C, H, W)``; bilinear,
    zero fill, same size. ``affine(x)`` with the defaults returns ``x``.

    Keypoints follow exactly with :func:`keypoints_affine` (inverse: :func:`keypoints_unaffine`).
    """
    if angle == 0 and scale == 1 and dx == 0 and dy == 0:
        return x
    if not scale > 0:
        raise InvalidInputError(f"scale must be a positive number, got {scale!r}")
    h, w = x.shape[-2:]
    a, b, c, d = _rotation(-angle)  # the inverse rotation, to sample the input
    sx, sy = w / 2.0, h / 2.0
    # u_in = D^-1 R^-1 (D u_out - t) / s with D = diag(W/2, H/2), u in grid_sample's [-1, 1]
    theta = torch.tensor(
        [
            [a / scale, b * sy / sx / scale, -(a * dx + b * dy) / sx / scale],
            [c * sx / sy / scale, d / scale, -(c * dx + d * dy) / sy / scale],
        ],
        dtype=torch.float32,
    )
    work = x.float()
    grid = F.affine_grid(theta.to(work.device)[None].expand(x.shape[0], 2, 3), list(work.shape), align_corners=False)
    out = F.grid_sample(work, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.to(x.dtype) if x.is_floating_point() else out


def keypoints_affine(
    points: torch.Tensor, angle: float, scale: float, dx: float, dy: float, size: tuple[int, int]
) -> torch.Tensor:
    """Where keypoints ``(B, N, 2)`` (normalised) of an image of ``size = (H, W)`` land under
    :func:`affine` with the same arguments."""
    check_points(points)
    h, w = size
    a, b, c, d = _rotation(angle)
    px = points[..., 0] * w - w / 2.0
    py = points[..., 1] * h - h / 2.0
    ox = w / 2.0 + scale * (a * px + b * py) + dx
    oy = h / 2.0 + scale * (c * px + d * py) + dy
    return torch.stack([ox / w, oy / h], dim=-1)


def keypoints_unaffine(
    points: torch.Tensor, angle: float, scale: float, dx: float, dy: float, size: tuple[int, int]
) -> torch.Tensor:
    """The exact inverse of :func:`keypoints_affine`: keypoints found on the transformed image,
    mapped back to the original frame."""
    check_points(points)
    h, w = size
    a, b, c, d = _rotation(-angle)
    px = (points[..., 0] * w - w / 2.0 - dx) / scale
    py = (points[..., 1] * h - h / 2.0 - dy) / scale
    return torch.stack([(w / 2.0 + a * px + b * py) / w, (h / 2.0 + c * px + d * py) / h], dim=-1)


def boxes_unaffine(boxes: torch.Tensor, scale: float, dx: float, dy: float, size: tuple[int, int]) -> torch.Tensor:
    """Boxes ``(B, N, 4)`` found on an image zoomed by ``scale`` and translated by ``(dx, dy)``
    pixels (no rotation: a rotated box is not a box), mapped back to the original frame."""
    check_points(boxes, size=4)
    corners = keypoints_unaffine(boxes.reshape(*boxes.shape[:-1], 2, 2).flatten(-3, -2), 0.0, scale, dx, dy, size)
    corners = corners.reshape(*boxes.shape[:-1], 2, 2)
    return boxes_from_corners(corners[..., 0, :], corners[..., 1, :])


__all__ += ["affine", "keypoints_affine", "keypoints_unaffine", "boxes_unaffine"]
