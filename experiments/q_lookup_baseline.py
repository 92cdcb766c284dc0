r"""A lookup-table Q on the sales simulator's abstract state: is the action ranking in the logs at all? (sales)

  python -m experiments.q_lookup_baseline --workdir=RUN [--iteration=0] [--logs=iter_0] [--truth=PATH]

Keys each logged decision by what the oracle reads from the transcript (need known, budget known, pending
objection, liked, a product shown) and the parsed act of the suggestion, averages the Monte Carlo returns per key
(keys with fewer than 3 returns fall back to the act's mean), and scores the run's ranking set (data/ranking_<k>.json,
or --truth, e.g. a precise set from experiments.q_ranking_ablation) like a Q-model: q_ranking.ranking_metrics.
Three fits: on the randomised turns only, on every turn whose return samples Q^{pi_k} (qfit.targets=unbiased),
and on every turn. If even this table ranks at chance, the logs do not hold the ranking, whatever the Q-model.
"""

import collections
import os

import numpy as np
from absl import flags

from experiments import cli
from iterppo_jax import conversation as conv_lib
from iterppo_jax import data as data_lib
from iterppo_jax import q_ranking
from iterppo_jax.envs import sales

_WORKDIR = cli.define(flags.DEFINE_string, "workdir", None, "A sales loop run.")
_ITERATION = cli.define(flags.DEFINE_integer, "iteration", 0, "Which pi_k's ranking set.")
_LOGS = cli.define(flags.DEFINE_string, "logs", "", "Logs to fit on: data/<name>.jsonl (default iter_<k>).")
_TRUTH = cli.define(flags.DEFINE_string, "truth", "", "A ranking set (default data/ranking_<k>.json).")


def abstract_state(turns) -> tuple:
  v = sales.visible_facts(turns)
  return (v.need is not None, v.budget is not None, v.objection, v.liked, v.product is not None)


def fit_table(records, keep) -> tuple[dict, dict, int]:
  """(mean return per (abstract state, act kind), per act kind, decisions used) over those `keep(example)`
  selects."""
  by_id = {r.id: r for r in records}
  cells, acts, used = collections.defaultdict(list), collections.defaultdict(list), 0
  for e in data_lib.examples_from_conversations(records, gamma=0.95):
    if not keep(e):
      continue
    record = by_id[e.conversation_id]
    state = abstract_state(record.turns[:record.agent_steps()[e.turn]])
    kind = sales.parse_business("" if e.suggestion == conv_lib.ABSTAIN_TEXT else e.suggestion).kind
    cells[(state, kind)].append(e.target)
    acts[kind].append(e.target)
    used += 1
  return ({key: float(np.mean(v)) for key, v in cells.items() if len(v) >= 3},
          {key: float(np.mean(v)) for key, v in acts.items()}, used)


def score(action_set: q_ranking.ActionSet, evals: dict, table: tuple[dict, dict, int]) -> dict:
  cells, acts, _ = table
  flat = []
  for (cid, i), candidates in zip(action_set.where, action_set.candidates):
    state = abstract_state(evals[cid].turns[:i])
    for c in candidates:
      kind = sales.parse_business(c).kind
      flat.append(cells.get((state, kind), acts.get(kind, 0.0) - 1e-3))
  return q_ranking.ranking_metrics(action_set.unflatten(np.asarray(flat)), action_set.true_q, action_set.mask)


def main(argv):
  del argv
  wd, k = _WORKDIR.value, _ITERATION.value
  records = conv_lib.read_jsonl(os.path.join(wd, "data", f"{_LOGS.value or f'iter_{k}'}.jsonl"))
  action_set = q_ranking.ActionSet.load(_TRUTH.value or os.path.join(wd, "data", f"ranking_{k}.json"))
  evals = {r.id: r for r in conv_lib.read_jsonl(os.path.join(wd, "data", f"eval_{k}.jsonl"))}
  print(f"truth: {len(action_set.prompts)} states, {action_set.rollouts} rollouts, reliability "
        f"{action_set.reliability():.2f}")
  print("| fitted on | decisions | top-1 (chance) | Spearman | pairwise | gain of pick (best) |\n|---|---|---|---|---|---|")
  for name, keep in (("randomised turns", lambda e: e.explored), ("turns from t* on", lambda e: e.target_valid),
                     ("every turn", lambda e: True)):
    table = fit_table(records, keep)
    m = score(action_set, evals, table)
    print(f"| {name} | {table[2]} | {m['top1']:.2f} ({m['top1_chance']:.2f}) | {m['spearman']:+.2f} | {m['pairwise']:.2f} | "
          f"{m['pick_gain']:+.3f} ({m['best_gain']:.3f}) |")


if __name__ == "__main__":
  cli.run(main)
