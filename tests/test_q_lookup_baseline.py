"""experiments.q_lookup_baseline: the tabular Q on the sales abstract state, and its scoring on a ranking set."""

import numpy as np

from experiments import q_lookup_baseline as lookup
from iterppo_jax import q_ranking
from iterppo_jax.envs import base, policies, sales


def test_table_means_and_scoring():
  env = sales.SalesEnv(business_user=base.BusinessUserConfig(mode="direct"))
  records = env.play(policies.make_sales_policy("behavior"), 300, seed=0)
  cells, acts, used = lookup.fit_table(records, lambda e: True)
  assert set(acts) >= {"ask_need", "recommend", "close"} and all(0 <= v <= 1 for v in cells.values())
  assert used == sum(len(r.agent_steps()) for r in records)
  # At the opening state (nothing known), asking the need has a higher logged return than closing.
  opening = lookup.abstract_state(records[0].turns[:1])
  assert cells[(opening, "ask_need")] > cells.get((opening, "close"), acts["close"])
  # Scored on a set whose truth is the table itself, the ranking is perfect.
  rng = np.random.default_rng(0)
  cands = [sales.business_text(sales.Act(k), rng) for k in ("ask_need", "close", "off_topic")]
  truth = np.asarray([[cells.get((opening, sales.parse_business(c).kind), acts[sales.parse_business(c).kind] - 1e-3)
                       for c in cands]])
  action_set = q_ranking.ActionSet([(records[0].id, 1)], ["s"], [cands], [["script"] * 3], truth, np.zeros_like(truth), 1)
  m = lookup.score(action_set, {records[0].id: records[0]}, (cells, acts, used))
  assert m["top1"] == 1 and m["pairwise"] == 1
