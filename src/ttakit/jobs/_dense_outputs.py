"""What ``ttakit predict --task`` writes, one writer per form, and the geometry that maps a model's
output back onto the image file it came from.

* segmentation: ``OUT/<name>.png``, a palette PNG whose pixel values are class indices (the
  palette only colours them), and with ``--probs`` ``OUT/probs/<name>.npz`` (``probs``: float16
  ``(classes, h, w)`` at the model's input size, compressed);
* keypoints: ``OUT/<name>.json``, the named points in pixels of the image file;
* detection: one JSON line per image in ``<out stem>.images.jsonl`` as the run goes, turned at
  the end into the COCO results list ``OUT`` (``image_id``, ``category_id``, ``bbox`` as
  ``[x, y, w, h]``, ``score``, plus ``n_views``, ``box_std``, ``score_std``), its file-name map
  ``<out stem>.images.json`` and a CSV ``<out stem>.csv``, each written atomically.

Every file is written atomically (:mod:`ttakit._io`): a killed run leaves whole files or none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_write, atomic_write_json, atomic_write_text
from ..errors import InvalidInputError
from ._predict_resume import csv_line

DETECTION_CSV_COLUMNS = ["image_id", "path", "category_id", "category", "x", "y", "w", "h", "score", "n_views",
                         "std_x1", "std_y1", "std_x2", "std_y2", "score_std"]
SEGMENTATION_COLUMNS = ["path", "mask", "probs", "height", "width"]
KEYPOINT_COLUMNS = ["path", "keypoints", "height", "width"]
MAX_PALETTE_CLASSES = 256


# --------------------------------------------------------------------------- names


def output_names(paths: Sequence[str], images: Any, suffix: str) -> dict[str, str]:
    """Each input's output file name, relative to the output folder: its path relative to the
    images folder (or, for a list or glob, to the folder all inputs share) with ``suffix`` in
    place of its extension. Two inputs that would collide (``a.jpg``, ``a.png``) keep their
    extension (``a.jpg.png``, ``a.png.png``)."""
    absolute = [Path(os.path.abspath(p)) for p in paths]
    given = Path(os.path.abspath(os.fspath(images))) if isinstance(images, (str, os.PathLike)) else None
    if given is not None and given.is_dir():
        root = given
    else:
        root = Path(os.path.commonpath([str(p.parent) for p in absolute])) if absolute else Path(".")
    relative = [p.relative_to(root) for p in absolute]
    plain = [r.with_suffix(suffix).as_posix() for r in relative]
    counts: dict[str, int] = {}
    for name in plain:
        counts[name] = counts.get(name, 0) + 1
    return {path: (name if counts[name] == 1 else r.as_posix() + suffix)
            for path, name, r in zip(paths, plain, relative, strict=True)}


# --------------------------------------------------------------------------- geometry


def source_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(H, W)`` of the image file as decoded (EXIF rotations that swap the sides applied)."""
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        if "exif" in image.info or image.format == "TIFF":
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # the quarter turns
                width, height = height, width
    return int(height), int(width)


def _fit_geometry(model_size: tuple[int, int], size: tuple[int, int], resize: str) -> tuple[float, float, int, int]:
    """How ``size`` ``(H, W)`` was placed on the model's canvas: ``(scale_x, scale_y, left, top)``
    with ``x_model = x_source * scale_x + left`` (the decoder's ``stretch``/``fit``/``crop``)."""
    (mh, mw), (h, w) = model_size, size
    if resize == "stretch":
        return mw / w, mh / h, 0, 0
    scale = min(mw / w, mh / h) if resize == "fit" else max(mw / w, mh / h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if resize == "fit":
        return new_w / w, new_h / h, (mw - new_w) // 2, (mh - new_h) // 2
    return new_w / w, new_h / h, -((new_w - mw) // 2), -((new_h - mh) // 2)


def points_to_source(points: torch.Tensor, model_size: tuple[int, int], size: tuple[int, int],
                     resize: str) -> torch.Tensor:
    """``points``: ``(..., 2)`` x, y in pixels of the model's input -> pixels of the image file."""
    sx, sy, left, top = _fit_geometry(model_size, size, resize)
    offset = points.new_tensor([left, top])
    return (points - offset) / points.new_tensor([sx, sy])


def boxes_to_source(boxes: torch.Tensor, model_size: tuple[int, int], size: tuple[int, int],
                    resize: str) -> torch.Tensor:
    """``boxes``: ``(N, 4)`` xyxy pixels of the model's input -> pixels of the image file, clipped to it."""
    points = points_to_source(boxes.reshape(-1, 2, 2), model_size, size, resize).reshape(-1, 4)
    h, w = size
    return torch.stack([points[:, 0].clamp(0, w), points[:, 1].clamp(0, h),
                        points[:, 2].clamp(0, w), points[:, 3].clamp(0, h)], dim=1)


def spread_to_source(std: torch.Tensor, model_size: tuple[int, int], size: tuple[int, int],
                     resize: str) -> torch.Tensor:
    """``std``: ``(N, 4)`` per-coordinate spreads (x1, y1, x2, y2) in model pixels -> image-file pixels."""
    sx, sy, _, _ = _fit_geometry(model_size, size, resize)
    return std / std.new_tensor([sx, sy, sx, sy])


def probs_to_source(probs: torch.Tensor, model_size: tuple[int, int], size: tuple[int, int],
                    resize: str) -> torch.Tensor:
    """``probs``: ``(C, h, w)`` at the model's input size -> ``(C, H, W)`` on the image file
    (bilinear; a ``fit`` letterbox's padding cut away first). ``crop`` is refused before the run
    (:func:`check_mask_resize`): the model never saw the cut border."""
    sx, sy, left, top = _fit_geometry(model_size, size, resize)
    h, w = size
    if resize == "fit":
        new_h, new_w = round(h * sy), round(w * sx)
        probs = probs[:, top:top + new_h, left:left + new_w]
    if tuple(probs.shape[-2:]) == (h, w):
        return probs
    return torch.nn.functional.interpolate(probs[None].float(), size=(h, w), mode="bilinear",
                                           align_corners=False)[0]


def check_mask_resize(resize: str) -> None:
    if resize == "crop":
        raise InvalidInputError(
            "--resize crop with --task segmentation: the model never sees the border the crop cuts away, so those "
            "pixels would get no label; use --resize stretch or fit"
        )


# --------------------------------------------------------------------------- segmentation


def palette() -> list[int]:
    """The PASCAL VOC colour map (class 0 black): flat ``[r, g, b, ...]``, 256 entries."""
    colours = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colours += [r, g, b]
    return colours


def check_palette_classes(n_classes: int) -> None:
    if n_classes > MAX_PALETTE_CLASSES:
        raise InvalidInputError(
            f"a palette PNG label map holds at most {MAX_PALETTE_CLASSES} classes, the model has {n_classes}"
        )


def write_label_png(path: Path, labels: torch.Tensor) -> None:
    """``labels``: ``(H, W)`` class indices -> a palette PNG whose pixel values are those indices."""
    from PIL import Image

    image = Image.fromarray(labels.to(torch.uint8).cpu().numpy(), mode="P")
    image.putpalette(palette())

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            image.save(handle, format="PNG", optimize=False)

    atomic_write(path, write)


def write_probs(path: Path, probs: torch.Tensor) -> None:
    """``probs``: ``(C, h, w)`` -> ``path`` (.npz, compressed), key ``probs``, float16."""
    array = probs.detach().to("cpu", torch.float16).numpy()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.savez would append .npz to the name
            np.savez_compressed(handle, probs=array)

    atomic_write(path, write)


def write_labels_file(folder: Path, classes: Sequence[str]) -> Path:
    """``OUT/labels.json``: the class of each pixel value and its palette colour."""
    colours = palette()
    return atomic_write_json(folder / "labels.json", {
        "classes": [{"index": i, "name": name, "colour": colours[3 * i:3 * i + 3]} for i, name in enumerate(classes)],
    })


# --------------------------------------------------------------------------- keypoints


def keypoint_record(path: str, points: torch.Tensor, spread: torch.Tensor | None, names: Sequence[str],
                    size: tuple[int, int]) -> dict[str, Any]:
    """One image's named points: ``points`` ``(N, 2)`` x, y and ``spread`` ``(N, 2)`` (their std
    across the views), both in pixels of the image file."""
    height, width = size
    listed = []
    for i, name in enumerate(names):
        entry: dict[str, Any] = {"name": name, "x": round(float(points[i, 0]), 3), "y": round(float(points[i, 1]), 3)}
        if spread is not None:
            entry["std"] = [round(float(spread[i, 0]), 3), round(float(spread[i, 1]), 3)]
        listed.append(entry)
    return {"path": path, "height": height, "width": width, "keypoints": listed}


def write_json(path: Path, record: Any) -> None:
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")


# --------------------------------------------------------------------------- detection


def detection_record(path: str, image_id: int, size: tuple[int, int], boxes: torch.Tensor, scores: torch.Tensor,
                     labels: torch.Tensor, n_views: torch.Tensor | None, box_std: torch.Tensor | None,
                     score_std: torch.Tensor | None) -> dict[str, Any]:
    """One image's detections as a JSON line: ``boxes`` ``(N, 4)`` xyxy pixels of the image file;
    ``scores``, ``labels``, ``n_views``, ``score_std`` ``(N,)``; ``box_std`` ``(N, 4)`` pixels."""
    detections = []
    for i in range(boxes.shape[0]):
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        item: dict[str, Any] = {
            "category_id": int(labels[i]),
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            "score": round(float(scores[i]), 5),
        }
        if n_views is not None:
            item["n_views"] = int(n_views[i])
        if box_std is not None:
            item["box_std"] = [round(float(v), 3) for v in box_std[i]]
        if score_std is not None:
            item["score_std"] = round(float(score_std[i]), 5)
        detections.append(item)
    return {"path": path, "image_id": image_id, "height": size[0], "width": size[1], "detections": detections}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a detection stream (a torn last line is dropped by the resume reader first)."""
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_detection_outputs(out: Path, records: Iterable[dict[str, Any]], ids: dict[str, int],
                            classes: Sequence[str] | None) -> dict[str, Any]:
    """From the stream's records (the images of this input list, ``ids``: path -> image_id), write
    the COCO results list ``out``, its file-name map and the CSV, atomically. Returns their paths
    and counts."""
    by_id: dict[int, dict[str, Any]] = {}
    for record in records:
        image_id = ids.get(record["path"])
        if image_id is not None:
            by_id[image_id] = record
    results, images, rows = [], [], [DETECTION_CSV_COLUMNS]
    for image_id in sorted(by_id):
        record = by_id[image_id]
        images.append({"id": image_id, "file_name": record["path"], "height": record["height"],
                       "width": record["width"]})
        for det in record["detections"]:
            results.append({"image_id": image_id, **det})
            x, y, w, h = det["bbox"]
            label = det["category_id"]
            name = classes[label] if classes is not None and 0 <= label < len(classes) else ""
            std = det.get("box_std") or ["", "", "", ""]
            rows.append([image_id, record["path"], label, name, x, y, w, h, det["score"], det.get("n_views", ""),
                         *std, det.get("score_std", "")])
    labels = sorted({det["category_id"] for record in by_id.values() for det in record["detections"]}
                    | (set(range(len(classes))) if classes is not None else set()))
    categories = [{"id": c, "name": classes[c] if classes is not None and 0 <= c < len(classes) else str(c)}
                  for c in labels]
    names_file, csv_file = detection_side_files(out)
    atomic_write_text(out, json.dumps(results) + "\n")
    atomic_write_json(names_file, {"images": images, "categories": categories})
    atomic_write_text(csv_file, "".join(csv_line(row) for row in rows))
    return {"n_images": len(images), "n_detections": len(results), "images_file": str(names_file),
            "csv": str(csv_file)}


def detection_side_files(out: Path) -> tuple[Path, Path]:
    """``(file-name map, CSV)`` beside the COCO results ``out``: ``<stem>.images.json``, ``<stem>.csv``."""
    return out.with_name(out.stem + ".images.json"), out.with_name(out.stem + ".csv")


def detection_stream(out: Path) -> Path:
    """The per-image JSON lines a detection run appends as it goes: ``<stem>.images.jsonl``."""
    return out.with_name(out.stem + ".images.jsonl")
