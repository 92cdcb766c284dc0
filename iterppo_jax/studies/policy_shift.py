"""Does the improvement step climb Q_k? What each iteration did to the policy, from a finished run's files.

For a loop run with the dialogue-state Q-model (qfit.view=dialogue_state), per iteration k:
  * pi_k's evaluation conversion and the share of its suggestions per act (the domain tracker's act key);
  * Q_k's own objective: the mean of Q_k over pi_k's evaluation decisions and over pi_{k+1}'s. The improvement
    step maximises E_{a~pi}[Q_k(s, a)] - beta KL(pi || pi_k); a step that does not raise the first term moved the
    policy along directions Q_k does not prefer (docs/results.md, finding 15). pi_{k+1}'s states differ from
    pi_k's, so the difference also holds the state shift: read it next to the run's true-Q ranking measures.

Reads only workdir/data/eval_<k>.jsonl and workdir/checkpoints/qtable/<k>.json (nothing is refitted or played).
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np

from iterppo_jax import conversation as conv_lib
from iterppo_jax import errors
from iterppo_jax import q_table
from iterppo_jax.envs import registry


def _decisions(records):
  """(turns before, suggestion text) of every suggestion turn."""
  return [(r.turns[:i], t.text) for r in records for i, t in enumerate(r.turns) if t.role == "suggestion"]


def shift_rows(workdir: str, top_acts: int = 6) -> list[dict]:
  """One row per iteration k that has eval_<k> (and, for the Q columns, qtable/<k> and eval_<k+1>)."""
  config_path = os.path.join(workdir, "config.json")
  try:
    with open(config_path) as f:
      domain = json.load(f)["env"]["domain"]
  except (OSError, ValueError, KeyError) as e:
    raise errors.DataError(f"{config_path}: not a loop run's config ({type(e).__name__}: {e})") from e
  state_fn, act_fn = registry.tracker(domain)

  def evals(k):
    path = os.path.join(workdir, "data", f"eval_{k}.jsonl")
    return conv_lib.read_jsonl(path) if os.path.exists(path) else None

  rows, k, records = [], 0, evals(0)
  if records is None:
    raise errors.DataError(f"{workdir}/data/eval_0.jsonl not found: not a finished loop run")
  while records is not None:
    decisions = _decisions(records)
    acts = collections.Counter(a[0] if a else "none" for a in (act_fn(t, x) for t, x in decisions))
    row = {"k": k, "conversion": float(np.mean([r.outcome for r in records])), "decisions": len(decisions),
           "act_share": {a: n / len(decisions) for a, n in acts.most_common(top_acts)}}
    following = evals(k + 1)
    q_path = os.path.join(workdir, "checkpoints", "qtable", f"{k}.json")
    if following is not None and os.path.exists(q_path):
      q = q_table.TableQ.load(q_path, state_fn, act_fn)
      row["q_on_pi_k"] = float(np.mean([q.score(t, x) for t, x in decisions]))
      row["q_on_pi_next"] = float(np.mean([q.score(t, x) for t, x in _decisions(following)]))
    rows.append(row)
    k, records = k + 1, following
  return rows


def table(rows: list[dict]) -> str:
  lines = ["| k | conversion of pi_k | Q_k over pi_k's decisions | over pi_{k+1}'s | change | pi_k's acts (share) |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    q = (f"{r['q_on_pi_k']:.3f} | {r['q_on_pi_next']:.3f} | {r['q_on_pi_next'] - r['q_on_pi_k']:+.3f}"
         if "q_on_pi_k" in r else "- | - | -")
    acts = ", ".join(f"{a} {v:.2f}" for a, v in r["act_share"].items())
    lines.append(f"| {r['k']} | {r['conversion']:.3f} | {q} | {acts} |")
  return "\n".join(lines)
