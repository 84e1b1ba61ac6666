"""A small CenterNet-style anchor-free detector (``centernet-small``), its targets, loss and decoder.

Objects are points: a class heatmap at stride 4 peaks at each box centre, and two more heads
give the box's size and the centre's sub-cell offset there (Zhou et al., "Objects as Points",
2019). ``forward`` decodes the heads into a padded ``(B, max_det, 6)`` tensor of
``x1, y1, x2, y2, score, label`` in pixels of the input (a 3x3 max-pool keeps the local peaks,
then the top ``max_det`` over classes and positions), with tensor ops only, so it traces to
TorchScript and ONNX and feeds ttakit's detection TTA as a YOLO-style output. ``heads`` returns
the raw heads for training (:func:`centernet_loss`). A traced export (``torch.jit.trace``,
ONNX) keeps the input size it was traced at for the clipping and the top-k bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError
from .registry import Normalize, register_model

__all__ = ["CenterNet", "STRIDE", "decode_heads", "centernet_targets", "centernet_loss", "focal_loss"]

STRIDE = 4


def _conv(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv3x3-BN-ReLU; ``(B, in, H, W) -> (B, out, H / stride, W / stride)``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _head(width: int, out_channels: int, bias: float = 0.0) -> nn.Sequential:
    final = nn.Conv2d(width, out_channels, 1)
    nn.init.constant_(final.bias, bias)
    return nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), final)


def decode_heads(
    heatmap: torch.Tensor, size: torch.Tensor, offset: torch.Tensor, max_det: int = 32,
    score_threshold: float = 0.01, stride: int = STRIDE,
) -> torch.Tensor:
    """Boxes from CenterNet heads.

    Args:
        heatmap: ``(B, C, h, w)`` class scores in ``[0, 1]`` (after the sigmoid).
        size: ``(B, 2, h, w)`` box width and height in cells (pixels / ``stride``).
        offset: ``(B, 2, h, w)`` the centre's position inside its cell, x then y, in cells.
        max_det: rows of the output.
        score_threshold: peaks scoring less become padding rows.

    Returns:
        ``(B, max_det, 6)``: ``x1, y1, x2, y2`` (pixels), ``score``, ``label``, by falling
        score; padding rows are ``0, 0, 0, 0, 0, -1``.

    Example:
        >>> hm = torch.zeros(1, 2, 8, 8); hm[0, 1, 3, 5] = 0.9
        >>> wh = torch.full((1, 2, 8, 8), 2.0); off = torch.full((1, 2, 8, 8), 0.5)
        >>> decode_heads(hm, wh, off, max_det=2)[0].tolist()
        [[18.0, 10.0, 26.0, 18.0, 0.8999999761581421, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0, -1.0]]
    """
    batch, classes, height, width = heatmap.shape
    peaks = heatmap * (F.max_pool2d(heatmap, 3, stride=1, padding=1) == heatmap).to(heatmap.dtype)
    k = min(max_det, classes * height * width)
    scores, index = peaks.reshape(batch, -1).topk(k, dim=1)  # (B, k)
    labels = torch.div(index, height * width, rounding_mode="floor")
    cell = index - labels * height * width
    ys = torch.div(cell, width, rounding_mode="floor")
    xs = cell - ys * width
    flat_size = size.reshape(batch, 2, height * width)
    flat_off = offset.reshape(batch, 2, height * width)
    gather = cell[:, None, :].expand(batch, 2, k)
    wh = flat_size.gather(2, gather) * stride  # (B, 2, k) pixels
    off = flat_off.gather(2, gather)
    cx = (xs.to(heatmap.dtype) + off[:, 0]) * stride
    cy = (ys.to(heatmap.dtype) + off[:, 1]) * stride
    boxes = torch.stack([cx - wh[:, 0] / 2, cy - wh[:, 1] / 2, cx + wh[:, 0] / 2, cy + wh[:, 1] / 2], dim=2)
    rows = torch.cat([boxes, scores[..., None], labels[..., None].to(heatmap.dtype)], dim=2)  # (B, k, 6)
    keep = (scores >= score_threshold)[..., None]
    padding = torch.zeros_like(rows)
    padding[..., 5] = -1.0
    rows = torch.where(keep, rows, padding)
    if k < max_det:
        extra = torch.zeros(batch, max_det - k, 6, dtype=rows.dtype, device=rows.device)
        extra[..., 5] = -1.0
        rows = torch.cat([rows, extra], dim=1)
    return rows


class CenterNet(nn.Module):
    """A few conv layers to stride 4 (dilated for a receptive field wider than the largest
    object), then three heads: class heatmap, box size and centre offset.

    Shape:
        - Input: ``(B, in_channels, H, W)`` raw images in ``[0, 1]``; sides that are not
          multiples of 4 are padded (right and bottom) and the boxes stay in input pixels.
        - Output of ``forward``: ``(B, max_det, 6)`` as :func:`decode_heads`.
        - Output of ``heads``: ``(B, num_classes, H/4, W/4)`` heatmap logits, ``(B, 2, H/4, W/4)``
          size and ``(B, 2, H/4, W/4)`` offset.

    Example:
        >>> net = CenterNet(1, 10).eval()
        >>> net(torch.rand(2, 1, 96, 96)).shape
        torch.Size([2, 32, 6])
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        width: int = 48,
        max_det: int = 32,
        score_threshold: float = 0.01,
    ) -> None:
        super().__init__()
        if not isinstance(max_det, int) or isinstance(max_det, bool) or max_det < 1:
            raise InvalidInputError(f"max_det must be a positive integer, got {max_det!r}")
        if not 0.0 <= float(score_threshold) < 1.0:
            raise InvalidInputError(f"score_threshold must lie in [0, 1), got {score_threshold!r}")
        self.max_det = max_det
        self.score_threshold = float(score_threshold)
        half = max(width // 2, 1)
        self.normalize = Normalize(mean, std, channels=in_channels)
        self.body = nn.Sequential(
            _conv(in_channels, half // 2 or 1),  # (B, w/4, H, W)
            _conv(half // 2 or 1, half, stride=2),  # (B, w/2, H/2, W/2)
            _conv(half, half),
            _conv(half, width, stride=2),  # (B, w, H/4, W/4)
            _conv(width, width, dilation=2),
            _conv(width, width, dilation=4),
            _conv(width, width, dilation=2),
        )
        # a prior of 0.1 per class and cell, as CenterNet starts its heatmap
        self.heatmap = _head(width, num_classes, bias=-math.log((1 - 0.1) / 0.1))
        self.size = _head(width, 2)
        self.offset = _head(width, 2)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw heads: heatmap logits, size (cells) and offset (cells), at stride 4."""
        height, width = x.shape[-2], x.shape[-1]
        x = self.normalize(x)
        pad_h, pad_w = (-height) % STRIDE, (-width) % STRIDE
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        features = self.body(x)
        return self.heatmap(features), self.size(features), self.offset(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heatmap, size, offset = self.heads(x)
        rows = decode_heads(torch.sigmoid(heatmap), size, offset, self.max_det, self.score_threshold)
        # boxes of objects at the border may overshoot it: clip them to the image, as detectors do
        xs = rows[..., 0:4:2].clamp(0.0, float(x.shape[-1]))
        ys = rows[..., 1:4:2].clamp(0.0, float(x.shape[-2]))
        return torch.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1], rows[..., 4], rows[..., 5]], dim=-1)

    def layer_groups(self) -> list[list[nn.Module]]:
        """The body, and the three heads."""
        return [[self.body], [self.size, self.offset, self.heatmap]]


def _gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CornerNet's radius: the largest shift of a box's corners that keeps IoU >= ``min_overlap``
    (the smallest root of the three cases), in the units of ``height`` and ``width``."""
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2**2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def centernet_targets(
    boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], num_classes: int,
    image_size: tuple[int, int], stride: int = STRIDE,
) -> dict[str, torch.Tensor]:
    """Training targets for a batch.

    Args:
        boxes: per image ``(m, 4)`` ``x1, y1, x2, y2`` in pixels.
        labels: per image ``(m,)`` class indices.
        image_size: ``(H, W)`` of the input images.

    Returns:
        ``heatmap`` ``(B, C, h, w)`` (a Gaussian of CenterNet's radius around each centre cell,
        the element-wise max where objects meet), ``size`` and ``offset`` ``(B, 2, h, w)`` (set at
        centre cells, in cells) and ``centres`` ``(B, h, w)`` bool (the cells that hold a centre),
        with ``h = ceil(H / stride)``.
    """
    height, width = -(-image_size[0] // stride), -(-image_size[1] // stride)
    batch = len(boxes)
    heatmap = torch.zeros(batch, num_classes, height, width)
    size = torch.zeros(batch, 2, height, width)
    offset = torch.zeros(batch, 2, height, width)
    centres = torch.zeros(batch, height, width, dtype=torch.bool)
    ys = torch.arange(height, dtype=torch.float32)[:, None]
    xs = torch.arange(width, dtype=torch.float32)[None, :]
    for i, (image_boxes, image_labels) in enumerate(zip(boxes, labels, strict=True)):
        for box, label in zip(image_boxes.tolist(), image_labels.tolist(), strict=True):
            w, h = (box[2] - box[0]) / stride, (box[3] - box[1]) / stride
            if w <= 0 or h <= 0:
                continue
            cx, cy = (box[0] + box[2]) / 2 / stride, (box[1] + box[3]) / 2 / stride
            col, row = min(int(cx), width - 1), min(int(cy), height - 1)
            sigma = (2 * max(0, int(_gaussian_radius(h, w))) + 1) / 6
            blob = torch.exp(-((xs - col) ** 2 + (ys - row) ** 2) / (2 * sigma**2))
            heatmap[i, label] = torch.maximum(heatmap[i, label], blob)
            size[i, :, row, col] = torch.tensor([w, h])
            offset[i, :, row, col] = torch.tensor([cx - col, cy - row])
            centres[i, row, col] = True
    return {"heatmap": heatmap, "size": size, "offset": offset, "centres": centres}


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss over ``(B, C, h, w)`` heatmap logits, summed and
    divided by the number of centres (at least 1); ``target`` is 1 at centres."""
    prob = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    positive = target.eq(1).float()
    pos_loss = -torch.log(prob) * (1 - prob) ** alpha * positive
    neg_loss = -torch.log(1 - prob) * prob**alpha * (1 - target) ** beta * (1 - positive)
    return (pos_loss.sum() + neg_loss.sum()) / positive.sum().clamp(min=1.0)


def centernet_loss(
    heads: tuple[torch.Tensor, torch.Tensor, torch.Tensor], targets: dict[str, torch.Tensor],
    size_weight: float = 0.1, offset_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Focal loss on the heatmap plus L1 on size and offset at the centre cells.

    Returns:
        ``(loss, parts)``: the scalar to minimise and its parts as floats.
    """
    heatmap, size, offset = heads
    centres = targets["centres"][:, None].expand_as(size).float()
    count = targets["centres"].sum().clamp(min=1).float()
    hm_loss = focal_loss(heatmap, targets["heatmap"])
    size_loss = (F.l1_loss(size, targets["size"], reduction="none") * centres).sum() / count
    off_loss = (F.l1_loss(offset, targets["offset"], reduction="none") * centres).sum() / count
    loss = hm_loss + size_weight * size_loss + offset_weight * off_loss
    return loss, {"heatmap": float(hm_loss.detach()), "size": float(size_loss.detach()), "offset": float(off_loss.detach())}


@register_model("centernet-small", task="detection")
def centernet_small(
    *,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    width: int = 48,
    max_det: int = 32,
    score_threshold: float = 0.01,
) -> nn.Module:
    return CenterNet(in_channels, num_classes, mean, std, width=width, max_det=max_det, score_threshold=score_threshold)
