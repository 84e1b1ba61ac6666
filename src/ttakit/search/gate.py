"""Gate tuning: how much of a policy's lift a confidence gate keeps, and at what cost.

Gated TTA predicts plainly first and runs a policy's other views only on images whose plain
(identity-view) top-class probability is below a threshold; the identity view's output is
reused, so a policy of K views costs ``1 + (K - 1) * fraction_gated`` forward passes per image.
:func:`tune_gate_threshold` picks, from validation outputs, the cheapest threshold that keeps
``keep`` of the full policy's accuracy lift (with a bootstrap margin);
:func:`evaluate_gated_on_cache` computes gated predictions from cached per-view outputs. Running
a gated policy on a model is :class:`ttakit.TTAEngine`'s job.

Example:
    >>> plain = torch.tensor([[0.9, 0.1], [0.55, 0.45]])
    >>> full = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    >>> tune_gate_threshold(plain, full, torch.tensor([0, 1]), n_views=4).fraction_gated
    0.5
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InvalidInputError
from ..policy import Policy
from .calibration import apply_calibration

if TYPE_CHECKING:
    from .cache import ViewCache

__all__ = [
    "GATE_ALL",
    "GateTuning",
    "GatedOutput",
    "forward_passes",
    "tune_gate_threshold",
    "evaluate_gated_on_cache",
]


# The largest threshold a policy stores: gates every image whose plain confidence is below 1.
# (A float32 softmax saturated at exactly 1.0 is never gated.)
GATE_ALL = 1.0


@dataclass
class GateTuning:
    """The gate chosen by :func:`tune_gate_threshold` and what it costs and keeps on the tuning data.

    Attributes:
        threshold: run the extra views on images whose plain confidence is ``< threshold``
            (0: never; 1: every image not predicted with probability exactly 1).
        keep: the fraction of the full policy's accuracy lift that had to be kept.
        confidence: the share of bootstrap resamples on which it had to be kept.
        fraction_gated: share of images that get the extra views.
        forward_passes_per_image: plain = 1, full = ``n_views``, gated = this.
        n_views: forward passes per image of the full policy.
        plain_accuracy, full_accuracy, gated_accuracy: top-1 accuracies.
        full_lift, gated_lift: accuracy minus plain accuracy.
        kept_lift: ``gated_lift / full_lift`` (1.0 when the full lift is not positive).
    """

    threshold: float
    keep: float
    confidence: float
    fraction_gated: float
    forward_passes_per_image: float
    n_views: int
    plain_accuracy: float
    full_accuracy: float
    gated_accuracy: float
    full_lift: float
    gated_lift: float
    kept_lift: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GatedOutput:
    """What gated prediction returns.

    Attributes:
        probs: ``(N, C)`` merged probabilities (plain for confident images, the policy's merge for
            gated ones), before temperature scaling.
        gated: ``(N,)`` bool, which images got the extra views.
        n_gated: ``int(gated.sum())``.
        forward_passes_per_image: average forward passes per image actually spent.
    """

    probs: torch.Tensor
    gated: torch.Tensor
    n_gated: int
    forward_passes_per_image: float


def forward_passes(n_views: int, fraction_gated: float, reuse_identity: bool = True) -> float:
    """Forward passes per image of gated TTA: ``1 + (K - 1) * f`` (identity reused) or ``1 + K * f``."""
    extra = n_views - 1 if reuse_identity else n_views
    return 1.0 + extra * float(fraction_gated)


def _check_probs(name: str, probs: object) -> torch.Tensor:
    if not isinstance(probs, torch.Tensor) or probs.ndim != 2 or probs.shape[0] == 0:
        shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise InvalidInputError(
            f"Expected argument `{name}` to be a non-empty (N, C) tensor, but got {shape}"
        )
    if not torch.isfinite(probs).all():
        raise InvalidInputError(
            f"Expected argument `{name}` to hold finite probabilities, but it holds NaN/inf"
        )
    return probs.float()


def _check_threshold(threshold: object) -> float:
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, numbers.Real)
        or not math.isfinite(threshold)
    ):
        raise InvalidInputError(
            f"Expected argument `threshold` to be a finite number, but got {threshold!r}"
        )
    if not 0 <= threshold <= 1:
        raise InvalidInputError(
            f"Expected argument `threshold` to be a number in [0, 1] (0 never gates, 1 gates all), but got {threshold}"
        )
    return float(threshold)


def tune_gate_threshold(
    plain_probs: torch.Tensor,
    full_probs: torch.Tensor,
    labels: torch.Tensor,
    keep: float = 0.95,
    n_views: int = 2,
    reuse_identity: bool = True,
    confidence: float = 0.9,
    n_boot: int = 200,
    seed: int = 0,
    max_cost: float | None = None,
    keep_nll: float | None = None,
    full_calibrated: torch.Tensor | None = None,
) -> GateTuning:
    """The cheapest confidence threshold that keeps at least ``keep`` of the full policy's lift.

    Images are gated in order of increasing plain confidence; the chosen threshold gates the
    fewest images such that the gated accuracy lift over plain is ``>= keep * full_lift`` on
    the given data *and* on at least ``confidence`` of ``n_boot`` bootstrap resamples of it.
    The bootstrap is a margin against noise: a lift of 1% on 10,000 images is 100 images, and
    a threshold that keeps exactly 95% of it here keeps less on fresh data about half the time.
    ``confidence=0`` turns the margin off. Thresholds only fall between distinct confidences,
    so ties are gated together. When the full policy does not beat plain prediction
    (``full_lift <= 0``), gating buys nothing: the threshold is 0 and no image is gated.

    Args:
        plain_probs: ``(N, C)`` probabilities of the identity view alone.
        full_probs: ``(N, C)`` merged probabilities of the full policy.
        labels: ``(N,)`` class indices.
        keep: fraction of the accuracy lift to keep, in ``(0, 1]``.
        n_views: forward passes per image of the full policy (for the cost columns).
        reuse_identity: whether the full policy's identity view reuses the plain pass.
        confidence: share of bootstrap resamples on which the kept lift must reach ``keep``.
        n_boot: bootstrap resamples (seeded by ``seed``).
        keep_nll: also keep this fraction of the NLL reduction of ``full_calibrated`` (the full
            policy's probabilities as inference returns them, temperature applied) over the plain
            softmax, on the data: confident rows keep the plain softmax, so a gate that is cheap
            for accuracy can throw away the calibration TTA bought. None: accuracy only.
        full_calibrated: ``(N, C)``; required with ``keep_nll``.
        max_cost: the most forward passes gated TTA may spend, as a fraction of the full
            policy's. When the cheapest robust threshold costs more, the threshold within the
            budget that keeps the lift on the most bootstrap resamples is chosen instead (among
            those keeping ``keep`` on the data itself; if none does, the budget is exceeded).
    """
    plain = _check_probs("plain_probs", plain_probs)
    full = _check_probs("full_probs", full_probs)
    _check_tuning_args(plain, full, labels, keep=keep, n_views=n_views, confidence=confidence, max_cost=max_cost,
                       n_boot=n_boot)
    labels = labels.long()
    n = plain.shape[0]
    conf = plain.max(dim=1).values  # (N,)
    plain_ok = (plain.argmax(1) == labels).double()
    full_ok = (full.argmax(1) == labels).double()
    plain_acc, full_acc = float(plain_ok.mean()), float(full_ok.mean())
    full_lift = full_acc - plain_acc
    tuning = functools.partial(
        _tuning, n=n, keep=keep, confidence=confidence, n_views=n_views, reuse_identity=reuse_identity,
        plain_acc=plain_acc, full_acc=full_acc,
    )
    if full_lift <= 0:
        return tuning(0.0, 0, plain_acc)
    order = torch.argsort(conf, stable=True)
    sorted_conf = conf[order]
    # gain[j] = accuracy lift when the j least confident images are gated, j = 0..N
    gain = (
        torch.cat(
            [torch.zeros(1, dtype=torch.float64), torch.cumsum((full_ok - plain_ok)[order], 0)]
        )
        / n
    )
    # A threshold t gates {conf < t}: cuts fall between distinct confidences, and after the
    # last image only if its confidence is below 1 (thresholds lie in [0, 1]).
    cut_ok = torch.ones(n + 1, dtype=torch.bool)
    cut_ok[1:n] = sorted_conf[1:] > sorted_conf[:-1]
    cut_ok[n] = bool(sorted_conf[-1] < GATE_ALL)
    target = keep * full_lift - 1e-12
    keeps = cut_ok & (gain >= target)
    if keep_nll is not None:
        keeps &= _keeps_nll(plain, full_calibrated, labels, order, keep_nll)
    robust = keeps.clone()
    keep_rate = None
    if confidence > 0 and n_boot > 0:
        keep_rate = _bootstrap_keep_rate((full_ok - plain_ok)[order], keep, n_boot, seed)
        robust &= keep_rate >= confidence
    feasible = torch.nonzero(robust).flatten()
    if len(feasible):
        j = int(feasible[0])
    else:  # the lift needs images at confidence 1.0: gate as many as a threshold can
        j = int(torch.nonzero(cut_ok).flatten()[-1])
    if max_cost is not None:
        j = _within_budget(j, keeps, keep_rate, n, n_views, reuse_identity, max_cost)
    threshold = float(sorted_conf[j]) if j < n else GATE_ALL
    return tuning(threshold, j, plain_acc + float(gain[j]))


def _check_tuning_args(
    plain: torch.Tensor,
    full: torch.Tensor,
    labels: object,
    *,
    keep: object,
    n_views: object,
    confidence: object,
    max_cost: object,
    n_boot: object,
) -> None:
    if full.shape != plain.shape:
        raise InvalidInputError(
            f"Expected `full_probs` to have the shape of `plain_probs` {tuple(plain.shape)}, but got {tuple(full.shape)}"
        )
    if (
        not isinstance(labels, torch.Tensor)
        or labels.ndim != 1
        or labels.shape[0] != plain.shape[0]
    ):
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise InvalidInputError(
            f"Expected argument `labels` to be a ({plain.shape[0]},) tensor, but got {got}"
        )
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0 < keep <= 1:
        raise InvalidInputError(
            f"Expected argument `keep` to be a number in (0, 1], but got {keep!r}"
        )
    if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 1:
        raise InvalidInputError(
            f"Expected argument `n_views` to be a positive integer, but got {n_views!r}"
        )
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, numbers.Real)
        or not 0 <= confidence <= 1
    ):
        raise InvalidInputError(
            f"Expected argument `confidence` to be a number in [0, 1], but got {confidence!r}"
        )
    if max_cost is not None and (
        isinstance(max_cost, bool) or not isinstance(max_cost, numbers.Real) or not 0 < max_cost <= 1
    ):
        raise InvalidInputError(
            f"Expected argument `max_cost` to be a number in (0, 1] or None, but got {max_cost!r}"
        )
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise InvalidInputError(
            f"Expected argument `n_boot` to be an integer >= 0, but got {n_boot!r}"
        )


def _tuning(
    threshold: float,
    n_gated: int,
    gated_acc: float,
    *,
    n: int,
    keep: float,
    confidence: float,
    n_views: int,
    reuse_identity: bool,
    plain_acc: float,
    full_acc: float,
) -> GateTuning:
    """The :class:`GateTuning` of gating the ``n_gated`` least confident of ``n`` images."""
    fraction = n_gated / n
    full_lift = full_acc - plain_acc
    gated_lift = gated_acc - plain_acc
    kept = gated_lift / full_lift if full_lift > 0 else 1.0
    return GateTuning(
        threshold=threshold,
        keep=float(keep),
        confidence=float(confidence),
        fraction_gated=fraction,
        forward_passes_per_image=forward_passes(n_views, fraction, reuse_identity)
        if n_gated
        else 1.0,
        n_views=n_views,
        plain_accuracy=plain_acc,
        full_accuracy=full_acc,
        gated_accuracy=gated_acc,
        full_lift=full_lift,
        gated_lift=gated_lift,
        kept_lift=kept,
    )


def _keeps_nll(
    plain: torch.Tensor,
    full_calibrated: torch.Tensor | None,
    labels: torch.Tensor,
    order: torch.Tensor,
    keep_nll: float,
) -> torch.Tensor | bool:
    """``(N + 1,)``: whether each cut keeps ``keep_nll`` of the calibrated policy's NLL reduction
    over the plain softmax (True everywhere when the policy reduces no NLL)."""
    if full_calibrated is None or full_calibrated.shape != plain.shape:
        raise InvalidInputError("Expected `full_calibrated` of the shape of `plain_probs` with `keep_nll`")
    n = plain.shape[0]
    plain_loss = -plain.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-12).log().double()
    full_loss = -full_calibrated.float().gather(1, labels[:, None]).squeeze(1).clamp_min(1e-12).log().double()
    # nll_gain[j] = NLL reduction when the j least confident images get the calibrated policy
    nll_gain = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum((plain_loss - full_loss)[order], 0)]) / n
    if float(nll_gain[-1]) > 0:
        return nll_gain >= keep_nll * float(nll_gain[-1]) - 1e-12
    return True


def _within_budget(
    j: int,
    keeps: torch.Tensor,
    keep_rate: torch.Tensor | None,
    n: int,
    n_views: int,
    reuse_identity: bool,
    max_cost: float,
) -> int:
    """Cut ``j``, or, when it costs more than ``max_cost`` of the full policy's passes, the cut
    within budget that keeps the lift on the most resamples (among those keeping it on the data)."""
    fractions = torch.arange(n + 1, dtype=torch.float64) / n
    cost = torch.tensor([forward_passes(n_views, float(f), reuse_identity) / n_views for f in fractions])
    affordable = torch.nonzero(keeps & (cost <= max_cost + 1e-12)).flatten()
    if cost[j] > max_cost + 1e-12 and len(affordable):
        rates = keep_rate[affordable] if keep_rate is not None else affordable.double()
        j = int(affordable[int(torch.argmax(rates + 1e-9 * affordable.double()))])
    return j


def _bootstrap_keep_rate(delta: torch.Tensor, keep: float, n_boot: int, seed: int) -> torch.Tensor:
    """For each cut j (gate the j least confident images), the share of bootstrap resamples on
    which gating keeps ``keep`` of the resample's full lift.

    ``delta``: ``(N,)`` per-image (full correct - plain correct), in gating order. Resamples where
    the full policy does not help count as kept (there is nothing to lose). Returns ``(N + 1,)``.
    """
    n = delta.shape[0]
    generator = torch.Generator().manual_seed(seed)
    rate = torch.zeros(n + 1, dtype=torch.float64)
    for start in range(0, n_boot, 50):  # bounds memory to 50 x N counts
        b = min(50, n_boot - start)
        index = torch.randint(0, n, (b, n), generator=generator)
        counts = torch.zeros(b, n, dtype=torch.float64).scatter_add_(
            1, index, torch.ones(b, n, dtype=torch.float64)
        )
        gains = torch.cat(
            [torch.zeros(b, 1, dtype=torch.float64), torch.cumsum(counts * delta, 1)], 1
        )
        rate += (gains >= keep * gains[:, -1:] - 1e-9).double().sum(0)
    return rate / n_boot


def _resolve_threshold(policy: Policy, threshold: float | None) -> float:
    """``threshold``, or the policy's stored one, validated."""
    if threshold is None:
        threshold = policy.gate_threshold
        if threshold is None:
            raise InvalidInputError(
                f"policy {policy.name!r} stores no gate_threshold; pass `threshold` (e.g. from tune_gate_threshold)"
            )
    return _check_threshold(threshold)


def _identity_index(policy: Policy) -> int:
    for k, view in enumerate(policy.views):
        if view.is_identity:
            return k
    raise InvalidInputError(
        f"gated TTA needs a policy that holds the identity view (its plain prediction is reused), "
        f"but policy {policy.name!r} holds only {policy.view_names}"
    )


def _check_policy(policy: object) -> Policy:
    if not isinstance(policy, Policy):
        raise InvalidInputError(
            f"Expected argument `policy` to be a ttakit.Policy, but got {type(policy).__name__}"
        )
    return policy


def evaluate_gated_on_cache(
    cache: ViewCache, policy: Policy, threshold: float | None = None, calibrate: bool = False
) -> GatedOutput:
    """Gated prediction computed from cached per-view logits (no model).

    Confident images keep the identity view's softmax; the others get the policy's merge. With
    ``calibrate`` the policy's temperature and matrix scaling are applied to the gated rows' merged
    output, as they are fitted to its merge.

    Args:
        cache: a :class:`ttakit.search.ViewCache` holding every view of ``policy``.
        policy: a policy holding the identity view.
        threshold: the gate; defaults to ``policy.gate_threshold``.
    """
    policy = _check_policy(policy)
    threshold = _resolve_threshold(policy, threshold)
    _identity_index(policy)
    plain_probs = torch.softmax(cache.logits[cache.index("identity")].float(), dim=1)
    full_probs = cache.policy_probs(policy)
    gated = plain_probs.max(dim=1).values < threshold
    if calibrate:
        full_probs = apply_calibration(full_probs, policy)
    probs = torch.where(gated[:, None], full_probs, plain_probs)
    n_gated = int(gated.sum())
    return GatedOutput(
        probs, gated, n_gated, forward_passes(len(policy), n_gated / max(len(gated), 1))
    )
