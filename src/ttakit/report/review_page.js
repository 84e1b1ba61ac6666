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
