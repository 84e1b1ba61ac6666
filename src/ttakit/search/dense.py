"""Policy search for dense tasks: views (and, for detection, the box-fusion settings) selected on
cached per-view de-augmented outputs of validation images, by mIoU or COCO mAP.

As for classification (:mod:`ttakit.search.greedy`), each candidate view runs once over the
validation images and its de-augmented output is cached; selection then only merges cached
tensors:

* segmentation: the cache holds each view's class probabilities ``(V, N, C, H, W)`` in float16
  (the engine's ``mean`` of softmax probabilities is the mean of these); a set of views scores
  the mIoU of the arg-max of their mean (:func:`ttakit.dense_metrics.mean_iou`);
* detection: the cache holds each view's de-augmented boxes ``(V, N, R, 6)`` (``x1, y1, x2, y2,
  score, label`` in pixels, padding rows score 0, label -1: what
  :meth:`ttakit.detection.DetectionTTAWrapper.run` returns with ``return_views=True``); a set of
  views is fused exactly as the wrapper fuses them and scores the COCO mAP
  (:func:`ttakit.dense_metrics.detection_map`).

Selection is greedy forward selection from the identity: add the candidate that most raises the
metric, up to ``budget`` views, stopping when none does (ties go to the earlier candidate in the
pool, so the search is deterministic). For detection a set of views scores its best under the
few :data:`SELECTION_SETTINGS`, and once the views are chosen a small grid of merge settings (:data:`DETECTION_GRID`:
method, IoU threshold, match by IoU or IoS, conf_type) is scored for the selected views and for
the identity alone; the best pair wins, the fewer views on a tie. The identity alone is always a
candidate and, for detection, so is the detector's plain output (``nms`` at ``iou_thr=1.0``
keeps every box: :data:`PLAIN_SETTINGS`), so the result is never worse than no TTA on the images
it saw. The searched policy records its detection settings in ``policy.meta["detection"]``,
which ``ttakit predict --task detection`` reads back.

Example:
    >>> import torch
    >>> probs = torch.softmax(torch.randn(3, 4, 3, 8, 8), dim=2)   # 3 views, 4 images, 3 classes
    >>> masks = probs[0].argmax(1)                                  # the identity view is right
    >>> result = search_segmentation(probs, masks, default_dense_pool(scales=())[:3], num_classes=3)
    >>> result.policy.view_names, result.score
    (['identity'], 1.0)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import transforms as T
from ..errors import InvalidInputError
from ..policy import Policy, Step, View

__all__ = [
    "DETECTION_DEFAULTS",
    "DETECTION_GRID",
    "detection_settings",
    "SELECTION_SETTINGS",
    "PLAIN_SETTINGS",
    "DenseSearchResult",
    "default_dense_pool",
    "segmentation_view_cache",
    "detection_view_cache",
    "search_segmentation",
    "search_detection",
    "dense_search",
]

# The merge settings the views are selected with: a set of views scores its best under these (the
# wrapper's default; IoS matching, which merges boxes views shift apart; NMS, which keeps one).
SELECTION_SETTINGS: list[dict[str, Any]] = [
    {"merge": "wbf", "iou_thr": 0.55, "match": "iou", "conf_type": "avg"},
    {"merge": "wbf", "iou_thr": 0.6, "match": "ios", "conf_type": "avg"},
    {"merge": "nms", "iou_thr": 0.5, "match": "iou", "conf_type": "avg"},
]
# The detector's own boxes: NMS that suppresses nothing (no two boxes overlap by more than IoU 1).
PLAIN_SETTINGS: dict[str, Any] = {"merge": "nms", "iou_thr": 1.0, "match": "iou", "conf_type": "avg"}
# What the grid tries once the views are chosen: the settings users otherwise pick by hand.
DETECTION_GRID: list[dict[str, Any]] = [
    *({"merge": "wbf", "iou_thr": t, "match": "iou", "conf_type": c}
      for t in (0.5, 0.6, 0.7) for c in ("avg", "max", "box_and_model_avg")),
    *({"merge": "wbf", "iou_thr": t, "match": "ios", "conf_type": "avg"} for t in (0.6, 0.8)),
    *({"merge": "nms", "iou_thr": t, "match": "iou", "conf_type": "avg"} for t in (0.5, 0.6, 0.7)),
    {"merge": "soft_nms", "iou_thr": 0.5, "match": "iou", "conf_type": "avg"},
    {"merge": "nmw", "iou_thr": 0.55, "match": "iou", "conf_type": "avg"},
]
OBJECTIVES = {"segmentation": ("miou",), "detection": ("map", "map50")}
# The merge settings a detection run uses when neither the caller nor the policy names them
# (:class:`~ttakit.detection.DetectionTTAWrapper`'s defaults).
DETECTION_DEFAULTS: dict[str, Any] = {"merge": "wbf", "iou_thr": 0.55, "skip_box_thr": 0.0, "conf_type": "avg",
                                      "match": "iou"}


def detection_settings(policy: Policy, **given: Any) -> dict[str, Any]:
    """The box-fusion settings to run ``policy`` with: those ``given`` (not None), else those a
    searched policy records (``policy.meta["detection"]``), else :data:`DETECTION_DEFAULTS`.

    Example:
        >>> searched = Policy([View.identity()], meta={"detection": {"merge": "nms", "iou_thr": 0.6}})
        >>> detection_settings(searched, iou_thr=0.5)["merge"], detection_settings(searched, iou_thr=0.5)["iou_thr"]
        ('nms', 0.5)
        >>> # DetectionTTAWrapper(model, searched, **detection_settings(searched))
    """
    recorded = policy.meta.get("detection") if isinstance(policy.meta, dict) else None
    recorded = recorded if isinstance(recorded, dict) else {}
    settings = {}
    for key, default in DETECTION_DEFAULTS.items():
        value = given.get(key)
        settings[key] = value if value is not None else recorded.get(key, default)
    return settings


@dataclass
class DenseSearchResult:
    """What a dense search returns.

    Attributes:
        policy: the selected views (identity first, in selection order), named ``searched``;
            for detection ``policy.meta["detection"]`` holds the merge settings.
        task, objective, budget: what was searched, by which metric, with how many views at most.
        score: the policy's validation score; ``baseline``: no TTA's (the identity alone; for
            detection the detector's plain boxes).
        path: one dict per greedy step (``added``, ``views``, ``score``).
        candidates: each pool view's score as ``identity + view``.
        grid: detection: the score of each merge setting for the selected views and for the
            identity alone.
        stop_reason: why the selection stopped.
        n_images: validation images searched on; seconds: selection time (caching excluded).
    """

    policy: Policy
    task: str
    objective: str
    budget: int
    score: float
    baseline: float
    path: list[dict[str, Any]]
    candidates: list[dict[str, Any]]
    stop_reason: str
    n_images: int
    seconds: float
    grid: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] | None = None

    @property
    def lift(self) -> float:
        """``score - baseline`` (never negative on the images searched on)."""
        return self.score - self.baseline

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task, "objective": self.objective, "budget": self.budget,
            "selected": self.policy.view_names, "settings": self.settings, "score": self.score,
            "baseline": self.baseline, "lift": self.lift, "path": self.path, "candidates": self.candidates,
            "grid": self.grid, "stop_reason": self.stop_reason, "n_images": self.n_images, "seconds": self.seconds,
            "policy": self.policy.to_json(),
        }


# --------------------------------------------------------------------------- pool


def default_dense_pool(flips: bool = True, scales: Sequence[float] = (0.75, 1.25)) -> list[View]:
    """Candidate views that invert masks and boxes exactly: the identity, horizontal and
    vertical flips, bilinear rescaling by each of ``scales`` and each scale with a horizontal
    flip. (Crops and tiles are left out: their merge weights pixels by coverage, which a mean of
    cached views would not reproduce.)"""
    views = [View.identity()]
    if flips:
        views += [View([Step(T.HorizontalFlip(), True)]), View([Step(T.VerticalFlip(), True)])]
    for s in scales:
        scale = T.Scale([float(s)], interpolation="bilinear")
        views.append(View([Step(scale, float(s))]))
        if flips:
            views.append(View([Step(T.HorizontalFlip(), True), Step(scale, float(s))]))
    return views


def _check_pool(views: Sequence[View]) -> list[View]:
    views = [v if isinstance(v, View) else View(v) for v in views]
    if not views or not views[0].is_identity:
        raise InvalidInputError(
            f"the candidate views must start with the identity (no TTA is always a candidate), got "
            f"{[v.name for v in views][:3]}"
        )
    names = [v.name for v in views]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"the candidate views must be distinct, got {names}")
    return views


def _check_budget(budget: object) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise InvalidInputError(f"budget must be an integer >= 1 (views per image), got {budget!r}")
    return budget


# --------------------------------------------------------------------------- caches


def segmentation_view_cache(
    model: Callable[..., Any], images: torch.Tensor, views: Sequence[View], *, activation: str | None = "softmax",
    chunk: int = 32, max_batch: int = 256, device: Any = None, amp: bool = False,
) -> torch.Tensor:
    """Each view's de-augmented class probabilities: ``images (N, C, H, W)`` -> ``(V, N, K, H, W)``
    float16 (``K`` classes). ``activation``: ``"softmax"`` for logits (a model declaring
    ``outputs="probs"`` is taken as it is), None for outputs that are probabilities already."""
    from ..engine import TTAEngine

    views = _check_pool(views)
    engine = TTAEngine(model, Policy(list(views), name="pool"), target="mask", activation=activation,
                       max_batch=max_batch, device=device, amp=amp)
    probs_given = getattr(model, "outputs", None) == "probs" or activation is None
    parts = []
    for start in range(0, images.shape[0], chunk):
        raw = engine.run(images[start:start + chunk], return_views=True).views.float()  # (V, b, K, H, W)
        probs = raw if probs_given else torch.softmax(raw, dim=2)
        parts.append(probs.to(torch.float16).cpu())
    return torch.cat(parts, dim=1)


def detection_view_cache(
    model: Callable[..., Any], images: torch.Tensor, views: Sequence[View], *, max_detections: int = 100,
    chunk: int = 32, max_batch: int = 256, device: Any = None, amp: bool = False, output_format: Any = None,
) -> torch.Tensor:
    """Each view's de-augmented boxes: ``images (N, C, H, W)`` -> ``(V, N, R, 6)`` float32 rows
    ``x1, y1, x2, y2, score, label`` in pixels (padding rows: score 0, label -1)."""
    from ..detection import DetectionTTAWrapper

    views = _check_pool(views)
    wrapper = DetectionTTAWrapper(model, Policy(list(views), name="pool"), max_detections=max_detections,
                                  output_format=output_format, max_batch=max_batch, device=device, amp=amp)
    parts = [wrapper.run(images[start:start + chunk], return_views=True).views.float().cpu()
             for start in range(0, images.shape[0], chunk)]
    rows = max(p.shape[2] for p in parts)
    padded = []
    for p in parts:  # every chunk to the same rows per image (tiles may give more)
        if p.shape[2] < rows:
            pad = p.new_zeros(p.shape[0], p.shape[1], rows - p.shape[2], 6)
            pad[..., 5] = -1.0
            p = torch.cat([p, pad], dim=2)
        padded.append(p)
    return torch.cat(padded, dim=1)


# --------------------------------------------------------------------------- greedy selection


def _greedy(n_views: int, budget: int, score: Callable[[list[int]], float],
            names: Sequence[str]) -> tuple[list[int], float, list[dict[str, Any]], list[dict[str, Any]], str]:
    """Forward selection from ``[0]`` (the identity): ``(selected, score, path, candidates, stop_reason)``."""
    selected = [0]
    best = score(selected)
    path = [{"step": 0, "added": names[0], "views": [names[0]], "score": best}]
    candidates = [{"view": names[v], "score_with_identity": score([0, v])} for v in range(1, n_views)]
    first = {c["view"]: c["score_with_identity"] for c in candidates}
    stop = "budget reached" if budget == 1 else "every candidate view is selected"
    while len(selected) < budget:
        trials = []
        for v in range(1, n_views):
            if v in selected:
                continue
            value = first[names[v]] if selected == [0] else score([*selected, v])
            trials.append((value, v))
        if not trials:
            stop = "every candidate view is selected"
            break
        value, v = max(trials, key=lambda t: (t[0], -t[1]))  # the earlier view on a tie
        if not value > best:
            stop = "no candidate view raises the score"
            break
        selected.append(v)
        best = value
        path.append({"step": len(path), "added": names[v], "views": [names[i] for i in selected], "score": value})
        if len(selected) == budget:
            stop = "budget reached"
    return selected, best, path, candidates, stop


def search_segmentation(
    cache: torch.Tensor, masks: torch.Tensor, views: Sequence[View], *, num_classes: int, budget: int = 4,
    ignore_index: int | None = None, chunk: int = 64,
) -> DenseSearchResult:
    """Greedy selection of views by validation mIoU.

    Args:
        cache: ``(V, N, K, H, W)`` per-view probabilities (:func:`segmentation_view_cache`), view 0
            the identity.
        masks: ``(N, H, W)`` int64 class indices.
        views: the V views of the cache.
        num_classes: classes counted by :func:`ttakit.dense_metrics.mean_iou`.
        budget: most views in the policy.
    """
    from ..dense_metrics import confusion_matrix

    views = _check_pool(views)
    budget = _check_budget(budget)
    if cache.ndim != 5 or cache.shape[0] != len(views):
        raise InvalidInputError(f"cache must be (V={len(views)}, N, K, H, W), got {tuple(cache.shape)}")
    if tuple(masks.shape) != (cache.shape[1], *cache.shape[3:]):
        raise InvalidInputError(
            f"masks must be (N, H, W) = {(cache.shape[1], *cache.shape[3:])} to match the cache, got {tuple(masks.shape)}"
        )
    started = time.perf_counter()
    masks = masks.long()

    def score(selected: list[int]) -> float:
        matrix = None
        for start in range(0, cache.shape[1], chunk):  # bounded memory: a chunk of images in float32 at a time
            summed = cache[selected, start:start + chunk].float().sum(dim=0)
            part = confusion_matrix(summed.argmax(dim=1), masks[start:start + chunk], num_classes, ignore_index)
            matrix = part if matrix is None else matrix + part
        return _miou(matrix)

    names = [v.name for v in views]
    selected, best, path, candidates, stop = _greedy(len(views), min(budget, len(views)), score, names)
    policy = Policy([views[i] for i in selected], name="searched",
                    meta={"search": {"task": "segmentation", "objective": "miou", "score": best,
                                     "baseline": path[0]["score"], "n_images": int(cache.shape[1])}})
    return DenseSearchResult(policy, "segmentation", "miou", budget, best, path[0]["score"], path, candidates, stop,
                             int(cache.shape[1]), time.perf_counter() - started)


def _miou(matrix: torch.Tensor) -> float:
    """Mean IoU over the classes present, from a confusion matrix (as :func:`mean_iou` computes it)."""
    matrix = matrix.double()
    hits = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - hits
    present = union > 0
    return float((hits[present] / union[present]).mean()) if bool(present.any()) else math.nan


def _fuse_all(cache: torch.Tensor, selected: Sequence[int], views: Sequence[View], settings: Mapping[str, Any],
              size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
    """The selected views' boxes fused image by image, exactly as :class:`DetectionTTAWrapper` fuses them."""
    from ..detection import DetectionTTAWrapper

    wrapper = DetectionTTAWrapper(_no_model, Policy([views[i] for i in selected]), **settings)
    rows = cache[list(selected)]
    out = []
    for i in range(rows.shape[1]):
        d = wrapper._fuse_image(rows[:, i], size, torch.int64)
        out.append({"boxes": d.boxes, "scores": d.scores, "labels": d.labels})
    return out


def _no_model(images: torch.Tensor) -> list:  # the wrapper only fuses cached boxes here: never called
    raise RuntimeError("the search fuses cached boxes; the model does not run")


def _plain(cache: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """The identity view's own boxes, unfused."""
    out = []
    for rows in cache[0]:
        keep = (rows[:, 4] > 0) & (rows[:, 5] >= 0)
        out.append({"boxes": rows[keep, :4], "scores": rows[keep, 4], "labels": rows[keep, 5].long()})
    return out


def search_detection(
    cache: torch.Tensor, targets: Sequence[Mapping[str, torch.Tensor]], views: Sequence[View], *,
    size: tuple[int, int], budget: int = 4, objective: str = "map",
    grid: Sequence[Mapping[str, Any]] | None = None,
) -> DenseSearchResult:
    """Greedy selection of views by validation COCO mAP, then a grid over the merge settings.

    Args:
        cache: ``(V, N, R, 6)`` per-view de-augmented boxes in pixels (:func:`detection_view_cache`),
            view 0 the identity.
        targets: one ``{"boxes": (M, 4) xyxy pixels, "labels": (M,)}`` per image.
        views: the V views of the cache.
        size: ``(H, W)`` of the images (boxes are clipped to it before fusion, as the wrapper does).
        budget: most views in the policy.
        objective: ``"map"`` (mAP@[.5:.95]) or ``"map50"``.
        grid: merge settings to try (default :data:`DETECTION_GRID`); each a dict of
            ``merge``, ``iou_thr``, ``match``, ``conf_type`` (and optionally ``skip_box_thr``).
    """
    from .._box_fusion import check_fusion_args
    from ..dense_metrics import detection_map

    views = _check_pool(views)
    budget = _check_budget(budget)
    if objective not in OBJECTIVES["detection"]:
        raise InvalidInputError(f"objective must be one of {', '.join(OBJECTIVES['detection'])}, got {objective!r}")
    if cache.ndim != 4 or cache.shape[0] != len(views) or cache.shape[-1] != 6:
        raise InvalidInputError(f"cache must be (V={len(views)}, N, R, 6), got {tuple(cache.shape)}")
    if len(targets) != cache.shape[1]:
        raise InvalidInputError(f"targets must hold one entry per cached image ({cache.shape[1]}), got {len(targets)}")
    grid = [dict(g) for g in (DETECTION_GRID if grid is None else grid)]
    for g in grid:
        check_fusion_args(g.get("merge"), g.get("iou_thr"), g.get("skip_box_thr", 0.0), g.get("conf_type", "avg"),
                          g.get("match", "iou"))
    started = time.perf_counter()
    size = (int(size[0]), int(size[1]))
    targets = list(targets)

    def score_of(predictions: list[dict[str, torch.Tensor]]) -> float:
        value = detection_map(predictions, targets)[objective]
        return float(value) if not math.isnan(value) else 0.0

    def score(selected: list[int], settings: Mapping[str, Any]) -> float:
        return score_of(_fuse_all(cache, selected, views, settings, size))

    def selection_score(selected: list[int]) -> float:
        return max(score(selected, settings) for settings in SELECTION_SETTINGS)

    names = [v.name for v in views]
    selected, _, path, candidates, stop = _greedy(len(views), min(budget, len(views)), selection_score, names)
    baseline = score_of(_plain(cache))
    # The grid, for the selected views and for the identity alone; the plain output is the floor.
    rows: list[dict[str, Any]] = [{"views": [names[0]], "settings": dict(PLAIN_SETTINGS), "score": baseline,
                                   "plain": True}]
    sets = [[0]] if selected == [0] else [selected, [0]]
    for chosen in sets:
        for settings in grid:
            rows.append({"views": [names[i] for i in chosen], "settings": settings,
                         "score": score(chosen, settings)})
    best = max(rows, key=lambda r: (r["score"], -len(r["views"])))  # max keeps the first of equals
    chosen_views = [views[names.index(n)] for n in best["views"]]
    settings = {"skip_box_thr": 0.0, **best["settings"]}
    policy = Policy(chosen_views, name="searched", meta={
        "detection": settings,
        "search": {"task": "detection", "objective": objective, "score": best["score"], "baseline": baseline,
                   "n_images": int(cache.shape[1])},
    })
    return DenseSearchResult(policy, "detection", objective, budget, best["score"], baseline, path, candidates, stop,
                             int(cache.shape[1]), time.perf_counter() - started, grid=rows, settings=settings)


def dense_search(
    model: Callable[..., Any], images: torch.Tensor, targets: Any, *, task: str, views: Sequence[View] | None = None,
    budget: int = 4, objective: str | None = None, num_classes: int | None = None,
    grid: Sequence[Mapping[str, Any]] | None = None, max_detections: int = 100, max_batch: int = 256,
    device: Any = None, amp: bool = False,
) -> DenseSearchResult:
    """Cache every candidate view on ``images`` and search (:func:`search_segmentation` or
    :func:`search_detection`).

    Args:
        model: a segmentation model ``(N, C, H, W) -> (N, K, H, W)`` or a detector (any output
            :class:`~ttakit.detection.DetectionTTAWrapper` reads).
        images: ``(N, C, H, W)`` validation images in ``[0, 1]``.
        targets: segmentation: ``(N, H, W)`` class indices; detection: one ``{"boxes", "labels"}``
            per image.
        task: ``"segmentation"`` or ``"detection"``.
        views: the candidate pool, the identity first (default :func:`default_dense_pool`).
        objective: ``"miou"`` (segmentation); ``"map"`` or ``"map50"`` (detection).
        num_classes: segmentation: classes counted (default: the model's output channels).
    """
    if task not in OBJECTIVES:
        raise InvalidInputError(f"task must be one of {', '.join(OBJECTIVES)}, got {task!r}")
    pool = _check_pool(views if views is not None else default_dense_pool())
    objective = objective or OBJECTIVES[task][0]
    if objective not in OBJECTIVES[task]:
        raise InvalidInputError(f"objective for {task} must be one of {', '.join(OBJECTIVES[task])}, got {objective!r}")
    if task == "segmentation":
        cache = segmentation_view_cache(model, images, pool, max_batch=max_batch, device=device, amp=amp)
        return search_segmentation(cache, torch.as_tensor(targets), pool, num_classes=num_classes or cache.shape[2],
                                   budget=budget)
    cache = detection_view_cache(model, images, pool, max_detections=max_detections, max_batch=max_batch,
                                 device=device, amp=amp)
    return search_detection(cache, targets, pool, size=tuple(images.shape[-2:]), budget=budget, objective=objective,
                            grid=grid)
