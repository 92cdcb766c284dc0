"""experiments.seeds_summary: per-seed conversion, mean over seeds with a t-interval, paired gains."""

import numpy as np
import pytest

from experiments import seeds_summary
from iterppo_jax import stats


def _summary(conversions, behavior=0.26, top1=0.3):
  its = [{"conversion": c, "conversion_lo": c - 0.03, "conversion_hi": c + 0.03} for c in conversions]
  return {"iterations": its, "reference": {"behavior": {"conversion": behavior}},
          "q_ranking": [{"rank_top1": top1, "rank_top1_chance": 0.12, "rank_spearman": 0.1, "rank_pick_gain": 0.01,
                         "rank_best_gain": 0.08, "rank_truth_reliability": 0.5, "logged_adv_corr": 0.0,
                         "deployed_conversion": 0.1}] * (len(conversions) - 1)}


def test_mean_interval_is_the_student_t_interval():
  mean, lo, hi = stats.mean_interval([0.1, 0.2, 0.3])
  assert mean == pytest.approx(0.2) and hi - mean == pytest.approx(4.303 * 0.1 / np.sqrt(3), rel=1e-4)
  assert np.isnan(stats.mean_interval([0.5])[1])


def test_paired_gains_and_the_behaviour_line():
  runs = [_summary([0.10, 0.20, 0.25]), _summary([0.12, 0.18, 0.30]), _summary([0.08, 0.16, 0.20], top1=0.6)]
  t = seeds_summary.summarize(runs, ["s0", "s1", "s2"])
  assert t["iterations"] == 3
  assert t["gains"][0][0] == pytest.approx(np.mean([0.10, 0.06, 0.08]))
  assert t["gain_over_pi0"][0] == pytest.approx(np.mean([0.15, 0.18, 0.12]))
  assert t["last_above_behavior"] == [False, True, False]
  assert t["ranking"][0]["rank_top1"][0] == pytest.approx(0.4)
  text = seeds_summary.markdown(t)
  assert "| pi_2 - pi_1 | +0.070" in text and "last iterate above it in 1 of 3 seeds" in text


def test_one_iteration_lists_its_gain_once():
  runs = [_summary([0.10, 0.20]), _summary([0.12, 0.18]), _summary([0.08, 0.16])]
  text = seeds_summary.markdown(seeds_summary.summarize(runs, ["s0", "s1", "s2"]))
  assert text.count("| pi_1 - pi_0 |") == 1


def test_unmeasured_ranking_prints_a_dash_not_nan():
  runs = [_summary([0.10, 0.20]), _summary([0.12, 0.18])]
  for r in runs:
    r["q_ranking"] = [{"logged_adv_corr": 0.2, "deployed_conversion": 0.1}]  # a run with loop.rank_states=0
  text = seeds_summary.markdown(seeds_summary.summarize(runs, ["s0", "s1"]))
  assert "nan" not in text and "| Q_0 | - (-) | - |" in text and "+0.20" in text and "-: not measured" in text
  runs[1]["q_ranking"][0]["logged_cv_adv_corr"] = 0.06  # cross-fitted on every randomised turn (qfit.cross_fit)
  runs[0]["q_ranking"][0]["logged_cv_adv_corr"] = 0.04
  assert "| +0.20 | +0.05 | 0.100 |" in seeds_summary.markdown(seeds_summary.summarize(runs, ["s0", "s1"]))
