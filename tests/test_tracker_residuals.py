"""experiments.tracker_residuals: true Q left inside the tracker's cells, and the hidden field it follows."""

import json

import numpy as np
import pytest

from iterppo_jax import errors
from iterppo_jax import q_ranking
from iterppo_jax.envs import registry
from iterppo_jax.studies import tracker_residuals


def _run(tmp_path, hidden_weight: float):
  """A sales run dir whose true-Q set is a per-cell value plus `hidden_weight` x the customer's price sensitivity
  (hidden) for every candidate, and twice that for the 'close' candidates."""
  from configs import sales as sales_config  # pylint: disable=import-outside-toplevel
  env_config = sales_config.get_config().env
  env = registry.make_env(env_config)
  records = env.play(registry.make_policy("sales", "behavior", env_config), 40, seed=0)
  wd = tmp_path / f"run_{hidden_weight}"
  (wd / "data").mkdir(parents=True)
  (wd / "config.json").write_text(json.dumps({"env": env_config.to_dict()}))
  with open(wd / "data" / "eval_0.jsonl", "w") as f:
    for r in records:
      f.write(json.dumps(r.to_json()) + "\n")
  state_fn, act_fn = registry.tracker("sales")
  candidates = registry.candidate_fn("sales")
  rng = np.random.default_rng(0)
  where, texts = [], []
  for r in records:
    for i, t in enumerate(r.turns):
      if t.role == "suggestion":
        where.append((r.id, i))
        texts.append(candidates(r.turns[:i], rng))
  m = max(len(c) for c in texts)
  q, se = np.zeros((len(where), m)), np.full((len(where), m), 0.01)
  by_id = {r.id: r for r in records}
  for s, ((cid, i), cands) in enumerate(zip(where, texts)):
    turns = by_id[cid].turns[:i]
    sensitivity = env.restore(by_id[cid], i).hidden.price_sensitivity
    for j, text in enumerate(cands):
      act = act_fn(turns, text)
      cell = (hash((state_fn(turns), act)) % 97) / 97
      q[s, j] = cell + hidden_weight * sensitivity * (2.0 if act[0] == "close" else 1.0)
  q_ranking.ActionSet(where, [""] * len(where), texts, [["script"] * len(c) for c in texts], q, se, 16).save(
      str(wd / "data" / "ranking_0.json"))
  return wd


def test_residuals_vanish_for_a_cell_valued_q_and_name_the_hidden_field_otherwise(tmp_path):
  flat = tracker_residuals.residuals(tracker_residuals.pairs(str(_run(tmp_path, 0.0)), 0), min_kind=5)
  assert flat["residual_var"] == pytest.approx(0.0, abs=1e-20)  # the cells hold the whole true Q
  hidden = tracker_residuals.residuals(tracker_residuals.pairs(str(_run(tmp_path, 0.5)), 0), min_kind=5)
  assert hidden["residual_var"] > 10 * hidden["noise_var"]
  # centred within the state, the shared term cancels; what is left follows the hidden field on 'close'
  close = hidden["by_kind"]["close"]
  assert close["fields"][0][0] == "price_sensitivity" and close["fields"][0][1] > 0.5
  text = tracker_residuals.table(hidden)
  assert "| close |" in text and "price_sensitivity +" in text


def test_a_run_without_a_true_q_set_is_one_clear_error(tmp_path):
  with pytest.raises(errors.DataError, match="config.json: not a loop run's config"):
    tracker_residuals.pairs(str(tmp_path), 0)
  wd = _run(tmp_path, 0.0)
  with pytest.raises(errors.DataError, match="ranking_3.json not found"):
    tracker_residuals.pairs(str(wd), 3)
  truth = json.loads((wd / "data" / "ranking_0.json").read_text())
  truth["where"][0][0] = "no-such-conversation"
  (wd / "data" / "ranking_0.json").write_text(json.dumps(truth))
  with pytest.raises(errors.DataError, match="'no-such-conversation', which data/eval_0 does not hold"):
    tracker_residuals.pairs(str(wd), 0)
