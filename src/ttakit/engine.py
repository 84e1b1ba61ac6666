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
per-sample tensor arguments are sliced along with the images. Views that cut each image into
several (:class:`~ttakit.transforms.Tiles`) run on their own, augmenting as many whole images as
fit in a pass; an image with more tiles than that has them run in several passes, whose outputs
are concatenated before de-augmenting: no forward pass holds more than ``max_batch`` images.

Masks from views that see part of the image (crops; shifts with padding) are pasted into the full
frame and merged per pixel over the views that saw it (each view's geometry is probed on a blank
image before any forward pass, once per input shape); a policy leaving some pixel unseen by every
view is refused then. Policies without such views merge exactly as before.

Speed: the policy's per-view work (transformers, bound augmentation steps, label pass-through,
merge settings, weights) is prepared once, when the engine is built; the views of a stacked pass
of class scores are merged in one step. The default plan is fixed by the batch size: on CPU,
passes of up to 32 images (the views of a small batch share one forward pass; a batch of
``max_batch`` or more is cut into chunks of 32), one view of the whole batch per pass for batches
of 33 to ``max_batch - 1`` images (ttach's plan); ``max_batch`` elsewhere.
``pass_size="auto"`` opts in to choosing the plan by timing the first calls
(:mod:`ttakit._pass_tuner`); it changes speed only.

Every other inference path (the wrappers, ``evaluate``, ``gating``, the trainer's plain
prediction) calls :meth:`TTAEngine.run`; it is the only chunking loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._amp import autocast
from ._device import _first_tensor, _same_device, check_device, eval_mode
from ._engine_args import (
    _check_class_dim,
    _check_flag,
    _check_gate,
    _check_ids,
    _check_max_batch,
    _check_model,
    _check_output_key,
    _check_pass_size,
    _check_seed,
    _model_output_kind,
    as_policy,
)
from ._engine_checks import (
    _sum_is_finite,
    check_coverage,
    check_output_shape,
    find_non_finite,
    non_finite_error,
    unwrap_output,
)
from ._engine_finish import Scaling, TTAOutput, _as_normal_tensor, merged_uncertainty
from ._engine_views import (
    DeaugmentHook,
    _bound_augment,
    _cat,
    _check_deaugment,
    _deaugment_label,
    _group_by_shape,
    _index_args,
    _label_passes_through,
    _RowIds,
    _slice_args,
    loses_pixels,
    multiplies_batch,
    view_geometry,
)
from ._pass_tuner import PassTuner, candidate_pass_sizes
from .errors import InvalidInputError, ModelOutputError
from .functional import check_image
from .merge import (
    MergeAccumulator,
    _at_least_float32,
    apply_activation,
    check_activation,
    check_coverage_mode,
    check_matrix_scaling,
    check_merge_mode,
    check_temperature,
    check_weights,
)
from .policy import Compose, Policy, View

__all__ = ["TTAEngine", "TTAOutput", "as_policy", "check_device", "eval_mode", "DeaugmentHook", "FROM_POLICY"]


# Default of ``temperature`` and ``gate_threshold``: take the policy's.
FROM_POLICY = "policy"

# On CPU a forward pass runs slower per image once its activations outgrow the caches, so passes
# hold at most 32 images there: enough to stack the views of a small batch (benchmarks/engine.py).
_CPU_PASS = 32


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
            For masks, views that see part of the image (crops, shifts with padding) are merged per
            pixel over the views that saw it (merge modes mean, gmean, tsharpen, vote, max, min).
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
            plan, on CPU 32 (enough to stack the views of a small batch; larger passes run slower
            per image there), or the whole batch for 33 to ``max_batch - 1`` images (one view per
            pass, as ttach runs them); ``max_batch`` on other devices. ``"auto"``: on CPU, chosen per
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
        self.model = _check_model(model)
        self.policy = as_policy(policy)
        self.policy.check_targets(target)
        self.target = target
        self.merge_mode = check_merge_mode(merge_mode or self.policy.merge_mode)
        self._set_weights(weights)
        if activation == "auto":
            activation = "softmax" if target == "label" else None
        self.activation = check_activation(activation)
        self.model_outputs = _model_output_kind(model)
        self.max_batch = _check_max_batch(max_batch)
        self.pass_size = _check_pass_size(pass_size)
        self.pass_tuner: PassTuner | None = PassTuner() if pass_size == "auto" else None
        self.output_key = _check_output_key(output_key)
        self.deaugment = _check_deaugment(deaugment, target)
        self.class_dim = _check_class_dim(class_dim)
        self.device = check_device(device)
        self.amp = _check_flag(amp, "amp")
        self.inference_mode = _check_flag(inference_mode, "inference_mode")
        self.check_outputs = _check_flag(check_outputs, "check_outputs")
        self.seed = _check_seed(seed)

        self.temperature = check_temperature(
            self.policy.temperature if temperature == FROM_POLICY else temperature, "temperature"
        )
        self.matrix_scaling = check_matrix_scaling(
            self.policy.matrix_scaling if matrix_scaling == FROM_POLICY else matrix_scaling, "matrix_scaling"
        )
        threshold = self.policy.gate_threshold if gate_threshold == FROM_POLICY else gate_threshold
        self.gate_threshold = _check_gate(threshold, self.target, self.policy)
        self._prepare_views()
        self._prepare_merge()
        self._probe: torch.Tensor | None = _first_tensor(model)
        if self.device is not None and self._probe is not None and not _same_device(self._probe.device, self.device):
            raise InvalidInputError(
                f"device={device!r} but the model's parameters are on {self._probe.device}; move the model first "
                f"(model.to({str(self.device)!r})) or pass device=None to run where the model is"
            )

    def _set_weights(self, weights: Sequence[float] | torch.Tensor | None) -> None:
        given = weights if weights is not None else self.policy.weights
        checked = check_weights(given, len(self.policy), self.merge_mode)
        self.weights = None if checked is None else checked.tolist()
        # (K, C) class-by-view weights: merged by the accumulator, p_c ~ sum_k W[k][c] p_kc renormalised.
        self._class_weights = checked is not None and checked.ndim == 2
        # Per-view weights for the uncertainty's expected entropy (class-by-view: each view's mean).
        self._view_weights = checked.mean(1).tolist() if self._class_weights else self.weights

    def _prepare_views(self) -> None:
        """Per-policy work, done once: transformers, bound augmentations, the identity view, label
        pass-through, the stages of the gate."""
        n_views = len(self.policy)
        self.transformers = list(self.policy)
        self._names = self.policy.view_names
        self._identity = next((k for k, v in enumerate(self.policy.views) if v.is_identity), None)
        self._others = [k for k in range(n_views) if k != self._identity]
        self._passthrough = (
            [_label_passes_through(t) for t in self.transformers]
            if self.target == "label" and self.deaugment is _deaugment_label
            else [False] * n_views
        )
        self._augment = [
            _bound_augment(view) if passes else transformer.augment_image
            for view, transformer, passes in zip(self.policy.views, self.transformers, self._passthrough, strict=True)
        ]
        # The views run in stages: all at once, or under the gate the identity on every image and
        # then the others on the images it is unsure of.
        self._stages = [list(range(n_views))] if self.gate_threshold is None else [[self._identity], self._others]
        # Views that cut an image into several (Tiles) run in passes of their own; for masks, views
        # that see part of the image (crops, shifts) are merged per pixel over the views that saw it.
        # Both need each view's geometry per input size, probed before any forward pass.
        self._multiplies = any(multiplies_batch(v) for v in self.policy.views)
        self._coverage = self.target == "mask" and any(loses_pixels(v) for v in self.policy.views)
        if self._coverage:
            check_coverage_mode(self.merge_mode)
        self._geometries: dict[tuple, list] = {}

    def _prepare_merge(self) -> None:
        """The merge settings, and what the merged output is (for the temperature and the
        uncertainty): probabilities, logits or sigmoid outputs."""
        probs_in = self.model_outputs == "probs" and self.activation == "softmax"
        # A probs model is never softmaxed again; its gmean is renormalised as softmax's would be.
        self._merge_activation = None if probs_in else self.activation
        self._template = MergeAccumulator(
            self.merge_mode, len(self.policy), self.weights, self._merge_activation, self.class_dim, self.seed,
            renormalize=True if probs_in else None,
        )
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
        self._scaling = Scaling(self.temperature, self.matrix_scaling, self.class_dim, self._space)

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
        pass_size = self._default_pass(device, total)
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
        geometry = self._geometry(images, args, device) if self._multiplies or self._coverage else None
        started = tuner.clock() if timed_key is not None else 0.0
        out = self._run(images, args, ids, device, pass_size, return_views, return_uncertainty, progress, geometry)
        if timed_key is not None:
            tuner.record(timed_key, pass_size, tuner.clock() - started)
        return out

    def _default_pass(self, device: torch.device, total: int) -> int:
        """Most images per forward pass without timing, for a call of ``total`` images:
        ``pass_size``; else ``max_batch`` off the CPU; on CPU the whole batch when it holds more
        than 32 and fewer than ``max_batch`` images (one view per pass, ttach's plan), else 32."""
        if isinstance(self.pass_size, int):
            return min(self.pass_size, self.max_batch)
        if device.type != "cpu":
            return self.max_batch
        return total if _CPU_PASS < total < self.max_batch else min(_CPU_PASS, self.max_batch)

    def _geometry(self, images: torch.Tensor, args: tuple, device: torch.device) -> list:
        """Each view's :class:`~ttakit._engine_views.ViewGeometry` on images like ``images``
        (cached per image shape), its coverage checked: all before any forward pass."""
        key = (tuple(images.shape[1:]), images.dtype, device)
        geometry = self._geometries.get(key)
        if geometry is None:
            geometry = [
                view_geometry(view, tuple(images.shape[1:]), device, images.dtype, self._coverage)
                for view in self.policy.views
            ]
            if self._coverage:
                crops = [
                    tuple(s.transform.crop_size)
                    for v in self.policy.views
                    for s in v.steps
                    if getattr(s.transform, "crop_size", None) is not None
                ]
                check_coverage(
                    [g.coverage for g in geometry], self._view_weights, self._names, self.policy.name, crops,
                    (int(images.shape[-2]), int(images.shape[-1])),
                )
            if len(self._geometries) >= 64:  # a few tensors per shape: bounded like the pass tuner
                self._geometries.clear()
            self._geometries[key] = geometry
        if args and any(g.rows > 1 for g in geometry):
            raise InvalidInputError(
                f"extra model arguments cannot follow views that cut each image into several (policy "
                f"{self.policy.name!r}: {', '.join(n for n, g in zip(self._names, geometry, strict=True) if g.rows > 1)}); "
                "run tiled views without extra arguments"
            )
        return geometry

    def _run(
        self, images, args, ids, device, pass_size, return_views, return_uncertainty, progress, geometry=None
    ) -> TTAOutput:
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
            parts.append(
                self._run_chunk(chunk, chunk_args, chunk_ids, start, pass_size, keep, return_uncertainty, ref, geometry)
            )
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

    def _run_chunk(self, chunk, args, ids, offset, pass_size, keep, want_uncertainty, ref, geometry=None):
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
            acc, outputs, gated, rows, forwarded = self._run_views(
                chunk, args, ids, offset, pass_size, keep, ref, geometry
            )
        return self._finish_chunk(chunk, ids, acc, outputs, gated, rows, forwarded, keep, want_uncertainty)

    def _run_views(self, chunk, args, ids, offset, pass_size, keep, ref, geometry=None):
        """The loop of :meth:`_run_chunk`: ``(accumulator, kept outputs, gated, gated rows, images forwarded)``."""
        b = chunk.shape[0]
        acc = self._template.fresh(coverage=self._coverage)
        coverage = [g.coverage for g in geometry] if self._coverage else [None] * len(self.transformers)
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
            if geometry is not None and self._multiplies:  # views cutting images into several run apart
                tiled = [k for k in views if geometry[k].rows > 1]
                views = [k for k in views if geometry[k].rows == 1]
                for k in tiled:
                    forwarded += self._run_multiplied(k, images, geometry[k].rows, pass_size, acc, outputs, store,
                                                      ref, bad, rows, coverage[k])
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
                        find_non_finite(out, group, n, rows, bad)
                    if all(self._passthrough[k] for k in group):  # class scores come back as they are
                        stack = out.reshape(len(group), n, *out.shape[1:])
                        check_output_shape(tuple(stack.shape[1:]), group[0], ref, self._names, self.class_dim)
                        if not bad:  # nothing is merged after a NaN/inf: the error follows
                            acc.add_stack(stack, group)
                        if store:
                            for k, output in zip(group, stack, strict=True):
                                outputs[k] = _at_least_float32(output)
                    else:
                        for i, k in enumerate(group):
                            output = self.deaugment(self.transformers[k], out[i * n : (i + 1) * n], view_size)
                            check_output_shape(tuple(output.shape), k, ref, self._names, self.class_dim)
                            if not bad:
                                acc.add(output, k, coverage[k])
                            if store:
                                outputs[k] = _at_least_float32(output)
                    del out
        if bad:
            raise non_finite_error(self._names, bad, offset, ids)
        return acc, outputs, gated, rows, forwarded

    def _run_multiplied(self, k, images, per_image, pass_size, acc, outputs, store, ref, bad, rows, coverage) -> int:
        """View ``k``, which makes ``per_image`` images of each (tiles), on ``images``: augmented a
        few images at a time, so that no forward pass holds more than ``pass_size`` (<= ``max_batch``)
        images (an image with more tiles than that: its tiles in several passes, outputs
        concatenated before de-augmenting); merged into ``acc``. Returns the images forwarded."""
        transformer = self.transformers[k]
        n = images.shape[0]
        group = max(1, pass_size // per_image)  # whole images per augmentation
        parts, forwarded = [], 0
        for start in range(0, n, group):
            augmented = self._augment[k](images[start : start + group])
            view_size = (int(augmented.shape[-2]), int(augmented.shape[-1]))
            outs = []
            for first in range(0, augmented.shape[0], pass_size):
                outs.append(self._forward(augmented[first : first + pass_size], ()))
            forwarded += augmented.shape[0]
            del augmented
            out = _cat(outs, 0)
            del outs
            if self.check_outputs and not _sum_is_finite(out):
                find_non_finite(out, [k], out.shape[0] // per_image, rows, bad, per_image, start)
            parts.append(self.deaugment(transformer, out, view_size))
            del out
        output = _cat(parts, 0)
        check_output_shape(tuple(output.shape), k, ref, self._names, self.class_dim)
        if not bad:
            acc.add(output, k, coverage)
        if store:
            outputs[k] = _at_least_float32(output)
        return forwarded

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
        final = self._scaling(merged, gated)
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
        uncertainty = (
            merged_uncertainty(
                views, merged, final, gated, class_dim=self.class_dim, views_are_probs=self.model_outputs == "probs",
                space=self._space, view_weights=self._view_weights,
            )
            if want_uncertainty
            else None
        )
        return final, views, gated, forwarded, uncertainty

    def _confidence(self, plain_raw: torch.Tensor) -> torch.Tensor:
        """``(b,)`` top-class probability of the identity's raw output."""
        probs = plain_raw if self.model_outputs == "probs" else torch.softmax(plain_raw, dim=self.class_dim)
        return probs.amax(dim=self.class_dim)

    def _forward(self, batch: torch.Tensor, args) -> torch.Tensor:
        with autocast(batch.device.type, self.amp):
            output = self.model(batch, *args)
        if isinstance(output, torch.Tensor):
            if self.output_key is not None:
                raise ModelOutputError(
                    f"output_key={self.output_key!r} was given but the model returned Tensor, not a mapping"
                )
        else:
            output = unwrap_output(output, self.output_key)
        if output.ndim == 0 or output.shape[0] != batch.shape[0]:
            raise ModelOutputError(
                f"the model returned shape {tuple(output.shape)} for a batch of {batch.shape[0]} images; "
                "its first dimension must be the batch"
            )
        return output.float() if self.amp else output
