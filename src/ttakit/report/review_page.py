"""The audit's review page: one self-contained ``review.html`` to look at flagged images and decide.

Everything is in the one file (thumbnails as PNG data URIs, the script and the styles inline; no
server, no network, no CDN), so it opens from disk on the machine that ran the audit or after being
copied off it. The page lists the flagged images in order of the audit's score (the default
method: the practitioner's rule on the probability of every class but the label,
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
    return (
        _TEMPLATE.replace("%%TITLE%%", html.escape(title))
        .replace("%%SUBTITLE%%", html.escape(subtitle))
        .replace("%%LEGEND%%", html.escape(_legend(mislabel_threshold, ambiguous_range, outlier_below)))
        .replace("%%STYLE%%", _STYLE)
        .replace("%%SCRIPT%%", _SCRIPT)
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


_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%%TITLE%%</title>
<style>%%STYLE%%</style>
</head>
<body>
<header id="top">
  <h1>%%TITLE%%</h1>
  <p class="sub">%%SUBTITLE%%</p>
  <div class="bar">
    <label>method <select id="f-method"></select></label>
    <label>reason <select id="f-reason"></select></label>
    <label>given <select id="f-given"></select></label>
    <label>suggested <select id="f-suggested"></select></label>
    <label>show <select id="f-status"><option value="all">all</option><option value="undecided">undecided</option>
      <option value="decided">decided</option></select></label>
    <span class="counter" title="decided and left: the images matching method, reason, given and suggested; shown: the cards listed (after show)">
      <b id="n-decided">0</b> decided, <b id="n-left">0</b> left, <b id="n-shown">0</b> shown
      <span class="total">&middot; all <span id="n-total">0</span> listed: <span id="n-total-decided">0</span> decided,
      <span id="n-total-left">0</span> left</span></span>
    <button id="undo" type="button" title="u or Ctrl+Z">Undo</button>
    <button id="export" type="button">Export decisions.csv</button>
  </div>
  <p class="keys">Keys: <kbd>&darr;</kbd>/<kbd>j</kbd> next, <kbd>&uarr;</kbd>/<kbd>p</kbd> previous,
    <kbd>k</kbd> keep, <kbd>r</kbd> relabel to the suggested class, <kbd>0</kbd>-<kbd>9</kbd> relabel to class
    0-9, <kbd>x</kbd>/<kbd>Delete</kbd> remove, <kbd>u</kbd> undo. Decisions are kept in this browser for
    this audit run; export them and run <code>ttakit audit-apply decisions.csv --data DATA --out DIR</code>.</p>
</header>
<p class="legend">%%LEGEND%%</p>
<main id="list" aria-live="polite"></main>
<div id="sentinel"></div>
<p id="empty" hidden>Nothing flagged matches these filters.</p>
<script id="review-data" type="application/json">%%DATA%%</script>
<script>%%SCRIPT%%</script>
</body>
</html>
"""

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f6f4;color:#222}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ccc;padding:8px 16px;z-index:2}
h1{font-size:18px;margin:0}.sub{margin:2px 0 6px;color:#555}.keys{margin:4px 0 0;color:#555;font-size:12px}
.legend{margin:8px 16px 0;color:#444;font-size:12px}
.total{color:#555}
.bar{display:flex;flex-wrap:wrap;gap:10px;align-items:center}.counter{margin-left:auto}
select,button{font:inherit}button{cursor:pointer}
kbd{border:1px solid #aaa;border-radius:3px;padding:0 3px;background:#fafafa;font-size:11px}
main{padding:8px 16px;display:flex;flex-direction:column;gap:6px}
.card{display:flex;gap:12px;background:#fff;border:1px solid #ddd;border-left:6px solid #bbb;padding:6px;scroll-margin-top:calc(var(--head, 170px) + 8px);
  content-visibility:auto;contain-intrinsic-size:auto 100px}
.card.r-mislabelled{border-left-color:#b2182b}.card.r-ambiguous{border-left-color:#e08214}
.card.r-outlier{border-left-color:#5e3c99}
.card.focus{outline:3px solid #2a7ab9}
.thumb{width:84px;height:84px;image-rendering:pixelated;background:#000;flex:none}
.card.focus .thumb{width:224px;height:224px}
.info{display:flex;flex-direction:column;gap:3px;min-width:0}
.where{color:#555;font-size:12px;overflow-wrap:anywhere}
.reason{font-weight:600}.r-mislabelled .reason{color:#b2182b}.r-ambiguous .reason{color:#b35806}
.r-outlier .reason{color:#5e3c99}.flags,.votes,.views{font-size:12px;color:#444}.views{color:#7a4b00}
.actions{display:flex;gap:6px;flex-wrap:wrap}
.decision{font-weight:600}.d-keep .decision{color:#1a7f37}.d-relabel .decision{color:#2a7ab9}
.d-remove .decision{color:#b2182b}.d-remove .thumb{opacity:.35}
"""

_SCRIPT = r"""
(function () {
"use strict";
var D = JSON.parse(document.getElementById("review-data").textContent);
var C = D.classes, items = D.items, KEY = "ttakit-review:" + D.run, CHUNK = 40;
var REASONS = {mislabelled: "likely mislabelled", ambiguous: "ambiguous between two classes",
  outlier: "outlier (no class fits)"};
var state = load(), view = [], rendered = 0, focus = -1, cards = {};
var list = document.getElementById("list");
function keyOf(it) { return it.file ? "f:" + it.file : "r:" + it.row; }
function load() {
  try { var s = JSON.parse(localStorage.getItem(KEY)); if (s && s.decisions) { return s; } } catch (e) {}
  return {decisions: {}, undo: []};
}
function save() { try { localStorage.setItem(KEY, JSON.stringify(state)); } catch (e) {} }
function el(tag, cls, text) {
  var e = document.createElement(tag); if (cls) { e.className = cls; }
  if (text !== undefined) { e.textContent = text; } return e;
}
function fillSelect(id, options, value) {
  var s = document.getElementById(id);
  options.forEach(function (o) { var opt = el("option", "", o[1]); opt.value = o[0]; s.appendChild(opt); });
  s.value = value; s.addEventListener("change", applyFilters);
}
var classOptions = [["all", "all"]].concat(C.map(function (c, i) { return [String(i), i + ": " + c]; }));
fillSelect("f-method", [["any", "any method"]].concat(D.methods.map(function (m) {
  return [m, m === "others" ? "rule: 1 - p(label) (default)" : (m === "top" ? "rule: top class" : m)]; })),
  D.defaultMethod);
fillSelect("f-reason", [["all", "all"], ["mislabelled", "likely mislabelled"], ["ambiguous", "ambiguous"],
  ["outlier", "outlier"]], "all");
fillSelect("f-given", classOptions, "all");
fillSelect("f-suggested", classOptions, "all");
document.getElementById("f-status").addEventListener("change", applyFilters);
function val(id) { return document.getElementById(id).value; }
function filters() {
  return {m: val("f-method"), r: val("f-reason"), g: val("f-given"), s: val("f-suggested"), st: val("f-status")};
}
// Every filter but "show": the images the counter counts as decided and left.
function inScope(it, f) {
  if (f.m !== "any" && it.flags.indexOf(f.m) < 0 && !(it.reason === "outlier" && f.m === D.defaultMethod)) {
    return false;
  }
  if (f.r !== "all" && it.reason !== f.r) { return false; }
  if (f.g !== "all" && String(it.given) !== f.g) { return false; }
  if (f.s !== "all" && String(it.sug) !== f.s) { return false; }
  return true;
}
function matches(it, f) {
  if (!inScope(it, f)) { return false; }
  var st = f.st, decided = !!state.decisions[keyOf(it)];
  if (st === "undecided" && decided) { return false; }
  if (st === "decided" && !decided) { return false; }
  return true;
}
// Focused cards scroll clear of the sticky header, whatever its height.
function headHeight() {
  document.documentElement.style.setProperty("--head", document.getElementById("top").offsetHeight + "px");
}
window.addEventListener("resize", headHeight);
headHeight();
function applyFilters() {
  view = [];
  var f = filters();
  for (var i = 0; i < items.length; i++) { if (matches(items[i], f)) { view.push(i); } }
  list.textContent = ""; cards = {}; rendered = 0; focus = -1;
  window.scrollTo(0, 0);  // a new list starts at its top
  renderMore();
  document.getElementById("empty").hidden = view.length > 0;
  counter();
  if (view.length) { setFocus(0, false); }
}
function renderMore() {
  var end = Math.min(view.length, rendered + CHUNK), frag = document.createDocumentFragment();
  for (var k = rendered; k < end; k++) { frag.appendChild(makeCard(view[k], k)); }
  list.appendChild(frag); rendered = end;
}
function ensureRendered(k) { while (rendered <= k && rendered < view.length) { renderMore(); } }
function makeCard(i, k) {
  var it = items[i], card = el("article", "card r-" + it.reason);
  card.dataset.i = i; card.dataset.k = k; card.id = "item-" + i;
  var img = el("img", "thumb"); img.src = it.img; img.alt = "row " + it.row; img.decoding = "async";
  card.appendChild(img);
  var info = el("div", "info");
  info.appendChild(el("div", "where", "#" + (k + 1) + " \u00b7 row " + it.row + (it.file ? " \u00b7 " + it.file : "")));
  var lab = el("div", "labels");
  lab.appendChild(document.createTextNode("given "));
  lab.appendChild(el("b", "given", C[it.given]));
  lab.appendChild(document.createTextNode(" \u2192 suggested "));
  lab.appendChild(el("b", "suggested", C[it.sug]));
  // The default rule judges p(given label): show it beside the suggestion's p.
  lab.appendChild(document.createTextNode(" (p = " + it.p.toFixed(2) +
    (typeof it.pGiven === "number" ? "; p(given) = " + it.pGiven.toFixed(2) : "") + ")"));
  info.appendChild(lab);
  info.appendChild(el("div", "reason", REASONS[it.reason]));
  info.appendChild(el("div", "flags", it.reason === "outlier" ? "flagged by: no method (the outlier rule)" :
    "flagged by: " + it.flags.map(function (m) {
      return it.kinds[m] && it.kinds[m] !== it.reason ? m + " (" + it.kinds[m] + ")" : m; }).join(", ")));
  if (it.views.length) {
    info.appendChild(el("div", "views", "views: " + it.views.map(function (v) {
      return v[0] + " \u2192 " + C[v[1]]; }).join(", ")));
  }
  if (it.votes.length) {
    info.appendChild(el("div", "votes", "with and without TTA: " + it.votes.map(function (v) {
      return v[0] + " \u2192 " + C[v[1]]; }).join(", ")));
  }
  var act = el("div", "actions");
  [["keep", "Keep (k)"], ["relabel", "Relabel to " + C[it.sug] + " (r)"], ["remove", "Remove (x)"]].forEach(
    function (a) { var b = el("button", "act-" + a[0], a[1]); b.type = "button"; b.dataset.act = a[0]; act.appendChild(b); });
  var sel = el("select", "relabel-any"); sel.dataset.act = "relabel-any";
  var first = el("option", "", "relabel to\u2026"); first.value = ""; sel.appendChild(first);
  C.forEach(function (c, ci) { var o = el("option", "", ci + ": " + c); o.value = String(ci); sel.appendChild(o); });
  act.appendChild(sel);
  info.appendChild(act);
  info.appendChild(el("div", "decision"));
  card.appendChild(info);
  cards[i] = card; paint(i);
  return card;
}
function describe(d) {
  if (!d) { return ""; }
  return d.d === "relabel" ? "decided: relabel to " + C[d.to] : "decided: " + d.d;
}
function paint(i) {
  var card = cards[i]; if (!card) { return; }
  var d = state.decisions[keyOf(items[i])];
  card.classList.remove("d-keep", "d-relabel", "d-remove");
  if (d) { card.classList.add("d-" + d.d); }
  card.querySelector(".decision").textContent = describe(d);
}
function counter() {
  var all = 0, scope = 0, decided = 0, f = filters();
  for (var i = 0; i < items.length; i++) {
    var d = !!state.decisions[keyOf(items[i])];
    if (d) { all++; }
    if (inScope(items[i], f)) { scope++; if (d) { decided++; } }
  }
  function put(id, v) { document.getElementById(id).textContent = v; }
  put("n-decided", decided); put("n-left", scope - decided); put("n-shown", view.length);
  put("n-total", items.length); put("n-total-decided", all); put("n-total-left", items.length - all);
}
function setFocus(k, scroll) {
  if (k < 0 || k >= view.length) { return; }
  ensureRendered(k);
  if (focus >= 0 && cards[view[focus]]) { cards[view[focus]].classList.remove("focus"); }
  focus = k;
  var card = cards[view[k]]; card.classList.add("focus");
  if (scroll !== false) { card.scrollIntoView({block: "nearest"}); }
}
function decide(i, d, to) {
  var key = keyOf(items[i]);
  state.undo.push([key, state.decisions[key] || null]);
  if (state.undo.length > 5000) { state.undo.shift(); }
  state.decisions[key] = d === "relabel" ? {d: d, to: to} : {d: d};
  save(); paint(i); counter();
  var k = view.indexOf(i);
  if (k >= 0 && k === focus) { setFocus(k + 1); }
}
function undo() {
  var last = state.undo.pop(); if (!last) { return; }
  if (last[1]) { state.decisions[last[0]] = last[1]; } else { delete state.decisions[last[0]]; }
  save();
  for (var i = 0; i < items.length; i++) {
    if (keyOf(items[i]) === last[0]) { paint(i); var k = view.indexOf(i); if (k >= 0) { setFocus(k); } break; }
  }
  counter();
}
list.addEventListener("click", function (e) {
  var card = e.target.closest(".card"); if (!card) { return; }
  var i = +card.dataset.i, act = e.target.dataset ? e.target.dataset.act : undefined;
  setFocus(+card.dataset.k, false);
  if (act === "keep" || act === "remove") { decide(i, act); }
  else if (act === "relabel") { decide(i, "relabel", items[i].sug); }
});
list.addEventListener("change", function (e) {
  if (e.target.dataset.act !== "relabel-any" || e.target.value === "") { return; }
  var card = e.target.closest(".card"), to = +e.target.value; e.target.value = "";
  setFocus(+card.dataset.k, false);
  decide(+card.dataset.i, to === items[+card.dataset.i].given ? "keep" : "relabel", to);
});
document.addEventListener("keydown", function (e) {
  var tag = e.target.tagName;
  if (tag === "SELECT" || tag === "INPUT" || tag === "TEXTAREA" || e.altKey || e.metaKey) { return; }
  if ((e.key === "z" && e.ctrlKey) || (e.key === "u" && !e.ctrlKey)) { undo(); e.preventDefault(); return; }
  if (e.ctrlKey) { return; }
  var i = focus >= 0 ? view[focus] : -1;
  if (e.key === "ArrowDown" || e.key === "j") { setFocus(focus + 1); }
  else if (e.key === "ArrowUp" || e.key === "p") { setFocus(focus - 1); }
  else if (i < 0) { return; }
  else if (e.key === "k") { decide(i, "keep"); }
  else if (e.key === "r") { decide(i, "relabel", items[i].sug); }
  else if (e.key === "x" || e.key === "Delete") { decide(i, "remove"); }
  else if (/^[0-9]$/.test(e.key) && +e.key < C.length) {
    decide(i, +e.key === items[i].given ? "keep" : "relabel", +e.key);
  } else { return; }
  e.preventDefault();
});
function cell(v) { v = String(v); return /[",\r\n]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v; }
function decisionsCsv() {
  var lines = ["row,file,given,decision,new_label"];
  for (var i = 0; i < items.length; i++) {
    var it = items[i], d = state.decisions[keyOf(it)]; if (!d) { continue; }
    lines.push([it.row, it.file, C[it.given], d.d, d.d === "relabel" ? C[d.to] : ""].map(cell).join(","));
  }
  return lines.join("\n") + "\n";
}
document.getElementById("undo").addEventListener("click", undo);
document.getElementById("export").addEventListener("click", function () {
  var url = URL.createObjectURL(new Blob([decisionsCsv()], {type: "text/csv"}));
  var a = el("a"); a.href = url; a.download = "decisions.csv"; document.body.appendChild(a); a.click();
  setTimeout(function () { URL.revokeObjectURL(url); a.remove(); }, 1000);
});
if ("IntersectionObserver" in window) {
  new IntersectionObserver(function (entries) {
    if (entries[0].isIntersecting && rendered < view.length) { renderMore(); }
  }, {rootMargin: "800px"}).observe(document.getElementById("sentinel"));
}
window.ttakitReview = {csv: decisionsCsv, state: function () { return state; }, items: items,
  focus: function () { return focus < 0 ? null : items[view[focus]]; }, rendered: function () { return rendered; }};
applyFilters();
})();
"""
