r"""Is it the estimator or the view of the state? A Q head on frozen features, against the true Q (sales); the
probe, its features and estimators: iterppo_jax/studies/q_representation_probe.py.

  python -m experiments.q_representation_probe --workdir=RUN [--iteration=0] [--logs=PATH] [--truth=PATH] \
      [--seeds=3] [--reaction_steps=N]
"""

from absl import flags

from experiments import cli
from iterppo_jax.studies import q_representation_probe as probe_lib

_WORKDIR = cli.define(flags.DEFINE_string, "workdir", None, "A sales loop run (its pi_k, D_k, ranking set).")
_ITERATION = cli.define(flags.DEFINE_integer, "iteration", 0, "Which pi_k and D_k.")
_LOGS = cli.define(flags.DEFINE_string, "logs", "", "Logs of pi_k to fit on (default data/iter_<k>.jsonl).")
_TRUTH = cli.define(flags.DEFINE_string, "truth", "", "A ranking set (default data/ranking_<k>.json).")
_SEEDS = cli.define(flags.DEFINE_integer, "seeds", 3, "Head initialisations and batch orders, averaged.")
_REACTION_STEPS = cli.define(flags.DEFINE_integer, "reaction_steps", 0,
                             "First train pi_k's trunk this many steps to predict the words of the customer's reply "
                             "from the sent message's last token (0: probe pi_k's trunk as it is).")


def main(argv):
  del argv
  probe_lib.probe(_WORKDIR.value, _ITERATION.value, logs=_LOGS.value, truth=_TRUTH.value, seeds=_SEEDS.value,
                  reaction_steps=_REACTION_STEPS.value)


if __name__ == "__main__":
  cli.run(main)
