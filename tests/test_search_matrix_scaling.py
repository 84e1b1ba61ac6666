"""Matrix scaling after the temperature (``ttakit.search.calibration``): fitted to correct a
model's class bias, kept by the search only when it wins under cross-validation, saved in the
policy and applied by the engine exactly as the search scored it, with a ``none (matrix-scaled)``
control row so the views' own share of a lift stays visible."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ttakit.engine import TTAEngine
from ttakit.errors import InvalidInputError
from ttakit.merge import apply_matrix_scaling
from ttakit.metrics import accuracy, nll
from ttakit.policy import Compose, Policy
from ttakit.report import search_markdown
from ttakit.search import ViewCache, cache_views, greedy_search
from ttakit.search.calibration import apply_calibration, compare_matrix_scaling, fit_matrix_scaling
from ttakit.search.greedy import cache_output
from ttakit.transforms import HorizontalFlip, Shift

BIAS = torch.tensor([1.5, 0.0, -0.5, 0.0])


def _biased(n: int = 2000, seed: int = 0, bias: torch.Tensor = BIAS) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities of a model whose scores carry a fixed class bias: ``(probs, labels)``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    z = 2.0 * F.one_hot(y, 4) + torch.randn(n, 4, generator=g)
    return torch.softmax(z + bias, 1), y


def test_fit_matrix_scaling_undoes_a_class_bias():
    probs, y = _biased()
    fitted = fit_matrix_scaling(probs, y)
    assert len(fitted["weight"]) == 4 and len(fitted["bias"]) == 4
    scaled = apply_matrix_scaling(probs, fitted["weight"], fitted["bias"])
    assert accuracy(scaled, y) > accuracy(probs, y) + 0.05
    assert nll(scaled, y) < nll(probs, y) - 0.05
    # The learned bias pushes back against the model's: class 0 down relative to class 2.
    assert fitted["bias"][0] - fitted["bias"][2] < -1.0


def test_matrix_scaling_is_kept_only_when_it_wins_out_of_sample():
    probs, y = _biased()
    kept = compare_matrix_scaling(probs, y, 1.0, seed=0, accuracy_floor=accuracy(probs, y))
    assert kept["used"] and kept["cv_nll_matrix"] < kept["cv_nll_temperature"] - 0.05
    assert kept["matrix_scaling"] is not None
    fair, y2 = _biased(bias=torch.zeros(4))  # nothing to correct: the matrix only fits noise
    dropped = compare_matrix_scaling(fair, y2, 1.0, seed=0, accuracy_floor=accuracy(fair, y2))
    assert not dropped["used"] and dropped["matrix_scaling"] is None
    assert dropped["cv_nll_matrix"] >= dropped["cv_nll_temperature"] - 1e-4
    few = compare_matrix_scaling(probs[:30], y[:30], 1.0, seed=0, accuracy_floor=0.0)
    assert not few["used"] and few["cv_nll_matrix"] is None  # too few rows to judge C * C numbers
    # An accuracy floor above what the matrix reaches refuses it whatever its NLL.
    assert not compare_matrix_scaling(probs, y, 1.0, seed=0, accuracy_floor=1.0)["used"]


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: fit_matrix_scaling(torch.rand(5), torch.zeros(5, dtype=torch.long)), r"\(N, C\) tensor"),
        (lambda: fit_matrix_scaling(torch.rand(5, 3), torch.zeros(4, dtype=torch.long)), r"\(5,\) tensor"),
        (lambda: fit_matrix_scaling(torch.full((5, 3), float("nan")), torch.zeros(5, dtype=torch.long)), "NaN"),
        (lambda: fit_matrix_scaling(torch.rand(5, 3), torch.zeros(5, dtype=torch.long), l2=-1), "`l2`"),
    ],
)
def test_bad_input_to_fit_matrix_scaling_is_named(call, pattern):
    with pytest.raises(InvalidInputError, match=pattern):
        call()


class BiasedLinear(nn.Module):
    """A linear classifier of 8x8 images whose output bias favours class 0; the labels are what it
    would predict without that bias, so a matrix fitted on validation can undo it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(64, 4)
        self.shift = nn.Parameter(0.3 * BIAS, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)) * 3 + self.shift


VIEWS = Compose([HorizontalFlip(), Shift([(1, 0), (0, 1)])]).views


def _biased_images(model: BiasedLinear, n: int = 1200) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and the labels the unbiased model gives the mean of all ``VIEWS``: each view alone
    is a noisy estimate, so the views help, and the bias is there to correct."""
    images = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        truth = TTAEngine(lambda x: model.linear(x.flatten(1)), VIEWS, activation=None).run(images).merged
    return images, truth.argmax(1)


def test_search_saves_matrix_scaling_and_the_engine_applies_it_as_scored():
    model = BiasedLinear().eval()
    images, labels = _biased_images(model)
    cache = cache_views(model, images, labels, VIEWS, progress=False)
    result = greedy_search(cache, budget=6)
    policy = result.policy
    assert len(policy) > 1
    assert policy.matrix_scaling is not None and policy.meta["matrix_scaling"]["used"]
    cv = policy.meta["matrix_scaling"]
    assert cv["cv_nll_matrix"] < cv["cv_nll_temperature"]
    # The control: the identity with the same kind of calibration, and no TTA.
    rows = {r["policy"]: r for r in result.rows()}
    assert "none (matrix-scaled)" in rows and rows["none (matrix-scaled)"]["accuracy"] > rows["none"]["accuracy"]
    assert result.fallback is not None and result.fallback.view_names == ["identity"]
    assert result.fallback.matrix_scaling is not None and result.fallback.meta["matrix_scaling"]["used"]
    # The engine returns what the search scored (gate, temperature and matrix included).
    scored, passes = cache_output(cache, policy)
    out = TTAEngine(model, policy, activation="softmax").run(images)
    assert torch.allclose(out.merged, scored, atol=1e-5)
    assert out.passes_per_image == pytest.approx(passes)
    assert policy.gate_threshold is not None  # the matrix applies to the gated rows only
    plain = torch.softmax(cache.logits[cache.index("identity")], 1)
    gated = plain.max(1).values < policy.gate_threshold
    assert torch.allclose(scored[gated], apply_calibration(cache.policy_probs(policy), policy)[gated], atol=1e-6)
    assert torch.allclose(scored[~gated], plain[~gated], atol=1e-6)
    back = Policy.from_json(policy.to_json())
    assert torch.allclose(TTAEngine(model, back, activation="softmax").run(images).merged, scored, atol=1e-5)
    assert "matrix scaling" in search_markdown(result)


def test_matrix_scaling_can_be_turned_off():
    model = BiasedLinear().eval()
    images, labels = _biased_images(model, 600)
    cache = cache_views(model, images, labels, Compose([HorizontalFlip()]).views, progress=False)
    result = greedy_search(cache, budget=2, matrix_scaling=False)
    assert result.policy.matrix_scaling is None and result.fallback.matrix_scaling is None
    assert "matrix_scaling" not in result.policy.meta
    assert "none (matrix-scaled)" not in {r["policy"] for r in result.rows()}


def test_a_cache_of_only_the_identity_still_gets_its_matrix():
    probs, y = _biased(1500)
    cache = ViewCache(probs.log()[None], y, Compose([]).views)
    result = greedy_search(cache, budget=3)
    assert result.policy.view_names == ["identity"] and result.policy.matrix_scaling is not None
    assert accuracy(cache_output(cache, result.policy)[0], y) > accuracy(probs, y) + 0.05


def _first_per_class(ds, keep: list[int], per_class: int | None):
    """The first ``per_class`` images of each class in ``keep`` (all for None), relabelled 0..len(keep)-1."""
    from ttakit.data.core import ImageDataset

    rows = torch.cat([torch.nonzero(ds.labels == c).flatten()[:per_class] for c in keep]).sort().values
    relabel = torch.full((len(ds.classes),), -1, dtype=torch.long)
    relabel[torch.tensor(keep)] = torch.arange(len(keep))
    return ImageDataset(ds.images[rows], relabel[ds.labels[rows]], [ds.classes[c] for c in keep], name="subset")


@pytest.mark.slow
def test_matrix_scaling_is_refused_on_a_few_hundred_validation_rows():
    """Real data, the case that showed the risk (benchmarks/recipes.py, part 2): a seed CNN trained
    from scratch on 100 Fashion-MNIST images of each of classes 5-9, searched on 250 validation
    images. A 5 x 5 matrix fitted on those rows wins 2-fold cross-validation there, yet costs test
    accuracy; with 20 rows per fitted number required (600 here) the search does not keep it."""
    from ttakit.data import load_fashion_mnist
    from ttakit.data.core import train_val_split
    from ttakit.jobs._policy_eval import evaluate_policies
    from ttakit.search import search_policy
    from ttakit.training.config import TrainConfig
    from ttakit.training.loop import train_model

    classes = [5, 6, 7, 8, 9]
    train_all, val_all = train_val_split(load_fashion_mnist("train"), 0.1, seed=0)
    train = _first_per_class(train_all, classes, 100)
    val = _first_per_class(val_all, classes, 50)
    test = _first_per_class(load_fashion_mnist("test"), classes, None)
    config = TrainConfig(epochs=15, batch_size=32, lr=1e-2, schedule="onecycle", augment=("flip", "shift"), seed=2)
    model = train_model(train, config, progress=False).model.eval()

    searched = search_policy(model, val.images, val.labels, train_augmentations=("flip", "shift"), budget=4,
                             progress=False)
    assert searched.policy.matrix_scaling is None
    assert "needs 600" in searched.policy.meta["matrix_scaling"]["not_used_because"]
    plain, tta = evaluate_policies(model, test, [searched.policy], progress=False)[:2]
    assert tta.metrics["accuracy"] >= plain.metrics["accuracy"] - 0.005

    # What the rule prevents: the same policy with a matrix fitted on the 250 rows anyway.
    merged_val = cache_output(searched.cache, searched.policy)[0] if searched.cache is not None else None
    assert merged_val is not None
    forced = replace(searched.policy, matrix_scaling=fit_matrix_scaling(merged_val, val.labels))
    forced_tta = evaluate_policies(model, test, [forced], progress=False)[1]
    assert forced_tta.metrics["accuracy"] < plain.metrics["accuracy"] - 0.005
