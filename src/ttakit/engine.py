"""The one place a policy runs.

:class:`TTAEngine` applies everything a policy holds: its views, merge mode and weights, the
temperature and matrix scaling (on the merged output) and the gate (the identity view first, the
other views only on images the plain prediction is unsure of). One path does it all
(:meth:`TTAEngine._run_chunk`): cut the images into chunks of ``pass_size``; per chunk, augment
the views, stack as many views per forward pass as fit in ``pass_size`` images, run the model,
check the pass for NaN/inf, de-augment each view with a task-specific hook, and merge it into a
running :class:`MergeAccumulator`. The gate is a second stage of the same loop: after the
identity, the accumulator keeps the unsure rows and the other views run on those.

One answer per image: the merged output (to float rounding, <= 1e-6), a vote and its tie-break,
the NaN/inf check and its error depend on the image (and its ``ids`` entry), never on the batch it
came in or on the pass plan.

Memory: at most ``max_batch`` augmented images exist at a time, whatever the number of views
(while views of a small batch are stacked, their copy in the stacked batch too, until it is
made). With extra model arguments the same bound holds: views then run one per forward pass, and
per-sample tensor arguments are sliced along with the images.

Speed: the policy's per-view work (transformers, bound augmentation steps, label pass-through,
merge settings, weights) is prepared once, when the engine is built; the views of a stacked pass
of class scores are merged in one step. The default plan is fixed: passes of up to 32 images on
CPU (the views of a small batch share one forward pass), ``max_batch`` elsewhere.
``pass_size="auto"`` opts in to choosing the plan by timing the first calls
(:mod:`ttakit._pass_tuner`); it changes speed only.

Every other inference path (the wrappers, ``evaluate``, ``gating``, the trainer's plain
prediction) calls :meth:`TTAEngine.run`; it is the only chunking loop.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._pass_tuner import PassTuner, candidate_pass_sizes
from .errors import InvalidInputError, ModelOutputError
from .functional import check_image
from .merge import (
    PROB_FLOOR,
    MergeAccumulator,
    apply_activation,
    apply_matrix_scaling,
    apply_temperature,
    check_activation,
    check_matrix_scaling,
    check_merge_mode,
    check_temperature,
    check_weights,
    content_key,
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
            ``disagreement`` ``(B,)``. The entropies are of the merge before temperature and
            matrix scaling (renormalised over classes: ``sum``, ``max``, ``min``, ``tsharpen`` and
            ``vote`` do not sum to 1); ``disagreement`` counts the views whose top class differs
            from the class the row reports (``merged``'s top class, after the scaling). On rows
            the gate kept plain only the identity ran: ``std``, ``mutual_information`` and
            ``disagreement`` are 0 there.
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
        pass_size: images per forward pass (at most ``max_batch``): views of a small batch are
            stacked up to it, a large batch is cut into chunks of it. Default ``None``: a fixed
            plan, 32 on CPU (enough to stack the views of a small batch; larger passes run slower
            per image there) and ``max_batch`` on other devices. ``"auto"``: on CPU, chosen per
            input shape from the wall time of the first calls (:mod:`ttakit._pass_tuner`, like
            ``torch.backends.cudnn.benchmark``) among 32, the whole batch (one view per pass) and
            ``max_batch``; calls with extra arguments or per-view outputs use the default. The
            plan changes speed only: merged outputs (to float rounding), votes, checks and errors
            are the same whatever it is.
        output_key: when the model returns a mapping, the key of the output to merge.
        deaugment: hook mapping one view's output back; defaults by ``target``.
        class_dim: class dimension of one output (softmax, vote, gate, uncertainty); not 0.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a ``torch.device``: where
            images are sent, chunk by chunk; default the model's device. The model is not moved.
        amp: run the forward pass under ``torch.autocast`` (bfloat16 on CPU, float16 on
            CUDA/MPS); outputs are merged in float32.
        inference_mode: run under ``torch.inference_mode`` (no autograd).
        check_outputs: raise :class:`ModelOutputError` on NaN/inf outputs (every forward pass is
            checked, before any merge). Views whose outputs differ in shape are always an error.
        seed: seeds the random tie-break of ``vote``, with each image's id (see :meth:`run`).

    Attributes:
        pass_tuner: the :class:`~ttakit._pass_tuner.PassTuner` of ``pass_size="auto"`` (None
            otherwise); replace it to change its trials, margin or clock.

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
        pass_size: int | str | None = None,
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
        if pass_size is not None and pass_size != "auto" and (
            isinstance(pass_size, bool) or not isinstance(pass_size, int) or pass_size < 1
        ):
            raise InvalidInputError(
                "pass_size must be a positive integer number of images, 'auto' (chosen by timing the first calls) "
                f"or None (the default plan), got {pass_size!r}"
            )
        self.pass_size = pass_size
        self.pass_tuner: PassTuner | None = PassTuner() if pass_size == "auto" else None
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

        # Per-policy work, done once: transformers, bound augmentations, the identity view, label
        # pass-through, the stages of the gate, merge settings.
        self.transformers = list(self.policy)
        self._names = self.policy.view_names
        self._identity = next((k for k, v in enumerate(self.policy.views) if v.is_identity), None)
        self._others = [k for k in range(n_views) if k != self._identity]
        self._passthrough = (
            [_label_passes_through(t) for t in self.transformers]
            if target == "label" and deaugment is _deaugment_label
            else [False] * n_views
        )
        self._augment = [
            _bound_augment(view) if passes else transformer.augment_image
            for view, transformer, passes in zip(self.policy.views, self.transformers, self._passthrough, strict=True)
        ]
        # The views run in stages: all at once, or under the gate the identity on every image and
        # then the others on the images it is unsure of.
        self._stages = [list(range(n_views))] if self.gate_threshold is None else [[self._identity], self._others]
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
        """Images per forward pass chosen so far by ``pass_size="auto"``, by input shape
        ``(B, C, H, W)`` (empty without it; shapes still being timed are absent)."""
        if self.pass_tuner is None:
            return {}
        return {tuple(key[0]): size for key, size in self.pass_tuner.chosen.items()}

    def __len__(self) -> int:
        return len(self.transformers)

    def __call__(self, images: torch.Tensor, *args: Any, ids: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """The merged output of :meth:`run`."""
        return self.run(images, *args, ids=ids).merged

    # ------------------------------------------------------------------------------ run

    def run(
        self,
        images: torch.Tensor,
        *args: Any,
        ids: Sequence[int] | torch.Tensor | None = None,
        return_views: bool = False,
        return_uncertainty: bool = False,
        progress: Callable[[int], Any] | None = None,
    ) -> TTAOutput:
        """Augment, predict, de-augment, merge, and apply the policy's temperature and gate.

        Every image gets the same answer whatever the batch it comes in and the pass plan: its
        merged output (to float rounding), its vote, its NaN/inf check and its error.

        Args:
            images: ``(B, C, H, W)`` float images, any number (they are cut into chunks of
                ``pass_size`` images: pass a whole data set at once; this is the only chunking
                loop, and images move to ``device`` one chunk at a time).
            *args: extra model arguments. Views then run one per forward pass (not stacked), and
                images are still chunked, so ``max_batch`` still bounds every pass. When the batch
                is cut into chunks (or the gate picks rows), a tensor argument whose first
                dimension is B is taken as per-sample and sliced along with the images; every other
                argument is passed unchanged to every forward pass.
            ids: optional identity of each image, ``(B,)`` int64 tensor or list of B ints (e.g. its
                row in the data set, or a stable hash of its file path). A ``vote`` that ties
                exactly (votes and summed scores) is broken by a random pick seeded by
                ``(seed, id)``; without ids, by ``(seed, a hash of the image's pixels)``. Either
                way the pick depends on the image alone. NaN/inf errors name the id.
            return_views: also return the ``(K, B, ...)`` de-augmented per-view outputs.
            return_uncertainty: also return per-image uncertainty (``target="label"`` only).
            progress: called with the number of images finished after each chunk (e.g. a tqdm bar's
                ``update``).

        Returns:
            :class:`TTAOutput`.
        """
        check_model_input = getattr(self.model, "check_input", None)  # a ttakit Predictor knows its input
        if callable(check_model_input):
            check_model_input(images, "images")  # the user's batch, before any view stacks it
        check_image(images, "images")
        total = images.shape[0]
        if total == 0:
            raise InvalidInputError(f"images is an empty batch of shape {tuple(images.shape)}; pass at least one image")
        if return_uncertainty and (self.target != "label" or self._space == "sigmoid"):
            raise InvalidInputError(
                f"return_uncertainty needs class probabilities (target 'label', activation softmax or None), "
                f"got target {self.target!r} and activation {self.activation!r}"
            )
        if ids is not None:
            ids = _check_ids(ids, total)
        device = self.device
        if device is None:
            device = self._probe.device if self._probe is not None else images.device
        pass_size = self._default_pass(device)
        tuner, timed_key = self.pass_tuner, None
        if tuner is not None and device.type == "cpu" and not args and not return_views and not return_uncertainty:
            key = (tuple(images.shape), images.dtype)
            chosen = tuner.chosen.get(key)
            if chosen is not None:
                pass_size = chosen
            else:
                candidates = candidate_pass_sizes(total, len(self.transformers), pass_size, self.max_batch)
                pass_size, timed = tuner.choose(key, candidates)
                timed_key = key if timed else None
        started = tuner.clock() if timed_key is not None else 0.0
        out = self._run(images, args, ids, device, pass_size, return_views, return_uncertainty, progress)
        if timed_key is not None:
            tuner.record(timed_key, pass_size, tuner.clock() - started)
        return out

    def _default_pass(self, device: torch.device) -> int:
        """Most images per forward pass without timing: ``pass_size``, or 32 on CPU and
        ``max_batch`` elsewhere."""
        if isinstance(self.pass_size, int):
            return min(self.pass_size, self.max_batch)
        return min(_CPU_PASS, self.max_batch) if device.type == "cpu" else self.max_batch

    def _run(self, images, args, ids, device, pass_size, return_views, return_uncertainty, progress) -> TTAOutput:
        total = images.shape[0]
        chunk_size = min(total, pass_size)
        keep = return_views or return_uncertainty
        ref: list[tuple[int, tuple[int, ...]]] = []  # the first view's output shape per image, for the checks
        parts = []
        for start in range(0, total, chunk_size):
            stop = min(start + chunk_size, total)
            chunk = images if chunk_size == total else images[start:stop]
            if chunk.device != device:
                chunk = chunk.to(device, non_blocking=True)
            chunk_args = _slice_args(args, total, start, stop) if args and chunk_size < total else args
            chunk_ids = None if ids is None else ids[start:stop]
            parts.append(self._run_chunk(chunk, chunk_args, chunk_ids, start, pass_size, keep, return_uncertainty, ref))
            if progress is not None:
                progress(stop - start)
        if len(parts) == 1:
            merged, views, gated, forwarded, uncertainty = parts[0]
            views = views if return_views else None
        else:
            merged = torch.cat([p[0] for p in parts])
            views = torch.cat([p[1] for p in parts], 1) if return_views else None
            gated = torch.cat([p[2] for p in parts]) if self.gate_threshold is not None else None
            forwarded = sum(p[3] for p in parts)
            uncertainty = {key: torch.cat([p[4][key] for p in parts]) for key in parts[0][4]} if return_uncertainty else None
        if uncertainty is not None:
            uncertainty = {key: _as_normal_tensor(value) for key, value in uncertainty.items()}
        return TTAOutput(
            _as_normal_tensor(merged),
            _as_normal_tensor(views),
            list(self._names),
            forwarded / total,
            _as_normal_tensor(gated),
            uncertainty,
        )

    # ------------------------------------------------------------------------------ the one path

    def _run_chunk(self, chunk, args, ids, offset, pass_size, keep, want_uncertainty, ref):
        """Every view of ``chunk`` (``(b, C, H, W)``, on the device), merged.

        Augment the views, stack as many per forward pass as fit in ``pass_size`` images, run the
        model, check each pass for NaN/inf, de-augment with the hook, and merge into the
        accumulator. Under the gate the identity runs first, on every row, and the other views
        then run on the rows it is unsure of (the accumulator keeps those rows). A NaN/inf is
        raised after every view of the chunk has run, naming the first bad image and every view
        bad on it, so the error does not depend on the plan.

        The model runs under ``torch.inference_mode`` (unless ``inference_mode=False``); what
        follows its passes (the merge's last step, scaling, views) runs outside it, so the results
        are ordinary tensors without a copy. Returns ``(merged (b, ...), views (K, b, ...) or None,
        gated (b,) or None, images forwarded, uncertainty or None)``.
        """
        with torch.inference_mode() if self.inference_mode else contextlib.nullcontext():
            acc, outputs, gated, rows, forwarded = self._run_views(chunk, args, ids, offset, pass_size, keep, ref)
        return self._finish_chunk(chunk, ids, acc, outputs, gated, rows, forwarded, keep, want_uncertainty)

    def _run_views(self, chunk, args, ids, offset, pass_size, keep, ref):
        """The loop of :meth:`_run_chunk`: ``(accumulator, kept outputs, gated, gated rows, images forwarded)``."""
        b = chunk.shape[0]
        acc = self._template.fresh()
        outputs: list[torch.Tensor | None] = [None] * len(self.transformers)  # kept per-view outputs
        bad: dict[int, list[int]] = {}  # view -> rows of the chunk whose output is NaN/inf
        images, row_args, rows, gated, forwarded = chunk, args, None, None, 0  # rows: None = all
        gate = self.gate_threshold is not None
        for stage, views in enumerate(self._stages):
            store = keep or (gate and stage == 0)  # per-view outputs to keep: asked for, or the gate's identity
            if stage == 1:  # the gate: the other views only on rows the identity is unsure of
                gated = self._confidence(outputs[self._identity]) < self.gate_threshold
                rows = torch.nonzero(gated).flatten()
                if rows.numel() == 0:
                    break
                if rows.numel() == b:
                    rows = None
                else:
                    images, row_args, acc = chunk[rows], _index_args(args, b, rows), acc.take_rows(rows)
            n = images.shape[0]
            per_pass = 1 if args else max(1, pass_size // n)
            for first in range(0, len(views), per_pass):
                augmented = {k: self._augment[k](images) for k in views[first : first + per_pass]}
                for group in _group_by_shape(augmented):  # views that resize the image pass apart
                    # Hand each view to the batch and the batch to the model: no augmented image
                    # outlives the forward pass it was made for.
                    batch = _cat([augmented.pop(k) for k in group], 0)
                    view_size = (int(batch.shape[-2]), int(batch.shape[-1]))
                    out = self._forward(batch, row_args)
                    forwarded += batch.shape[0]
                    del batch
                    if self.check_outputs and not _sum_is_finite(out):
                        self._find_non_finite(out, group, n, rows, bad)
                    if all(self._passthrough[k] for k in group):  # class scores come back as they are
                        stack = out.reshape(len(group), n, *out.shape[1:])
                        self._check_shape(tuple(stack.shape[1:]), group[0], ref)
                        if not bad:  # nothing is merged after a NaN/inf: the error follows
                            acc.add_stack(stack, group)
                        if store:
                            for k, output in zip(group, stack, strict=True):
                                outputs[k] = _at_least_float32(output)
                    else:
                        for i, k in enumerate(group):
                            output = self.deaugment(self.transformers[k], out[i * n : (i + 1) * n], view_size)
                            self._check_shape(tuple(output.shape), k, ref)
                            if not bad:
                                acc.add(output, k)
                            if store:
                                outputs[k] = _at_least_float32(output)
                    del out
        if bad:
            raise self._non_finite_error(bad, offset, ids)
        return acc, outputs, gated, rows, forwarded

    def _finish_chunk(self, chunk, ids, acc, outputs, gated, rows, forwarded, keep, want_uncertainty):
        """The chunk's merged output (the gate's plain rows and the merged ones), scaled; its views
        and uncertainty."""
        ids_of = _RowIds(chunk, ids, rows)
        if gated is None:
            merged = acc.result(ids_of)
        else:
            plain = outputs[self._identity]
            merged = apply_activation(plain, self._merge_activation, self.class_dim)
            if merged is plain:  # the kept output may be the model's own tensor: never write into it
                merged = merged.clone()
            if rows is None:  # every row was gated
                merged = acc.result(ids_of).to(merged.dtype)
            elif rows.numel():
                merged[rows] = acc.result(ids_of).to(merged.dtype)
        final = self._scale(merged, gated)
        views = None
        if keep:
            if gated is None:
                views = torch.stack(outputs)
            else:
                views = outputs[self._identity].unsqueeze(0).repeat(len(outputs), *([1] * outputs[self._identity].ndim))
                for k in self._others:
                    if outputs[k] is not None:
                        if rows is None:
                            views[k] = outputs[k]
                        else:
                            views[k, rows] = outputs[k]
        uncertainty = self._uncertainty(views, merged, final, gated) if want_uncertainty else None
        return final, views, gated, forwarded, uncertainty

    def _confidence(self, plain_raw: torch.Tensor) -> torch.Tensor:
        """``(b,)`` top-class probability of the identity's raw output."""
        probs = plain_raw if self.model_outputs == "probs" else torch.softmax(plain_raw, dim=self.class_dim)
        return probs.amax(dim=self.class_dim)

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

    def _find_non_finite(self, out: torch.Tensor, group: list[int], n: int, rows, bad: dict[int, list[int]]) -> None:
        """Record in ``bad`` the chunk rows whose output is NaN/inf, per view of the pass ``out``
        (``len(group)`` views of ``n`` rows each; ``rows`` maps them to the chunk's rows)."""
        finite = torch.isfinite(out).reshape(out.shape[0], -1).all(dim=1).cpu()
        for i, k in enumerate(group):
            found = torch.nonzero(~finite[i * n : (i + 1) * n]).flatten()
            if found.numel():
                chunk_rows = found if rows is None else rows.cpu()[found]
                bad.setdefault(k, []).extend(chunk_rows.tolist())

    def _non_finite_error(self, bad: dict[int, list[int]], offset: int, ids: torch.Tensor | None) -> ModelOutputError:
        first = min(min(found) for found in bad.values())
        views = ", ".join(repr(self._names[k]) for k in sorted(bad) if first in bad[k])
        image = f"the image with id {int(ids[first])}" if ids is not None else f"image {offset + first} of the batch"
        return ModelOutputError(
            f"the model returned NaN/inf for {image} under view(s) {views}; check the model and its input "
            "normalisation (TTA cannot merge non-finite outputs)"
        )

    def _check_shape(self, shape: tuple[int, ...], index: int, ref: list) -> None:
        """``shape``: view ``index``'s de-augmented output ``(n, ...)``. The first view's must fit
        ``class_dim``; every later one must match it per image (whatever the plan and checks)."""
        if ref:
            first, expected = ref[0]
            if shape[1:] != expected:
                raise ModelOutputError(
                    f"view {self._names[index]!r} returned outputs of shape {shape[1:]} per image after "
                    f"de-augmentation, but view {self._names[first]!r} returned {expected}; every view must map "
                    "back to the same shape"
                )
            return
        ndim = len(shape)
        if not -ndim < self.class_dim < ndim:
            raise InvalidInputError(
                f"class_dim={self.class_dim} does not fit the model's output of shape {shape} (one view, batch "
                f"first): expected a dimension in 1..{ndim - 1} (or -{ndim - 1}..-1); pass class_dim=1 for (B, C) scores"
            )
        ref.append((index, shape[1:]))

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

    def _uncertainty(self, views: torch.Tensor, merged: torch.Tensor, final: torch.Tensor, gated: torch.Tensor | None):
        """Per-image uncertainty of the views around the merge (before temperature and matrix),
        with disagreement measured against the class the row reports (``final``'s top class)."""
        if views.ndim != 3 or self.class_dim % 2 != 1:
            raise InvalidInputError(
                f"return_uncertainty needs (B, C) class scores with class_dim=1, got outputs of shape "
                f"{tuple(views.shape[1:])} and class_dim={self.class_dim}"
            )
        view_probs = views if self.model_outputs == "probs" else torch.softmax(views, dim=2)
        merged_probs = merged if self._space == "probs" else torch.softmax(_at_least_float32(merged), dim=1)
        # sum, max, min, tsharpen and vote do not sum to 1 over the classes: entropies need a distribution.
        merged_probs = _at_least_float32(merged_probs)
        merged_probs = merged_probs / merged_probs.sum(dim=1, keepdim=True).clamp_min(PROB_FLOOR)
        out = view_uncertainty(view_probs, merged_probs, self._view_weights, labels=final.argmax(dim=1))
        if gated is not None:
            plain = ~gated
            for key in ("std", "mutual_information", "disagreement"):
                out[key][plain] = 0.0
            out["expected_entropy"][plain] = out["predictive_entropy"][plain]
        return out


class _RowIds:
    """The vote's tie-break ids of the accumulator's rows (computed only for rows that tie): the
    caller's ``ids``, else a hash of the image itself; ``rows`` maps accumulator rows to the chunk."""

    def __init__(self, chunk: torch.Tensor, ids: torch.Tensor | None, rows: torch.Tensor | None):
        self.chunk, self.ids, self.rows = chunk, ids, rows

    def __call__(self, tied: torch.Tensor) -> list[int]:
        rows = tied if self.rows is None else self.rows[tied.to(self.rows.device)]
        if self.ids is not None:
            return self.ids[rows.cpu()].tolist()
        return [content_key(self.chunk[r]) for r in rows.tolist()]


def _bound_augment(view: View) -> Callable[[torch.Tensor], torch.Tensor]:
    """A view's augmentation with its steps bound once (ttakit's identity steps skipped), for views
    whose class scores need no de-augmentation (so no recorded input size)."""
    steps = tuple(
        (s.transform.apply_aug_image, {s.transform.pname: s.param})
        for s in view.steps
        if not (isinstance(s.transform, BaseTransform) and s.transform.is_identity(s.param))
    )

    def augment(image: torch.Tensor) -> torch.Tensor:
        for apply, kwargs in steps:
            image = apply(image, **kwargs)
        return image

    return augment


_IDS_FORMS = "a (B,) integer tensor or a list of B integers (one per image)"


def _check_ids(ids: object, total: int) -> torch.Tensor | None:
    """``None`` or the images' ids as a CPU int64 tensor of ``total`` values."""
    if ids is None:
        return None
    if isinstance(ids, torch.Tensor):
        if ids.ndim != 1:
            raise InvalidInputError(f"ids must be {_IDS_FORMS}, got a tensor of shape {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise InvalidInputError(f"ids must be {_IDS_FORMS}, got a tensor of dtype {ids.dtype}")
        checked = ids.detach().to("cpu", torch.int64)
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise InvalidInputError(f"ids must be {_IDS_FORMS}, got {type(ids).__name__}")
    else:
        wrong = [v for v in ids if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
        if wrong:
            raise InvalidInputError(f"ids must be {_IDS_FORMS}, got {_show(ids)} (not an integer: {wrong[0]!r})")
        try:
            checked = torch.tensor([int(v) for v in ids], dtype=torch.int64)
        except (OverflowError, RuntimeError):
            raise InvalidInputError(f"ids must be {_IDS_FORMS} that fit in int64, got {_show(ids)}") from None
    if checked.numel() != total:
        raise InvalidInputError(f"ids must hold one integer per image ({total}), got {checked.numel()}")
    return checked


def _show(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sum_is_finite(x: torch.Tensor) -> bool:
    """Whether the sum of ``x`` is finite, which proves every value is: a NaN or an inf of either
    sign makes any sum NaN or inf (False also when finite values overflow the sum: callers then
    check value by value)."""
    if not x.is_floating_point():
        return True
    if x.numel() <= 64 and x.device.type == "cpu":  # a few class scores: summed in Python, no kernel
        return math.isfinite(sum(x.reshape(-1).tolist()))
    return math.isfinite(float(x.detach().sum()))


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
    images = iter(augmented.values())
    shape = next(images).shape
    if all(image.shape == shape for image in images):
        return [list(augmented)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, image in augmented.items():
        groups.setdefault(tuple(image.shape), []).append(k)
    return list(groups.values())
