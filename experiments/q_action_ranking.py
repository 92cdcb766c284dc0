"""How well a run's Q-models rank *actions*, not just states (sales runs).

  python -m experiments.q_action_ranking --workdir=runs/iterative_ppo_<time> [--states=300]

At states of the run's evaluation conversations (data/eval_<k>.jsonl) it scores six scripted candidate acts
(ask the need, ask the budget, recommend the fitting product, answer the pending or a likely question, discount,
close) with every fitted Q_k, and prints, per Q_k and state set: how often the oracle's act is on top (chance is
1/6), how often "answer" is on top where no question is pending, and the mean Q of each candidate by the
oracle's act at the state. A Q-model with a high outcome AUC can still rank actions at chance; PPO then follows
its errors (docs/results.md, "Before issue #16").
"""

import json
import os

import numpy as np
from absl import flags
from absl import logging
from flax import nnx
from ml_collections import config_dict

from experiments import cli
from iterppo_jax import conversation as conv_lib
from iterppo_jax import data as data_lib
from iterppo_jax import errors
from iterppo_jax import loop
from iterppo_jax import qfit as qfit_lib
from iterppo_jax import settings
from iterppo_jax import train_state as ts
from iterppo_jax.envs import sales
from iterppo_jax.models import heads

_WORKDIR = cli.define(flags.DEFINE_string, "workdir", None, "A finished (or partly finished) sales loop run.")
_STATES = cli.define(flags.DEFINE_integer, "states", 300, "States per evaluation file.")

KINDS = ("ask_need", "ask_budget", "recommend", "answer", "discount", "close")


def candidates(v: sales.Visible, rng) -> list[str]:
  """One business message per candidate act at a state read from the transcript."""
  out = []
  for kind in KINDS:
    if kind == "recommend":
      act = sales.Act("recommend", product=sales.product_for(v.need or "laptop", 1 if v.budget is None else v.budget))
    elif kind == "answer":
      act = sales.Act("answer", topic=v.topic or "warranty")
    else:
      act = sales.Act(kind)
    out.append(sales.business_text(act, rng))
  return out


def state_set(run_, records, n_states: int, seed: int = 0):
  """(arrays of n x 6 candidate pairs, the oracle's act index per state)."""
  rng = np.random.default_rng(seed)
  examples, best = [], []
  for r in records:
    for i in r.agent_steps():
      if len(best) >= n_states:
        break
      v = sales.visible_facts(r.turns[:i])
      prompt = run_.encoding.state(r.turns[:i])
      best.append(KINDS.index(sales.oracle_act(v).kind))
      examples += [data_lib.Example("c", 0, prompt, t, t, "accept", 0., 0., -1, True, 0.) for t in candidates(v, rng)]
  return run_.arrays(examples), np.asarray(best)


def ranking(q: np.ndarray, best: np.ndarray) -> dict:
  """q [n, 6]: the share of states whose top candidate is the oracle's act, and the unprompted-answer share."""
  top = q.argmax(1)
  no_question = best != KINDS.index("answer")
  table = {KINDS[b]: [float(x) for x in q[best == b].mean(0)] for b in range(len(KINDS)) if np.any(best == b)}
  return {"oracle_top": float(np.mean(top == best)),
          "answer_top_without_question": float(np.mean(top[no_question] == KINDS.index("answer"))),
          "mean_q_by_oracle_act": table}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  wd = _WORKDIR.value
  config = config_dict.ConfigDict(json.load(open(os.path.join(wd, "config.json"))))
  typed = settings.load(config)
  if typed.env.domain != "sales":
    raise errors.SettingsError(f"{wd} is a {typed.env.domain!r} run; this diagnostic knows the sales acts only")
  run_, logs = loop.setup(config, wd)
  _, pi0 = loop.train_pi0(run_, logs)
  sets = {}
  for k in range(typed.loop.iterations + 1):
    path = os.path.join(wd, "data", f"eval_{k}.jsonl")
    if os.path.exists(path):
      sets[f"eval_{k}"] = state_set(run_, conv_lib.read_jsonl(path), _STATES.value)
  make_q = lambda: heads.scalar_model_from_policy(nnx.merge(loop.run_policy_graphdef(run_), pi0), rngs=nnx.Rngs(0))
  trainable, state = ts.init_trainable(make_q, loop.optimizer(typed.qfit), run_.mesh)
  predict_fn = qfit_lib.make_predict_fn(trainable, typed.qfit.kind)
  for k in range(typed.loop.iterations):
    if not run_.progress.get(f"qfit/{k}"):
      continue
    params = loop.restore_params(run_, "qmodel", k, state.params)
    for name, (arrays, best) in sets.items():
      q = qfit_lib.predict(predict_fn, params, arrays, 64, run_.mesh).reshape(-1, len(KINDS))
      r = ranking(q, best)
      print(f"Q_{k} on {name} states: oracle's act on top {r['oracle_top']:.2f} (chance {1 / len(KINDS):.2f}), "
            f"'answer' on top with no question pending {r['answer_top_without_question']:.2f}")
      print("  oracle's act \\ candidate " + " ".join(f"{c[:10]:>10}" for c in KINDS))
      for b, row in r["mean_q_by_oracle_act"].items():
        print(f"  {b:<25} " + " ".join(f"{x:10.3f}" for x in row))


if __name__ == "__main__":
  cli.run(main)
