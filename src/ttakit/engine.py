"""The one place that runs a model over views.

:class:`TTAEngine` augments a batch with every view of a policy, runs the model on as many
views at once as ``max_batch`` allows (several views of a small batch share one forward
pass; a large batch is cut into chunks of ``max_batch`` images), de-augments each output
with a task-specific hook, checks it, and merges it into a running :class:`MergeAccumulator`.
At most ``max_batch`` augmented images exist at a time, whatever the number of views (while
views of a small batch are stacked, their copy in the stacked batch too, until it is made).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import InvalidInputError, ModelOutputError
from .functional import check_image
from .merge import MergeAccumulator, check_activation, check_merge_mode
from .policy import Compose, Policy, Transformer, View

__all__ = ["TTAEngine", "TTAOutput", "as_policy", "DeaugmentHook"]

# (transformer, output of the model on the view, spatial size of the view) -> output in the input's frame
DeaugmentHook = Callable[[Transformer, torch.Tensor, tuple[int, int]], torch.Tensor]


def _deaugment_label(transformer: Transformer, output: torch.Tensor, view_size) -> torch.Tensor:
    return transformer.deaugment_label(output)


def _deaugment_mask(transformer: Transformer, output: torch.Tensor, view_size) -> torch.Tensor:
    if output.ndim != 4:
        raise ModelOutputError(
            f"a segmentation model must return masks of shape (B, C, H, W), got shape {tuple(output.shape)}"
        )
    return transformer.deaugment_mask(output)


_DEFAULT_HOOKS: dict[str, DeaugmentHook] = {"label": _deaugment_label, "mask": _deaugment_mask}


@dataclass
class TTAOutput:
    """What :meth:`TTAEngine.run` returns.

    Attributes:
        merged: ``(B, ...)`` the merged output.
        views: ``(K, B, ...)`` each view's de-augmented raw output (before ``activation``), or None
            unless ``return_views=True``.
        view_names: the K views' names, in policy order.
    """

    merged: torch.Tensor
    views: torch.Tensor | None
    view_names: list[str]


def as_policy(policy: Policy | Compose | Sequence[View] | str) -> Policy:
    """Accept a :class:`Policy`, a ttach-style :class:`Compose`, a list of views or a policy name."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, Compose):
        return policy.to_policy()
    if isinstance(policy, str):
        # Imported here: aliases builds on this module's callers, not on the engine.
        from .aliases import get_policy

        return get_policy(policy)
    if isinstance(policy, Sequence) and all(isinstance(v, View) for v in policy):
        return Policy(list(policy))
    # A ttach.Compose: rebuild it from its transforms, which follow the same protocol.
    if hasattr(policy, "aug_transforms") and hasattr(policy, "aug_transform_parameters"):
        return Compose(policy.aug_transforms).to_policy()
    raise InvalidInputError(
        f"policy must be a ttakit.Policy, a Compose, a list of View or a policy name, got {type(policy).__name__}"
    )


def _model_device(model: Any) -> torch.device:
    if isinstance(model, nn.Module):
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            return tensor.device
    return torch.device("cpu")


def _as_normal_tensor(x: torch.Tensor | None) -> torch.Tensor | None:
    # Tensors made under inference_mode reject in-place updates outside it; ttach's outputs are
    # ordinary tensors that callers may modify (``pred[pred < 0.5] = 0``), so hand back a copy.
    return x.clone() if x is not None and x.is_inference() else x


class TTAEngine:
    """Run ``model`` over every view of ``policy`` and merge what comes back.

    Args:
        model: an ``nn.Module`` or any callable ``model(images, *args)``.
        policy: a :class:`Policy`, :class:`Compose`, list of :class:`View` or a policy name.
        target: ``"label"`` (classification), ``"mask"`` (segmentation) or, with a ``deaugment``
            hook, ``"keypoints"``/``"boxes"``. Views that cannot invert it fail here, at build time.
        merge_mode: a :mod:`ttakit.merge` mode; defaults to the policy's.
        weights: per-view weights; default the policy's.
        activation: ``"softmax"``, ``"sigmoid"`` or ``None`` (merge raw outputs). ``"auto"``
            (default) merges class probabilities (softmax) for ``"label"`` and raw outputs
            otherwise. The ttach-compatible wrappers pass ``None``, as ttach merges raw outputs.
        max_batch: most images per forward pass (views of a small batch are stacked up to it).
        output_key: when the model returns a mapping, the key of the output to merge.
        deaugment: hook mapping one view's output back; defaults by ``target``.
        class_dim: class dimension of one output (softmax and vote).
        device: where to run; defaults to the model's device.
        amp: run the forward pass under autocast (bfloat16 on CPU, float16 on CUDA).
        inference_mode: run under ``torch.inference_mode`` (no autograd).
        check_outputs: raise :class:`ModelOutputError` on NaN/inf or view-dependent shapes.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> engine = TTAEngine(model, "hflip")
        >>> engine(torch.rand(2, 1, 4, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        model: Callable[..., Any],
        policy: Policy | Compose | Sequence[View] | str,
        *,
        target: str = "label",
        merge_mode: str | None = None,
        weights: Sequence[float] | None = None,
        activation: str | None = "auto",
        max_batch: int = 256,
        output_key: str | None = None,
        deaugment: DeaugmentHook | None = None,
        class_dim: int = 1,
        device: torch.device | str | None = None,
        amp: bool = False,
        inference_mode: bool = True,
        check_outputs: bool = True,
        seed: int = 0,
    ):
        if not callable(model):
            raise InvalidInputError(f"model must be callable (an nn.Module or a function), got {type(model).__name__}")
        self.model = model
        self.policy = as_policy(policy)
        self.policy.check_targets(target)
        self.target = target
        self.merge_mode = check_merge_mode(merge_mode or self.policy.merge_mode)
        self.weights = list(weights) if weights is not None else self.policy.weights
        if activation == "auto":
            activation = "softmax" if target == "label" else None
        self.activation = check_activation(activation)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidInputError(f"max_batch must be a positive integer number of images, got {max_batch!r}")
        self.max_batch = max_batch
        self.output_key = output_key
        if deaugment is None:
            if target not in _DEFAULT_HOOKS:
                raise InvalidInputError(f"target {target!r} needs a deaugment hook; use its TTA wrapper")
            deaugment = _DEFAULT_HOOKS[target]
        self.deaugment = deaugment
        self.class_dim = class_dim
        self.device = torch.device(device) if device is not None else None
        self.amp = amp
        self.inference_mode = inference_mode
        self.check_outputs = check_outputs
        self.seed = seed
        self.transformers = list(self.policy)

    @property
    def view_names(self) -> list[str]:
        return self.policy.view_names

    def __len__(self) -> int:
        return len(self.transformers)

    def __call__(self, images: torch.Tensor, *args: Any) -> torch.Tensor:
        return self.run(images, *args).merged

    def run(self, images: torch.Tensor, *args: Any, return_views: bool = False) -> TTAOutput:
        """Augment, predict, de-augment and merge.

        Args:
            images: ``(B, C, H, W)`` float images.
            *args: extra model arguments, passed unchanged to every forward pass. With extra
                arguments each view runs on its own and the batch is not chunked (they may be
                per-sample), exactly as in ttach.
            return_views: also return the ``(K, B, ...)`` de-augmented per-view outputs.
        """
        check_image(images, "images")
        total = images.shape[0]
        if total == 0:
            raise InvalidInputError(f"images is an empty batch of shape {tuple(images.shape)}; pass at least one image")
        device = self.device or _model_device(self.model)
        grad_context = torch.inference_mode() if self.inference_mode else contextlib.nullcontext()
        with grad_context:
            image_chunk = total if args else min(total, self.max_batch)
            merged, per_view = [], []
            for start in range(0, total, image_chunk):
                chunk = images[start : start + image_chunk].to(device, non_blocking=True)
                # Stack as many views of this chunk as fit in max_batch images (one if extra args).
                views_per_pass = 1 if args else max(1, self.max_batch // chunk.shape[0])
                out, views = self._run_chunk(chunk, args, views_per_pass, return_views)
                merged.append(out)
                if return_views:
                    per_view.append(views)
            merged_all = torch.cat(merged) if len(merged) > 1 else merged[0]
            views_all = None
            if return_views:
                views_all = torch.cat(per_view, dim=1) if len(per_view) > 1 else per_view[0]
        return TTAOutput(_as_normal_tensor(merged_all), _as_normal_tensor(views_all), self.view_names)

    def _run_chunk(self, chunk, args, views_per_pass, return_views):
        n_views = len(self.transformers)
        acc = MergeAccumulator(
            self.merge_mode, n_views, self.weights, self.activation, self.class_dim, self.seed
        )
        outputs: list[torch.Tensor | None] = [None] * n_views
        reference_shape: tuple[int, ...] | None = None
        for first in range(0, n_views, views_per_pass):
            group = range(first, min(first + views_per_pass, n_views))
            augmented = {k: self.transformers[k].augment_image(chunk) for k in group}
            for same_size in _group_by_shape(augmented):
                # Hand each view over to the batch (dropping our reference), and the batch to the
                # model: no augmented image outlives the forward pass it was made for.
                parts = [augmented.pop(k) for k in same_size]
                batch = torch.cat(parts) if len(parts) > 1 else parts[0]
                del parts
                view_size = (int(batch.shape[-2]), int(batch.shape[-1]))
                result = self._forward(batch, args)
                del batch
                if self.check_outputs:
                    self._check_finite(result, same_size, chunk.shape[0])
                for k, output in zip(same_size, result.split(chunk.shape[0])):
                    output = self.deaugment(self.transformers[k], output, view_size)
                    if self.check_outputs:
                        reference_shape = self._check_shape(output, k, reference_shape)
                    acc.add(output, k)
                    if return_views:
                        outputs[k] = output.float()
                del result, output
        views = torch.stack(outputs) if return_views else None
        return acc.result(), views

    def _forward(self, batch: torch.Tensor, args) -> torch.Tensor:
        device_type = batch.device.type
        amp_dtype = torch.bfloat16 if device_type == "cpu" else torch.float16
        autocast = torch.autocast(device_type, dtype=amp_dtype) if self.amp else contextlib.nullcontext()
        with autocast:
            output = self.model(batch, *args)
        if isinstance(output, Mapping):
            if self.output_key is None:
                raise ModelOutputError(
                    f"the model returned a mapping with keys {sorted(output)}; name the output to merge "
                    "with output_key (output_label_key / output_mask_key / output_keypoints_key in the wrappers)"
                )
            if self.output_key not in output:
                raise ModelOutputError(f"output_key {self.output_key!r} is not among the model's outputs {sorted(output)}")
            output = output[self.output_key]
        elif self.output_key is not None:
            raise ModelOutputError(
                f"output_key={self.output_key!r} was given but the model returned {type(output).__name__}, not a mapping"
            )
        if not isinstance(output, torch.Tensor):
            raise ModelOutputError(f"the model must return a tensor (or a mapping of tensors), got {type(output).__name__}")
        if output.ndim == 0 or output.shape[0] != batch.shape[0]:
            raise ModelOutputError(
                f"the model returned shape {tuple(output.shape)} for a batch of {batch.shape[0]} images; "
                "its first dimension must be the batch"
            )
        return output.float() if self.amp else output

    def _check_finite(self, result: torch.Tensor, views: list[int], per_view: int) -> None:
        # One check per forward pass (not per view); the culprit view is found only on failure.
        if bool(torch.isfinite(result).all()):
            return
        for k, part in zip(views, result.split(per_view)):
            bad = int((~torch.isfinite(part)).sum())
            if bad:
                raise ModelOutputError(
                    f"the model returned {bad} NaN/inf values for view {self.view_names[k]!r}; check the model "
                    "and its input normalisation (TTA cannot merge non-finite outputs)"
                )

    def _check_shape(self, output: torch.Tensor, index: int, reference: tuple[int, ...] | None):
        shape = tuple(output.shape)
        if reference is not None and shape != reference:
            raise ModelOutputError(
                f"view {self.view_names[index]!r} produced output of shape {shape} after de-augmentation, but "
                f"earlier views produced {reference}; every view must map back to the same shape"
            )
        return shape


def _group_by_shape(augmented: dict[int, torch.Tensor]) -> list[list[int]]:
    # Views that change the image size (Scale, Resize, crops) cannot share a batch with others.
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, image in augmented.items():
        groups.setdefault(tuple(image.shape), []).append(k)
    return list(groups.values())
