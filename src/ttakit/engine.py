"""The one place a policy runs.

:class:`TTAEngine` applies everything a policy holds: its views, merge mode and weights, the
temperature (on the merged output) and the gate (the identity view first, the other views only
on images the plain prediction is unsure of). It augments a batch with the views, runs the model
on passes of about ``pass_size`` images (several views of a small batch share one forward
pass; a large batch is cut into chunks of ``pass_size`` images, never more than ``max_batch``), de-augments each output
with a task-specific hook, checks it, and merges it into a running :class:`MergeAccumulator`.

Memory: at most ``max_batch`` augmented images exist at a time, whatever the number of views
(while views of a small batch are stacked, their copy in the stacked batch too, until it is
made). With extra model arguments the same bound holds: views then run one per forward pass, and
per-sample tensor arguments are sliced along with the images.

Speed: the policy's per-view work (transformers, bound augmentation steps, merge settings, weights)
is prepared once, when the engine is built. A classification batch that fits one chunk takes one
merge over the stacked outputs of its views. On CPU, by default, how many views share a forward
pass is measured rather than guessed: the first calls of each input shape try each distinct plan
(stacked views, one view per pass, passes of 32) and later calls use the fastest
(:mod:`ttakit._pass_tuner`); results do not depend on the plan beyond float rounding.

Every other inference path (the wrappers, ``evaluate``, ``gating``, the trainer's plain
prediction) calls :meth:`TTAEngine.run`; it is the only chunking loop.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._pass_tuner import MAX_SHAPES, PassTuner, candidate_pass_sizes
from .errors import InvalidInputError, ModelOutputError
from .functional import check_image
from .merge import (
    MergeAccumulator,
    apply_activation,
    apply_matrix_scaling,
    apply_temperature,
    check_activation,
    check_matrix_scaling,
    check_merge_mode,
    check_temperature,
    check_weights,
)
from .policy import Compose, Policy, Transformer, View
from .transforms import BaseTransform
from .uncertainty import view_uncertainty

__all__ = ["TTAEngine", "TTAOutput", "as_policy", "check_device", "eval_mode", "DeaugmentHook", "FROM_POLICY"]

# (transformer, output of the model on the view, spatial size of the view) -> output in the input's frame
DeaugmentHook = Callable[[Transformer, torch.Tensor, tuple[int, int]], torch.Tensor]

# Default of ``temperature`` and ``gate_threshold``: take the policy's.
FROM_POLICY = "policy"

_MODEL_OUTPUTS = ("logits", "probs")
# On CPU a large forward pass runs slower per image once its activations outgrow the caches (on
# the shared 2-core benchmark machine the seed CNN and ResNet-20 took 1.3-3x longer per image at
# 64-256 images than at 8-32, the more so the busier the machine), so passes hold at most 32
# images there: enough to stack the views of a small batch (benchmarks/engine.py).
_CPU_PASS = 32
_DEVICE_FORMS = "'cpu', 'cuda', 'cuda:N' (N = 0, 1, ...), 'mps' or a torch.device"


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
        merged: ``(B, ...)`` the merged output, temperature applied (see :class:`TTAEngine`).
        views: ``(K, B, ...)`` each view's de-augmented raw output (before ``activation``), or None
            unless ``return_views=True``. Under the gate, rows that were not gated hold the
            identity view's output in every view (the other views did not run on them).
        view_names: the K views' names, in policy order.
        passes_per_image: forward passes spent per image (images through the model / B): K
            without a gate, ``1 + (K - 1) * gated_fraction`` with one.
        gated: ``(B,)`` bool, the rows that got every view, or None when no gate is active.
        uncertainty: None unless ``return_uncertainty=True``; then per-image tensors
            (:func:`ttakit.uncertainty.view_uncertainty`): ``std`` ``(B, C)``,
            ``predictive_entropy``, ``expected_entropy``, ``mutual_information`` and
            ``disagreement`` ``(B,)``. On rows the gate kept plain only the identity ran: ``std``,
            ``mutual_information`` and ``disagreement`` are 0 there.
    """

    merged: torch.Tensor
    views: torch.Tensor | None
    view_names: list[str]
    passes_per_image: float = 0.0
    gated: torch.Tensor | None = None
    uncertainty: dict[str, torch.Tensor] | None = None

    @property
    def passes(self) -> torch.Tensor:
        """``(B,)`` forward passes each image got: K, or 1 / K under the gate."""
        k = len(self.view_names)
        if self.gated is None:
            return torch.full((self.merged.shape[0],), k, dtype=torch.long)
        return 1 + (k - 1) * self.gated.long().cpu()


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
    if isinstance(policy, Sequence) and policy and all(isinstance(v, View) for v in policy):
        return Policy(list(policy))
    # A ttach.Compose: rebuild it from its transforms, which follow the same protocol.
    if hasattr(policy, "aug_transforms") and hasattr(policy, "aug_transform_parameters"):
        return Compose(policy.aug_transforms).to_policy()
    raise InvalidInputError(
        f"policy must be a ttakit.Policy, a Compose, a list of View or a policy name, got {type(policy).__name__}"
    )


def check_device(device: object) -> torch.device | None:
    """``None`` or a usable device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a ``torch.device``.

    Raises :class:`InvalidInputError` naming the value and the valid forms, or saying that CUDA /
    MPS is not available on this machine.
    """
    if device is None:
        return None
    if isinstance(device, torch.device):
        parsed = device
    elif isinstance(device, str):
        try:
            parsed = torch.device(device.strip())
        except (RuntimeError, ValueError):
            raise InvalidInputError(f"device must be one of {_DEVICE_FORMS}, got {device!r}") from None
    else:
        raise InvalidInputError(f"device must be one of {_DEVICE_FORMS}, got {type(device).__name__} {device!r}")
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(
                f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda is not None}); use device='cpu'"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise InvalidInputError(
                f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
        return parsed
    if parsed.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise InvalidInputError(f"device {device!r}: MPS (Apple GPU) is not available on this machine; use 'cpu'")
        return parsed
    raise InvalidInputError(f"device must be one of {_DEVICE_FORMS}, got {device!r}")


class eval_mode:  # noqa: N801 - used like a function: ``with eval_mode(model):``
    """Put an ``nn.Module`` in eval mode for the block and restore its mode afterwards (any other
    callable is left alone)."""

    def __init__(self, model: Any):
        self.model = model
        self.was_training = bool(getattr(model, "training", False))

    def __enter__(self) -> None:
        if self.was_training and hasattr(self.model, "eval"):
            self.model.eval()

    def __exit__(self, *exc: object) -> None:
        if self.was_training and hasattr(self.model, "train"):
            self.model.train(True)


def _model_output_kind(model: Any) -> str:
    kind = getattr(model, "outputs", None)
    if not isinstance(kind, str):  # no declaration (or e.g. a sub-module called "outputs")
        return "logits"
    if kind not in _MODEL_OUTPUTS:
        raise InvalidInputError(
            f"the model declares outputs={kind!r}; expected 'logits' or 'probs' (probabilities, not softmaxed again)"
        )
    return kind


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same; "cuda" (no index) is the current CUDA device."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        if a.type != "cuda":
            return True
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


def _first_tensor(model: Any) -> torch.Tensor | None:
    if isinstance(model, nn.Module):
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            return tensor
    return None


def _as_normal_tensor(x: torch.Tensor | None) -> torch.Tensor | None:
    # Tensors made under inference_mode reject in-place updates outside it; ttach's outputs are
    # ordinary tensors that callers may modify (``pred[pred < 0.5] = 0``), so hand back a copy.
    return x.clone() if x is not None and x.is_inference() else x


def _label_passes_through(transformer: Transformer) -> bool:
    """Whether de-augmenting class scores returns them untouched (true of every ttakit transform),
    probed once so the engine can skip the call and merge a stacked pass in one go."""
    probe = torch.zeros(1, 2)
    try:
        return transformer.deaugment_label(probe) is probe
    except Exception:  # a foreign transform: call it every time and let it raise there
        return False


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInputError(f"{name} must be True or False, got {value!r}")
    return value


class TTAEngine:
    """Run ``model`` over every view of ``policy`` and merge what comes back.

    Args:
        model: an ``nn.Module`` or any callable ``model(images, *args)``. A model whose
            ``outputs`` attribute is ``"probs"`` returns probabilities: they are merged as they are
            (never softmaxed again; ``gmean`` renormalised as for softmax). ``"logits"`` or no
            attribute: raw scores.
        policy: a :class:`Policy`, :class:`Compose`, list of :class:`View` or a policy name.
        target: ``"label"`` (classification), ``"mask"`` (segmentation) or, with a ``deaugment``
            hook, ``"keypoints"``/``"boxes"``. Views that cannot invert it fail here, at build time.
        merge_mode: a :mod:`ttakit.merge` mode; defaults to the policy's.
        weights: per-view weights (K non-negative numbers) or class-by-view weights (K lists of C,
            merge ``"mean"`` of probabilities only: ``p_c ~ sum_k W[k][c] p_kc`` renormalised over
            classes); default the policy's.
        activation: ``"softmax"``, ``"sigmoid"`` or ``None`` (merge raw outputs). ``"auto"``
            (default) merges class probabilities (softmax) for ``"label"`` and raw outputs
            otherwise. The ttach-compatible wrappers pass ``None``, as ttach merges raw outputs.
        temperature: scales the merged output: probabilities ``p -> softmax(log(p) / T)``, raw
            logits ``z -> z / T``, sigmoid outputs ``p -> sigmoid(logit(p) / T)``. Default
            ``"policy"``: the policy's (None: no scaling).
        matrix_scaling: ``{"weight": (C, C), "bias": (C,)}`` applied after the temperature:
            probabilities ``p -> softmax(W log(p) + b)``, raw logits ``z -> W z + b`` (not for
            sigmoid outputs). Default ``"policy"``: the policy's (None: none).
        gate_threshold: in ``[0, 1]``: run the identity view first and the other views only on
            images whose plain top-class probability is ``< gate_threshold`` (0: plain inference;
            1: every view on every image not predicted with probability exactly 1). Images not
            gated get ``activation(identity output)``, without temperature (it was fitted to the
            merge). Needs ``target="label"`` and the identity among the views. Default
            ``"policy"``: the policy's (None: no gate).
        max_batch: most images per forward pass: the memory bound (at most this many augmented
            images exist at a time).
        pass_size: images per forward pass the engine aims for (at most ``max_batch``): views of
            a small batch are stacked up to it, a large batch is cut into chunks of it. Default
            ``None``: on CPU, tuned per input shape from the first calls' wall time among 32, the
            whole batch (one view per pass, ttach's plan) and ``max_batch``; the reference plan
            (the whole batch when it holds more than 32 and fewer than ``max_batch`` images, else 32) is kept unless
            another is 3% faster (calls with extra arguments, a gate or per-view outputs use 32);
            ``max_batch`` on other devices.
        output_key: when the model returns a mapping, the key of the output to merge.
        deaugment: hook mapping one view's output back; defaults by ``target``.
        class_dim: class dimension of one output (softmax, vote, gate, uncertainty); not 0.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a ``torch.device``: where
            images are sent, chunk by chunk; default the model's device. The model is not moved.
        amp: run the forward pass under ``torch.autocast`` (bfloat16 on CPU, float16 on
            CUDA/MPS); outputs are merged in float32.
        inference_mode: run under ``torch.inference_mode`` (no autograd).
        check_outputs: raise :class:`ModelOutputError` on NaN/inf or view-dependent shapes.
        seed: seeds the random tie-break of ``vote``.

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
        weights: Sequence[float] | torch.Tensor | None = None,
        activation: str | None = "auto",
        temperature: float | str | None = FROM_POLICY,
        matrix_scaling: dict | str | None = FROM_POLICY,
        gate_threshold: float | str | None = FROM_POLICY,
        max_batch: int = 256,
        pass_size: int | None = None,
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
        n_views = len(self.policy)
        self.merge_mode = check_merge_mode(merge_mode or self.policy.merge_mode)
        given = weights if weights is not None else self.policy.weights
        checked = check_weights(given, n_views, self.merge_mode)
        self.weights = None if checked is None else checked.tolist()
        # (K, C) class-by-view weights: merged by the accumulator, p_c ~ sum_k W[k][c] p_kc renormalised.
        self._class_weights = checked is not None and checked.ndim == 2
        # Per-view weights for the uncertainty's expected entropy (class-by-view: each view's mean).
        self._view_weights = checked.mean(1).tolist() if self._class_weights else self.weights
        if activation == "auto":
            activation = "softmax" if target == "label" else None
        self.activation = check_activation(activation)
        self.model_outputs = _model_output_kind(model)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidInputError(f"max_batch must be a positive integer number of images, got {max_batch!r}")
        self.max_batch = max_batch
        if pass_size is not None and (
            isinstance(pass_size, bool) or not isinstance(pass_size, int) or pass_size < 1
        ):
            raise InvalidInputError(f"pass_size must be a positive integer number of images or None, got {pass_size!r}")
        self.pass_size = pass_size
        self._tuner = PassTuner()
        if output_key is not None and not isinstance(output_key, str):
            raise InvalidInputError(f"output_key must be a string key of the model's output mapping, got {output_key!r}")
        self.output_key = output_key
        if deaugment is None:
            if target not in _DEFAULT_HOOKS:
                raise InvalidInputError(f"target {target!r} needs a deaugment hook; use its TTA wrapper")
            deaugment = _DEFAULT_HOOKS[target]
        elif not callable(deaugment):
            raise InvalidInputError(f"deaugment must be a callable hook, got {type(deaugment).__name__}")
        self.deaugment = deaugment
        if isinstance(class_dim, bool) or not isinstance(class_dim, int) or class_dim == 0:
            raise InvalidInputError(
                f"class_dim must be a non-zero integer (the class dimension of one output, e.g. 1 for (B, C); "
                f"0 is the batch), got {class_dim!r}"
            )
        self.class_dim = class_dim
        self.device = check_device(device)
        self.amp = _check_flag(amp, "amp")
        self.inference_mode = _check_flag(inference_mode, "inference_mode")
        self.check_outputs = _check_flag(check_outputs, "check_outputs")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise InvalidInputError(f"seed must be an integer, got {seed!r}")
        self.seed = int(seed)

        self.temperature = check_temperature(
            self.policy.temperature if temperature == FROM_POLICY else temperature, "temperature"
        )
        self.matrix_scaling = check_matrix_scaling(
            self.policy.matrix_scaling if matrix_scaling == FROM_POLICY else matrix_scaling, "matrix_scaling"
        )
        self._matrix_tensors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        threshold = self.policy.gate_threshold if gate_threshold == FROM_POLICY else gate_threshold
        self.gate_threshold = self._check_gate(threshold)

        # Per-policy work, done once: transformers, the identity view, label pass-through, merge settings.
        self.transformers = list(self.policy)
        self._names = self.policy.view_names
        self._identity = next((k for k, v in enumerate(self.policy.views) if v.is_identity), None)
        self._others = [k for k in range(n_views) if k != self._identity]
        self._passthrough = (
            [_label_passes_through(t) for t in self.transformers]
            if target == "label" and deaugment is _deaugment_label
            else [False] * n_views
        )
        probs_in = self.model_outputs == "probs" and self.activation == "softmax"
        # A probs model is never softmaxed again; its gmean is renormalised as softmax's would be.
        self._merge_activation = None if probs_in else self.activation
        self._template = MergeAccumulator(
            self.merge_mode, n_views, self.weights, self._merge_activation, class_dim, self.seed,
            renormalize=True if probs_in else None,
        )
        # What the merged output is, for the temperature and the uncertainty: probabilities, logits, sigmoid.
        if self.activation == "sigmoid":
            self._space = "sigmoid"
        elif self.activation == "softmax" or self.model_outputs == "probs":
            self._space = "probs"
        else:
            self._space = "raw"
        if self.matrix_scaling is not None and self._space == "sigmoid":
            raise InvalidInputError(
                "matrix_scaling recalibrates one class among C (softmax probabilities or logits), but activation="
                "'sigmoid' makes independent per-class outputs; pass activation='softmax' or matrix_scaling=None"
            )
        if self._class_weights and self._space != "probs":
            raise InvalidInputError(
                f"class-by-view weights (policy {self.policy.name!r}) merge class probabilities, but activation="
                f"{self.activation!r} on a model returning {self.model_outputs}; pass activation='softmax'"
            )
        self._probe: torch.Tensor | None = _first_tensor(model)
        if self.device is not None and self._probe is not None and not _same_device(self._probe.device, self.device):
            raise InvalidInputError(
                f"device={device!r} but the model's parameters are on {self._probe.device}; move the model first "
                f"(model.to({str(self.device)!r})) or pass device=None to run where the model is"
            )
        # The fast path for a batch whose views all fit in one forward pass (classification
        # without gate or extra arguments): augmentation steps bound once, one merge over the stack.
        # ttakit's own steps at their identity parameter are skipped (a call that returns its input).
        self._aug_plans = [
            tuple(
                (s.transform.apply_aug_image, {s.transform.pname: s.param})
                for s in view.steps
                if not (isinstance(s.transform, BaseTransform) and s.transform.is_identity(s.param))
            )
            for view in self.policy.views
        ]
        self._single_pass = self.gate_threshold is None and all(self._passthrough)
        # Calls whose pass plan is measured (pass_size=None, on CPU): no gate, no autocast.
        self._tunable = self.pass_size is None and self.gate_threshold is None and not self.amp
        self._mean_weights: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        # (shape, dtype, device) of plain calls that ran in one forward pass -> views per pass.
        self._one_pass_shapes: dict[tuple, int] = {}

    def _pass(self, device: torch.device) -> int:
        """Most images one stacked forward pass may hold on ``device`` (untuned)."""
        if self.pass_size is not None:
            return min(self.pass_size, self.max_batch)
        return min(_CPU_PASS, self.max_batch) if device.type == "cpu" else self.max_batch

    def _pass_for_call(self, key: tuple, device: torch.device) -> tuple[int, tuple | None]:
        """(images per pass for a call with input ``key`` = (shape, dtype) whose plan is not chosen
        yet, the key if the call is to be timed)."""
        candidates = candidate_pass_sizes(key[0][0], len(self.transformers), self._pass(device), self.max_batch)
        size, timed = self._tuner.choose(key, candidates)
        return size, key if timed else None

    def _check_gate(self, threshold: object) -> float | None:
        if threshold is None:
            return None
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, numbers.Real)
            or not math.isfinite(threshold)
            or not 0 <= threshold <= 1
        ):
            raise InvalidInputError(
                f"gate_threshold must be a number in [0, 1] (0 never runs the extra views, 1 runs them on "
                f"every image) or None for no gate, got {threshold!r}"
            )
        if self.target != "label":
            raise InvalidInputError(
                f"the gate (gate_threshold={threshold}) needs class scores (target 'label'), got target "
                f"{self.target!r}; pass gate_threshold=None"
            )
        if not any(v.is_identity for v in self.policy.views):
            raise InvalidInputError(
                f"the gate needs a policy that holds the identity view (its plain prediction is reused and decides "
                f"which images get the others), but policy {self.policy.name!r} holds only {self.policy.view_names}"
            )
        return float(threshold)

    @property
    def view_names(self) -> list[str]:
        return list(self._names)

    @property
    def tuned_pass_sizes(self) -> dict[tuple[int, ...], int]:
        """Images per forward pass chosen so far, by input shape ``(B, C, H, W)`` (``pass_size=None``
        on CPU; shapes still being tuned are absent)."""
        return {tuple(key[0]): size for key, size in self._tuner.chosen.items()}

    def __len__(self) -> int:
        return len(self.transformers)

    def __call__(self, images: torch.Tensor, *args: Any) -> torch.Tensor:
        if not args and self._one_pass_shapes and isinstance(images, torch.Tensor):
            # A shape already run in one forward pass: straight to it (the checks on the input,
            # the device and the plan gave the same answer for this shape, dtype and device).
            per_pass = self._one_pass_shapes.get((images.shape, images.dtype, images.device))
            if per_pass is not None and (self.device is not None or self._probe is None or self._probe.device == images.device):
                merged = self._merge_one_pass(images, per_pass)
                if merged is not None:
                    return merged
        return self.run(images, *args).merged

    # ------------------------------------------------------------------------------ run

    def run(
        self,
        images: torch.Tensor,
        *args: Any,
        return_views: bool = False,
        return_uncertainty: bool = False,
        progress: Callable[[int], Any] | None = None,
    ) -> TTAOutput:
        """Augment, predict, de-augment, merge, and apply the policy's temperature and gate.

        Args:
            images: ``(B, C, H, W)`` float images, any number (they are cut into chunks of
                ``pass_size`` images: pass a whole data set at once; this is the only chunking
                loop, and images move to ``device`` one chunk at a time).
            *args: extra model arguments. Views then run one per forward pass (not stacked), and
                images are still chunked, so ``max_batch`` still bounds every pass. When the batch
                is cut into chunks (or the gate picks rows), a tensor argument whose first
                dimension is B is taken as per-sample and sliced along with the images; every other
                argument is passed unchanged to every forward pass.
            return_views: also return the ``(K, B, ...)`` de-augmented per-view outputs.
            return_uncertainty: also return per-image uncertainty (``target="label"`` only).
            progress: called with the number of images finished after each chunk (e.g. a tqdm bar's
                ``update``).

        Returns:
            :class:`TTAOutput`.
        """
        check_image(images, "images")
        total = images.shape[0]
        if total == 0:
            raise InvalidInputError(f"images is an empty batch of shape {tuple(images.shape)}; pass at least one image")
        if return_uncertainty and (self.target != "label" or self._space == "sigmoid"):
            raise InvalidInputError(
                f"return_uncertainty needs class probabilities (target 'label', activation softmax or None), "
                f"got target {self.target!r} and activation {self.activation!r}"
            )
        device = self.device
        if device is None:
            device = self._probe.device if self._probe is not None else images.device
        plain_call = not args and not return_views and not return_uncertainty
        tuning_key = None
        if plain_call and self._tunable and device.type == "cpu":
            key = (images.shape, images.dtype)
            pass_size = self._tuner.chosen.get(key)  # the common case: a shape already tuned
            if pass_size is None:
                pass_size, tuning_key = self._pass_for_call(key, device)
        else:
            pass_size = self._pass(device)
        if tuning_key is None:
            return self._run(images, args, device, pass_size, return_views, return_uncertainty, progress, plain_call)
        start_time = time.perf_counter()
        out = self._run(images, args, device, pass_size, return_views, return_uncertainty, progress, plain_call)
        self._tuner.record(tuning_key, pass_size, time.perf_counter() - start_time)
        return out

    def _run(self, images, args, device, pass_size, return_views, return_uncertainty, progress, plain_call):
        total = images.shape[0]
        if plain_call and self._single_pass and total <= pass_size:
            per_pass = max(1, pass_size // total)
            on_device = images.device == device
            out = self._run_one_pass(images if on_device else images.to(device, non_blocking=True), per_pass)
            if out is not None:
                if on_device and (not self._tunable or (images.shape, images.dtype) in self._tuner.chosen):
                    if len(self._one_pass_shapes) < MAX_SHAPES:
                        self._one_pass_shapes[(images.shape, images.dtype, images.device)] = per_pass
                if progress is not None:
                    progress(total)
                return out
        chunk_size = min(total, pass_size)
        keep_views = return_views or return_uncertainty
        grad_context = torch.inference_mode() if self.inference_mode else contextlib.nullcontext()
        merged_parts, view_parts, gated_parts, unc_parts = [], [], [], []
        forwarded = 0
        shape: list[tuple[int, ...]] = []  # the first view's output shape, for the checks
        with grad_context:
            for start in range(0, total, chunk_size):
                stop = min(start + chunk_size, total)
                chunk = images[start:stop]
                if chunk.device != device:
                    chunk = chunk.to(device, non_blocking=True)
                chunk_args = _slice_args(args, total, start, stop) if args and chunk_size < total else args
                if self.gate_threshold is None:
                    merged, views, n = self._run_all(chunk, chunk_args, keep_views, shape, pass_size)
                    gated = None
                else:
                    merged, views, gated, n = self._run_gated(chunk, chunk_args, keep_views, shape, pass_size)
                forwarded += n
                if return_uncertainty:
                    unc_parts.append(self._uncertainty(views, merged, gated))
                merged = self._scale(merged, gated)
                merged_parts.append(merged)
                if return_views:
                    view_parts.append(views)
                if gated is not None:
                    gated_parts.append(gated)
                if progress is not None:
                    progress(stop - start)
            merged_all = _cat(merged_parts, 0)
            views_all = _cat(view_parts, 1) if return_views else None
            gated_all = _cat(gated_parts, 0) if gated_parts else None
            uncertainty = {key: _cat([u[key] for u in unc_parts], 0) for key in unc_parts[0]} if unc_parts else None
        if uncertainty is not None:
            uncertainty = {key: _as_normal_tensor(value) for key, value in uncertainty.items()}
        return TTAOutput(
            _as_normal_tensor(merged_all),
            _as_normal_tensor(views_all),
            list(self._names),
            forwarded / total,
            _as_normal_tensor(gated_all),
            uncertainty,
        )

    # ------------------------------------------------------------------------------ chunks

    def _run_one_pass(self, images: torch.Tensor, per_pass: int) -> TTAOutput | None:
        """Every view of a batch that fits one chunk, ``per_pass`` views per forward pass, merged
        at once (classification without gate, extra arguments or per-view outputs); None if the
        views differ in size (the general path then handles them)."""
        merged = self._merge_one_pass(images, per_pass)
        if merged is None:
            return None
        return TTAOutput(merged, None, list(self._names), float(len(self.transformers)))

    def _merge_one_pass(self, images: torch.Tensor, per_pass: int) -> torch.Tensor | None:
        """The merged output of :meth:`_run_one_pass`, temperature applied. The last step runs
        outside inference mode where it can, so the result is an ordinary tensor without a copy."""
        n = len(self.transformers)
        mode, weights = self.merge_mode, self.weights
        linear = (mode == "mean" or mode == "sum") and not self._class_weights and (weights is None or min(weights) > 0)
        # A linear merge carries any NaN/inf of a view into the merged output: one check there, on
        # B x C numbers, instead of one per forward pass (the culprit is found only on failure).
        check_each_pass = not linear
        # One view per pass (ttach's plan) merged linearly: a running sum of the outputs, as ttach
        # does, instead of concatenating them first.
        as_list = linear and per_pass == 1 and n > 1
        if self.inference_mode and not torch.is_inference_mode_enabled():
            with torch.inference_mode():
                stack = self._one_pass_stack(images, per_pass, check_each_pass, as_list)
        else:
            stack = self._one_pass_stack(images, per_pass, check_each_pass, as_list)
        if stack is None:
            return None
        if isinstance(stack, list) and not stack[0].is_floating_point():
            stack = torch.stack(stack)  # integer scores: the accumulator's exact arithmetic below
        if isinstance(stack, list):
            merged = self._running_sum(stack)
            if self.check_outputs and not _is_finite(merged):
                self._check_finite(torch.cat(stack), range(n), stack[0].shape[0])
        elif linear and stack.is_floating_point():
            class_dim = self.class_dim if self.class_dim < 0 else self.class_dim + 1
            x = apply_activation(stack, self._merge_activation, class_dim)
            if n == 1 and weights is None:  # never hand back (a view of) the model's own output tensor
                merged = x[0].clone() if x is stack else x[0]
            else:
                # One (1, K) x (K, B*...) product instead of a reduction over the views: one kernel
                # to bring back into cache right after a forward pass, where every step runs slower.
                key = (x.device, x.dtype)
                w = self._mean_weights.get(key)
                if w is None:
                    w = torch.tensor(weights if weights is not None else [1.0] * n, dtype=torch.float64)
                    if mode == "mean":
                        w = w / (self._template.total_weight if weights is not None else n)
                    w = w.to(dtype=x.dtype, device=x.device).view(1, n)
                    self._mean_weights[key] = w
                merged = torch.mm(w, x.reshape(n, -1)).view(x.shape[1:])
            if self.check_outputs and not _is_finite(merged):
                self._check_finite(stack.reshape(-1, *stack.shape[2:]), range(n), stack.shape[1])
        else:
            acc = self._template.fresh()
            acc.add_stack(stack, range(n))
            merged = acc.result()
        return _as_normal_tensor(self._scale(merged, None))

    def _running_sum(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The linear merge (mean or sum, plain or weighted) of K >= 2 floating outputs ``(B, ...)``
        as a running sum; never written into a model's own output tensor."""
        weights, n = self.weights, len(outputs)
        parts = [apply_activation(o, self._merge_activation, self.class_dim) for o in outputs]
        if weights is None:
            total = parts[0] + parts[1]
            for part in parts[2:]:
                total += part
            return total.div_(n) if self.merge_mode == "mean" else total
        total = parts[0] * weights[0]
        for part, w in zip(parts[1:], weights[1:], strict=True):
            total.add_(part, alpha=w)
        return total.div_(self._template.total_weight) if self.merge_mode == "mean" else total

    def _one_pass_stack(
        self, chunk: torch.Tensor, per_pass: int, check: bool = True, as_list: bool = False
    ) -> torch.Tensor | list[torch.Tensor] | None:
        """``(K, B, ...)``: the model's outputs on every view of ``chunk``, ``per_pass`` views
        stacked per forward pass (each checked for NaN/inf if ``check``); with ``as_list`` and one
        view per pass, the K outputs ``(B, ...)`` as a list."""
        n, b = len(self._aug_plans), chunk.shape[0]
        size = None
        results = []
        for first in range(0, n, per_pass):
            views = []
            for plan in self._aug_plans[first : first + per_pass]:
                image = chunk
                for apply, kwargs in plan:
                    image = apply(image, **kwargs)
                if size is None:
                    size = image.shape
                elif image.shape != size:  # views that resize (Scale, crops): the general path, from now on
                    self._single_pass = False
                    return None
                views.append(image)
            batch = torch.cat(views) if len(views) > 1 else views[0]
            del views
            output = self._forward(batch, ())
            del batch
            if check and self.check_outputs:
                self._check_finite(output, range(first, min(first + per_pass, n)), b)
            results.append(output)
        if as_list and per_pass == 1:
            self._check_view_shape(tuple(results[0].shape), 0, [])
            return results
        result = torch.cat(results) if len(results) > 1 else results[0]
        del results
        stack = result.view(n, b, *result.shape[1:]) if result.is_contiguous() else result.reshape(n, b, *result.shape[1:])
        self._check_view_shape(tuple(stack.shape[1:]), 0, [])
        return stack

    def _run_all(self, chunk: torch.Tensor, args: tuple, keep_views: bool, shape: list, pass_size: int):
        """Every view on every row of ``chunk``: (merged, views or None, images forwarded)."""
        acc = self._template.fresh()
        n_views = len(self.transformers)
        outputs: list[torch.Tensor | None] | None = [None] * n_views if keep_views else None
        self._run_views(chunk, args, range(n_views), acc, outputs, shape, pass_size)
        views = torch.stack(outputs) if keep_views else None
        return acc.result(), views, chunk.shape[0] * n_views

    def _run_gated(self, chunk: torch.Tensor, args: tuple, keep_views: bool, shape: list, pass_size: int):
        """The identity on every row, the other views on rows whose plain confidence is below the gate."""
        b = chunk.shape[0]
        identity = self._identity
        plain: list[torch.Tensor | None] = [None] * len(self.transformers)
        self._run_views(chunk, args, [identity], None, plain, shape, pass_size)
        plain_raw = plain[identity]  # (b, C, ...) raw, float32 or better
        plain_probs = plain_raw if self.model_outputs == "probs" else torch.softmax(plain_raw, dim=self.class_dim)
        gated = plain_probs.amax(dim=self.class_dim) < self.gate_threshold  # (b,)
        rows = torch.nonzero(gated).flatten()
        n_gated = int(rows.numel())
        merged = apply_activation(plain_raw, self._merge_activation, self.class_dim)
        if merged is plain_raw:  # a view of the model's own output: never write into it or hand it back
            merged = merged.clone()
        views = plain_raw.unsqueeze(0).repeat(len(self.transformers), *([1] * plain_raw.ndim)) if keep_views else None
        if n_gated == 0:
            return merged, views, gated, b
        everything = n_gated == b
        sub = chunk if everything else chunk[rows]
        sub_args = args if everything or not args else _index_args(args, b, rows)
        acc = self._template.fresh()
        acc.add(plain_raw if everything else plain_raw[rows], identity)
        outputs: list[torch.Tensor | None] | None = [None] * len(self.transformers) if keep_views else None
        self._run_views(sub, sub_args, self._others, acc, outputs, shape, pass_size)
        merged_rows = acc.result()
        if everything:
            merged = merged_rows.to(merged.dtype)
        else:
            merged[rows] = merged_rows.to(merged.dtype)
        if keep_views:
            for k in self._others:
                if everything:
                    views[k] = outputs[k]
                else:
                    views[k, rows] = outputs[k]
        return merged, views, gated, b + n_gated * len(self._others)

    def _run_views(self, chunk, args, indices, acc, outputs, shape, pass_size: int) -> None:
        """Run views ``indices`` over ``chunk``, stacking as many per pass as fit in ``pass_size``
        images (one per pass with extra arguments); add each to ``acc`` and/or keep it in ``outputs``."""
        b = chunk.shape[0]
        per_pass = 1 if args else max(1, pass_size // b)
        indices = list(indices)
        for first in range(0, len(indices), per_pass):
            group = indices[first : first + per_pass]
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
                    self._check_finite(result, same_size, b)
                n = len(same_size)
                if all(self._passthrough[k] for k in same_size):
                    # Class scores come back unchanged: merge the whole pass at once.
                    stack = result.reshape(n, b, *result.shape[1:]) if n > 1 else result.unsqueeze(0)
                    self._check_view_shape(tuple(stack.shape[1:]), same_size[0], shape)
                    if acc is not None:
                        acc.add_stack(stack, same_size)
                    if outputs is not None:
                        for i, k in enumerate(same_size):
                            outputs[k] = _at_least_float32(stack[i])
                else:
                    for i, k in enumerate(same_size):
                        output = self.deaugment(self.transformers[k], result[i * b : (i + 1) * b], view_size)
                        self._check_view_shape(tuple(output.shape), k, shape)
                        if acc is not None:
                            acc.add(output, k)
                        if outputs is not None:
                            outputs[k] = _at_least_float32(output)
                del result

    def _forward(self, batch: torch.Tensor, args) -> torch.Tensor:
        if self.amp:
            device_type = batch.device.type
            dtype = torch.bfloat16 if device_type == "cpu" else torch.float16
            with torch.autocast(device_type, dtype=dtype):
                output = self.model(batch, *args)
        else:
            output = self.model(batch, *args)
        if isinstance(output, torch.Tensor):
            if self.output_key is not None:
                raise ModelOutputError(
                    f"output_key={self.output_key!r} was given but the model returned Tensor, not a mapping"
                )
        else:
            output = self._unwrap(output)
        if output.ndim == 0 or output.shape[0] != batch.shape[0]:
            raise ModelOutputError(
                f"the model returned shape {tuple(output.shape)} for a batch of {batch.shape[0]} images; "
                "its first dimension must be the batch"
            )
        return output.float() if self.amp else output

    def _unwrap(self, output: Any) -> torch.Tensor:
        """The tensor to merge from a model output that is not a tensor (a mapping), or an error."""
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
        return output

    # ------------------------------------------------------------------------------ checks

    def _check_finite(self, result: torch.Tensor, views: list[int], per_view: int) -> None:
        # One sum per forward pass; the exact (slower) check and the culprit view only if the sum
        # is not finite (NaN/inf, or finite values whose sum overflows).
        if _is_finite(result):
            return
        if bool(torch.isfinite(result).all()):
            return
        for i, k in enumerate(views):
            bad = int((~torch.isfinite(result[i * per_view : (i + 1) * per_view])).sum())
            if bad:
                raise ModelOutputError(
                    f"the model returned {bad} NaN/inf values for view {self._names[k]!r}; check the model "
                    "and its input normalisation (TTA cannot merge non-finite outputs)"
                )

    def _check_view_shape(self, shape: tuple[int, ...], index: int, seen: list) -> None:
        """The first view's output must fit ``class_dim``; later ones must match it (batch aside)."""
        if seen:
            reference = seen[0]
            if shape[1:] != reference[1:] and self.check_outputs:
                raise ModelOutputError(
                    f"view {self._names[index]!r} produced output of shape {shape} after de-augmentation, but "
                    f"earlier views produced {reference}; every view must map back to the same shape"
                )
            return
        ndim = len(shape)
        if not -ndim < self.class_dim < ndim:
            raise InvalidInputError(
                f"class_dim={self.class_dim} does not fit the model's output of shape {shape} (one view, batch "
                f"first): expected a dimension in 1..{ndim - 1} (or -{ndim - 1}..-1); pass class_dim=1 for (B, C) scores"
            )
        seen.append(shape)

    # ------------------------------------------------------------------------------ temperature, uncertainty

    def _scale(self, merged: torch.Tensor, gated: torch.Tensor | None) -> torch.Tensor:
        """The temperature and matrix scaling on the merged output (under the gate: on the gated
        rows only)."""
        if self.temperature is None and self.matrix_scaling is None:
            return merged
        if gated is None:
            return self._temper(merged)
        rows = torch.nonzero(gated).flatten()
        if rows.numel() == 0:
            return merged
        if rows.numel() == gated.numel():
            return self._temper(merged)
        merged = merged.clone()
        merged[rows] = self._temper(merged[rows]).to(merged.dtype)
        return merged

    def _temper(self, x: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        if t is not None:
            if self._space == "probs":
                x = apply_temperature(x, t, self.class_dim)
            elif self._space == "sigmoid":
                p = _at_least_float32(x).clamp(1e-7, 1 - 1e-7)
                x = torch.sigmoid(torch.logit(p) / t)
            else:
                x = _at_least_float32(x) / t
        if self.matrix_scaling is not None:
            x = _at_least_float32(x)
            key = (x.device, x.dtype)
            if key not in self._matrix_tensors:
                self._matrix_tensors[key] = (
                    torch.tensor(self.matrix_scaling["weight"], dtype=x.dtype, device=x.device),
                    torch.tensor(self.matrix_scaling["bias"], dtype=x.dtype, device=x.device),
                )
            weight, bias = self._matrix_tensors[key]
            x = apply_matrix_scaling(x, weight, bias, self.class_dim, probs=self._space == "probs")
        return x

    def _uncertainty(self, views: torch.Tensor, merged: torch.Tensor, gated: torch.Tensor | None):
        if views.ndim != 3 or self.class_dim % 2 != 1:
            raise InvalidInputError(
                f"return_uncertainty needs (B, C) class scores with class_dim=1, got outputs of shape "
                f"{tuple(views.shape[1:])} and class_dim={self.class_dim}"
            )
        view_probs = views if self.model_outputs == "probs" else torch.softmax(views, dim=2)
        merged_probs = merged if self._space == "probs" else torch.softmax(_at_least_float32(merged), dim=1)
        out = view_uncertainty(view_probs, _at_least_float32(merged_probs), self._view_weights)
        if gated is not None:
            plain = ~gated
            for key in ("std", "mutual_information", "disagreement"):
                out[key][plain] = 0.0
            out["expected_entropy"][plain] = out["predictive_entropy"][plain]
        return out


def _is_finite(x: torch.Tensor) -> bool:
    """Whether the sum of ``x`` is finite, which proves every value is (False also when finite
    values overflow the sum: callers then check value by value)."""
    if not x.is_floating_point():
        return True
    x = x.detach()
    if x.numel() <= 64 and x.device.type == "cpu":  # a few class scores: summed in Python, no kernel
        return math.isfinite(sum(x.reshape(-1).tolist()))
    return math.isfinite(float(x.sum()))


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _slice_args(args: tuple, total: int, start: int, stop: int) -> tuple:
    """Per-sample tensor arguments (first dimension ``total``) cut to ``[start, stop)``."""
    return tuple(
        a[start:stop] if isinstance(a, torch.Tensor) and a.ndim > 0 and a.shape[0] == total else a for a in args
    )


def _index_args(args: tuple, total: int, rows: torch.Tensor) -> tuple:
    """Per-sample tensor arguments (first dimension ``total``) at ``rows``."""
    return tuple(
        a[rows.to(a.device)] if isinstance(a, torch.Tensor) and a.ndim > 0 and a.shape[0] == total else a
        for a in args
    )


def _group_by_shape(augmented: dict[int, torch.Tensor]) -> list[list[int]]:
    # Views that change the image size (Scale, Resize, crops) cannot share a batch with others.
    if len(augmented) == 1:
        return [list(augmented)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, image in augmented.items():
        groups.setdefault(tuple(image.shape), []).append(k)
    return list(groups.values())
