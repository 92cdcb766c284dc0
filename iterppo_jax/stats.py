"""The project's statistics, host-side NumPy, one home: intervals (Wilson for a proportion, Student-t for a mean
over seeds) and the scores of a Q-model (Brier, expected calibration error, AUC, Pearson and Spearman)."""

from __future__ import annotations

import numpy as np


# ---- intervals ----

def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
  """95% Wilson score interval for a binomial proportion (sound near 0 and 1, unlike the normal one)."""
  if n == 0:
    return 0.0, 1.0
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return float(centre - half), float(centre + half)


def t975(df: int) -> float:
  """Student-t 0.975 quantile (a table to df 10, then a Cornish-Fisher expansion, within 3e-3)."""
  table = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
  if df <= len(table):
    return table[df - 1]
  z = 1.959964
  return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_interval(values) -> tuple[float, float, float]:
  """(mean, lo, hi): the mean of `values` (NaNs dropped) with a 95% Student-t interval over them (NaN bounds for
  fewer than 2 values)."""
  x = np.asarray([v for v in values if v == v], np.float64)
  if len(x) == 0:
    return float("nan"), float("nan"), float("nan")
  if len(x) < 2:
    return float(x.mean()), float("nan"), float("nan")
  half = t975(len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
  return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


# ---- scores of predictions ----

def brier(probs, outcomes) -> float:
  """Brier score: mean_i (p_i - y_i)^2. Lower is better; 0.25 for a constant 0.5 forecast of fair coins."""
  probs = np.asarray(probs, np.float64).ravel()
  outcomes = np.asarray(outcomes, np.float64).ravel()
  return float(np.mean(np.square(probs - outcomes)))


def expected_calibration_error(probs, outcomes, n_bins: int = 10) -> float:
  """ECE with equal-width bins: sum_b (n_b / N) * |mean_{i in b} p_i - mean_{i in b} y_i|.

  Bins are [0, 1/n), [1/n, 2/n), ..., [(n-1)/n, 1]; the last bin includes 1. Empty bins contribute 0.

  Args:
    probs: [N] predicted probabilities in [0, 1].
    outcomes: [N] observed outcomes (0/1, or returns in [0, 1]).
    n_bins: number of bins.

  Returns:
    ECE as a float.
  """
  probs = np.asarray(probs, np.float64).ravel()
  outcomes = np.asarray(outcomes, np.float64).ravel()
  bins = np.clip(np.floor(probs * n_bins).astype(np.int64), 0, n_bins - 1)
  prob_sums = np.bincount(bins, weights=probs, minlength=n_bins)
  outcome_sums = np.bincount(bins, weights=outcomes, minlength=n_bins)
  # |sum p - sum y| / N == (n_b / N) * |mean p - mean y|, and is 0 for empty bins without dividing by 0.
  return float(np.sum(np.abs(prob_sums - outcome_sums)) / max(len(probs), 1))


def average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks with ties given their average rank (the Mann-Whitney convention)."""
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  first_rank = np.cumsum(counts) - counts + 1  # rank of the first element of each tie group
  return (first_rank + (counts - 1) / 2.0)[inverse]


def auc(scores, labels) -> float:
  """ROC AUC via the Mann-Whitney U statistic: P(score_pos > score_neg) + 0.5 P(score_pos = score_neg).

    AUC = (sum_{i pos} rank_i - n_pos (n_pos + 1) / 2) / (n_pos * n_neg), ranks averaged over ties.

  Args:
    scores: [N] predicted scores (any monotone scale).
    labels: [N] binary labels (truthy = positive).

  Returns:
    AUC, or NaN when one class is absent.
  """
  scores = np.asarray(scores, np.float64).ravel()
  labels = np.asarray(labels).ravel().astype(bool)
  n_pos = int(labels.sum())
  n_neg = len(labels) - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = average_ranks(scores)
  u_statistic = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u_statistic / (n_pos * n_neg))


def pearson(x, y) -> float:
  """Pearson correlation cov(x, y) / (std(x) std(y)); NaN when either input is constant."""
  x = np.asarray(x, np.float64).ravel()
  y = np.asarray(y, np.float64).ravel()
  x = x - x.mean()
  y = y - y.mean()
  denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
  if denominator == 0:
    return float("nan")
  return float(np.sum(x * y) / denominator)


def spearman(x, y) -> float:
  """Spearman correlation with average ranks for ties; NaN when either side is constant."""
  return pearson(average_ranks(np.asarray(x, np.float64).ravel()), average_ranks(np.asarray(y, np.float64).ravel()))
