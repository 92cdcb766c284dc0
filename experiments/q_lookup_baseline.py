r"""A lookup-table Q on the sales simulator's abstract state: is the action ranking in the logs at all? (sales)

  python -m experiments.q_lookup_baseline --workdir=RUN [--iteration=0] [--logs=iter_0] [--truth=PATH]

Keys each logged decision by what the oracle reads from the transcript (need known, budget known, pending
objection, liked, a product shown) and the parsed act of the suggestion (for a recommendation, its fit to the
stated need and budget; for an answer, whether it answers the pending question), averages the Monte Carlo returns per key
(keys with fewer than 3 returns fall back to the act's mean), and scores the run's ranking set (data/ranking_<k>.json,
or --truth, e.g. a precise set from experiments.q_ranking_ablation) like a Q-model: q_ranking.ranking_metrics.
Monte Carlo fits on the randomised turns only, on every turn whose return samples Q^{pi_k}
(qfit.targets=unbiased), and on every turn; then SARSA on every turn, Q(x, a) = mean of r + gamma Q(x', a'_pi)
with a'_pi pi_k's own next action (its sample where a randomised turn replaced it), iterated to its fixed point
(what qfit.method=td estimates). If even these tables rank at chance, the logs do not hold the ranking, whatever
the Q-model; if one does and the Q-model does not, the Q-model's estimator or its view of the state is at fault.
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


abstract_state = sales.dialogue_state  # the sales state tracker (envs/sales.py)
act_key = sales.act_key


turns_before = data_lib.turns_before


def fit_table(records, keep) -> tuple[dict, dict, int]:
  """(mean return per (abstract state, act key), per act key, decisions used) over those `keep(example)`
  selects."""
  by_id = {r.id: r for r in records}
  cells, acts, used = collections.defaultdict(list), collections.defaultdict(list), 0
  for e in data_lib.examples_from_conversations(records, gamma=0.95):
    if not keep(e):
      continue
    turns = turns_before(by_id[e.conversation_id], e)
    state, kind = abstract_state(turns), act_key(turns, e.suggestion)
    cells[(state, kind)].append(e.target)
    acts[kind].append(e.target)
    used += 1
  return ({key: float(np.mean(v)) for key, v in cells.items() if len(v) >= 3},
          {key: float(np.mean(v)) for key, v in acts.items()}, used)


def fit_sarsa(records, sweeps: int = 60, gamma: float = 0.95) -> tuple[dict, dict, int]:
  """Tabular SARSA of pi_k on every logged turn: Q(x, a) <- mean over its transitions of r + gamma Q(x', a'),
  a' pi_k's own next action (data.Example.own_action at a randomised turn), `sweeps` synchronous sweeps."""
  by_id = {r.id: r for r in records}
  examples = data_lib.examples_from_conversations(records, gamma=gamma)
  keys = []
  for e in examples:
    turns = turns_before(by_id[e.conversation_id], e)
    keys.append((abstract_state(turns), act_key(turns, e.suggestion),
                 act_key(turns, e.own_action if e.own_action is not None else e.suggestion)))
  transitions = collections.defaultdict(list)
  for i, e in enumerate(examples):
    nxt = None if e.done else (keys[e.next_index][0], keys[e.next_index][2])
    transitions[keys[i][:2]].append((e.reward, nxt))
  q = collections.defaultdict(float)
  for _ in range(sweeps):
    q = collections.defaultdict(float, {key: float(np.mean([r + (0.0 if n is None else gamma * q[n]) for r, n in ts]))
                                        for key, ts in transitions.items()})
  acts = collections.defaultdict(list)
  for key, ts in transitions.items():
    acts[key[1]] += [q[key]] * len(ts)
  return ({key: q[key] for key in transitions}, {a: float(np.mean(v)) for a, v in acts.items()}, len(examples))


def score(action_set: q_ranking.ActionSet, evals: dict, table: tuple[dict, dict, int]) -> dict:
  cells, acts = table[:2]
  flat = []
  for (cid, i), candidates in zip(action_set.where, action_set.candidates):
    state = abstract_state(evals[cid].turns[:i])
    for c in candidates:
      key = act_key(evals[cid].turns[:i], c)
      flat.append(cells.get((state, key), acts.get(key, 0.0) - 1e-3))
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
  fits = []
  for name, keep in (("randomised turns", lambda e: e.explored), ("turns from t* on", lambda e: e.target_valid),
                     ("every turn", lambda e: True)):
    fits.append((f"Monte Carlo, {name}", fit_table(records, keep)))
  fits.append(("SARSA, every turn (pi_k's next action)", fit_sarsa(records)))
  for name, table in fits:
    m = score(action_set, evals, table)
    print(f"| {name} | {table[2]} | {m['top1']:.2f} ({m['top1_chance']:.2f}) | {m['spearman']:+.2f} | {m['pairwise']:.2f} | "
          f"{m['pick_gain']:+.3f} ({m['best_gain']:.3f}) |")


if __name__ == "__main__":
  cli.run(main)
