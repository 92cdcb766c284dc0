"""experiments.q_lookup_baseline: the tabular Q on the sales abstract state, and its scoring on a ranking set."""

import numpy as np

from experiments import q_lookup_baseline as lookup
from iterppo_jax import q_ranking
from iterppo_jax.envs import base, sales


def test_table_means_and_scoring():
  env = sales.SalesEnv(business_user=base.BusinessUserConfig(mode="direct"))
  records = env.play(sales.make_sales_policy("behavior"), 300, seed=0)
  cells, acts, used = lookup.fit_table(records, lambda e: True)
  assert {key[0] for key in acts} >= {"ask_need", "recommend", "close"} and all(0 <= v <= 1 for v in cells.values())
  assert used == sum(len(r.agent_steps()) for r in records)
  # At the opening state (nothing known), asking the need has a higher logged return than closing.
  opening = lookup.abstract_state(records[0].turns[:1])
  assert cells[(opening, ("ask_need",))] > cells.get((opening, ("close",)), acts[("close",)])
  # Scored on a set whose truth is the table itself, the ranking is perfect.
  rng = np.random.default_rng(0)
  cands = [sales.business_text(sales.Act(k), rng) for k in ("ask_need", "close", "off_topic")]
  key = lambda c: lookup.act_key(records[0].turns[:1], c)
  truth = np.asarray([[cells.get((opening, key(c)), acts[key(c)] - 1e-3) for c in cands]])
  action_set = q_ranking.ActionSet([(records[0].id, 1)], ["s"], [cands], [["script"] * 3], truth, np.zeros_like(truth), 1)
  m = lookup.score(action_set, {records[0].id: records[0]}, (cells, acts, used))
  assert m["top1"] == 1 and m["pairwise"] == 1


def test_sarsa_table_is_the_fixed_point_of_its_backups():
  env = sales.SalesEnv(business_user=base.BusinessUserConfig(mode="direct"))
  records = env.play(sales.make_sales_policy("behavior"), 200, seed=1)
  cells, acts, used = lookup.fit_sarsa(records, sweeps=80)
  assert used == sum(len(r.agent_steps()) for r in records) and all(0 <= v <= 1 for v in cells.values())
  # One more sweep changes nothing (converged), and the values differ from the Monte Carlo means (they bootstrap).
  again, _, _ = lookup.fit_sarsa(records, sweeps=81)
  assert max(abs(again[k] - v) for k, v in cells.items()) < 1e-6
  mc, _, _ = lookup.fit_table(records, lambda e: True)
  assert max(abs(mc[k] - cells[k]) for k in mc) > 1e-3
  # Recommending the stated budget's tier beats a tier above it wherever both were logged.
  fits = [(cells[(s, ("recommend", 0))], cells[(s, ("recommend", up))]) for s, a in cells for up in (1, 2)
          if a == ("recommend", 0) and (s, ("recommend", up)) in cells]
  assert fits and np.mean([good > bad for good, bad in fits]) >= 0.5
