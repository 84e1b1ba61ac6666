"""Detector outputs in and out of the engine.

A detector may return, per image, a torchvision-style dict (``boxes``, ``scores``, ``labels``), a
YOLO-style ``(N, 6)`` tensor of rows ``x1, y1, x2, y2, score, label`` (a list of B, or one padded
``(B, N, 6)`` tensor), a ``(boxes, scores, labels)`` tuple, or anything a user's ``output_format``
callable maps to a list of B such tuples. :func:`parse_detections` reads any of these into
per-image ``(boxes (N, 4), scores (N,), labels (N,))`` triples and names the form, so the merged
detections can go back in it (:func:`to_form`). :func:`pad_normalised` turns the triples into the
fixed-size ``(B, M, 6)`` tensor the engine stacks and de-augments: boxes normalised by the size of
the image the model saw, padding rows with score 0 and label -1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .errors import ModelOutputError

# The forms a detector's output may take, as :func:`parse_detections` names them.
FORMS = ("dicts", "rows", "padded", "tuples", "custom")

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

_EXPECTED = (
    "a list of B dicts with 'boxes' (N, 4), 'scores' (N,), 'labels' (N,); a list of B (N, 6) tensors or one "
    "(B, N, 6) tensor of rows x1, y1, x2, y2, score, label; or a list of B (boxes, scores, labels) tuples "
    "(else pass output_format=, a callable returning a list of B (boxes, scores, labels))"
)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, (list, tuple)):
        return f"a {type(x).__name__} of {len(x)}"
    return type(x).__name__


def _tensor(x: object, what: str, image: int) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise ModelOutputError(f"the {what} of image {image} must be a tensor, got {type(x).__name__}") from None


def _from_rows(rows: object, image: int) -> Triple:
    rows = _tensor(rows, "detections", image)
    if rows.ndim != 2 or rows.shape[-1] != 6:
        raise ModelOutputError(
            f"the detections of image {image} must be an (N, 6) tensor of rows x1, y1, x2, y2, score, label, "
            f"got shape {tuple(rows.shape)}"
        )
    return rows[:, :4], rows[:, 4], rows[:, 5]


def _from_mapping(item: Mapping, image: int) -> Triple:
    missing = [key for key in ("boxes", "scores", "labels") if key not in item]
    if missing:
        raise ModelOutputError(
            f"the detections of image {image} are a mapping with keys {sorted(map(str, item))}, missing "
            f"{missing}; expected 'boxes' (N, 4), 'scores' (N,) and 'labels' (N,)"
        )
    return item["boxes"], item["scores"], item["labels"]


def _item_form(item: object) -> str | None:
    if isinstance(item, Mapping):
        return "dicts"
    if isinstance(item, torch.Tensor):
        return "rows"
    if isinstance(item, (tuple, list)) and len(item) == 3:
        return "tuples"
    return None


def check_triple(triple: object, image: int) -> Triple:
    """One image's ``(boxes (N, 4), scores (N,), labels (N,))``, checked for shape (not values)."""
    if not isinstance(triple, (tuple, list)) or len(triple) != 3:
        raise ModelOutputError(
            f"the detections of image {image} must be (boxes, scores, labels), got {_describe(triple)}"
        )
    boxes = _tensor(triple[0], "boxes", image)
    scores = _tensor(triple[1], "scores", image)
    labels = _tensor(triple[2], "labels", image)
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        if not (boxes.numel() == 0 and scores.numel() == 0):  # an empty (0,) is accepted as no boxes
            raise ModelOutputError(
                f"the boxes of image {image} must have shape (N, 4) as x1, y1, x2, y2 pixels, got shape "
                f"{tuple(boxes.shape)}"
            )
        boxes = boxes.reshape(0, 4)
    n = boxes.shape[0]
    for name, value in (("scores", scores), ("labels", labels)):
        if value.reshape(-1).shape[0] != n or value.ndim > 1:
            raise ModelOutputError(
                f"the {name} of image {image} must have shape ({n},), one per box, got shape {tuple(value.shape)}"
            )
    return boxes, scores.reshape(n), labels.reshape(n)


def parse_detections(
    output: Any, batch: int, output_format: Callable[[Any], Sequence[Any]] | None = None
) -> tuple[list[Triple], str]:
    """A detector's raw output for ``batch`` images -> (B triples, the form's name in :data:`FORMS`).

    Padding rows of a padded ``(B, N, 6)`` tensor (score <= 0 or label < 0) are dropped.
    """
    if output_format is not None:
        triples = output_format(output)
        if isinstance(triples, (str, bytes)) or not isinstance(triples, Sequence) or len(triples) != batch:
            raise ModelOutputError(
                f"output_format must return a list of {batch} (boxes, scores, labels), one per image, got "
                f"{_describe(triples)}"
            )
        return [check_triple(t, i) for i, t in enumerate(triples)], "custom"
    if isinstance(output, torch.Tensor):
        if output.ndim != 3 or output.shape[0] != batch or output.shape[-1] != 6:
            raise ModelOutputError(
                f"a detector returning one tensor must return (B, N, 6) rows x1, y1, x2, y2, score, label for "
                f"B = {batch} images, got shape {tuple(output.shape)}"
            )
        triples = []
        for i, rows in enumerate(output):
            rows = rows[(rows[:, 4] > 0) & (rows[:, 5] >= 0)]
            triples.append(check_triple(_from_rows(rows, i), i))
        return triples, "padded"
    if isinstance(output, (list, tuple)) and len(output) == batch:
        forms = {_item_form(item) for item in output}
        if len(forms) == 1 and None not in forms:
            form = forms.pop()
            if form == "dicts":
                triples = [_from_mapping(item, i) for i, item in enumerate(output)]
            elif form == "rows":
                triples = [_from_rows(item, i) for i, item in enumerate(output)]
            else:
                triples = list(output)
            return [check_triple(t, i) for i, t in enumerate(triples)], form
    if batch == 0:
        return [], "rows"
    first = _describe(output[0]) if isinstance(output, (list, tuple)) and output else ""
    raise ModelOutputError(
        f"unknown detector output format for {batch} images: got {_describe(output)}"
        f"{' of ' + first if first else ''}; expected {_EXPECTED}"
    )


def pad_normalised(
    triples: Sequence[Triple], size: tuple[int, int], max_detections: int, tolerance: float = 1.0
) -> torch.Tensor:
    """Per-image detections in pixels of an image of ``size = (H, W)`` -> ``(B, max_detections, 6)``.

    Each row is ``x1, y1, x2, y2, score, label`` with the box normalised to ``[0, 1]`` by ``(W, H)``;
    the top ``max_detections`` boxes by score are kept; padding rows hold score 0 and label -1.
    Boxes up to ``tolerance`` pixels outside the image are clipped to it; farther out, or with
    ``x2 < x1`` or ``y2 < y1``, they are an error naming the box and the image size.
    """
    height, width = size
    rows = []
    device = next((t[0].device for t in triples), torch.device("cpu"))
    for i, (boxes, scores, labels) in enumerate(triples):
        boxes = boxes.to(device=device, dtype=torch.float32)
        scores = scores.to(device=device, dtype=torch.float32)
        labels = labels.to(device=device, dtype=torch.float32)
        _check_box_values(boxes, i, height, width, tolerance)
        if boxes.shape[0] > max_detections:
            top = torch.topk(scores, max_detections).indices
            boxes, scores, labels = boxes[top], scores[top], labels[top]
        limit = boxes.new_tensor([width, height, width, height])
        boxes = torch.minimum(boxes.clamp(min=0.0), limit) / limit
        row = torch.zeros(max_detections, 6, device=device)
        row[:, 5] = -1.0
        n = boxes.shape[0]
        row[:n, :4], row[:n, 4], row[:n, 5] = boxes, scores, labels
        rows.append(row)
    return torch.stack(rows) if rows else torch.zeros(0, max_detections, 6)


def _check_box_values(boxes: torch.Tensor, image: int, height: int, width: int, tolerance: float) -> None:
    if boxes.numel() == 0:
        return
    x1, y1, x2, y2 = boxes.unbind(-1)
    inverted = (x2 < x1) | (y2 < y1)
    if bool(inverted.any()):
        box = boxes[int(torch.nonzero(inverted)[0])].tolist()
        raise ModelOutputError(
            f"box {_fmt(box)} of image {image} has x2 < x1 or y2 < y1; boxes must be x1, y1, x2, y2 pixels "
            "with x1 <= x2 and y1 <= y2"
        )
    outside = (boxes.amin(-1) < -tolerance) | (x2 > width + tolerance) | (y2 > height + tolerance)
    if bool(outside.any()):
        box = boxes[int(torch.nonzero(outside)[0])].tolist()
        raise ModelOutputError(
            f"box {_fmt(box)} of image {image} lies outside the {width}x{height} (W x H) image the model was "
            f"given by more than {tolerance:g} px; boxes must be x1, y1, x2, y2 pixels of that image"
        )


def _fmt(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in box) + "]"


def to_form(
    form: str,
    boxes: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    extras: Sequence[Mapping[str, torch.Tensor]],
) -> Any:
    """Per-image detections back in the detector's own ``form`` (:data:`FORMS`): ``dicts`` also
    carry each image's ``extras`` (n_views, box_std, score_std); ``rows`` is a list of ``(N, 6)``;
    ``padded`` one ``(B, max N, 6)`` tensor padded with score 0 and label -1; ``tuples`` and
    ``custom`` lists of ``(boxes, scores, labels)``."""
    if form == "dicts":
        return [
            {"boxes": b, "scores": s, "labels": lab, **extra}
            for b, s, lab, extra in zip(boxes, scores, labels, extras, strict=True)
        ]
    if form in ("rows", "padded"):
        rows = [
            torch.cat([b, s[:, None].to(b.dtype), lab[:, None].to(b.dtype)], dim=1)
            for b, s, lab in zip(boxes, scores, labels, strict=True)
        ]
        if form == "rows":
            return rows
        longest = max((r.shape[0] for r in rows), default=0)
        padded = torch.zeros(len(rows), longest, 6, dtype=rows[0].dtype if rows else torch.float32)
        if rows:
            padded = padded.to(rows[0].device)
        padded[:, :, 5] = -1.0
        for i, r in enumerate(rows):
            padded[i, : r.shape[0]] = r
        return padded
    return [(b, s, lab) for b, s, lab in zip(boxes, scores, labels, strict=True)]
