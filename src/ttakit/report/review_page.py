"""The audit's review page: one self-contained ``review.html`` to look at flagged images and decide.

Everything is in the one file (thumbnails as PNG data URIs, the script and the styles inline; no
server, no network, no CDN), so it opens from disk on the machine that ran the audit or after being
copied off it. The skeleton, the styles and the script are package data next to this module
(``review_page.html``, ``review_page.css``, ``review_page.js``), inlined at write time.

The page lists the flagged images in order of the audit's score (the default method: the practitioner's rule on the probability of every class but the label,
``mislabel_by="others"``, which ``benchmarks/audit.py`` measures best on flipped labels; the rule
on the top class and confident learning are filters and columns), with filters by method, reason,
given and suggested class, a counter of the decided and left images under the current filters
(and of all flagged images), and decisions by click or keyboard (keep, relabel, remove, undo) that
survive a reload (``localStorage`` keyed by the audit run) and export as ``decisions.csv``, which
:func:`ttakit.jobs.audit_apply.apply_decisions` (``ttakit audit-apply``) applies.

Each image gets one reason:

* ``mislabelled`` (likely mislabelled): a method (the rule, on ``1 - p[label]`` or on the top
  class, or confident learning) flags it as mislabelled;
* ``ambiguous`` (between two classes): the rule flags it as ambiguous (its top probability lies in
  ``ambiguous_range``, 0.5-0.6) and no method as mislabelled;
* ``outlier`` (no class fits): no method flags it, yet the model's top probability is below
  ``outlier_below`` (0.4): no class, not even the best one, gets as much as 0.4, so the model
  spreads its belief over three or more classes (with the ambiguous band starting at 0.5, an image
  between just two classes scores higher). Typically an image of none of the classes, a damaged or
  mostly empty one. The suggestion is the top class (the runner-up when that is the label); outliers
  come after the other reasons, least sure first, and are shown under the default method.

Example:
    >>> import torch
    >>> probs = torch.tensor([[0.97, 0.03], [0.55, 0.45], [0.1, 0.9]])
    >>> entries = review_entries(probs, torch.tensor([1, 0, 1]), methods=("others", "top"))
    >>> [(e["row"], e["reason"], e["suggested"]) for e in entries]
    [(0, 'mislabelled', 0), (1, 'ambiguous', 1)]
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_text
from ..errors import InvalidInputError

__all__ = ["REVIEW_METHODS", "review_entries", "review_page_html", "thumbnail_data_uri", "write_review_page"]

#: Methods the page shows, the default first: the rule on 1 - p[label] ("others"), the rule on the
#: top class ("top"), confident learning ("cleanlab").
REVIEW_METHODS = ("others", "top", "cleanlab")
_REASON_ORDER = {"mislabelled": 0, "ambiguous": 1, "outlier": 2}


def thumbnail_data_uri(image: torch.Tensor) -> str:
    """``(C, H, W)`` in ``[0, 1]`` -> a ``data:image/png;base64,...`` URI (grey for C = 1, RGB for
    C >= 3, first channel otherwise)."""
    from PIL import Image

    x = image.detach().float().cpu().clamp(0, 1)
    if x.ndim != 3:
        raise InvalidInputError(f"Expected an image of shape (C, H, W), but got shape {tuple(x.shape)}")
    pixels = (x * 255).round().to(torch.uint8)
    if pixels.shape[0] >= 3:
        picture = Image.fromarray(pixels[:3].permute(1, 2, 0).numpy(), "RGB")
    else:
        picture = Image.fromarray(pixels[0].numpy(), "L")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def review_entries(
    probs: torch.Tensor,
    labels: torch.Tensor,
    *,
    methods: Sequence[str] = REVIEW_METHODS,
    mislabel_threshold: float = 0.9,
    ambiguous_range: tuple[float, float] = (0.5, 0.6),
    outlier_below: float | None = 0.4,
    plain_probs: torch.Tensor | None = None,
    view_probs: dict[str, torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """One entry per flagged image, in the page's order.

    Args:
        probs: ``(N, C)`` out-of-sample (TTA) probabilities.
        labels: ``(N,)`` the given labels.
        methods: which flags to compute, of :data:`REVIEW_METHODS`.
        outlier_below: an image no method flags whose top probability is below this is an
            ``outlier`` (no class fits it; see the module's docstring); None: no outliers.
        plain_probs: ``(N, C)`` probabilities without TTA; shown as a vote when its top class differs.
        view_probs: view name -> each TTA view's ``(N, C)`` probabilities (or logits), or its
            ``(N,)`` top classes (what the audit keeps); shown when the views disagree.

    Returns:
        Dicts with ``pos`` (position in ``probs``), ``row`` (= ``pos``; callers map it), ``given``,
        ``suggested``, ``probability`` (of ``suggested``), ``given_probability`` (of ``given``), ``reason`` (``mislabelled``,
        ``ambiguous``, ``outlier``), ``score``, ``flags`` (methods that flagged it), ``views``
        (``[[view name, class], ...]`` when the TTA views disagree, else empty), ``votes``
        (``[["no TTA", class], ["TTA", class]]`` when plain inference disagrees with the TTA
        probabilities, else empty), ``flag_kinds`` (method -> its kind). Order: mislabelled by
        ``1 - p[given]`` (highest first), ambiguous by the margin of the two top classes (smallest
        first), outliers by top probability (lowest first).
    """
    from ..label_issues import flag_issues

    unknown = [m for m in methods if m not in REVIEW_METHODS]
    if unknown:
        from ..errors import unknown_name

        raise unknown_name("review method", unknown[0], REVIEW_METHODS)
    p = probs.detach().float().cpu()
    y = labels.detach().long().cpu()
    flags: dict[int, dict[str, Any]] = {}

    def add(row: int, method: str, kind: str, suggested: int) -> None:
        entry = flags.setdefault(row, {"flags": [], "kinds": set(), "suggested": {}, "by": {}})
        if method not in entry["flags"]:
            entry["flags"].append(method)
        entry["by"].setdefault(method, kind)
        entry["kinds"].add(kind)
        entry["suggested"].setdefault(kind, suggested)

    for method in methods:
        if method == "cleanlab":
            if len(torch.unique(y)) < 2:
                continue
            found = flag_issues(p, y, methods=("cleanlab",))
        else:
            found = flag_issues(p, y, methods=("rule",), mislabel_threshold=mislabel_threshold,
                                ambiguous_range=ambiguous_range, mislabel_by=method)
        for issue in found:
            add(issue.row, method, issue.kind, issue.suggested)
    top_p, top = p.max(dim=1)
    if outlier_below is not None:
        for row in torch.nonzero(top_p < float(outlier_below)).flatten().tolist():
            if row not in flags:
                add(row, "outlier", "outlier", int(top[row]) if int(top[row]) != int(y[row]) else _second(p[row], int(y[row])))
    plain_top = plain_probs.detach().float().cpu().argmax(dim=1) if plain_probs is not None else None
    view_tops = {}
    for name, v in (view_probs or {}).items():
        v = v.detach().cpu()
        if v.shape[0] != p.shape[0] or v.ndim not in (1, 2):
            raise InvalidInputError(
                f"Expected view {name!r} to hold (N,) classes or (N, C) probabilities with N = {p.shape[0]}, "
                f"but got shape {tuple(v.shape)}"
            )
        view_tops[name] = v.long() if v.ndim == 1 else v.float().argmax(dim=1)
    entries = []
    for row, info in flags.items():
        given = int(y[row])
        kinds = info["kinds"]
        reason = "mislabelled" if "mislabelled" in kinds else ("ambiguous" if "ambiguous" in kinds else "outlier")
        suggested = int(info["suggested"][reason])
        if reason == "mislabelled":
            score = 1.0 - float(p[row, given])
        elif reason == "ambiguous":
            two = torch.topk(p[row], 2).values
            score = -float(two[0] - two[1])
        else:
            score = -float(top_p[row])
        views: list[list[Any]] = []
        if view_tops:
            named = [[name, int(t[row])] for name, t in view_tops.items()]
            if len({c for _, c in named}) > 1:
                views = named
        votes: list[list[Any]] = []
        if plain_top is not None and int(plain_top[row]) != int(top[row]):
            votes = [["no TTA", int(plain_top[row])], ["TTA", int(top[row])]]
        entries.append({
            "pos": row, "row": row, "given": given, "suggested": suggested,
            "probability": round(float(p[row, suggested]), 4), "reason": reason, "score": round(score, 6),
            "given_probability": round(float(p[row, given]), 4),
            "flags": [m for m in (*REVIEW_METHODS, "outlier") if m in info["flags"]], "votes": votes, "views": views,
            "flag_kinds": {m: k for m, k in info["by"].items()},
        })
    entries.sort(key=lambda e: (_REASON_ORDER[e["reason"]], -e["score"], e["pos"]))
    return entries


def _legend(mislabel_threshold: float, ambiguous_range: tuple[float, float], outlier_below: float | None) -> str:
    """The page's one-line definition of the three reasons."""
    lo, hi = ambiguous_range
    text = (
        f"Reasons: likely mislabelled = a method says so (rule: another class is on top and "
        f"1 - p(label) > {mislabel_threshold:g}, or with the rule on the top class p(top) > {mislabel_threshold:g}; "
        f"or confident learning); ambiguous between two classes = top probability in {lo:g}-{hi:g}; "
    )
    if outlier_below is None:
        return text + "outlier: not computed for this audit."
    return text + (
        f"outlier (no class fits) = no method flags it, yet no class gets even p = {outlier_below:g}: the model "
        "spreads its belief over three or more classes (an image of none of the classes, damaged or empty?)."
    )


def _second(p: torch.Tensor, exclude: int) -> int:
    q = p.clone()
    q[exclude] = -1.0
    return int(q.argmax())


def review_page_html(
    items: Sequence[dict[str, Any]],
    classes: Sequence[str],
    *,
    run_id: str,
    title: str = "ttakit audit: review",
    subtitle: str = "",
    default_method: str = "others",
    methods: Sequence[str] = REVIEW_METHODS,
    mislabel_threshold: float = 0.9,
    ambiguous_range: tuple[float, float] = (0.5, 0.6),
    outlier_below: float | None = 0.4,
) -> str:
    """The page as one HTML string.

    Args:
        items: entries as :func:`review_entries` returns them, each with ``img`` (a data URI),
            ``row`` (the row in the data as given) and optionally ``file``.
        run_id: keys the browser storage of the decisions (one audit run, one set of decisions).
        default_method: the method the page opens on (the audit's: ``others``, ``top`` or
            ``cleanlab``); ``methods`` the ones in its menu.
        mislabel_threshold, ambiguous_range, outlier_below: the rules' bounds, for the page's
            legend of the reasons.
    """
    methods = [m for m in REVIEW_METHODS if m in methods]
    if default_method not in methods:
        from ..errors import unknown_name

        raise unknown_name("review method", default_method, methods)
    data = {
        "run": str(run_id),
        "classes": [str(c) for c in classes],
        "methods": methods,
        "defaultMethod": default_method,
        "items": [
            {
                "row": int(it["row"]), "file": it.get("file") or "", "img": it.get("img", ""),
                "given": int(it["given"]), "sug": int(it["suggested"]), "p": float(it["probability"]),
                "pGiven": it.get("given_probability"),  # None (null) for entries made without it
                "reason": it["reason"], "flags": list(it.get("flags", [])), "votes": list(it.get("votes", [])),
                "views": list(it.get("views", [])),
                "kinds": dict(it.get("flag_kinds", {})),
            }
            for it in items
        ],
    }
    # JSON inside <script>: "</" and "<!--" must not appear literally.
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")
    # The skeleton, the styles and the script are package data (review_page.html, .css, .js), inlined.
    return (
        _asset("review_page.html").replace("%%TITLE%%", html.escape(title))
        .replace("%%SUBTITLE%%", html.escape(subtitle))
        .replace("%%LEGEND%%", html.escape(_legend(mislabel_threshold, ambiguous_range, outlier_below)))
        .replace("%%STYLE%%", _asset("review_page.css"))
        .replace("%%SCRIPT%%", _asset("review_page.js"))
        .replace("%%DATA%%", payload)
    )


def write_review_page(
    path: str | os.PathLike,
    images: torch.Tensor,
    probs: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[str],
    *,
    rows: Sequence[int] | None = None,
    files: Sequence[str] | None = None,
    plain_probs: torch.Tensor | None = None,
    view_probs: dict[str, torch.Tensor] | None = None,
    methods: Sequence[str] = REVIEW_METHODS,
    default_method: str = "others",
    mislabel_threshold: float = 0.9,
    ambiguous_range: tuple[float, float] = (0.5, 0.6),
    outlier_below: float | None = 0.4,
    title: str = "ttakit audit: review",
    subtitle: str = "",
    run: str = "",
) -> Path:
    """Write ``review.html`` for the images ``probs`` flags (see :func:`review_entries`).

    Args:
        images: ``(N, C, H, W)`` in ``[0, 1]``, in the order of ``probs``.
        rows: the row of each image in the data as given (default ``0..N-1``).
        files: each image's path, for image folders.
        view_probs: each TTA view's probabilities or top classes (:func:`review_entries`).
        default_method: the method the page opens on: the audit's (``mislabel_by``, or
            ``cleanlab`` when the rule is off), so the page agrees with ``issues.csv``.
        run: text identifying the audit run (model, data, split, ...); with the flags it keys the
            browser storage, so decisions of one run never show up in another's page.
    """
    if images.shape[0] != probs.shape[0]:
        raise InvalidInputError(
            f"Expected `images` and `probs` to have the same number of rows, but got {images.shape[0]} and {probs.shape[0]}"
        )
    entries = review_entries(probs, labels, methods=methods, mislabel_threshold=mislabel_threshold,
                             ambiguous_range=ambiguous_range, outlier_below=outlier_below, plain_probs=plain_probs,
                             view_probs=view_probs)
    for entry in entries:
        pos = entry["pos"]
        entry["row"] = int(rows[pos]) if rows is not None else pos
        entry["file"] = str(files[pos]) if files is not None else ""
        entry["img"] = thumbnail_data_uri(images[pos])
    digest = hashlib.sha256()
    digest.update(str(run).encode())
    for entry in entries:
        digest.update(f"{entry['row']}|{entry['file']}|{entry['given']}|{entry['suggested']};".encode())
    html_text = review_page_html(entries, classes, run_id=digest.hexdigest()[:16], title=title, subtitle=subtitle,
                                 default_method=default_method, methods=methods, mislabel_threshold=mislabel_threshold,
                                 ambiguous_range=ambiguous_range, outlier_below=outlier_below)
    return atomic_write_text(path, html_text)


def _asset(name: str) -> str:
    """The text of one of the page's package-data files (next to this module), read at write time."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
