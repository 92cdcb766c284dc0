r"""Is it the estimator or the view of the state? A Q head on frozen features, against the true Q (sales).

  python -m experiments.q_representation_probe --workdir=RUN [--iteration=0] [--logs=PATH] [--truth=PATH]

A Q-model must (a) see in its input what decides the right act at a state and (b) be fitted by an estimator
whose targets hold the ranking. This probe separates the two. It fits a small MLP head Q(x) = sigmoid(f(x)) on
fixed features x of each logged (state, suggestion) of D_k (data/iter_<k>.jsonl, or --logs), with two
estimators, and scores it on the run's ranking set (data/ranking_<k>.json, or --truth) like a Q-model
(q_ranking.ranking_metrics):

* features: 'trunk', the frozen hidden states of pi_k's transformer at the prompt's last token and at the
  action's last token (what the Q-model starts from); 'abstract', one-hot codes of the simulator's abstract
  state and the act's fit to it (experiments.q_lookup_baseline: what the oracle reads, unavailable in
  production); 'abstract + noise', that code padded with irrelevant Gaussian columns to the trunk's width;
  'both'.
* estimators: Monte Carlo (the discounted return of the logs; turns before a randomised turn included, as
  qfit.targets=all) and fitted Q evaluation / SARSA of pi_k (targets r + gamma Q(s', a'_pi), a'_pi pi_k's own
  next action, recomputed every sweep: what qfit.method=td estimates).

It also prints how much of each abstract feature a linear map of the trunk features explains (held-out R^2): a
view that does not carry the act's fit to the state cannot rank acts by it. With --reaction_steps=N the trunk is
first trained N steps on a world-model task from the same logs (the words of the customer's reply to each sent
message, read at the message's last token), which teaches it the act and its fit to the state.
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
