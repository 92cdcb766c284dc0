"""What a dialogue-state tracker misses: the true Q that its (state, act) cells cannot hold, and what it follows.

A Q-model over the tracker's keys (qfit.view=dialogue_state) gives every (state, candidate) in one cell the same
value. On a loop run's true-Q set (data/ranking_<k>.json: states of pi_k's evaluation conversations, candidates,
the simulator's Monte Carlo Q), each candidate's true Q is centred on its state's mean (only the order within a
state matters to the improvement step), and the mean of its cell over the set is taken out. What is left is what
the cells miss, plus Monte Carlo noise: its variance against the noise's says how much is real, and its
correlation with each field of the simulator's hidden state (restored at that turn, and as the candidate, sent as
it is, leaves it: 'after.' fields; numeric fields as they are, each value of a short text field as an
indicator), per act kind, says what the tracker would need. A field the
transcript cannot show yet (which fix will solve the issue, drawn at reset) is partial observability, which no
Q-model of the transcript removes; one it shows is a tracker to extend (docs/results.md, finding 22).

Reads only the runs' files and replays their logged states in the simulator; nothing is fitted or played on.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import os

import numpy as np

from iterppo_jax import errors
from iterppo_jax import q_ranking
from iterppo_jax import settings
from iterppo_jax import workdir as workdir_lib
from iterppo_jax.envs import registry

MAX_LEVELS = 8  # a text field with more distinct values than this is left out (a message, a name)


def _features(hidden) -> dict[str, float]:
  """The hidden state's numeric fields, and 'field=value' indicators of its short text fields."""
  out = {}
  for f in dataclasses.fields(hidden):
    v = getattr(hidden, f.name)
    if isinstance(v, (bool, int, float, np.integer, np.floating)):
      out[f.name] = float(v)
    elif isinstance(v, str):
      out[f"{f.name}={v}"] = 1.0
  return out


def pairs(workdir: str, k: int) -> list[dict]:
  """One row per (state, candidate) of the run's true-Q set k: its cell, true Q, standard error, hidden fields."""
  env_config = settings.load_env(workdir_lib.read_run_env(workdir))
  truth_path = os.path.join(workdir, "data", f"ranking_{k}.json")
  if not os.path.exists(truth_path):
    raise errors.DataError(f"{truth_path} not found: the run measured no ranking at k = {k} (loop.rank_states)")
  aset = q_ranking.ActionSet.load(truth_path)
  records = {r.id: r for r in workdir_lib.read_logs(workdir, f"eval_{k}")}
  env = registry.make_env(env_config)
  state_fn, act_fn = registry.tracker(env_config.domain)
  rows = []
  for i, (cid, n_turns) in enumerate(aset.where):
    if cid not in records:
      raise errors.DataError(f"{truth_path}: state {i} is in conversation {cid!r}, which data/eval_{k} does not hold")
    record = records[cid]
    turns = record.turns[:n_turns]
    live = env.restore(record, n_turns).hidden
    before = _features(live)
    state = state_fn(turns)
    for j, text in enumerate(aset.candidates[i]):
      # the customer's state once this candidate is sent as it is ('after.' fields: e.g. whether it fixed it)
      after = copy.deepcopy(live)
      env.customer_reply(after, text, np.random.default_rng(0))
      hidden = {**before, **{f"after.{n}": v for n, v in _features(after).items()}}
      rows.append({"set": (workdir, k), "state": i, "cell": (state, act_fn(turns, text)),
                   "q": float(aset.true_q[i, j]), "se": float(aset.true_se[i, j]), "hidden": hidden})
  return rows


def residuals(rows: list[dict], min_kind: int = 30, top: int = 3) -> dict:
  """Centres each row's true Q on its state's mean and takes out its cell's mean (per true-Q set; cells of one
  row hold nothing to compare and are left out). Returns the residual's variance, the Monte Carlo noise's (the
  mean squared standard error, shrunk by the cell's size as the mean is taken out) and, per act kind with at
  least `min_kind` rows, its variance and the `top` hidden fields most correlated with it."""
  by_state = collections.defaultdict(list)
  for r in rows:
    by_state[(r["set"], r["state"])].append(r)
  centred = {}
  for members in by_state.values():
    mean = np.mean([r["q"] for r in members])
    for r in members:
      centred[id(r)] = r["q"] - mean
  cells = collections.defaultdict(list)
  for r in rows:
    cells[(r["set"], r["cell"])].append(r)
  levels = collections.defaultdict(set)  # a text field's values over every row
  for r in rows:
    for name in r["hidden"]:
      field, _, value = name.partition("=")
      levels[field].add(value)
  kept = []
  for members in cells.values():
    if len(members) < 2:
      continue
    mean = np.mean([centred[id(r)] for r in members])
    kept += [(r, centred[id(r)] - mean, r["se"] ** 2 * (1 - 1 / len(members))) for r in members]
  if not kept:
    raise errors.DataError("no tracker cell holds two (state, candidate) pairs: nothing to compare")
  res = np.array([x for _, x, _ in kept])
  out = {"pairs": len(kept), "residual_var": float(res.var()), "noise_var": float(np.mean([n for _, _, n in kept])),
         "by_kind": {}}
  kinds = collections.defaultdict(list)
  for r, x, _ in kept:
    act = r["cell"][1]
    kinds[act[0] if act else "none"].append((r, x))
  for kind, members in sorted(kinds.items(), key=lambda kv: -len(kv[1])):
    if len(members) < min_kind:
      continue
    x = np.array([m[1] for m in members])
    names = sorted({n for r, _ in members for n in r["hidden"] if len(levels[n.partition("=")[0]]) <= MAX_LEVELS})
    corr = {}
    for name in names:
      f = np.array([r["hidden"].get(name, 0.0) for r, _ in members])
      was = name[len("after."):] if name.startswith("after.") else None
      if was is not None and np.array_equal(f, [r["hidden"].get(was, 0.0) for r, _ in members]):
        continue  # a field no candidate of this kind changes: its 'after.' copy says nothing new
      if f.std() > 0 and x.std() > 0:
        corr[name] = float(np.corrcoef(f, x)[0, 1])
    strongest = sorted(corr.items(), key=lambda kv: -abs(kv[1]))[:top]
    out["by_kind"][kind] = {"n": len(members), "residual_var": float(x.var()), "fields": strongest}
  return out


def table(result: dict) -> str:
  lines = [f"{result['pairs']} (state, candidate) pairs in cells of two or more: residual variance "
           f"{result['residual_var']:.4f}, Monte Carlo noise {result['noise_var']:.4f} (real: "
           f"{max(0.0, 1 - result['noise_var'] / result['residual_var']):.0%})", "",
           "| act kind | pairs | residual variance | hidden fields most correlated with the residual |",
           "|---|---|---|---|"]
  for kind, k in result["by_kind"].items():
    fields = ", ".join(f"{n} {c:+.2f}" for n, c in k["fields"])
    lines.append(f"| {kind} | {k['n']} | {k['residual_var']:.4f} | {fields} |")
  return "\n".join(lines)
