"""ttach-compatible TTA wrappers: ``nn.Module`` s over :class:`~ttakit.engine.TTAEngine`.

Constructor signatures are ttach's; ttakit adds keyword-only options. Like ttach, the
wrappers merge *raw* model outputs by default (``activation=None``); pass
``activation="softmax"`` to merge probabilities. Unlike ttach, a policy whose views cannot
invert the task's target fails when the wrapper is built, views share forward passes up to
``max_batch`` images, and the forward pass runs under ``torch.inference_mode`` unless
``inference_mode=False`` (pass that to backpropagate through TTA).

Given a :class:`~ttakit.policy.Policy`, a wrapper runs everything it holds, exactly as
:class:`~ttakit.engine.TTAEngine` does: views, weights, temperature, matrix scaling and gate, and
its merge mode unless ``merge_mode`` names another than ttach's default ``"mean"``. A ttach
``Compose`` holds none of these, so ttach code gets ttach's numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import nn

from .engine import FROM_POLICY, TTAEngine, TTAOutput
from .errors import InvalidInputError, ModelOutputError, NotInvertibleError
from .policy import Compose, Policy, Transformer

__all__ = ["ClassificationTTAWrapper", "SegmentationTTAWrapper", "KeypointsTTAWrapper"]


class _TTAWrapper(nn.Module):
    target = "label"

    def __init__(
        self,
        model: nn.Module,
        transforms: Compose | Policy,
        merge_mode: str = "mean",
        output_key: str | None = None,
        *,
        activation: str | None = None,
        weights: Sequence[float] | None = None,
        temperature: float | str | None = FROM_POLICY,
        matrix_scaling: dict | str | None = FROM_POLICY,
        gate_threshold: float | str | None = FROM_POLICY,
        max_batch: int = 256,
        pass_size: int | str | None = None,
        device: torch.device | str | None = None,
        amp: bool = False,
        inference_mode: bool = True,
        check_outputs: bool = True,
        deaugment=None,
    ):
        super().__init__()
        self.model = model
        self.transforms = transforms
        self.output_key = output_key
        # ttach's default "mean" leaves a Policy's own merge mode in charge; any other mode wins.
        engine_mode = None if isinstance(transforms, Policy) and merge_mode == "mean" else merge_mode
        self.engine = TTAEngine(
            model,
            transforms,
            target=self.target,
            merge_mode=engine_mode,
            weights=weights,
            activation=activation,
            temperature=temperature,
            matrix_scaling=matrix_scaling,
            gate_threshold=gate_threshold,
            max_batch=max_batch,
            pass_size=pass_size,
            output_key=output_key,
            deaugment=deaugment,
            device=device,
            amp=amp,
            inference_mode=inference_mode,
            check_outputs=check_outputs,
        )
        self.merge_mode = self.engine.merge_mode

    def run(
        self,
        image: torch.Tensor,
        *args: Any,
        return_views: bool = False,
        return_uncertainty: bool = False,
        progress=None,
    ) -> TTAOutput:
        """Like ``forward`` but returns a :class:`TTAOutput` (optionally with per-view outputs and
        uncertainty): see :meth:`TTAEngine.run`."""
        return self.engine.run(
            image, *args, return_views=return_views, return_uncertainty=return_uncertainty, progress=progress
        )

    def forward(self, image: torch.Tensor, *args: Any) -> torch.Tensor | Mapping[str, torch.Tensor]:
        result = self.engine(image, *args)
        return {self.output_key: result} if self.output_key is not None else result


class ClassificationTTAWrapper(_TTAWrapper):
    """Wrap a classification model (``(B, C, H, W) -> (B, classes)``) with TTA.

    Args:
        model: returns a tensor, or a mapping holding one under ``output_label_key``.
        transforms: a :class:`Compose` (e.g. ``ttakit.aliases.d4_transform()``) or a :class:`Policy`.
        merge_mode: mean, gmean, sum, max, min, tsharpen or vote.
        output_label_key: the key of the model's output mapping to merge.

    Example:
        >>> import ttakit as tta
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
        >>> wrapped = tta.ClassificationTTAWrapper(model, tta.aliases.d4_transform())
        >>> wrapped(torch.rand(2, 3, 4, 4)).shape
        torch.Size([2, 5])
    """

    target = "label"

    def __init__(
        self,
        model: nn.Module,
        transforms: Compose | Policy,
        merge_mode: str = "mean",
        output_label_key: str | None = None,
        **options: Any,
    ):
        super().__init__(model, transforms, merge_mode, output_label_key, **options)


class SegmentationTTAWrapper(_TTAWrapper):
    """Wrap a segmentation model (``(B, C, H, W) -> (B, classes, H, W)``) with TTA.

    Every view must invert masks; views that resample (Rotate, Zoom, Translate) are refused when
    the wrapper is built. Crops (FiveCrops, TenCrops) and shifts with padding see part of the
    image: their masks are pasted into the full frame and each pixel is merged over the views
    that saw it (merge modes mean, gmean, tsharpen, vote, max, min); a policy leaving some pixel
    unseen by every view is refused before any forward pass. :class:`~ttakit.transforms.Tiles`
    runs sliding-window inference as a view: tiles run in passes of at most ``max_batch`` images
    and are merged back with a uniform or Gaussian window.
    """

    target = "mask"

    def __init__(
        self,
        model: nn.Module,
        transforms: Compose | Policy,
        merge_mode: str = "mean",
        output_mask_key: str | None = None,
        **options: Any,
    ):
        super().__init__(model, transforms, merge_mode, output_mask_key, **options)


def _check_flip_pairs(flip_pairs: object) -> tuple[tuple[int, int], ...]:
    """``flip_pairs`` as ``((left, right), ...)`` of distinct non-negative indices (their range is
    checked against N when the model's output is known)."""
    if flip_pairs is None:
        return ()
    if isinstance(flip_pairs, (str, bytes)) or not isinstance(flip_pairs, Sequence):
        raise InvalidInputError(f"flip_pairs must be a list of (left, right) keypoint index pairs, got {flip_pairs!r}")
    seen: set[int] = set()
    pairs = []
    for pair in flip_pairs:
        if (
            isinstance(pair, (str, bytes))
            or not isinstance(pair, Sequence)
            or len(pair) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in pair)
        ):
            raise InvalidInputError(
                f"flip_pairs must hold (left, right) pairs of non-negative keypoint indices, got {pair!r}"
            )
        repeated = [i for i in pair if i in seen] or ([pair[0]] if pair[0] == pair[1] else [])
        if repeated:
            raise InvalidInputError(
                f"flip_pairs pair {tuple(pair)} repeats keypoint index {repeated[0]}; each index may appear in "
                "one pair, once"
            )
        seen.update(pair)
        pairs.append((int(pair[0]), int(pair[1])))
    return tuple(pairs)


# Three reference points, de-augmented through a view: a mirror flips the sign of their cross product.
_REFERENCE = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)


def mirrors(transformer: Transformer) -> bool:
    """Whether a view mirrors the image (hflip, vflip, TenCrops' flipped half, hflip+rot90, ...):
    de-augment three reference points and test the orientation of the triangle they span.
    The transformer must have augmented an image already (crops and shifts need its size)."""
    p = transformer.deaugment_keypoints(_REFERENCE.clone())[0]
    a, b = p[1] - p[0], p[2] - p[0]
    return float(a[0] * b[1] - a[1] * b[0]) < 0


class KeypointsTTAWrapper(_TTAWrapper):
    """Wrap a keypoint model with TTA: coordinates ``(B, 2N)`` as ``[x1, y1, ..., xN, yN]`` (or
    ``(B, N, 2)``), or heatmaps ``(B, N, H, W)``.

    Args:
        scaled: True if the model returns coordinates normalised to ``[0, 1]``; False if it
            returns pixels of the image it was given.
        flip_pairs: ``[(left, right), ...]`` keypoint indices that swap under a mirror (left and
            right eye, ...), as pose libraries list them. After a view that mirrors the image
            (hflip, vflip, TenCrops' flipped crops, hflip+rot90, ...) the model's "left eye" is the
            person's right eye: the pair is swapped back before merging. Which views mirror is
            found by de-augmenting three reference points, so any transform works.
        heatmaps: True if the model returns heatmaps ``(B, N, H, W)``; None (default) treats a
            rank-4 output as heatmaps. Heatmaps are de-augmented as masks (every view must invert
            masks and see every pixel: crops and shifts are refused), flip pairs' channels
            swapped, and merged. A heatmap smaller than
            its view is first resized (bilinear) to the view, so merged heatmaps have the input
            image's size.

    Unlike ttach, pixel outputs are normalised by the size of the *augmented* view (a
    rotated non-square image is ``W x H``), and the model's output is never modified in place.

    Example:
        >>> import ttakit as tta
        >>> model = lambda x: torch.tensor([[1.0, 2.0, 6.0, 2.0]]).expand(len(x), 4)  # left, right
        >>> policy = tta.Compose([tta.HorizontalFlip()])
        >>> tta.KeypointsTTAWrapper(model, policy, flip_pairs=[(0, 1)])(torch.rand(1, 1, 4, 8))
        tensor([[1.5000, 2.0000, 6.5000, 2.0000]])
    """

    target = "keypoints"

    def __init__(
        self,
        model: nn.Module,
        transforms: Compose | Policy,
        merge_mode: str = "mean",
        output_keypoints_key: str | None = None,
        scaled: bool = False,
        *,
        flip_pairs: Sequence[tuple[int, int]] | None = None,
        heatmaps: bool | None = None,
        **options: Any,
    ):
        if merge_mode == "vote":
            raise InvalidInputError("merge_mode 'vote' needs class scores; use mean, gmean, sum, max, min or tsharpen")
        if heatmaps is not None and not isinstance(heatmaps, bool):
            raise InvalidInputError(f"heatmaps must be True, False or None (detect rank-4 outputs), got {heatmaps!r}")
        self.scaled = scaled
        self.flip_pairs = _check_flip_pairs(flip_pairs)
        self.heatmaps = heatmaps
        super().__init__(model, transforms, merge_mode, output_keypoints_key, deaugment=self._deaugment, **options)
        if heatmaps:
            self.engine.policy.check_targets("mask")

    def _permutation(self, n: int) -> list[int]:
        """The keypoint order that swaps every flip pair, for N = ``n`` keypoints."""
        order = list(range(n))
        for left, right in self.flip_pairs:
            if max(left, right) >= n:
                raise InvalidInputError(
                    f"flip_pairs pair {(left, right)} is out of range for N = {n} keypoints (indices 0..{n - 1})"
                )
            order[left], order[right] = right, left
        return order

    def _deaugment(self, transformer: Transformer, output: torch.Tensor, view_size: tuple[int, int]) -> torch.Tensor:
        if self.heatmaps or (self.heatmaps is None and output.ndim == 4):
            return self._deaugment_heatmaps(transformer, output, view_size)
        # (B, 2N) as ttach documents it; (B, N, 2) is accepted too, as ttach's reshape does.
        if output.ndim < 2 or output[0].numel() % 2 or (output.ndim > 2 and output.shape[-1] != 2):
            raise ModelOutputError(
                f"a keypoint model must return (B, 2N) as [x1, y1, ..., xN, yN], got shape {tuple(output.shape)}"
            )
        points = output.reshape(output.shape[0], -1, 2)
        if not self.scaled:
            height, width = view_size
            points = points / points.new_tensor([width, height])
        points = transformer.deaugment_keypoints(points)
        if self.flip_pairs:
            order = self._permutation(points.shape[1])
            if mirrors(transformer):
                points = points[:, order]
        return points

    def _deaugment_heatmaps(
        self, transformer: Transformer, output: torch.Tensor, view_size: tuple[int, int]
    ) -> torch.Tensor:
        """``output: (B, N, h, w)`` heatmaps on the view -> ``(B, N, H, W)`` on the input image."""
        if output.ndim != 4:
            raise ModelOutputError(
                f"heatmaps=True: a keypoint model must return heatmaps (B, N, H, W), got shape {tuple(output.shape)}"
            )
        if tuple(output.shape[-2:]) != tuple(view_size):
            output = nnf.interpolate(output.float(), size=tuple(view_size), mode="bilinear", align_corners=False)
        weighted = getattr(transformer, "deaugment_mask_weighted", None)
        maps, seen = weighted(output) if weighted is not None else (transformer.deaugment_mask(output), None)
        if seen is not None and bool((seen <= 0).any()):
            # The keypoint merge has no per-pixel coverage: a pixel a view never saw would count as 0.
            raise NotInvertibleError(
                "heatmaps need views that see every pixel of the image, but a view of the policy leaves some "
                "unseen (a crop or a shift); drop it, or return keypoint coordinates"
            )
        if self.flip_pairs:
            order = self._permutation(maps.shape[1])
            if mirrors(transformer):
                maps = maps[:, order]
        return maps

    def _to_output(self, points: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        # (..., N, 2) normalised -> (..., 2N) in the model's convention (pixels unless scaled).
        if not self.scaled:
            height, width = image_size
            points = points * points.new_tensor([width, height])
        return points.reshape(*points.shape[:-2], -1)

    def run(
        self, image: torch.Tensor, *args: Any, return_views: bool = False, progress=None, **unused: Any
    ) -> TTAOutput:
        """Like ``forward`` but returns a :class:`TTAOutput`: ``merged`` is ``(B, 2N)`` and
        ``views`` ``(K, B, 2N)``, in the same units as ``forward`` (pixels unless ``scaled``);
        for heatmaps ``(B, N, H, W)`` and ``(K, B, N, H, W)``."""
        if unused.get("return_uncertainty"):
            raise InvalidInputError("return_uncertainty needs class scores; keypoint outputs have none")
        out = self.engine.run(image, *args, return_views=return_views, progress=progress)
        if out.merged.ndim == 4:  # heatmaps come back as they are merged
            return out
        size = (int(image.shape[-2]), int(image.shape[-1]))
        views = self._to_output(out.views, size) if out.views is not None else None
        return replace(out, merged=self._to_output(out.merged, size), views=views)

    def forward(self, image: torch.Tensor, *args: Any) -> torch.Tensor | Mapping[str, torch.Tensor]:
        result = self.run(image, *args).merged
        return {self.output_key: result} if self.output_key is not None else result
