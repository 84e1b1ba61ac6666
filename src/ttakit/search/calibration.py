"""Temperature scaling and matrix scaling, fitted and applied in one place.

A policy's merged output is a probability vector; its log is a logit vector up to a constant,
so calibrating it is ordinary temperature scaling: ``softmax(log(p) / T)``
(:func:`apply_temperature`, the one implementation, which the engine applies to a policy's
merged output). :func:`fit_temperature` finds the ``T`` minimising the NLL on
validation data. The search fits many temperatures at once (one per candidate merge) with the
vectorised internals below, which hold probabilities class-major ``(V, C, N)``.

After the temperature, :func:`fit_matrix_scaling` fits matrix scaling (Guo et al. 2017):
``softmax(W log(p) + b)`` with a ``(C, C)`` ``W`` pulled toward the identity. Unlike a temperature
it corrects a model's class biases, so it can change the argmax; :func:`compare_matrix_scaling`
keeps it only on at least ``MATRIX_ROWS_PER_NUMBER`` rows per fitted number and when it wins
under 2-fold cross-validation, in NLL and held-out accuracy. It helps a plain model as much as a
policy: reports show both, so a lift is never credited to the views that the matrix made.

Example:
    >>> apply_temperature(torch.tensor([[0.8, 0.2]]), 2.0)
    tensor([[0.6667, 0.3333]])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError
from ..merge import (  # applying lives with merging
    PROB_FLOOR,
    apply_matrix_scaling,
    apply_temperature,
    calibrate,
)
from ._util import SCORE_CHUNK, SingleThread, cm, gather_cm

__all__ = [
    "PROB_FLOOR",
    "apply_temperature",
    "fit_temperature",
    "fit_probs_temperature",
    "apply_matrix_scaling",
    "fit_matrix_scaling",
    "compare_matrix_scaling",
    "apply_calibration",
]

# Per-image NLL is capped where ttakit.metrics.nll clamps probabilities (eps=1e-12), so the
# search optimises the number the reports show, and a few confident mistakes cannot dominate.
NLL_CAP = -math.log(1e-12)
BETA_RANGE = (1e-2, 1e2)  # inverse temperatures searched: T in [0.01, 100]
# The name of the identity with the same calibration as a policy: the no-TTA control in reports.
MATRIX_CONTROL = "none (matrix-scaled)"
MATRIX_L2 = 1e-3  # pull of matrix scaling toward the identity map (per squared entry of W - I)
# Validation rows matrix scaling needs per number it fits (C * C + C): with fewer it fits the
# validation rows' own noise and loses on test though it wins cross-validation
# (test_matrix_scaling_is_refused_on_a_few_hundred_validation_rows; benchmarks/recipes.py).
MATRIX_ROWS_PER_NUMBER = 20


def _check_scores_labels(scores: object, labels: object, name: str, min_classes: int = 1) -> None:
    """``scores``: a finite, non-empty ``(N, C)`` tensor with ``C >= min_classes``; ``labels``: ``(N,)``."""
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] < min_classes:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        wanted = f" with C >= {min_classes}" if min_classes > 1 else ""
        raise InvalidInputError(f"Expected argument `{name}` to be a non-empty (N, C) tensor{wanted}, but got {shape}")
    if not isinstance(labels, torch.Tensor) or labels.shape != scores.shape[:1]:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise InvalidInputError(f"Expected argument `labels` to be a ({scores.shape[0]},) tensor, but got {got}")
    if not torch.isfinite(scores).all():
        raise InvalidInputError(f"Expected argument `{name}` to be finite, but it holds NaN/inf")


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(logits / T)``.

    The NLL is :func:`ttakit.metrics.nll`'s (probabilities floored at 1e-12). For merged
    probabilities pass ``log(probs)``. Safeguarded Newton on ``1 / T`` (the uncapped NLL is
    convex in it); the result lies in ``[0.01, 100]``.

    Args:
        logits: ``(N, C)``.
        labels: ``(N,)`` class indices.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> z = torch.randn(4000, 5) * 3
        >>> y = torch.distributions.Categorical(logits=z / 2).sample()
        >>> round(fit_temperature(z, y), 1)
        2.0
    """
    _check_scores_labels(logits, labels, "logits")
    with SingleThread():
        beta, _ = fit_beta_cm(*shifted_logits(cm(logits.detach())[None], labels.long()))
    return float(1.0 / beta[0])


def fit_probs_temperature(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the NLL of ``softmax(log(probs) / T)`` on held-out ``labels``:
    :func:`fit_temperature` on merged probabilities ``(N, C)`` (in float64, floored at
    :data:`PROB_FLOOR`). The one fit of an ensemble member's temperature."""
    return float(fit_temperature(torch.log(probs.double().clamp_min(PROB_FLOOR)), labels))


# --------------------------------------------------------------------------- vectorised internals


def shifted_log(probs_cm: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``d = log(p / max_c p)`` (``<= 0``, ``(V, C, N)``) and ``d[y]`` ``(V, N)`` of probabilities."""
    top = probs_cm.amax(1, keepdim=True).clamp_min(PROB_FLOOR)
    d = (probs_cm / top).clamp_min_(PROB_FLOOR).log_()
    return d, gather_cm(d, y)


def shifted_logits(logits_cm: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same for logits: ``d = z - max_c z``."""
    d = logits_cm - logits_cm.amax(1, keepdim=True)
    return d, gather_cm(d, y)


def moments(d: torch.Tensor, dy: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """NLL of ``softmax(beta * d)`` over classes and its first two derivatives in beta, per row.

    ``d``: ``(V, C, N)`` log-probabilities shifted so the top class is 0; ``dy``: ``(V, N)``;
    ``beta``: ``(V,)``. Each image's loss is capped at ``-log(1e-12)`` as in
    :func:`ttakit.metrics.nll` (a capped image has zero derivatives). Returns three ``(V,)``
    float64 tensors.
    """
    b = beta.float()
    e = torch.exp(d * b[:, None, None])
    s = e.sum(1)  # (V, N)
    e.mul_(d)
    ed = e.sum(1)
    ed2 = e.mul_(d).sum(1)
    mean_d = ed / s
    var = (ed2 / s - mean_d * mean_d).clamp_min_(0)
    loss = s.log_().sub_(b[:, None] * dy)
    capped = loss > NLL_CAP
    zero = torch.zeros((), dtype=loss.dtype)
    grad = torch.where(capped, zero, mean_d - dy)
    hess = torch.where(capped, zero, var)
    nll = loss.clamp_max_(NLL_CAP).double().mean(1)
    return nll, grad.double().mean(1), hess.double().mean(1)


def per_image_nll(d: torch.Tensor, dy: torch.Tensor, beta: float) -> torch.Tensor:
    """``(V, N)`` capped NLL of ``softmax(beta * d)`` per image (for confidence bounds)."""
    e = torch.exp(d * float(beta)).sum(1)
    return e.log_().sub_(float(beta) * dy).clamp_max_(NLL_CAP)


def fit_beta_cm(
    d: torch.Tensor,
    dy: torch.Tensor,
    beta0: torch.Tensor | float | None = None,
    iters: int = 40,
    rtol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse temperatures minimising the NLL of ``softmax(beta * d[v])``, for every row v at once.

    The uncapped NLL is convex in beta (capping only flattens a few confident mistakes), so a
    safeguarded Newton iteration (bisection inside a bracket kept by the sign of the gradient)
    converges from any start. Returns ``(beta, nll)``, ``(V,)`` float64, beta in ``[0.01, 100]``.
    """
    rows = d.shape[0]
    lo = torch.full((rows,), BETA_RANGE[0], dtype=torch.float64)
    hi = torch.full((rows,), BETA_RANGE[1], dtype=torch.float64)
    if beta0 is None:
        beta = torch.ones(rows, dtype=torch.float64)
    else:
        beta = torch.as_tensor(beta0, dtype=torch.float64).expand(rows).clone()
    beta = beta.clamp(BETA_RANGE[0] * 1.001, BETA_RANGE[1] * 0.999)
    for _ in range(iters):
        nll, grad, hess = moments(d, dy, beta)
        rising = grad > 0
        hi = torch.where(rising, beta, hi)
        lo = torch.where(rising, lo, beta)
        newton = beta - grad / hess.clamp_min(1e-12)
        bad = (hess <= 1e-12) | ~torch.isfinite(newton) | (newton <= lo) | (newton >= hi)
        new = torch.where(bad, torch.sqrt(lo * hi), newton)
        if bool(((new - beta).abs() <= rtol * beta).all()):
            return beta, nll  # converged: the beta the NLL was evaluated at
        beta = new
    return beta, moments(d, dy, beta)[0]


def fit_chunked(
    make: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
    rows: int,
    beta0: float | None = None,
    rtol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fit_beta_cm` over ``rows`` rows, ``make(start, stop) -> (d, dy)`` built per chunk."""
    betas, nlls = [], []
    for start in range(0, rows, SCORE_CHUNK):
        d, dy = make(start, min(start + SCORE_CHUNK, rows))
        beta, nll = fit_beta_cm(d, dy, beta0, rtol=rtol)
        betas.append(beta)
        nlls.append(nll)
    return torch.cat(betas), torch.cat(nlls)


def scores(probs: torch.Tensor, y: torch.Tensor, beta0: float | None = None) -> dict[str, float]:
    """accuracy, raw NLL and temperature-scaled NLL (and the temperature) of merged probabilities
    ``(N, C)``. Probabilities are renormalised first (a ``max`` merge does not sum to 1)."""
    p = probs.float()
    p = p / p.sum(1, keepdim=True).clamp_min(PROB_FLOOR)
    beta, nll_ts = fit_beta_cm(*shifted_log(cm(p)[None], y), beta0)
    picked = p.gather(1, y[:, None]).squeeze(1)
    return {
        "accuracy": float((p.argmax(1) == y).double().mean()),
        "nll": float(-picked.clamp_min(1e-12).log().double().mean()),
        "nll_ts": float(nll_ts[0]),
        "temperature": float(1.0 / beta[0]),
    }


def held_out_nll(probs: torch.Tensor, y: torch.Tensor, fit: torch.Tensor, held: torch.Tensor) -> float:
    """NLL on ``held`` of ``probs (N, C)`` temperature-scaled with a temperature fitted on ``fit``."""
    beta, _ = fit_beta_cm(*shifted_log(cm(probs[fit])[None], y[fit]))
    d, dy = shifted_log(cm(probs[held])[None], y[held])
    return float(moments(d, dy, beta)[0][0])


# --------------------------------------------------------------------------- matrix scaling


def apply_calibration(probs: torch.Tensor, policy: Any) -> torch.Tensor:
    """``(N, C)`` merged probabilities as a policy's calibration leaves them: its temperature,
    then its matrix scaling (either may be None)."""
    return calibrate(probs, policy.temperature, policy.matrix_scaling)


def _fit_matrix(logp: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` minimising the mean NLL of ``softmax(logp @ W.T + b) + l2 * |W - I|^2``
    (L-BFGS, float64). ``logp``: ``(N, C)`` log-probabilities."""
    c = logp.shape[1]
    x = logp.double()
    eye = torch.eye(c, dtype=torch.float64)
    delta = torch.zeros(c, c, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([delta, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ (eye + delta).T + bias, y) + l2 * (delta * delta).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (eye + delta).detach(), bias.detach()


def _log(probs: torch.Tensor) -> torch.Tensor:
    return probs.double().clamp_min(PROB_FLOOR).log()


def fit_matrix_scaling(
    probs: torch.Tensor, labels: torch.Tensor, *, l2: float = MATRIX_L2, max_iter: int = 100
) -> dict[str, list]:
    """Matrix scaling for merged, already temperature-scaled probabilities ``probs`` ``(N, C)``.

    Returns ``{"weight": C lists of C floats, "bias": C floats}`` minimising the NLL of
    ``softmax(W log(p) + b)`` on ``labels`` plus ``l2 * |W - I|^2`` (the identity map: a large
    ``l2`` leaves ``probs`` as they are), ready for :attr:`ttakit.Policy.matrix_scaling`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> y = torch.randint(0, 3, (3000,))
        >>> z = torch.randn(3000, 3) + 2.0 * torch.nn.functional.one_hot(y, 3)
        >>> p = torch.softmax(z + torch.tensor([1.5, 0.0, 0.0]), 1)  # a model biased toward class 0
        >>> fitted = fit_matrix_scaling(p, y)
        >>> before = (p.argmax(1) == y).float().mean()
        >>> after = (apply_matrix_scaling(p, fitted["weight"], fitted["bias"]).argmax(1) == y).float().mean()
        >>> bool(after > before)
        True
    """
    _check_scores_labels(probs, labels, "probs", min_classes=2)
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not l2 >= 0:
        raise InvalidInputError(f"Expected argument `l2` to be a number >= 0, but got {l2!r}")
    with SingleThread():
        weight, bias = _fit_matrix(_log(probs), labels.long(), float(l2), int(max_iter))
    return {"weight": weight.tolist(), "bias": bias.tolist()}


def compare_matrix_scaling(
    merged: torch.Tensor, y: torch.Tensor, temperature: float | None, *, seed: int, accuracy_floor: float
) -> dict[str, Any]:
    """Temperature alone vs temperature then matrix scaling, by 2-fold cross-validation.

    ``merged`` ``(N, C)``: a policy's merged probabilities before calibration, over the rows the
    calibration applies to. In each fold the temperature is refitted on the fitting half and the
    matrix fitted after it; both are scored on the other half, so every row is scored once by a
    fit that did not see it. Matrix scaling is ``used`` only if all of these hold:

    - there are at least ``MATRIX_ROWS_PER_NUMBER`` rows per number it fits (C * C + C): on
      fewer, a matrix can win both halves of a split and still lose on new data;
    - its held-out NLL beats the temperature's by more than 1e-4, and its held-out accuracy is
      at least the temperature's;
    - its accuracy on all the rows (fitted there, after ``temperature``) is at least
      ``accuracy_floor``.

    ``matrix_scaling`` then holds the matrix fitted on all the rows, ready for
    :attr:`ttakit.Policy.matrix_scaling`.
    """
    n = int(y.shape[0])
    out: dict[str, Any] = {"cv_nll_temperature": None, "cv_nll_matrix": None, "used": False, "matrix_scaling": None}
    if n < 40:  # too few rows to fit C * C + C numbers and judge them
        return out
    y = y.long()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    folds = [perm[: n // 2], perm[n // 2 :]]
    nll = {"temperature": torch.empty(n, dtype=torch.float64), "matrix": torch.empty(n, dtype=torch.float64)}
    hits = {"temperature": 0, "matrix": 0}
    with SingleThread():
        for fit, held in ((folds[0], folds[1]), (folds[1], folds[0])):
            t = fit_temperature(_log(merged[fit]).float(), y[fit])
            scaled = _log(apply_temperature(merged, t))
            weight, bias = _fit_matrix(scaled[fit], y[fit], MATRIX_L2, 100)
            for name, logits in (("temperature", scaled[held]), ("matrix", scaled[held] @ weight.T + bias)):
                nll[name][held] = F.cross_entropy(logits, y[held], reduction="none")
                hits[name] += int((logits.argmax(1) == y[held]).sum())
        calibrated = apply_temperature(merged, temperature)
        weight, bias = _fit_matrix(_log(calibrated), y, MATRIX_L2, 100)
    accuracy = float(((_log(calibrated) @ weight.T + bias).argmax(1) == y).double().mean())
    gain = nll["temperature"] - nll["matrix"]  # per row, > 0 where the matrix helps
    c = int(merged.shape[1])
    needed = MATRIX_ROWS_PER_NUMBER * c * (c + 1)
    reasons = []
    if n < needed:
        reasons.append(f"{n} rows for {c * (c + 1)} numbers (needs {needed})")
    if not float(gain.mean()) > 1e-4:
        reasons.append("no better held-out NLL")
    if hits["matrix"] < hits["temperature"]:
        reasons.append("lower held-out accuracy")
    if accuracy < accuracy_floor - 1e-12:
        reasons.append("lower accuracy than the merged views")
    used = not reasons
    out.update(
        {
            "cv_nll_temperature": float(nll["temperature"].mean()),
            "cv_nll_matrix": float(nll["matrix"].mean()),
            "cv_nll_gain_se": float(gain.std() / math.sqrt(n)),
            "cv_accuracy_temperature": hits["temperature"] / n,
            "cv_accuracy_matrix": hits["matrix"] / n,
            "accuracy_matrix": accuracy,
            "used": used,
            "not_used_because": "; ".join(reasons) or None,
            "matrix_scaling": {"weight": weight.tolist(), "bias": bias.tolist()} if used else None,
        }
    )
    return out
