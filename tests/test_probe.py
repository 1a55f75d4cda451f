"""The label probe: it finds a planted signal and finds nothing in shuffled labels."""
import numpy as np
import pytest

from sae.probe import cross_validated_accuracy, probe_accuracy, stratified_folds


def planted(seed=0, n=240, f=30, classes=4, strength=1.0):
    rng = np.random.default_rng(seed)
    y = np.array(list("abcd"))[rng.integers(0, classes, n)]
    x = rng.normal(size=(n, f))
    x[np.arange(n), np.searchsorted(list("abcd"), y)] += 3 * strength  # one feature per label
    return x, y


def test_probe_finds_a_planted_signal():
    x, y = planted()
    out = probe_accuracy(x[:180], y[:180], x[180:], y[180:])
    assert out["accuracy"] >= 0.85 and out["chance"] < 0.4
    assert out["n_train"] == 180 and out["n_test"] == 60


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probe_is_at_chance_on_shuffled_labels(seed):
    x, y = planted(seed)
    y = np.random.default_rng(seed + 10).permutation(y)
    out = probe_accuracy(x[:180], y[:180], x[180:], y[180:])
    assert abs(out["accuracy"] - 0.25) <= 0.15  # 60 held-out examples of 4 labels: chance is 0.25 ± 0.06


def test_probe_agrees_with_the_nearest_mean_rule_on_separable_data():
    # two well separated classes: any sane linear probe gets every held-out example right
    rng = np.random.default_rng(3)
    x = np.r_[rng.normal(-4, 1, (50, 5)), rng.normal(4, 1, (50, 5))]
    y = np.array(["neg"] * 50 + ["pos"] * 50)
    order = rng.permutation(100)
    x, y = x[order], y[order]
    assert probe_accuracy(x[:70], y[:70], x[70:], y[70:])["accuracy"] == 1.0


def test_folds_deal_every_example_once_and_each_label_evenly():
    _, y = planted(n=103)
    codes = np.unique(y, return_inverse=True)[1]
    folds = stratified_folds(codes, 10, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(y)))
    per_fold = np.array([np.bincount(codes[f], minlength=4) for f in folds])
    assert (per_fold.max(0) - per_fold.min(0) <= 1).all()


@pytest.mark.parametrize("shuffle", [False, True])
def test_cross_validated_accuracy_scores_each_example_on_a_probe_that_did_not_see_it(shuffle):
    x, y = planted()
    if shuffle:  # a probe that saw the held-out examples would score well above chance here
        y = np.random.default_rng(7).permutation(y)
    acc = cross_validated_accuracy(x, y, folds=5)
    assert abs(acc - 0.25) <= 0.08 if shuffle else acc >= 0.85  # 240 examples: chance is 0.25 ± 0.03
