r"""Q from exploratory logs: on-policy Monte Carlo vs Monte Carlo and FQE on an exploratory policy's logs, against
the simulator's true Q^pi. What is compared and how: iterppo_jax/studies/q_eval.py.

  python -m experiments.q_eval --out=/tmp/q_eval.jsonl        # pi = the noisy oracle (scripted); ~1.5 min, 2 CPU cores
  python -m experiments.q_eval --config.env.business_user=direct --out=/tmp/q_eval_direct.jsonl
  python -m experiments.q_eval --policy=checkpoint --workdir=runs/iterative_ppo_<time> --q_model=transformer \
      --out=/tmp/q_eval_pi0.jsonl      # pi = pi_0 of a loop run (same --config as the run; our role tags only)
"""

import json

from absl import flags
from absl import logging

from experiments import cli
from iterppo_jax import io_utils
from iterppo_jax import settings
from iterppo_jax.studies import q_eval

_CONFIG = cli.define_config("configs/sales.py")
_POLICY = cli.define(flags.DEFINE_string, "policy", "noisy_oracle",
                              "A scripted sales policy, or 'checkpoint' (pi_0 of --workdir).")
_WORKDIR = cli.define(flags.DEFINE_string, "workdir", "", "A loop run directory (tokenizer/, checkpoints/policy/0).")
_OUT = cli.define(flags.DEFINE_string, "out", "", "JSONL file for the rows (one per method and pair set).")
_CONVERSATIONS = cli.define(flags.DEFINE_integer, "conversations", 1000, "Conversations of pi and of the explorer to fit on.")
_PAIRS = cli.define(flags.DEFINE_integer, "pairs", 100, "Held-out (state, action) pairs per set whose true Q is estimated.")
_ROLLOUTS = cli.define(flags.DEFINE_integer, "rollouts", 32, "Monte Carlo rollouts per pair for the true Q.")
_Q_MODEL = cli.define(flags.DEFINE_enum, "q_model", "bag", ["bag", "transformer"], "The Q-model.")
_STEPS = cli.define(flags.DEFINE_integer, "steps", 1000, "Q-fit steps per method.")
_BATCH_SIZE = cli.define(flags.DEFINE_integer, "batch_size", 64, "Q-fit batch size.")
_LEARNING_RATE = cli.define(flags.DEFINE_float, "learning_rate", None, "Q-fit peak learning rate (default: see compare).")
_EXPLORE_EPS = cli.define(flags.DEFINE_float, "explore_eps", 0.3, "The explorer's probability of a random act.")
_EXPLORE_SKILL = cli.define(flags.DEFINE_float, "explore_skill", 0.6, "Mean skill of the explorer's staff.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
  rows = q_eval.compare(settings.load(_CONFIG.value), policy_name=_POLICY.value, workdir=_WORKDIR.value,
                 conversations=_CONVERSATIONS.value, pairs=_PAIRS.value, rollouts=_ROLLOUTS.value,
                 q_model=_Q_MODEL.value, steps=_STEPS.value, batch_size=_BATCH_SIZE.value,
                 learning_rate=_LEARNING_RATE.value, explore_eps=_EXPLORE_EPS.value,
                 explore_skill=_EXPLORE_SKILL.value)
  print(q_eval.format_table(rows))
  if _OUT.value:
    io_utils.atomic_write_text(_OUT.value, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
