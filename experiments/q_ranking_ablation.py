r"""Q-model variants fitted on one run's logs, ranked against that run's true Q^{pi_k} (issue #16's table).

  python -m experiments.q_ranking_ablation --workdir=runs/<a finished loop run> [--iteration=0] \
      [--variants=default,all_targets,explored_only,steps_800,scratch,dueling] [--truth_states=24 --truth_rollouts=64 \
      [--truth_draw=1]] [--out=docs/q_ranking_ablation.json]

Each variant refits Q_k on the run's D_k (data/iter_<k>.jsonl) in its own directory under <workdir>/ablate/,
starting from the run's pi_k, and is scored on the run's own data/ranking_<k>.json (the same states, candidates
and simulator Q for every variant, measured once by the loop). Prints one markdown row per variant: top-1
agreement with the true best, within-state Spearman, pairwise accuracy, the true gain of Q's pick over the
candidates' mean (and the best possible gain), the logs-only measures (corr(A, G) on the held-out tenth's
randomised turns and, cross-fitted, on all of them), and the number of fitted examples. A run without
data/ranking_<k>.json (loop.rank_states=0) and no --truth_rollouts gets the logs-only measures alone.
--truth_draw=D (D >= 1) measures another, independent set of states of the same size, to pool with the first.
"""

import os

from absl import flags
from absl import logging

from experiments import cli
from iterppo_jax import errors
from iterppo_jax import io_utils
from iterppo_jax import settings
from iterppo_jax.studies import q_ranking_ablation as ablation

_WORKDIR = cli.define(flags.DEFINE_string, "workdir", None, "A loop run that has data/ranking_<k>.json.")
_ITERATION = cli.define(flags.DEFINE_integer, "iteration", 0, "Which D_k / pi_k to refit Q on.")
_VARIANTS = cli.define(flags.DEFINE_list, "variants", ["default", "all_targets", "explored_only", "steps_800",
                                                        "scratch"], "Variants (keys of VARIANTS).")
_OUT = cli.define(flags.DEFINE_string, "out", "", "Also write the rows as JSON here.")
_TRUTH_STATES = cli.define(flags.DEFINE_integer, "truth_states", 0,
                           "With --truth_rollouts: measure a new, more precise true-Q set of this many states.")
_TRUTH_ROLLOUTS = cli.define(flags.DEFINE_integer, "truth_rollouts", 0,
                             "Rollouts per (state, candidate) of that set (0: use the run's data/ranking_<k>.json).")
_TRUTH_DRAW = cli.define(flags.DEFINE_integer, "truth_draw", 0,
                         "With --truth_rollouts: which draw of states (0 the first; 1, 2, ... independent others).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  wd, k = _WORKDIR.value, _ITERATION.value
  if _TRUTH_DRAW.value and not _TRUTH_ROLLOUTS.value:
    raise errors.SettingsError("--truth_draw: needs --truth_rollouts (it draws another precise truth); without it "
                               "Q_k is scored on the run's own data/ranking_<k>.json")
  base = ablation.read_run_config(wd)
  data_path = os.path.join(wd, "data", f"iter_{k}.jsonl")
  if not os.path.exists(data_path):
    data_path = os.path.join(wd, "data", "behavior.jsonl")
  truth = (ablation.precise_truth(wd, k, base, _TRUTH_STATES.value, _TRUTH_ROLLOUTS.value,
                                   _TRUTH_DRAW.value) if _TRUTH_ROLLOUTS.value
           else os.path.join(wd, "data", f"ranking_{k}.json"))
  if not os.path.exists(truth):  # a run with loop.rank_states=0 and no --truth_rollouts
    print(f"{truth} not found: the logs-only measures alone (- in the true-Q columns)")
    truth = None
  rows = []
  for name in _VARIANTS.value:
    row = ablation.refit(base, wd, k, name, truth, data_path)
    rows.append(row)
    v = lambda n, spec: "-" if row.get(n) is None else format(row[n], spec)  # noqa: E731
    print(f"| {name} | {v('rank_top1', '.2f')} (chance {v('rank_top1_chance', '.2f')}) | {v('rank_spearman', '+.2f')} | "
          f"{v('rank_pairwise', '.2f')} | {v('rank_pick_gain', '+.3f')} / {v('rank_best_gain', '.3f')} | "
          f"{v('logged_adv_corr', '+.2f')} ({v('logged_turns', '.0f')} turns) | "
          f"{v('logged_cv_adv_corr', '+.2f')} ({v('logged_cv_turns', '.0f')}) | {row['auc']:.2f} | "
          f"{row['train_examples']} |", flush=True)
  if _OUT.value:
    typed = settings.parse(base)  # what each refit's loop.setup loaded
    io_utils.atomic_write_json(_OUT.value, {
        "workdir": wd, "iteration": k, "truth": truth, "rows": rows, "domain": typed.env.domain,
        "seed": typed.seed, "first_data": typed.loop.first_data, "truth_draw": _TRUTH_DRAW.value})


if __name__ == "__main__":
  cli.run(main)
