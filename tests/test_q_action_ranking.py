"""The action-ranking diagnostic's arithmetic (experiments/q_action_ranking.py)."""

import numpy as np

from experiments import q_action_ranking as qar
from iterppo_jax.envs import sales


def test_ranking_counts_the_oracle_on_top_and_unprompted_answers():
  k = qar.KINDS
  best = np.array([k.index("ask_need"), k.index("recommend"), k.index("answer"), k.index("close")])
  q = np.zeros((4, len(k)))
  q[0, k.index("ask_need")] = 1.0  # right
  q[1, k.index("answer")] = 1.0  # an unprompted answer on top
  q[2, k.index("answer")] = 1.0  # right (a question is pending)
  q[3, k.index("discount")] = 1.0  # wrong, not an answer
  r = qar.ranking(q, best)
  assert r["oracle_top"] == 0.5
  assert np.isclose(r["answer_top_without_question"], 1 / 3)
  assert r["mean_q_by_oracle_act"]["recommend"][k.index("answer")] == 1.0


def test_candidates_parse_back_to_their_acts():
  v = sales.Visible(need="phone", budget=2, topic="shipping")
  texts = qar.candidates(v, np.random.default_rng(0))
  assert [sales.parse_business(t).kind for t in texts] == list(qar.KINDS)
