"""Run policies on a data set's images and score them (the core of ``ttakit evaluate``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import metrics as M
from ..aliases import get_policy
from ..data import ImageDataset
from ..engine import TTAEngine, TTAOutput, eval_mode
from ..errors import InvalidInputError
from ..policy import Policy
from ..progress import progress as show_progress
from . import _distributed
from ._policies import BASELINE

__all__ = ["PolicyEvaluation", "place_model", "predict_probs", "run_policy", "evaluate_policies"]


def place_model(models: Any, device: str | torch.device | None) -> None:
    """Move ``models`` (one model or a list) to ``device`` (``--device``; None: leave them), so the
    engine runs each where it is. A model that is not a torch module (ONNX, Keras, a NumPy
    function) runs where its own runtime runs."""
    from ..engine import check_device

    target = check_device(device)
    if target is None:
        return
    for model in models if isinstance(models, (list, tuple)) else [models]:
        if isinstance(model, torch.nn.Module):
            model.to(target)

@dataclass
class PolicyEvaluation:
    """One policy's results on one model and data set.

    ``probs`` ``(N, C)`` are kept for plots and paired tests, ``uncertainty`` (per-image scores
    from the same engine run, when asked) for the uncertainty report; neither is written to JSON.
    """

    name: str
    n_views: int
    forward_passes_per_image: float
    seconds: float
    metrics: dict[str, float]
    lift: dict[str, float] = field(default_factory=dict)
    probs: torch.Tensor | None = None
    uncertainty: dict[str, torch.Tensor] | None = None

    def row(self) -> dict[str, Any]:
        """A flat dict for tables and JSON."""
        return {
            "policy": self.name,
            "views": self.n_views,
            "passes_per_image": self.forward_passes_per_image,
            **self.metrics,
            **{f"lift_{k}": v for k, v in self.lift.items()},
            "ms_per_image": 1000.0 * self.seconds / max(self.metrics.get("n_images", 1), 1),
        }


def predict_probs(
    model: Any,
    images: torch.Tensor,
    policy: Policy,
    *,
    max_batch: int = 256,
    progress: bool = False,
    desc: str | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
) -> tuple[torch.Tensor, float]:
    """Class probabilities ``(N, C)`` of ``images`` ``(N, C, H, W)`` under ``policy``, and the
    forward passes spent per image.

    One :class:`~ttakit.engine.TTAEngine` call, so everything the policy stores applies: its
    views, merge mode and weights over probabilities, its gate (extra views only for images the
    plain prediction is unsure of) and its temperature. The engine chunks the images
    (``max_batch`` per forward pass); the model is in eval mode for the call.
    """
    out = run_policy(model, images, policy, max_batch=max_batch, progress=progress, desc=desc, device=device, amp=amp)
    return out.merged.float().cpu(), float(out.passes_per_image)


def run_policy(
    model: Any,
    images: torch.Tensor,
    policy: Policy,
    *,
    max_batch: int = 256,
    progress: bool = False,
    desc: str | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
    return_uncertainty: bool = False,
) -> TTAOutput:
    """One :class:`~ttakit.engine.TTAEngine` call over ``images`` ``(N, C, H, W)`` under ``policy``
    (softmax probabilities, model in eval mode, a progress bar when asked): the
    :class:`~ttakit.engine.TTAOutput`, with per-image uncertainty when ``return_uncertainty``."""
    engine = TTAEngine(model, policy, activation="softmax", max_batch=max_batch, device=device, amp=amp)
    with (
        eval_mode(model),
        show_progress(desc=desc or policy.name, total=len(images), unit="img", enabled=progress) as bar,
    ):
        return engine.run(images, progress=bar.update, return_uncertainty=return_uncertainty)


def evaluate_policies(
    model: torch.nn.Module,
    dataset: ImageDataset,
    policies: Sequence[Policy],
    *,
    max_batch: int = 256,
    progress: bool = True,
    n_bins: int = 15,
    bootstrap_resamples: int = 2000,
    seed: int = 0,
    device: str | torch.device | None = None,
    amp: bool = False,
    return_uncertainty: bool = False,
) -> list[PolicyEvaluation]:
    """Evaluate ``policies`` (plain inference is added first if missing) on ``dataset``.

    Each result holds accuracy, NLL, ECE and Brier score; forward passes per image; wall time;
    and, for every policy but plain, its lift over plain: accuracy and NLL differences, the
    McNemar p-value and a paired bootstrap confidence interval of the accuracy difference.

    With ``return_uncertainty=True`` the same engine run that scores each multi-view policy also
    returns its per-image uncertainty (``PolicyEvaluation.uncertainty``, see
    :attr:`ttakit.engine.TTAOutput.uncertainty`), so reporting it costs no second pass over
    the data.
    """
    if len(dataset) == 0:
        raise InvalidInputError("the evaluation data set is empty")
    ordered = list(policies)
    if not any(p.name == BASELINE and len(p) == 1 for p in ordered):
        ordered.insert(0, get_policy(BASELINE))
    results: list[PolicyEvaluation] = []
    ranks = _distributed.group(device)  # torchrun: each rank runs its blocks of max_batch rows
    rows = _distributed.block_rows(len(dataset), max_batch, ranks) if ranks.distributed else None
    images = dataset.images if rows is None else dataset.images[rows]
    for policy in ordered:
        started = time.perf_counter()
        probs, passes, uncertainty = None, 0.0, None
        if len(images):  # a rank whose share is empty (fewer blocks than ranks) runs nothing
            out = run_policy(
                model, images, policy, max_batch=max_batch, progress=progress and ranks.main, device=device, amp=amp,
                return_uncertainty=return_uncertainty and len(policy) > 1,
            )
            probs, passes = out.merged.float().cpu(), float(out.passes_per_image)
            if out.uncertainty is not None:
                uncertainty = {k: v.float().cpu() for k, v in out.uncertainty.items()}
        if rows is not None:
            probs, passes, uncertainty = _gather_rows(rows, probs, passes, uncertainty, len(dataset), ranks)
        seconds = time.perf_counter() - started
        scores = M.summarize(probs, dataset.labels, n_bins=n_bins)
        scores["n_images"] = len(dataset)
        results.append(
            PolicyEvaluation(policy.name, len(policy), passes, seconds, scores, probs=probs, uncertainty=uncertainty)
        )
    baseline = next(r for r in results if r.name == BASELINE)
    plain_correct = baseline.probs.argmax(1) == dataset.labels
    for result in results:
        if result is baseline:
            continue
        correct = result.probs.argmax(1) == dataset.labels
        test = M.mcnemar_test(plain_correct, correct)
        boot = M.paired_bootstrap(plain_correct, correct, n_resamples=bootstrap_resamples, seed=seed)
        result.lift = {
            "accuracy": result.metrics["accuracy"] - baseline.metrics["accuracy"],
            "nll": result.metrics["nll"] - baseline.metrics["nll"],
            "mcnemar_p": test.p_value,
            "ci_low": boot.ci_low,
            "ci_high": boot.ci_high,
            "bootstrap_p": boot.p_value,
        }
    return results


def _gather_rows(rows: list[int], probs: torch.Tensor | None, passes: float,
                 uncertainty: dict[str, torch.Tensor] | None, n: int,
                 ranks: _distributed.Ranks) -> tuple[torch.Tensor, float, dict[str, torch.Tensor] | None]:
    """Every rank's per-image outputs put back in row order: ``probs`` ``(N, C)``, the passes per
    image over all ``n`` rows, and each uncertainty score ``(N, ...)``. The same on every rank, so
    the metrics and tests computed from them are those of one process."""
    found = _distributed.gather((rows, probs, passes * len(rows), uncertainty), ranks, "the evaluated rows")
    first = next(p for _, p, _, _ in found if p is not None)
    full = torch.zeros((n, first.shape[1]), dtype=first.dtype)
    scores: dict[str, torch.Tensor] | None = None
    for part_rows, part_probs, _, part_scores in found:
        if part_probs is None:
            continue
        index = torch.as_tensor(part_rows, dtype=torch.long)
        full[index] = part_probs
        if part_scores is not None:
            if scores is None:
                scores = {k: torch.zeros((n, *v.shape[1:]), dtype=v.dtype) for k, v in part_scores.items()}
            for key, value in part_scores.items():
                scores[key][index] = value
    return full, sum(p for _, _, p, _ in found) / max(n, 1), scores
