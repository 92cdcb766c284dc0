"""The simulator's Monte Carlo true Q (TextEnv.estimate_q) at restored states of logged conversations."""

import numpy as np

from iterppo_jax.envs import base, sales


def test_two_states_of_one_conversation_in_one_call_keep_their_own_suggestions():
  """Issue #16's uid bug: estimate_q used to map first suggestions to episodes by conversation id, so two states
  of one conversation in one call were both scored with one of the two suggestions."""
  env = sales.SalesEnv(business_user=base.BusinessUserConfig(mode="direct"))
  behaviour = sales.make_sales_policy("behavior")
  record = next(r for r in env.play(behaviour, 40, seed=3) if len(r.agent_steps()) >= 4)
  steps = record.agent_steps()
  states = [env.restore(record, steps[1]), env.restore(record, steps[3])]
  assert states[0].uid == states[1].uid  # the situation that triggered the bug
  rng = np.random.default_rng(0)
  suggestions = [sales.business_text(sales.Act("close"), rng),
                 sales.business_text(sales.Act("recommend", product=sales.product_for("laptop", 1)), rng)]
  oracle = sales.make_sales_policy("oracle")
  together, _ = env.estimate_q(states, suggestions, oracle, gamma=0.95, n_rollouts=16, seed=5)
  alone = [env.estimate_q([s], [a], oracle, gamma=0.95, n_rollouts=16, seed=5)[0][0]
           for s, a in zip(states, suggestions)]
  np.testing.assert_array_equal(together, alone)
  # The two suggestions are really scored apart: sending the other one changes the estimate.
  swapped, _ = env.estimate_q(states, suggestions[::-1], oracle, gamma=0.95, n_rollouts=16, seed=5)
  assert not np.array_equal(swapped, together)
