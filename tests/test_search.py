"""Tests for ttakit.search: greedy selection on constructed caches, temperature and weights,
random-copy and fastai policies, the candidate pool, caching through the engine, reports, and
every bad-input error."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ttakit import transforms as T
from ttakit.data import ImageDataset
from ttakit.engine import TTAEngine
from ttakit.errors import (
    DataError,
    InvalidInputError,
    NotInvertibleError,
    PolicyFormatError,
    UnknownNameError,
)
from ttakit.metrics import accuracy, nll
from ttakit.policy import Compose, Policy, Step, View
from ttakit.report import write_search_report
from ttakit.search import (
    SearchResult,
    ViewCache,
    apply_temperature,
    cache_views,
    default_pool,
    fastai_merge,
    fastai_policy,
    fit_temperature,
    fit_view_weights,
    greedy_search,
    random_copy_policy,
    random_copy_views,
    search_policy,
)

FLIP_SHIFT = [{"name": "flip", "p": 0.5}, {"name": "shift", "max_pixels": 2}]
HFLIP = Compose([T.HorizontalFlip()]).views[1]
VFLIP = Compose([T.VerticalFlip()]).views[1]
ROT90, ROT180, ROT270 = Compose([T.Rotate90([90, 180, 270])]).views[1:]


def shift_view(dx: int, dy: int) -> View:
    return View([Step(T.Shift([(dx, dy)]), (dx, dy))])


def constructed_cache(n: int = 1000, c: int = 4, seed: int = 0) -> ViewCache:
    """identity: mediocre; hflip: an accurate noisy copy of the truth; vflip: anti-correlated;
    rot90: pure noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    onehot = F.one_hot(y, c).float()
    noise = lambda: torch.randn(n, c, generator=g)  # noqa: E731
    logits = torch.stack(
        [1.0 * onehot + noise(), 3.0 * onehot + noise(), -3.0 * onehot + noise(), 2 * noise()]
    )
    return ViewCache(logits, y, [View.identity(), HFLIP, VFLIP, ROT90])


def random_cache(n_views: int, n: int, c: int, seed: int) -> ViewCache:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    signal = F.one_hot(y, c).float() * 1.5
    strength = torch.rand(n_views, 1, 1, generator=g) * 2 - 0.5
    logits = signal * strength + torch.randn(n_views, n, c, generator=g) * 1.5
    views = [View.identity()] + [
        shift_view(dx, dy) for dx in range(-3, 4) for dy in range(-3, 4) if (dx, dy) != (0, 0)
    ]
    return ViewCache(logits, y, views[:n_views])


def tempered_nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Reference: fit T on log(probs), then metrics.nll of the temperature-scaled probabilities."""
    return nll(apply_temperature(probs, fit_temperature(torch.log(probs.clamp_min(1e-30)), y)), y)


# --------------------------------------------------------------------------- greedy search


def test_greedy_picks_the_accurate_view_and_never_the_anti_correlated_one() -> None:
    cache = constructed_cache()
    result = greedy_search(cache, budget=4, gate=False, learn_weights=False)
    names = result.policy.view_names
    assert names[:2] == ["identity", "hflip"]
    assert "vflip" not in names
    assert [row["added"] for row in result.path] == names
    # the path's scores are what they claim, by an independent computation
    for row, k in zip(result.path, range(1, len(names) + 1), strict=True):
        probs = cache.probs[[cache.index(n) for n in names[:k]]].mean(0)
        assert row["accuracy"] == pytest.approx(accuracy(probs, cache.labels), abs=1e-9)
        assert row["nll_ts"] == pytest.approx(tempered_nll(probs, cache.labels), abs=1e-4)
        assert row["n_views"] == k
    # candidate lifts: hflip alone and paired helps, vflip hurts
    lifts = {row["view"]: row for row in result.candidates}
    assert lifts["hflip"]["accuracy_lift"] > 0.1 and lifts["hflip"]["pair_nll_lift"] > 0
    assert lifts["vflip"]["accuracy_lift"] < 0 and lifts["vflip"]["pair_nll_lift"] < 0
    assert lifts["identity"]["accuracy_lift"] == 0


def test_first_greedy_step_matches_brute_force() -> None:
    cache = random_cache(12, 400, 5, seed=3)
    result = greedy_search(
        cache, budget=2, gate=False, learn_weights=False, refit_top=12, min_gain=0.0
    )
    ident = cache.probs[0]
    scores = {}
    for k in range(1, cache.n_views):
        pair = (ident + cache.probs[k]) / 2
        if accuracy(pair, cache.labels) >= accuracy(ident, cache.labels):
            scores[cache.names[k]] = tempered_nll(pair, cache.labels)
    best = min(scores, key=scores.get)
    if scores[best] < result.path[0]["nll_ts"]:
        assert result.policy.view_names == ["identity", best]
        assert result.path[1]["nll_ts"] == pytest.approx(scores[best], abs=1e-4)
    else:
        assert result.policy.view_names == ["identity"]


@pytest.mark.parametrize("objective", ["nll", "accuracy"])
@pytest.mark.parametrize("seed", range(6))
def test_never_worse_than_identity(objective: str, seed: int) -> None:
    cache = random_cache(10, 300, 4, seed)
    result = greedy_search(cache, budget=5, objective=objective, gate=False)
    y = cache.labels
    plain = cache.probs[cache.index("identity")]
    probs = cache.policy_probs(result.policy)
    assert result.policy.view_names[0] == "identity"
    assert accuracy(probs, y) >= accuracy(plain, y) - 1e-12
    calibrated = nll(apply_temperature(probs, result.policy.temperature), y)
    assert calibrated <= tempered_nll(plain, y) + 1e-5
    # the path never gets worse on its objective
    key = "nll_ts" if objective == "nll" else "accuracy"
    values = [row[key] for row in result.path]
    assert values == sorted(values, reverse=(objective == "nll"))


def test_all_candidates_harmful_returns_identity() -> None:
    cache = constructed_cache()
    harmful = ViewCache(cache.logits[[0, 2, 3]], cache.labels, [View.identity(), VFLIP, ROT90])
    result = greedy_search(harmful, budget=3)
    assert result.policy.view_names == ["identity"]
    assert result.policy.gate_threshold is None
    assert result.stop_reason in ("no candidate improves the objective", "no admissible candidate")


def test_accuracy_objective_selects_the_accurate_view() -> None:
    result = greedy_search(constructed_cache(), budget=3, objective="accuracy", gate=False)
    assert result.policy.view_names[:2] == ["identity", "hflip"]
    assert result.objective == "accuracy" and result.policy.meta["objective"] == "accuracy"


DETERMINISM_SCRIPT = """
import json, sys
import torch
from torch import nn
from ttakit.search import search_policy

torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 144, 3)).eval()
g = torch.Generator().manual_seed(1)
images = torch.rand(400, 1, 12, 12, generator=g)
with torch.no_grad():  # the truth is what the model says on average over flips: TTA helps
    flips = model(images).softmax(1) + model(images.flip(-1)).softmax(1) + model(images.flip(-2)).softmax(1)
    labels = flips.argmax(1)
result = search_policy(model, images, labels, budget=4, progress=False)
policy = result.policy.to_json()
policy.pop("meta")
print(json.dumps({"policy": policy, "rows": [r["policy"] for r in result.rows()]}, sort_keys=True))
"""


def test_search_is_deterministic_across_processes_and_thread_counts(tmp_path) -> None:
    # Two fresh processes, one and two intra-op threads (float sums split differently): the same
    # policy, to the last digit of its temperature, weights and gate.
    import subprocess
    import sys

    script = tmp_path / "search_once.py"
    script.write_text(DETERMINISM_SCRIPT)
    outputs = []
    for threads in ("1", "2"):
        done = subprocess.run([sys.executable, str(script), threads], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert outputs[0] == outputs[1]
    assert len(outputs[0]["policy"]["views"]) >= 2  # a real selection, not the identity fallback


def test_greedy_search_is_deterministic() -> None:
    cache = random_cache(20, 300, 4, seed=2)
    a, b = greedy_search(cache, budget=4), greedy_search(cache, budget=4)
    assert a.policy.to_json() | {"meta": None} == b.policy.to_json() | {"meta": None}


# --------------------------------------------------------------------------- temperature and weights


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_a_known_temperature(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 6, generator=g) * 3
    y = torch.multinomial(torch.softmax(z / temperature, 1), 1, generator=g).squeeze(1)
    assert fit_temperature(z, y) == pytest.approx(temperature, rel=0.05)


def test_fit_temperature_minimises_nll() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(500, 4, generator=g) * 2
    y = torch.multinomial(torch.softmax(z / 1.7, 1), 1, generator=g).squeeze(1)
    t = fit_temperature(z, y)
    assert 0.01 < t < 100
    at = lambda s: nll(torch.softmax(z / s, 1), y)  # noqa: E731
    assert at(t) <= min(at(t * 0.97), at(t * 1.03)) + 1e-9


def test_apply_temperature_matches_softmax_of_scaled_logits() -> None:
    z = torch.randn(5, 3)
    probs = torch.softmax(z, 1)
    assert torch.allclose(apply_temperature(probs, 2.0), torch.softmax(z / 2.0, 1), atol=1e-6)
    assert apply_temperature(probs, None) is probs
    with pytest.raises(InvalidInputError, match="temperature"):
        apply_temperature(probs, 0.0)


def test_fit_view_weights_improves_nll_and_favours_the_better_view() -> None:
    cache = constructed_cache(n=2000)
    weights = fit_view_weights(cache, ["identity", "hflip"])
    assert sum(weights) == pytest.approx(1.0) and all(w >= 0 for w in weights)
    assert weights[1] > weights[0]
    probs = cache.probs[[0, 1]]
    mixture = lambda w: nll(torch.tensordot(torch.tensor(w), probs, dims=1), cache.labels)  # noqa: E731
    assert mixture(weights) < mixture([0.5, 0.5]) - 1e-3
    # a strong pull toward uniform leaves the weights near uniform
    pulled = fit_view_weights(cache, [0, 1], prior=100.0)
    assert pulled[0] == pytest.approx(0.5, abs=0.01)


def test_learned_weights_are_kept_only_when_they_win() -> None:
    cache = constructed_cache(n=2000)
    result = greedy_search(cache, budget=2, gate=False, class_weights=False)  # per-view weights only
    agg = result.aggregation
    assert agg is not None and result.policy.view_names == ["identity", "hflip"]
    assert agg["cv_nll_weighted"] < agg["cv_nll_mean"]
    assert agg["used"] and result.policy.weights == pytest.approx(agg["weights"])
    assert result.policy.weights[1] > result.policy.weights[0]
    names = [row["policy"] for row in result.rows()]
    assert "searched (mean)" in names and "searched (weighted)" in names
    # two identical views: nothing to learn, the plain mean stays
    same = ViewCache(cache.logits[[0, 0]], cache.labels, [View.identity(), HFLIP])
    assert fit_view_weights(same, ["identity", "hflip"]) == pytest.approx([0.5, 0.5], abs=1e-6)


# --------------------------------------------------------------------------- random copies and fastai


def test_random_copies_are_seeded_reproducible_and_prefix_stable() -> None:
    a = [v.name for v in random_copy_views(FLIP_SHIFT, 10, seed=4)]
    assert a == [v.name for v in random_copy_views(FLIP_SHIFT, 10, seed=4)]
    assert a[:3] == [v.name for v in random_copy_views(FLIP_SHIFT, 3, seed=4)]
    assert a != [v.name for v in random_copy_views(FLIP_SHIFT, 10, seed=5)]
    for view in random_copy_views(FLIP_SHIFT, 50, seed=0):
        for step in view.steps:
            if isinstance(step.transform, T.Shift):
                assert max(abs(step.param[0]), abs(step.param[1])) <= 2
    no_flip = random_copy_views(
        [{"name": "flip", "p": 0.0}, {"name": "crop", "padding": 1, "max_pixels": 1}], 30
    )
    assert not any("hflip" in v.name for v in no_flip)
    assert all(v.is_identity for v in random_copy_views([{"name": "mixup", "alpha": 0.2}], 3))
    policy = random_copy_policy(FLIP_SHIFT, 5, seed=4)
    assert policy.view_names == a[:5] and policy.weights is None and policy.merge_mode == "mean"


def test_fastai_policy_reproduces_torch_lerp() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    images = torch.rand(7, 1, 8, 8)
    policy = fastai_policy(FLIP_SHIFT, n=4, beta=0.25, seed=1)
    assert policy.weights == pytest.approx([0.25, 0.1875, 0.1875, 0.1875, 0.1875])
    assert policy.view_names[0] == "identity"
    out = TTAEngine(model, policy, activation="softmax").run(images, return_views=True)
    probs = torch.softmax(out.views, dim=2)  # (5, B, C)
    expected = torch.lerp(probs[1:].mean(0), probs[0], 0.25)
    assert torch.allclose(out.merged, expected, atol=1e-6)
    assert torch.allclose(fastai_merge(probs[0], probs[1:], 0.25), expected, atol=1e-6)
    maxed = fastai_policy(FLIP_SHIFT, n=4, use_max=True, seed=1)
    assert maxed.merge_mode == "max" and maxed.weights is None
    out_max = TTAEngine(model, maxed, activation="softmax").run(images)
    assert torch.allclose(
        out_max.merged, fastai_merge(probs[0], probs[1:], use_max=True), atol=1e-6
    )


def test_bad_training_augmentations() -> None:
    with pytest.raises(UnknownNameError, match=r"'cutout'.*flip, mixup, shift"):
        random_copy_views([{"name": "cutout"}], 2)
    with pytest.raises(InvalidInputError, match=r"p must be a number in \[0, 1\], got 2"):
        random_copy_views([{"name": "flip", "p": 2}], 2)
    with pytest.raises(InvalidInputError, match="`n` to be an integer >= 1, but got 0"):
        random_copy_views(FLIP_SHIFT, 0)
    with pytest.raises(InvalidInputError, match=r"`beta` to be a number in \[0, 1\], but got 1.5"):
        fastai_policy(FLIP_SHIFT, beta=1.5)


# --------------------------------------------------------------------------- pool


def test_default_pool_contents() -> None:
    plain = default_pool((28, 28))
    names = [v.name for v in plain]
    assert names[0] == "identity" and len(set(names)) == len(names)
    for expected in (
        "hflip",
        "vflip",
        "rot90",
        "rot270",
        "shift(+3,-3)",
        "bright0.1",
        "contrast0.8",
        "crop_center+resize28x28",
    ):
        assert expected in names
    assert sum(n.startswith("shift(") for n in names) == 32  # 1-4 px in 8 directions
    for expected in ("tshift(+0.5,+0)", "tshift(-0.5,-0.5)", "zoom0.85", "zoom1.15", "rotate+4", "rotate-12"):
        assert expected in names
    assert not any(n.startswith("hflip+") for n in names)  # no flip combinations without a trained flip
    # fixed-size pool: every view keeps the input size
    images = torch.rand(2, 1, 28, 28)
    for view in plain:
        assert view.transformer().augment_image(images).shape == images.shape, view.name
    aligned = [v.name for v in default_pool((28, 28), FLIP_SHIFT, n_random=8, seed=0)]
    assert "hflip+shift(+1,-1)" in aligned and "hflip+shift(-3,+3)" in aligned
    assert "hflip+shift(-4,+4)" not in aligned  # combinations reach one pixel past the trained shift
    for expected in ("hflip+tshift(+0.5,+0)", "hflip+zoom1.1", "hflip+rotate-8", "hflip+crop_lt+resize28x28"):
        assert expected in aligned
    assert set(v.name for v in random_copy_views(FLIP_SHIFT, 8, 0)) <= set(aligned)
    free = [v.name for v in default_pool((28, 28), fixed_size=False)]
    assert "scale0.9" in free and "crop_lt" in free
    with pytest.raises(InvalidInputError, match="image_size"):
        default_pool((28,))


# --------------------------------------------------------------------------- cache through the engine


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    )


def tiny_dataset(n: int = 40, classes: int = 3) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    return ImageDataset(
        torch.rand(n, 1, 8, 8, generator=g),
        torch.arange(n) % classes,
        [str(i) for i in range(classes)],
    )


def tensors(ds: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    return ds.images, ds.labels


def test_search_takes_tensors_not_datasets() -> None:
    with pytest.raises(InvalidInputError) as err:
        search_policy(exploding_model, tiny_dataset(), torch.zeros(40), progress=False)
    assert "pass dataset.images and dataset.labels" in one_line(err)
    with pytest.raises(InvalidInputError, match=r"`labels` to be an \(40,\) integer tensor"):
        search_policy(exploding_model, tiny_dataset().images, torch.zeros(40), progress=False)


def test_cache_views_matches_direct_forward_passes() -> None:
    model, ds = tiny_model(), tiny_dataset(37)
    views = [View.identity(), HFLIP, shift_view(1, 0), HFLIP]  # a duplicate is dropped
    cache = cache_views(model, ds, views, max_batch=8, progress=False)
    assert cache.names == ["identity", "hflip", "shift(+1,+0)"]
    assert cache.logits.shape == (3, 37, 3) and cache.logits.dtype == torch.float32
    with torch.no_grad():
        for k, view in enumerate(cache.views):
            direct = model(view.transformer().augment_image(ds.images))
            assert torch.allclose(cache.logits[k], direct, atol=1e-5)
    assert torch.equal(cache.labels, ds.labels)


def test_view_cache_save_load_and_errors(tmp_path) -> None:
    cache = constructed_cache(n=50)
    cache.save(tmp_path / "cache.pt")
    back = ViewCache.load(tmp_path / "cache.pt")
    assert back.names == cache.names and torch.equal(back.logits, cache.logits)
    with pytest.raises(DataError, match="does not exist"):
        ViewCache.load(tmp_path / "missing.pt")
    with pytest.raises(InvalidInputError, match="duplicates"):
        ViewCache(torch.zeros(2, 3, 2), torch.zeros(3), [HFLIP, HFLIP])
    with pytest.raises(InvalidInputError, match=r"one view per row of `logits` \(2\)"):
        ViewCache(torch.zeros(2, 3, 2), torch.zeros(3), [HFLIP])
    with pytest.raises(
        InvalidInputError, match=r"labels` in \[0, 1\] for 2 classes, but got range \[0, 5\]"
    ):
        ViewCache(torch.zeros(1, 3, 2), torch.tensor([0, 1, 5]), [HFLIP])
    with pytest.raises(InvalidInputError, match="NaN"):
        ViewCache(torch.full((1, 3, 2), float("nan")), torch.zeros(3), [HFLIP])
    with pytest.raises(UnknownNameError, match="'vflip' is not in the cache"):
        ViewCache(torch.zeros(1, 3, 2), torch.zeros(3), [HFLIP]).index("vflip")


def test_search_policy_end_to_end_and_report(tmp_path, saved_figures) -> None:
    model, ds = tiny_model(), tiny_dataset(60)
    result = search_policy(model, ds.images, ds.labels, train_augmentations=FLIP_SHIFT, budget=3, progress=False)
    assert isinstance(result, SearchResult)
    assert result.policy.view_names[0] == "identity" and len(result.policy) <= 3
    assert result.policy.meta["fixed_size"] is True  # a dense head takes one size only
    assert result.cache_seconds is not None and result.policy.temperature > 0
    assert {"none", "hflip", "fastai-4", "fastai-max-4", "random-copy-8"} <= {
        r["policy"] for r in result.rows()
    }
    assert len(result.copies_curve) == 8
    paths = write_search_report(result, tmp_path / "out")
    assert {"policy", "json", "markdown", "views_curve", "candidate_lifts", "copies_curve"} <= set(
        paths
    )
    loaded = Policy.load(paths["policy"])
    assert loaded.view_names == result.policy.view_names
    assert loaded.temperature == pytest.approx(result.policy.temperature)
    assert (
        loaded.weights == result.policy.weights
        and loaded.gate_threshold == result.policy.gate_threshold
    )
    data = json.loads(paths["json"].read_text())
    assert (
        data["selected"] == result.policy.view_names and len(data["candidates"]) == result.pool_size
    )
    accuracy_panel, nll_panel = saved_figures["views_curve.png"].axes  # the selection path, drawn
    (line,) = accuracy_panel.get_lines()
    assert list(line.get_xdata()) == [row["n_views"] for row in result.path]
    assert list(line.get_ydata()) == pytest.approx([row["accuracy"] for row in result.path])
    assert nll_panel.get_ylabel() == "NLL (temperature-scaled)"
    (bars,) = saved_figures["candidate_lifts.png"].axes
    assert len(bars.patches) == result.pool_size
    assert "## Selection path" in paths["markdown"].read_text()


def test_searched_policy_json_round_trip_with_weights_and_gate(tmp_path) -> None:
    result = greedy_search(constructed_cache(n=2000), budget=3)
    policy = result.policy
    assert policy.weights is not None and policy.gate_threshold is not None
    policy.save(tmp_path / "policy.json")
    back = Policy.load(tmp_path / "policy.json")
    assert back.to_json() == json.loads(json.dumps(policy.to_json()))


# --------------------------------------------------------------------------- bad input


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def exploding_model(images: torch.Tensor) -> torch.Tensor:
    raise AssertionError("the model must not run on bad input")


def test_empty_validation_split() -> None:
    empty = ImageDataset(
        torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), ["a", "b"], name="val"
    )
    with pytest.raises(DataError) as err:
        search_policy(exploding_model, empty.images, empty.labels, progress=False)
    assert "the validation images are empty" in one_line(err)


def test_single_class_validation_split() -> None:
    ds = ImageDataset(
        torch.rand(5, 1, 8, 8), torch.ones(5, dtype=torch.long), ["a", "b"], name="val"
    )
    with pytest.raises(DataError) as err:
        search_policy(exploding_model, ds.images, ds.labels, progress=False)
    assert "single class (1) in 5 images" in one_line(err)
    with pytest.raises(DataError, match="single class"):
        greedy_search(ViewCache(torch.zeros(1, 4, 2), torch.zeros(4), [View.identity()]))


@pytest.mark.parametrize("budget", [0, -2, 1.5, True])
def test_budget_below_one(budget) -> None:
    with pytest.raises(InvalidInputError) as err:
        search_policy(exploding_model, *tensors(tiny_dataset()), budget=budget, progress=False)
    assert f"`budget` to be an integer >= 1 (views per image), but got {budget!r}" in one_line(err)
    with pytest.raises(InvalidInputError, match="budget"):
        greedy_search(constructed_cache(n=20), budget=budget)


def test_unknown_objective() -> None:
    with pytest.raises(UnknownNameError) as err:
        search_policy(exploding_model, *tensors(tiny_dataset()), objective="auc", progress=False)
    assert one_line(err) == "unknown objective 'auc'; expected one of: accuracy, nll"


class Smear(T.ImageOnlyTransform):
    """A transform that promises to invert images only: no label."""

    identity_param = 0
    targets = frozenset({"image"})

    def __init__(self):
        super().__init__("k", [0, 1])

    def apply_aug_image(self, image, k=0, **kwargs):
        return image

    def step_name(self, param):
        return None if param == 0 else "smear"


def test_pool_with_a_view_the_task_cannot_invert() -> None:
    pool = [View.identity(), HFLIP, View([Step(Smear(), 1)])]
    with pytest.raises(NotInvertibleError) as err:
        search_policy(exploding_model, *tensors(tiny_dataset()), pool=pool, progress=False)
    assert "Smear cannot invert the 'label' target" in one_line(err)
    with pytest.raises(InvalidInputError, match="only ttakit.View objects, but got 'hflip'"):
        search_policy(exploding_model, *tensors(tiny_dataset()), pool=[View.identity(), "hflip"], progress=False)


def test_cache_without_identity() -> None:
    with pytest.raises(InvalidInputError, match="'identity' view"):
        greedy_search(ViewCache(torch.randn(1, 6, 2), torch.arange(6) % 2, [HFLIP]))


def test_policy_json_from_a_newer_or_foreign_format(tmp_path) -> None:
    policy = greedy_search(constructed_cache(n=200), budget=2).policy
    data = policy.to_json()
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(data | {"format_version": 99}))
    with pytest.raises(PolicyFormatError) as err:
        Policy.load(newer)
    assert "format version 99" in one_line(err) and "upgrade ttakit" in str(err.value)
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"transforms": ["hflip"]}))
    with pytest.raises(PolicyFormatError) as err:
        Policy.load(foreign)
    assert 'is not a ttakit policy (expected "format": "ttakit-policy")' in one_line(err)


# --------------------------------------------------------------------------- budget (strengthened)


def helpful_cache(n_views: int = 12, n: int = 600, c: int = 4, seed: int = 0) -> ViewCache:
    """Every view is an independent noisy copy of the truth: each one added lowers the NLL."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    logits = 1.2 * F.one_hot(y, c).float() + torch.randn(n_views, n, c, generator=g)
    views = [View.identity()] + [shift_view(dx, dy) for dx in range(-2, 3) for dy in range(-2, 3) if (dx, dy) != (0, 0)]
    return ViewCache(logits, y, views[:n_views])


@pytest.mark.parametrize("budget", [1, 2, 3, 5])
def test_budget_is_respected(budget: int) -> None:
    cache = helpful_cache()
    result = greedy_search(cache, budget=budget, min_gain=0.0, gate=False)
    # Every candidate helps, so the search uses exactly the budget: an off-by-one in either
    # direction, or a loop that ignores the budget, fails here.
    assert len(result.policy) == budget
    assert [row["n_views"] for row in result.path] == list(range(1, budget + 1))
    assert result.stop_reason == ("budget of 1 view" if budget == 1 else "budget reached")
    assert len(set(result.policy.view_names)) == budget  # no view selected twice
    # the path keeps improving: each added view lowered the temperature-scaled NLL
    nlls = [row["nll_ts"] for row in result.path]
    assert all(b < a for a, b in zip(nlls, nlls[1:], strict=False))
    # and a larger budget than the pool stops at the pool
    small = cache.select(cache.names[:3])
    assert len(greedy_search(small, budget=10, min_gain=0.0, gate=False).policy) == 3


# --------------------------------------------------------------------------- successive halving


class TableModel(nn.Module):
    """A "model" that returns prescribed logits ``table[view, image]``: the image index is
    written into the pixels (a brightness view shifts every pixel alike, so the difference of
    two pixels keeps it) and the brightness delta names the view. Lets halving be tested
    against a known cache."""

    def __init__(self, table: torch.Tensor, step: float = 0.01):
        super().__init__()
        self.table, self.step = table, step
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += x.shape[0]
        n = self.table.shape[1]
        index = ((x[:, 0, 0, 1] - x[:, 0, 0, 0]) * n / 0.3).round().long().clamp(0, n - 1)
        view = ((x[:, 0, 0, 0] - 0.3) / self.step).round().long()
        return self.table[view, index]


def table_images(n: int) -> torch.Tensor:
    images = torch.full((n, 1, 4, 4), 0.3)
    images[:, 0, 0, 1] += torch.arange(n) * 0.3 / n
    return images


def table_setup(n: int = 2000, c: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    onehot = F.one_hot(y, c).float()
    good = [1.0, 1.6, 1.4, 1.2]  # identity and three useful views
    rows = [s * onehot + torch.randn(n, c, generator=g) for s in good]
    rows += [0.2 * onehot + torch.randn(n, c, generator=g) for _ in range(16)]  # weak views
    rows += [-1.0 * onehot + torch.randn(n, c, generator=g) for _ in range(10)]  # harmful views
    table = torch.stack(rows)
    deltas = [round(0.01 * k, 2) for k in range(1, table.shape[0])]
    views = Compose([T.Brightness(deltas)]).views
    return TableModel(table), table_images(n), y, views


def test_table_model_reproduces_its_table() -> None:
    model, images, y, views = table_setup(n=300)
    cache = cache_views(model, images, y, views, progress=False)
    assert torch.allclose(cache.logits, model.table, atol=1e-6)


def test_halving_spends_a_fraction_and_keeps_what_full_caching_selects() -> None:
    model, images, y, views = table_setup()
    full = search_policy(model, images, y, pool=views, budget=4, halving=False, gate=False, progress=False)
    model.calls = 0
    fast = search_policy(model, images, y, pool=views, budget=4, gate=False, first_rung=250, eta=2, progress=False)
    cost = fast.cost
    assert cost["full_caching_passes"] == len(views) * 2000 == full.cost["forward_passes"]
    # passes are counted honestly: the model saw exactly what the report says (+ the engine check)
    assert model.calls == cost["forward_passes"] + cost["check_passes"]
    assert sum(r["passes"] for r in cost["rungs"]) == cost["forward_passes"]
    assert cost["forward_passes"] <= 0.45 * cost["full_caching_passes"]
    assert cost["saved_passes"] == cost["full_caching_passes"] - cost["forward_passes"]
    # the harmful views go at the first rung, by the confidence bound
    assert cost["rungs"][0]["dropped_by_bound"] >= 10
    assert {"bright0.01", "bright0.02", "bright0.03"} <= set(fast.cache.names)
    assert fast.policy.view_names == full.policy.view_names
    assert fast.policy.temperature == pytest.approx(full.policy.temperature, rel=1e-6)
    # the survivors' cache is the full cache restricted to them, in image order
    assert torch.allclose(fast.cache.logits, full.cache.select(fast.cache.names).logits)
    assert torch.equal(fast.cache.labels, y)


def test_rung_sizes() -> None:
    from ttakit.search.halving import rung_sizes

    assert rung_sizes(10_000, 625, 2) == [625, 1250, 2500, 5000, 10_000]
    assert rung_sizes(40, 500, 2) == [40]
    assert rung_sizes(1000, 300, 3) == [300, 900, 1000]


# --------------------------------------------------------------------------- the saved policy


def test_saved_policy_with_gate_and_temperature_is_never_worse_through_the_engine() -> None:
    model, images, y, views = table_setup(n=1500, seed=1)
    result = search_policy(model, images, y, pool=views, budget=4, progress=False)
    policy = result.policy
    assert policy.meta["validation"]["checked_through"] == "TTAEngine"
    saved = TTAEngine(model, policy, activation="softmax").run(images)
    plain = torch.softmax(model.table[0], 1)
    identity_nll = tempered_nll(plain, y)
    assert accuracy(saved.merged, y) >= accuracy(plain, y)
    assert nll(saved.merged, y) <= identity_nll + 1e-6
    assert policy.meta["validation"]["saved"]["accuracy"] == pytest.approx(accuracy(saved.merged, y))
    assert policy.meta["validation"]["saved"]["nll"] == pytest.approx(nll(saved.merged, y), abs=1e-6)
    if policy.gate_threshold is not None:
        assert saved.passes_per_image < len(policy)


def test_a_harmful_gate_is_dropped_after_tuning() -> None:
    """The final check runs after the gate: a gate whose plain rows are badly calibrated fails the
    NLL check against the identity-with-temperature, and the ungated policy is saved instead."""
    from ttakit.search import never_worse

    cache = constructed_cache(n=2000)
    result = greedy_search(cache, budget=2, gate=False, learn_weights=False)
    base = result.comparison[0]
    policy = result.policy
    gated = Policy(policy.views, name="g", temperature=policy.temperature, gate_threshold=0.0)  # never gates
    hot = Policy(policy.views, name="g", temperature=100.0)  # flattened to uniform: far worse NLL

    def output(p):
        from ttakit.search.greedy import cache_output

        return cache_output(cache, p)

    chosen, saved, notes = never_worse([hot, gated, policy], Policy.identity(), base, output, cache.labels)
    assert chosen is policy and len(notes) == 2 and "dropped" in notes[0]
    assert saved["accuracy"] >= base["accuracy"] and saved["nll"] <= base["nll_ts"]


def test_gate_also_keeps_the_nll_reduction_when_asked() -> None:
    from ttakit.search import tune_gate_threshold

    g = torch.Generator().manual_seed(0)
    n = 2000
    y = torch.randint(0, 2, (n,), generator=g)
    conf = torch.rand(n, generator=g) * 0.49 + 0.5
    plain = torch.stack([conf, 1 - conf], 1)
    plain = torch.where((y == 0)[:, None], plain, plain.flip(1))  # plain is always right
    wrong = torch.rand(n, generator=g) < 0.15
    plain[wrong] = plain[wrong].flip(1)  # ... except on 15% of images
    full = plain.clone()
    unsure = conf < 0.6
    fix = wrong & unsure
    full[fix] = full[fix].flip(1)  # the policy fixes the unsure mistakes
    full = 0.8 * full + 0.1  # and is better calibrated everywhere: confident mistakes cost less
    acc_only = tune_gate_threshold(plain, full, y, keep=0.95, n_views=4, confidence=0)
    both = tune_gate_threshold(plain, full, y, keep=0.95, n_views=4, confidence=0, keep_nll=0.95, full_calibrated=full)
    assert acc_only.kept_lift >= 0.95 and both.kept_lift >= 0.95
    assert both.fraction_gated > acc_only.fraction_gated
    gated = plain.max(1).values < both.threshold
    mixed = torch.where(gated[:, None], full, plain)
    reduction = nll(plain, y) - nll(mixed, y)
    assert reduction >= 0.95 * (nll(plain, y) - nll(full, y)) - 1e-9
    with pytest.raises(InvalidInputError, match="full_calibrated"):
        tune_gate_threshold(plain, full, y, keep_nll=0.9)
