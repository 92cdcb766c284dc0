"""experiments/ranking_table.py: finding 7's tables from q_ranking_ablation's JSON files."""

import json

import numpy as np
import pytest

from experiments import ranking_table
from iterppo_jax import errors
from iterppo_jax import q_ranking


def _row(variant, top1, spearman):
  return {"variant": variant, "what": f"{variant} fit", "rank_top1": top1, "rank_top1_chance": 0.1,
          "rank_spearman": spearman, "rank_pairwise": 0.6, "rank_pick_gain": 0.05, "rank_best_gain": 0.1,
          "rank_truth_reliability": 0.7, "rank_states": 20}


def test_rows_per_run_and_means_over_the_sets_every_variant_has(tmp_path):
  files = {"a": ("behavior", 0, [_row("sarsa", 0.2, 0.1), _row("mc", 0.4, 0.3)]),
           "b": ("behavior", 1, [_row("sarsa", 0.6, 0.5), _row("mc", 0.2, 0.1)]),
           "c": ("behavior", 2, [{**_row("sarsa", 0.8, 0.7), "rank_clear_miss": 0.1, "rank_clear_best": 0.3}])}
  # (c has no mc: left out of the comparison)
  # c's truth is on this machine (noise-free: the exact Q would find every best); a's and b's are not.
  q = np.asarray([[0.1, 0.5, 0.2], [0.3, 0.0, 0.1]])
  (tmp_path / "truth").mkdir()
  q_ranking.ActionSet([("x", 1), ("y", 1)], ["s", "t"], [["u", "v", "w"]] * 2, [["script"] * 3] * 2, q,
                      np.zeros_like(q), rollouts=8).save(str(tmp_path / "truth" / "q2.json"))
  for name, (first_data, k, rows) in files.items():
    truth = str(tmp_path / "truth" / ("q2.json" if name == "c" else "gone.json"))
    (tmp_path / f"{name}.json").write_text(json.dumps({"domain": "sales", "first_data": first_data, "seed": 0,
                                                       "iteration": k, "rows": rows, "truth": truth}))
  text = ranking_table.tables(ranking_table.load(str(tmp_path / "*.json")), "sarsa", ["sarsa", "mc"])
  assert "| sales | behavior | 0 | Q_2 | 0.80 (0.10, 1.00) | +0.70 (+1.00) | 0.60 | 0.10 (0.30) |" in text
  assert "| sales | behavior | 0 | Q_0 | 0.20 (0.10, nan) | +0.10 (+nan) | 0.60 | nan (nan) |" in text
  assert "| sales | behavior | 0 | Q_0 | 0.20 (0.10, nan) | +0.10 (+nan) |" in text
  staff, own = text.split("fitted on pi_k's own deployments")
  assert "| sarsa | sarsa fit | 0.20 | +0.10 |" in staff and "| mc | mc fit | 0.40 | +0.30 |" in staff
  assert "mean over 1 (run, k) sets (sales s0 Q_1)" in own  # Q_2 lacks mc
  assert "| sarsa | sarsa fit | 0.60 | +0.50 |" in own
  assert "pi_k's mode" not in text  # files written before rank_mode_* was measured
  for name, (first_data, k, rows) in files.items():  # with pi_k's mode measured beside the variants
    rows = [{**r, "rank_pick_gain_own": 0.01, "rank_mode_top1": 0.3 + 0.1 * k, "rank_mode_spearman": 0.2,
             "rank_mode_pairwise": 0.6, "rank_mode_pick_gain": 0.04, "rank_mode_pick_gain_own": 0.02 * k}
            for r in rows]
    (tmp_path / f"{name}.json").write_text(json.dumps({"domain": "sales", "first_data": first_data, "seed": 0,
                                                       "iteration": k, "rows": rows, "truth": "gone.json"}))
  own = ranking_table.tables(ranking_table.load(str(tmp_path / "*.json")), "sarsa", ["sarsa", "mc"]).split(
      "fitted on pi_k's own deployments")[1]
  assert "| sarsa | sarsa fit | 0.60 | +0.50 | +0.050 | +0.010 |" in own
  assert "| pi_k's mode | no Q: the act D_k logged most at the state on top | 0.40 | +0.20 | +0.040 | +0.020 |" in own
  with pytest.raises(errors.DataError, match="no q_ranking_ablation file"):
    ranking_table.load(str(tmp_path / "none*.json"))


def test_independent_truths_of_one_q_k_pool_into_one_row_over_all_their_states(tmp_path):
  """Two truth draws (q_ranking_ablation --truth_draw) of one run's Q_k: one row, each measure the mean over the
  union of their states; the same draw twice is refused with both files named."""
  def write(name, draw, top1, spearman, states):
    row = {**_row("sarsa", top1, spearman), "rank_states": states}
    d = {"domain": "sales", "first_data": "policy", "seed": 2, "iteration": 2, "rows": [row], "truth": "gone.json"}
    if draw is not None:
      d["truth_draw"] = draw
    (tmp_path / f"{name}.json").write_text(json.dumps(d))
  write("a", None, 0.5, 0.4, 24)  # written before --truth_draw: draw 0
  write("b", 1, 0.75, 0.6, 16)
  rows = ranking_table.load(str(tmp_path / "*.json"))
  row = rows[("sales", "policy", 2, 2, "sarsa")]
  assert row["rank_states"] == 40 and row["draws"] == 2
  np.testing.assert_allclose([row["rank_top1"], row["rank_spearman"]], [(12 + 12) / 40, (9.6 + 9.6) / 40])
  assert "| 0.60 (0.10, nan) | +0.48 (+nan) |" in ranking_table.tables(rows, "sarsa", ["sarsa"])
  assert "| 40 (2 draws) |" in ranking_table.tables(rows, "sarsa", ["sarsa"])
  write("c", 1, 0.1, 0.1, 10)
  with pytest.raises(errors.DataError, match=r"c\.json: sales seed 2 Q_2 sarsa on truth draw 1 is also in .*b\.json"):
    ranking_table.load(str(tmp_path / "*.json"))


def test_paired_reliability_is_shown_with_the_unpaired_reading_and_pools_with_older_files(tmp_path):
  """A file with both readings of the truth's reliability shows both; pooled with a file written before the
  unpaired one was kept, the pooled unpaired reading is nan (not the one file's value) and is not shown."""
  def write(name, draw, row):
    d = {"domain": "negotiation", "first_data": "policy", "seed": 0, "iteration": 1, "rows": [row],
         "truth": "gone.json", "truth_draw": draw}
    (tmp_path / f"{name}.json").write_text(json.dumps(d))
  write("a", 0, {**_row("sarsa", 0.3, 0.2), "rank_truth_reliability": 0.55, "rank_truth_reliability_unpaired": 0.1})
  text = ranking_table.tables(ranking_table.load(str(tmp_path / "*.json")), "sarsa", ["sarsa"])
  assert "| 0.55 (0.10 unpaired) | 20 |" in text
  write("b", 1, _row("sarsa", 0.1, 0.0))
  rows = ranking_table.load(str(tmp_path / "*.json"))
  row = rows[("negotiation", "policy", 0, 1, "sarsa")]
  assert np.isnan(row["rank_truth_reliability_unpaired"]) and row["rank_truth_reliability"] == pytest.approx(0.625)
  assert "| 0.62 | 40 (2 draws) |" in ranking_table.tables(rows, "sarsa", ["sarsa"])
