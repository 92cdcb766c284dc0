r"""The sales suggested-response simulator and the runs built on it.

  python -m experiments.simulate --config=configs/sales.py --workdir=/tmp/sim
  python -m experiments.simulate --config=configs/sales.py --workdir=/tmp/sim --config.policy=oracle
  python -m experiments.simulate --config=configs/sales.py:tiny --workdir=/tmp/sim   # seconds, for tests

Any key can be overridden with --config.key=value; an unknown key fails before any work starts.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, tiny=False)
  c = ml_collections.ConfigDict()
  c.seed = 0  # every random stream is folded from this (conversations, policies, models)

  # ---- the world ----
  c.env = ml_collections.ConfigDict()
  c.env.domain = "sales"  # which simulator in iterppo_jax/envs
  c.env.business_user = "sr"  # 'sr': the business user accepts/edits/rejects; 'direct': sent verbatim
  c.env.max_turns = 10  # rounds before the customer is gone anyway
  c.env.skill_mean = 0.35  # mean skill of the historical staff; gives ~15% direct, ~25% SR conversion
  c.env.max_render_turns = 6  # rounds of history shown to a model (keeps prompts short on CPU)

  # ---- simulate: play conversations with a shipped policy ----
  c.policy = "behavior"  # behavior | oracle | random
  c.num_conversations = 5000  # enough for a +-1.3 point 95% interval on conversion
  c.batch_size = 1024  # conversations advanced in lock-step

  c.gamma = 0.95  # discount of returns and Q targets: a sale sooner is worth more (PAPER.md)

  if args["tiny"]:
    c.num_conversations = 200
    c.batch_size = 64
  return c
