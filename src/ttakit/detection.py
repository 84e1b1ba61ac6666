"""Test-time augmentation for any object detector: views through the engine, boxes fused per image.

:class:`DetectionTTAWrapper` runs a detector over every view of a policy through
:class:`~ttakit.engine.TTAEngine` (the one place a policy runs), maps each view's boxes back to
the input image and fuses them per image with the ``ensemble-boxes`` package (weighted boxes
fusion, NMS, soft-NMS or non-maximum weighted; views play its "models"), or by a greedy merge
on intersection over the smaller box (``match="ios"``, SAHI's metric for tiles).

How it runs: an adapter around the detector reads its output (any form
:mod:`ttakit._box_formats` knows) into a fixed-size ``(B, max_detections, 6)`` tensor of rows
``x1, y1, x2, y2, score, label`` normalised by the size of the view; the engine stacks views into
forward passes and calls :meth:`DetectionTTAWrapper._deaugment`, which maps the boxes back with
``transformer.deaugment_boxes`` (flips, quarter turns, Scale, Resize, Shift, crops, Translate,
Zoom, tiles) and pads every view to the same number of rows; the per-view tensors
``(K, B, R, 6)`` are then fused image by image.

Each fused box carries how many views found it and the spread of its coordinates (pixels) and
scores across those views (:class:`Detections`): the per-instance TTA uncertainty.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ._box_formats import pad_normalised, parse_detections, to_form
from ._box_fusion import check_fusion_args, fuse, view_agreement
from .engine import TTAEngine, as_policy
from .errors import InvalidInputError, ModelOutputError
from .functional import check_image
from .policy import Compose, Policy, Transformer, View

__all__ = ["DetectionTTAWrapper", "DetectionTTAOutput", "Detections"]


@dataclass(frozen=True)
class Detections:
    """The fused detections of one image, with how the views agree on each.

    Attributes:
        boxes: ``(N, 4)`` float32 ``x1, y1, x2, y2`` in pixels of the input image.
        scores: ``(N,)`` float32 fused scores, decreasing.
        labels: ``(N,)`` in the dtype the detector returned (int64 when it returned none).
        n_views: ``(N,)`` int64, how many views found the box (a box of the same label
            overlapping it by at least ``iou_thr``, by the wrapper's ``match`` metric).
        box_std: ``(N, 4)`` float32, the standard deviation of those views' coordinates (pixels).
        score_std: ``(N,)`` float32, the standard deviation of their scores. Both are population
            deviations (ddof 0): 0 for a box one view found.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    n_views: torch.Tensor
    box_std: torch.Tensor
    score_std: torch.Tensor

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def uncertainty(self) -> dict[str, torch.Tensor]:
        """``n_views``, ``box_std`` and ``score_std``, the extra keys of dict outputs."""
        return {"n_views": self.n_views, "box_std": self.box_std, "score_std": self.score_std}

    def to_json(self) -> dict[str, list]:
        """Every field as plain lists of Python numbers (``json.dumps`` ready)."""
        return {
            "boxes": self.boxes.tolist(),
            "scores": self.scores.tolist(),
            "labels": self.labels.tolist(),
            "n_views": self.n_views.tolist(),
            "box_std": self.box_std.tolist(),
            "score_std": self.score_std.tolist(),
        }


@dataclass
class DetectionTTAOutput:
    """What :meth:`DetectionTTAWrapper.run` returns.

    Attributes:
        detections: one :class:`Detections` per image.
        outputs: the same detections in the detector's own form (what ``forward`` returns).
        view_names: the K views' names, in policy order.
        views: ``(K, B, R, 6)`` each view's de-augmented rows ``x1, y1, x2, y2, score, label``
            in pixels of the input image (padding rows: score 0, label -1), or None unless
            ``return_views=True``.
    """

    detections: list[Detections]
    outputs: Any
    view_names: list[str]
    views: torch.Tensor | None = field(default=None, repr=False)

    def to_json(self) -> list[dict[str, list]]:
        """One JSON-ready dict per image (see :meth:`Detections.to_json`)."""
        return [d.to_json() for d in self.detections]


class _DetectorAdapter(nn.Module):
    """The detector as the engine sees it: ``(b, C, h, w) -> (b, max_detections, 6)`` rows
    normalised by ``(w, h)``, padded with score 0 and label -1. Records the detector's output form
    and label dtype, to hand the fused detections back in them."""

    def __init__(self, model: Callable[..., Any], max_detections: int, output_format, tolerance: float):
        super().__init__()
        self.model = model
        self.max_detections = max_detections
        self.output_format = output_format
        self.tolerance = tolerance
        self.form: str | None = None
        self.label_dtype: torch.dtype = torch.int64

    def forward(self, images: torch.Tensor, *args: Any) -> torch.Tensor:
        triples, form = parse_detections(self.model(images, *args), images.shape[0], self.output_format)
        self.form = form
        labels = next((t[2] for t in triples if t[2].numel()), None)
        if labels is not None:
            self.label_dtype = labels.dtype
        size = (int(images.shape[-2]), int(images.shape[-1]))
        rows = pad_normalised(triples, size, self.max_detections, self.tolerance)
        return rows.to(images.device)


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_view_weights(weights: object, k: int) -> list[float] | None:
    if weights is None:
        return None
    values = weights.tolist() if isinstance(weights, torch.Tensor) else weights
    if (
        isinstance(values, (str, bytes))
        or not isinstance(values, Sequence)
        or len(values) != k
        or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and np.isfinite(w) and w >= 0 for w in values)
        or not sum(values) > 0
    ):
        raise InvalidInputError(
            f"weights must be {k} non-negative numbers, one per view, not all zero, got {weights!r}"
        )
    return [float(w) for w in values]


class DetectionTTAWrapper(nn.Module):
    """Wrap any object detector with TTA: run it over every view, map the boxes back, fuse them.

    Args:
        model: ``model(images (B, C, H, W), *args)`` returning per image a torchvision-style dict
            (``boxes (N, 4)`` xyxy pixels, ``scores (N,)``, ``labels (N,)``), a YOLO-style
            ``(N, 6)`` tensor ``x1, y1, x2, y2, score, label`` (a list of B, or one padded
            ``(B, N, 6)`` tensor whose rows with score <= 0 or label < 0 are padding), or a
            ``(boxes, scores, labels)`` tuple. Boxes are pixels of the image the model was given.
        policy: a :class:`~ttakit.policy.Policy`, :class:`~ttakit.policy.Compose`, list of views or
            policy name; every view must invert boxes (checked here). Only its views and per-view
            weights are used: boxes are fused, not merged by the policy's merge mode.
        merge: ``"wbf"`` (weighted boxes fusion), ``"nms"``, ``"soft_nms"`` or ``"nmw"``
            (non-maximum weighted), as in ``ensemble-boxes``.
        iou_thr: overlap in ``(0, 1]`` from which two boxes of the same label are the same object.
        skip_box_thr: boxes scoring below it are dropped before fusion.
        conf_type: how WBF scores a cluster: ``"avg"``, ``"max"``, ``"box_and_model_avg"`` or
            ``"absent_model_aware_avg"`` (``ensemble-boxes``' meanings; used by ``"wbf"``).
        weights: K non-negative per-view weights (default: the policy's, else equal).
        match: ``"iou"`` or ``"ios"`` (intersection over the smaller box: a box cut by a tile's
            edge matches the whole box; greedy merge, with ``merge`` ``"wbf"`` or ``"nms"``).
        max_detections: the detector's top boxes kept per image it is given (per tile for tiles).
        output_format: a callable mapping the detector's raw output for B images to a list of B
            ``(boxes, scores, labels)``, for any other form; outputs then come back as such tuples.
        box_tolerance: boxes up to this many pixels outside the image are clipped to it; farther
            out they are an error.
        soft_nms_sigma, soft_nms_thresh: soft-NMS's Gaussian sigma and score floor.
        max_batch, pass_size, device, amp, inference_mode, check_outputs: as for
            :class:`~ttakit.engine.TTAEngine`.

    ``forward`` returns the fused detections in the detector's own form, boxes in pixels of the
    input image: dicts (with extra keys ``n_views``, ``box_std``, ``score_std``), a list of
    ``(N, 6)`` tensors, one padded ``(B, N, 6)`` tensor, or ``(boxes, scores, labels)`` tuples.
    :meth:`run` returns them all, with the uncertainty, for every form.

    Example:
        >>> from ttakit.transforms import HorizontalFlip
        >>> def detector(x):  # one box, the left half, of every image
        ...     w, h = x.shape[-1], x.shape[-2]
        ...     return [{"boxes": torch.tensor([[0.0, 0.0, w / 2, h]]), "scores": torch.tensor([0.9]),
        ...              "labels": torch.tensor([1])} for _ in x]
        >>> wrapped = DetectionTTAWrapper(detector, Compose([HorizontalFlip()]), iou_thr=0.3)
        >>> out = wrapped(torch.rand(1, 3, 8, 10))
        >>> out[0]["n_views"].tolist()  # the flipped view saw the right half: two boxes
        [1, 1]
    """

    def __init__(
        self,
        model: Callable[..., Any],
        policy: Policy | Compose | Sequence[View] | str,
        merge: str = "wbf",
        iou_thr: float = 0.55,
        skip_box_thr: float = 0.0,
        conf_type: str = "avg",
        weights: Sequence[float] | torch.Tensor | None = None,
        match: str = "iou",
        max_detections: int = 100,
        output_format: Callable[[Any], Sequence[Any]] | None = None,
        *,
        box_tolerance: float = 1.0,
        soft_nms_sigma: float = 0.5,
        soft_nms_thresh: float = 0.001,
        max_batch: int = 256,
        pass_size: int | str | None = None,
        device: torch.device | str | None = None,
        amp: bool = False,
        inference_mode: bool = True,
        check_outputs: bool = True,
    ):
        super().__init__()
        check_fusion_args(merge, iou_thr, skip_box_thr, conf_type, match)
        if output_format is not None and not callable(output_format):
            raise InvalidInputError(
                f"output_format must be a callable returning a list of B (boxes, scores, labels), got "
                f"{type(output_format).__name__}"
            )
        if isinstance(box_tolerance, bool) or not isinstance(box_tolerance, (int, float)) or not box_tolerance >= 0:
            raise InvalidInputError(f"box_tolerance must be a non-negative number of pixels, got {box_tolerance!r}")
        for name, value in (("soft_nms_sigma", soft_nms_sigma), ("soft_nms_thresh", soft_nms_thresh)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidInputError(f"{name} must be a positive number, got {value!r}")
        self.model = model
        given = as_policy(policy)
        if weights is None and given.weights is not None:
            if given.class_weights:
                raise InvalidInputError(
                    f"policy {given.name!r} holds class-by-view weights; box fusion takes K per-view weights"
                )
            weights = given.weights
        self.weights = _check_view_weights(weights, len(given))
        self.merge, self.iou_thr, self.skip_box_thr = merge, float(iou_thr), float(skip_box_thr)
        self.conf_type, self.match = conf_type, match
        self.soft_nms_sigma, self.soft_nms_thresh = float(soft_nms_sigma), float(soft_nms_thresh)
        self.max_detections = _check_positive_int(max_detections, "max_detections")
        # Only the views run through the engine: its merge of the padded rows is not used.
        self.policy = Policy(list(given.views), name=given.name)
        adapter = _DetectorAdapter(model, self.max_detections, output_format, float(box_tolerance))
        self.engine = TTAEngine(
            adapter,
            self.policy,
            target="boxes",
            merge_mode="mean",
            activation=None,
            temperature=None,
            matrix_scaling=None,
            gate_threshold=None,
            deaugment=self._deaugment,
            max_batch=max_batch,
            pass_size=pass_size,
            device=device,
            amp=amp,
            inference_mode=inference_mode,
            check_outputs=check_outputs,
        )
        self._rows: dict[tuple[int, int, int], int] = {}  # input (C, H, W) -> rows every view is padded to
        self._capacity = self.max_detections

    @property
    def view_names(self) -> list[str]:
        return self.policy.view_names

    # ------------------------------------------------------------------------------ engine hook

    def _rows_per_image(self, images: torch.Tensor) -> int:
        """The most de-augmented rows any view returns per input image: ``max_detections`` times
        the images a view turns one input into (tiles), found once per input size."""
        key = tuple(int(s) for s in images.shape[1:])
        if key not in self._rows:
            probe = torch.zeros(1, *key)
            self._rows[key] = max(v.transformer().augment_image(probe).shape[0] for v in self.policy.views)
        return self._rows[key] * self.max_detections

    def _deaugment(self, transformer: Transformer, output: torch.Tensor, view_size: tuple[int, int]) -> torch.Tensor:
        """``output: (b', M, 6)`` rows on the view (``b' = b * T`` for T tiles per image) ->
        ``(b, R, 6)`` with boxes normalised to the input image, padded to R rows."""
        boxes = transformer.deaugment_boxes(output[..., :4])
        b, rows = int(boxes.shape[0]), int(boxes.shape[1])
        rest = output[..., 4:]
        if rest.shape[0] != b:
            # Tiles: (b*T, M) image-major -> (b, T*M), the same tile-major order as the boxes.
            if rest.shape[0] % b or (rest.shape[0] // b) * rest.shape[1] != rows:
                raise ModelOutputError(
                    f"de-augmenting boxes turned {tuple(output.shape[:2])} rows into {(b, rows)}, which does not "
                    "regroup the scores and labels; a view must map b*T images of M boxes to b images of T*M"
                )
            rest = rest.reshape(b, rows, 2)
        out = torch.cat([boxes.to(rest.dtype), rest], dim=-1)
        if rows < self._capacity:
            pad = out.new_zeros(b, self._capacity - rows, 6)
            pad[..., 5] = -1.0
            out = torch.cat([out, pad], dim=1)
        return out

    # ------------------------------------------------------------------------------ run

    def run(self, images: torch.Tensor, *args: Any, return_views: bool = False, progress=None) -> DetectionTTAOutput:
        """Detect on every view, map back, fuse: :class:`DetectionTTAOutput` for ``images (B, C, H, W)``."""
        check_image(images, "images")
        self._capacity = self._rows_per_image(images)
        out = self.engine.run(images, *args, return_views=True, progress=progress)
        views = out.views  # (K, B, R, 6), boxes normalised to the input image
        height, width = int(images.shape[-2]), int(images.shape[-1])
        scale = views.new_tensor([width, height, width, height])
        pixels = torch.cat([views[..., :4] * scale, views[..., 4:]], dim=-1)
        adapter = self.engine.model
        detections = [self._fuse_image(pixels[:, i], (height, width), adapter.label_dtype) for i in range(images.shape[0])]
        detections = [self._to_device(d, images.device) for d in detections]
        outputs = to_form(
            adapter.form or "rows",
            [d.boxes for d in detections],
            [d.scores for d in detections],
            [d.labels for d in detections],
            [d.uncertainty for d in detections],
        )
        return DetectionTTAOutput(detections, outputs, list(out.view_names), pixels if return_views else None)

    def forward(self, images: torch.Tensor, *args: Any) -> Any:
        return self.run(images, *args).outputs

    def _fuse_image(self, rows: torch.Tensor, size: tuple[int, int], label_dtype: torch.dtype) -> Detections:
        """``rows: (K, R, 6)`` one image's de-augmented rows in pixels -> its :class:`Detections`."""
        height, width = size
        limit = np.array([width, height, width, height], dtype=np.float64)
        boxes, scores, labels = [], [], []
        for view in rows.detach().cpu().double().numpy():
            found = view[(view[:, 4] > 0) & (view[:, 5] >= 0)]
            b = np.clip(found[:, :4], 0.0, limit)
            positive = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])  # ensemble-boxes drops zero-area boxes noisily
            boxes.append(b[positive])
            scores.append(found[positive, 4])
            labels.append(found[positive, 5])
        fused_boxes, fused_scores, fused_labels = fuse(
            [b / limit for b in boxes], scores, labels,
            merge=self.merge, iou_thr=self.iou_thr, skip_box_thr=self.skip_box_thr, conf_type=self.conf_type,
            weights=self.weights, match=self.match, sigma=self.soft_nms_sigma, soft_thr=self.soft_nms_thresh,
        )
        fused_boxes = fused_boxes * limit
        n_views, box_std, score_std = view_agreement(
            fused_boxes, fused_labels, boxes, scores, labels, self.iou_thr, self.match
        )
        labels_out = torch.from_numpy(np.asarray(fused_labels))
        labels_out = labels_out.round().to(label_dtype) if not label_dtype.is_floating_point else labels_out.to(label_dtype)
        return Detections(
            boxes=torch.from_numpy(np.asarray(fused_boxes, dtype=np.float32).reshape(-1, 4)),
            scores=torch.from_numpy(np.asarray(fused_scores, dtype=np.float32)),
            labels=labels_out,
            n_views=torch.from_numpy(np.asarray(n_views, dtype=np.int64)),
            box_std=torch.from_numpy(np.asarray(box_std, dtype=np.float32).reshape(-1, 4)),
            score_std=torch.from_numpy(np.asarray(score_std, dtype=np.float32)),
        )

    @staticmethod
    def _to_device(d: Detections, device: torch.device) -> Detections:
        if device.type == "cpu":
            return d
        return Detections(*(getattr(d, f).to(device) for f in d.__dataclass_fields__))
