"""The per-site 95 % intervals: the vectorized bootstrap equals a plain loop over the same resamples (NumPy +
scikit-learn per resample), the resampling keeps every class's count, and the interval covers the truth about 95 %
of the time on synthetic test sets drawn from a known population."""

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from fedopal.site.intervals import metric_intervals, metrics_of_resamples, resample_counts


def reference_metrics(labels, probs):
    """Balanced accuracy and AUC of one resample, the plain way (float64, scikit-learn's AUC)."""
    preds = probs.argmax(1)
    present = np.unique(labels)
    bacc = np.mean([np.mean(preds[labels == c] == c) for c in present])
    pair = probs[:, present] / probs[:, present].sum(1, keepdims=True)
    if len(present) == 2:
        auc = roc_auc_score(labels == present[1], pair[:, 1])
    else:
        auc = np.mean([roc_auc_score(labels == c, pair[:, i]) for i, c in enumerate(present)])
    return bacc, auc


@pytest.mark.parametrize("num_classes,present", [(2, [0, 1]), (3, [0, 1, 2]), (5, [0, 2, 4])])
def test_the_vectorized_bootstrap_equals_a_loop_over_the_same_resamples(num_classes, present):
    rng = np.random.default_rng(num_classes)
    labels = rng.choice(present, size=90)
    probs = rng.dirichlet(np.ones(num_classes), size=90)
    probs[:5] = probs[5]  # ties in the scores
    counts = resample_counts(labels, n_boot=200, seed=3)
    fast = metrics_of_resamples(labels, probs, counts)
    for b in range(200):
        idx = np.repeat(np.arange(len(labels)), counts[b])
        bacc, auc = reference_metrics(labels[idx], probs[idx])
        assert fast["balanced_accuracy"][b] == pytest.approx(bacc, abs=1e-12)
        assert fast["auc"][b] == pytest.approx(auc, abs=1e-12)


def test_each_resample_keeps_every_class_count_and_the_seed_decides():
    labels = np.array([0] * 30 + [1] * 70 + [2] * 7)
    counts = resample_counts(labels, n_boot=500, seed=1)
    for c, n in ((0, 30), (1, 70), (2, 7)):
        assert (counts[:, labels == c].sum(1) == n).all()
    assert np.array_equal(counts, resample_counts(labels, n_boot=500, seed=1))
    assert not np.array_equal(counts, resample_counts(labels, n_boot=500, seed=2))
    # every image is drawn once per resample on average
    assert counts.mean() == pytest.approx(1.0, abs=0.01)


def test_undefined_metrics_have_undefined_intervals():
    labels = np.zeros(20, int)
    probs = np.tile([0.7, 0.3], (20, 1))
    ci = metric_intervals(labels, probs)
    assert all(math.isnan(v) for bounds in ci.values() for v in bounds)


def test_the_interval_covers_the_truth_about_95_percent_of_the_time():
    """A population where class 0 is recognised with probability 0.8 and class 1 with 0.6 (balanced accuracy 0.7), and
    scores binormal with separation d (AUC = Phi(d / sqrt 2)); 400 test sets of 60 + 40 images."""
    rng = np.random.default_rng(0)
    d = 1.0
    true_auc = norm.cdf(d / math.sqrt(2))
    covered = {"balanced_accuracy": 0, "auc": 0}
    widths = []
    trials = 400
    for t in range(trials):
        labels = np.array([0] * 60 + [1] * 40)
        # predictions: correct with the class's recall (0.8, 0.6); the AUC's score is independent of them
        correct = rng.random(100) < np.where(labels == 0, 0.8, 0.6)
        pred = np.where(correct, labels, 1 - labels)
        score = rng.normal(np.where(labels == 1, d, 0.0), 1.0)
        # probs whose argmax is `pred` and whose class-1 score orders the images as `score` does
        p1 = 1 / (1 + np.exp(-score))
        p1 = np.where(pred == 1, 0.5 + p1 / 2, p1 / 2)  # argmax follows pred, order within each half follows score
        probs = np.stack([1 - p1, p1], axis=1)
        ci = metric_intervals(labels, probs, n_boot=400, seed=t)
        lo, hi = ci["balanced_accuracy"]
        covered["balanced_accuracy"] += lo <= 0.7 <= hi
        widths.append(hi - lo)
        # the AUC's truth is the score's own: probs built from the score alone
        score_probs = np.stack([1 - 1 / (1 + np.exp(-score)), 1 / (1 + np.exp(-score))], axis=1)
        lo, hi = metric_intervals(labels, score_probs, n_boot=400, seed=t)["auc"]
        covered["auc"] += lo <= true_auc <= hi
    # measured: 92.8 % (balanced accuracy), 93.5 % (AUC); the percentile bootstrap runs a little short at 100 images
    for name, hits in covered.items():
        assert 0.91 <= hits / trials <= 0.985, (name, hits / trials)
    # about +-0.09 for 60 + 40 images: the uncertainty the issue quotes
    assert 0.14 < np.mean(widths) < 0.22
