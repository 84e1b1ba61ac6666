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
from torch import nn

from .engine import FROM_POLICY, TTAEngine, TTAOutput
from .errors import InvalidInputError, ModelOutputError
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

    Every view must invert masks: crops are refused here, when the wrapper is built.
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


class KeypointsTTAWrapper(_TTAWrapper):
    """Wrap a keypoint model returning ``(B, 2N)`` as ``[x1, y1, ..., xN, yN]`` with TTA.

    Args:
        scaled: True if the model returns coordinates normalised to ``[0, 1]``; False if it
            returns pixels of the image it was given.

    Unlike ttach, pixel outputs are normalised by the size of the *augmented* view (a
    rotated non-square image is ``W x H``), and the model's output is never modified in place.
    """

    target = "keypoints"

    def __init__(
        self,
        model: nn.Module,
        transforms: Compose | Policy,
        merge_mode: str = "mean",
        output_keypoints_key: str | None = None,
        scaled: bool = False,
        **options: Any,
    ):
        if merge_mode == "vote":
            raise InvalidInputError("merge_mode 'vote' needs class scores; use mean, gmean, sum, max, min or tsharpen")
        self.scaled = scaled
        super().__init__(model, transforms, merge_mode, output_keypoints_key, deaugment=self._deaugment, **options)

    def _deaugment(self, transformer: Transformer, output: torch.Tensor, view_size: tuple[int, int]) -> torch.Tensor:
        # (B, 2N) as ttach documents it; (B, N, 2) is accepted too, as ttach's reshape does.
        if output.ndim < 2 or output[0].numel() % 2 or (output.ndim > 2 and output.shape[-1] != 2):
            raise ModelOutputError(
                f"a keypoint model must return (B, 2N) as [x1, y1, ..., xN, yN], got shape {tuple(output.shape)}"
            )
        points = output.reshape(output.shape[0], -1, 2)
        if not self.scaled:
            height, width = view_size
            points = points / points.new_tensor([width, height])
        return transformer.deaugment_keypoints(points)

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
        ``views`` ``(K, B, 2N)``, in the same units as ``forward`` (pixels unless ``scaled``)."""
        if unused.get("return_uncertainty"):
            raise InvalidInputError("return_uncertainty needs class scores; keypoint outputs have none")
        out = self.engine.run(image, *args, return_views=return_views, progress=progress)
        size = (int(image.shape[-2]), int(image.shape[-1]))
        views = self._to_output(out.views, size) if out.views is not None else None
        return replace(out, merged=self._to_output(out.merged, size), views=views)

    def forward(self, image: torch.Tensor, *args: Any) -> torch.Tensor | Mapping[str, torch.Tensor]:
        result = self.run(image, *args).merged
        return {self.output_key: result} if self.output_key is not None else result
