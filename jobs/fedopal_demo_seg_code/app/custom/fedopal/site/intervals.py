"""95 % confidence intervals for a site's test metrics: a percentile bootstrap over its test images, by class.

With 30-80 test images per class, one balanced accuracy moves by about +-0.08 from one draw of the test set to the
next; the interval says how far. Each resample draws, within every class, as many images as the class has, with
replacement (a stratified bootstrap: the class counts, and so balanced accuracy's weighting, stay those of the test
set; Efron & Tibshirani, An Introduction to the Bootstrap, 1993, ch. 13 for the percentile interval). The metrics
are those of `site.train.classification_metrics`, computed for all resamples at once from the resampling counts:

- balanced accuracy: the mean over classes of (count-weighted correct) / n_class;
- AUC (binary, or one-vs-rest macro over the classes present): the Mann-Whitney form, sum_ij w_i w_j [s_i > s_j]
  (ties 1/2) / (n_pos n_neg), with w the resample's multiplicities.

By hand, because no pinned library has a stratified bootstrap of these metrics: scipy.stats.bootstrap resamples
without strata and would call sklearn once per resample (1,000 calls a round, per view).
"""

from __future__ import annotations

import numpy as np

LEVEL = 0.95
N_BOOT = 1000
METRICS = ("balanced_accuracy", "auc")


def resample_counts(labels: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """(n_boot, N) int: how many times each image is drawn in each resample; within every class, as many draws as
    the class has images (uniform, with replacement)."""
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, len(labels)), dtype=np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        counts[:, where] = rng.multinomial(len(where), np.full(len(where), 1 / len(where)), size=n_boot)
    return counts


def _pairwise(pos_scores: np.ndarray, neg_scores: np.ndarray) -> np.ndarray:
    """[s_i > s_j] + 0.5 [s_i == s_j] for every positive i and negative j."""
    diff = pos_scores[:, None] - neg_scores[None, :]
    return (diff > 0) + 0.5 * (diff == 0)


def metrics_of_resamples(labels: np.ndarray, probs: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Balanced accuracy and AUC of every resample (rows of `counts`), as classification_metrics defines them on
    the resampled set (NaN where it does: fewer than two classes)."""
    labels = np.asarray(labels).reshape(-1).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    present = np.unique(labels)
    n_boot = counts.shape[0]
    if len(present) < 2:
        return {m: np.full(n_boot, np.nan) for m in METRICS}
    weights = counts.astype(np.float64)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    n_per_class = {c: int((labels == c).sum()) for c in present}
    bacc = np.mean([weights[:, labels == c] @ correct[labels == c] / n_per_class[c] for c in present], axis=0)
    pair = probs[:, present]
    pair = pair / np.clip(pair.sum(1, keepdims=True), 1e-12, None)
    one_vs_rest = [present[1]] if len(present) == 2 else list(present)
    aucs = []
    for c in one_vs_rest:
        column = int(np.flatnonzero(present == c)[0])
        pos, neg = labels == c, labels != c
        table = _pairwise(pair[pos, column], pair[neg, column])
        aucs.append(np.einsum("bi,ij,bj->b", weights[:, pos], table, weights[:, neg]) / (pos.sum() * neg.sum()))
    return {"balanced_accuracy": bacc, "auc": np.mean(aucs, axis=0)}


def metric_intervals(labels: np.ndarray, probs: np.ndarray, n_boot: int = N_BOOT, level: float = LEVEL,
                     seed: int = 0) -> dict[str, tuple[float, float]]:
    """{metric: (low, high)}: the `level` percentile bootstrap interval of balanced accuracy and AUC over the test
    images, stratified by class. labels (N,) int, probs (N, num_classes). (NaN, NaN) where the metric is undefined
    (one class present)."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) == 0:
        return {m: (float("nan"), float("nan")) for m in METRICS}
    values = metrics_of_resamples(labels, probs, resample_counts(labels, n_boot, seed))
    tail = 100 * (1 - level) / 2
    out = {}
    for name, v in values.items():
        if np.isnan(v).all():
            out[name] = (float("nan"), float("nan"))
        else:
            low, high = np.percentile(v, (tail, 100 - tail))
            out[name] = (float(low), float(high))
    return out


def interval_keys(prefix: str, intervals: dict[str, tuple[float, float]]) -> dict[str, float]:
    """{'<prefix>balanced_accuracy_ci_low': .., '<prefix>balanced_accuracy_ci_high': .., ...}: how the site's
    metrics.jsonl (and an export's metrics) store them."""
    return {f"{prefix}{name}_ci_{end}": bound for name, (low, high) in intervals.items()
            for end, bound in (("low", low), ("high", high))}
