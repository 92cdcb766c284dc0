"""Does the improvement step climb Q_k? What each iteration did to the policy, from a finished run's files.

For a loop run with the dialogue-state Q-model (qfit.view=dialogue_state), per iteration k:
  * pi_k's evaluation conversion and the share of its suggestions per act (the domain tracker's act key);
  * how often pi_k's act is the domain oracle's at that state (the tracker's act keys equal; a simulator-side
    reference, like the true Q), overall and per act the oracle would play, next to the staff's own logs
    (data/behavior.jsonl): where a cloned pi_0 falls short of the staff it was cloned from (finding 22);
  * Q_k's own objective: the mean of Q_k over pi_k's evaluation decisions and over pi_{k+1}'s. The improvement
    step maximises E_{a~pi}[Q_k(s, a)] - beta KL(pi || pi_k); a step that does not raise the first term moved the
    policy along directions Q_k does not prefer (docs/results.md, finding 15). pi_{k+1}'s states differ from
    pi_k's, so the difference also holds the state shift: read it next to the run's true-Q ranking measures;
  * how far the step can climb Q_k at all: the spread of Q_k over pi_k's acts at one tracker state, and the raise
    of Q_k's mean that the step's exact solution pi_k exp(Q_k / beta) / Z would give, next to the spread of the
    states' values that the step's baseline must remove (q_ranking.step_reach, finding 29).

Reads only workdir/{config.json,data/{eval_<k>,behavior}.jsonl,checkpoints/qtable/<k>.json} (nothing is refitted or
played).
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np

from iterppo_jax import errors
from iterppo_jax import q_ranking
from iterppo_jax import q_table
from iterppo_jax import workdir as workdir_lib
from iterppo_jax.envs import registry


def _decisions(records):
  """(turns before, suggestion text) of every suggestion turn."""
  return [(r.turns[:i], t.text) for r in records for i, t in enumerate(r.turns) if t.role == "suggestion"]


def _staff_decisions(records):
  """(turns before, sent message) of every business turn the staff wrote (logs without suggestions)."""
  return [(r.turns[:i], t.text) for r in records for i, t in enumerate(r.turns) if t.role == "business"]


def oracle_agreement(domain: str, decisions) -> tuple[float, dict[str, tuple[int, float]]]:
  """(share of `decisions` whose act is the oracle's, {oracle's act kind: (decisions, share)}), acts compared by
  the domain tracker's act key at the state."""
  _, act_fn = registry.tracker(domain)
  oracle = registry.oracle_fn(domain)
  rng = np.random.default_rng(0)  # the oracle's wording; the act key reads the act, not the template
  hits = collections.defaultdict(list)
  for turns, text in decisions:
    best = act_fn(turns, oracle(turns, rng))
    hits[best[0] if best else "none"].append(act_fn(turns, text) == best)
  every = [h for v in hits.values() for h in v]
  by_act = {kind: (len(v), float(np.mean(v))) for kind, v in sorted(hits.items(), key=lambda kv: -len(kv[1]))}
  return (float(np.mean(every)) if every else float("nan")), by_act


def _beta(workdir: str) -> float | None:
  """The run's ppo.kl_coef from its config.json (None where it is not there)."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      return float(json.load(f)["ppo"]["kl_coef"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def shift_rows(workdir: str, top_acts: int = 6, beta: float | None = None) -> list[dict]:
  """One row per iteration k that has eval_<k> (and, for the Q columns, qtable/<k> and eval_<k+1>), after a row
  k = 'staff' for the staff's logs (data/behavior.jsonl) where the run has them; the exact step's raise at
  `beta` (default: the run's ppo.kl_coef)."""
  domain = workdir_lib.read_run_env(workdir)["domain"]
  state_fn, act_fn = registry.tracker(domain)
  beta = beta or _beta(workdir)

  def logs(name):
    try:
      return workdir_lib.read_logs(workdir, name)
    except FileNotFoundError:
      return None

  def evals(k):
    return logs(f"eval_{k}")

  def row_of(k, records, decisions):
    acts = collections.Counter(a[0] if a else "none" for a in (act_fn(t, x) for t, x in decisions))
    agreement, by_act = oracle_agreement(domain, decisions)
    return {"k": k, "conversion": float(np.mean([r.outcome for r in records])), "decisions": len(decisions),
            "act_share": {a: n / len(decisions) for a, n in acts.most_common(top_acts)},
            "oracle_agreement": agreement, "oracle_agreement_by_act": by_act}

  rows, k, records = [], 0, evals(0)
  if records is None:
    raise errors.DataError(f"{workdir}/data/eval_0.jsonl not found: not a finished loop run")
  staff = logs("behavior")
  if staff is not None:
    rows.append(row_of("staff", staff, _staff_decisions(staff)))
  while records is not None:
    decisions = _decisions(records)
    row = row_of(k, records, decisions)
    following = evals(k + 1)
    q_path = os.path.join(workdir, "checkpoints", "qtable", f"{k}.json")
    if following is not None and os.path.exists(q_path):
      q = q_table.TableQ.load(q_path, state_fn, act_fn)
      scores = [q.score(t, x) for t, x in decisions]
      row["q_on_pi_k"] = float(np.mean(scores))
      row["q_on_pi_next"] = float(np.mean([q.score(t, x) for t, x in _decisions(following)]))
      if beta:
        by_state = collections.defaultdict(list)
        for (t, _), score in zip(decisions, scores):
          by_state[repr(state_fn(t))].append(score)
        row["beta"] = beta
        row.update(q_ranking.step_reach(list(by_state.values()), beta))
    rows.append(row)
    k, records = k + 1, following
  return rows


def table(rows: list[dict]) -> str:
  lines = ["| k | conversion of pi_k | acts the oracle's | Q_k over pi_k's decisions | over pi_{k+1}'s | change | "
           "the exact step's raise (beta) | Q_k's s.d. in a state | s.d. of V_k(s) | pi_k's acts (share) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    q = (f"{r['q_on_pi_k']:.3f} | {r['q_on_pi_next']:.3f} | {r['q_on_pi_next'] - r['q_on_pi_k']:+.3f}"
         if "q_on_pi_k" in r else "- | - | -")
    q += (f" | {r['step_raise']:+.3f} ({r['beta']:g}) | {r['q_sd_in_state']:.3f} | {r['q_sd_of_state_value']:.3f}"
          if "step_raise" in r else " | - | - | -")
    acts = ", ".join(f"{a} {v:.2f}" for a, v in r["act_share"].items())
    lines.append(f"| {r['k']} | {r['conversion']:.3f} | {r['oracle_agreement']:.2f} | {q} | {acts} |")
  return "\n".join(lines)


def agreement_table(rows: list[dict]) -> str:
  """Per act the oracle plays (most frequent first, in the first row): the share of each row's decisions there
  that are the oracle's act, and how many there were."""
  kinds = list(rows[0]["oracle_agreement_by_act"])
  kinds += [k for r in rows for k in r["oracle_agreement_by_act"] if k not in kinds]
  names = [("staff's logs" if r["k"] == "staff" else f"pi_{r['k']}") for r in rows]
  lines = ["| the oracle's act | " + " | ".join(names) + " |", "|---" * (len(rows) + 1) + "|"]
  for kind in kinds:
    cells = [(f"{r['oracle_agreement_by_act'][kind][1]:.2f} ({r['oracle_agreement_by_act'][kind][0]})"
              if kind in r["oracle_agreement_by_act"] else "-") for r in rows]
    lines.append(f"| {kind} | " + " | ".join(cells) + " |")
  lines.append("| every act | " + " | ".join(f"{r['oracle_agreement']:.2f} ({r['decisions']})" for r in rows) + " |")
  return "\n".join(lines)
