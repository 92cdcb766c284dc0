r"""Loop runs of several seeds side by side: conversion per iteration, paired gains and Q's action ranking.

  python -m experiments.seeds_summary --workdirs=runs/s0,runs/s1,runs/s2 [--out=docs/results/sales_seeds]

Reads each run's summary.json (written by the loop at the end) and prints markdown: conversion of every pi_k per
seed with its 95% Wilson interval; the mean over seeds with a 95% Student-t interval over seeds; the paired gains
pi_{k+1} - pi_k (same seed, same held-out customers) averaged over seeds with their t-interval; and Q_k's ranking
of actions against the simulator's true Q^{pi_k} averaged over seeds. With --out, writes <out>.md and <out>.json.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import flags

from experiments import cli
from iterppo_jax import errors
from iterppo_jax import io_utils
from iterppo_jax import stats

_WORKDIRS = cli.define(flags.DEFINE_list, "workdirs", None, "Finished loop runs (one per seed).")
_OUT = cli.define(flags.DEFINE_string, "out", "", "Write <out>.md and <out>.json too.")

def summarize(summaries: list[dict], names: list[str]) -> dict:
  """The tables' numbers from loop summaries (one per seed); runs may have different numbers of iterations."""
  n_iter = min(len(s["iterations"]) for s in summaries)
  conv = np.asarray([[s["iterations"][k]["conversion"] for k in range(n_iter)] for s in summaries])
  out = {"runs": names, "iterations": n_iter, "conversion": conv.tolist(),
         "per_seed": [[(it["conversion"], it["conversion_lo"], it["conversion_hi"]) for it in s["iterations"][:n_iter]]
                      for s in summaries],
         "mean": [stats.mean_interval(conv[:, k]) for k in range(n_iter)],
         "gains": [stats.mean_interval(conv[:, k + 1] - conv[:, k]) for k in range(n_iter - 1)],
         "gain_over_pi0": stats.mean_interval(conv[:, -1] - conv[:, 0]),
         "behavior": stats.mean_interval([s["reference"]["behavior"]["conversion"] for s in summaries]),
         "last_above_behavior": [bool(c[-1] > s["reference"]["behavior"]["conversion"])
                                 for c, s in zip(conv, summaries)]}
  ranking = []
  for k in range(n_iter - 1):
    rows = [s.get("q_ranking", [])[k] if k < len(s.get("q_ranking", [])) else {} for s in summaries]
    ranking.append({m: stats.mean_interval([r.get(m, float("nan")) for r in rows])
                    for m in ("rank_top1", "rank_top1_chance", "rank_spearman", "rank_pick_gain", "rank_best_gain",
                              "rank_truth_reliability", "logged_adv_corr", "logged_cv_adv_corr",
                              "deployed_conversion")})
  out["ranking"] = ranking
  return out


def markdown(t: dict) -> str:
  f = lambda m: f"{m[0]:.3f} ({m[1]:.3f} to {m[2]:.3f})"  # noqa: E731
  lines = ["| policy | " + " | ".join(t["runs"]) + " | mean over seeds (95% t-interval) |",
           "|---|" + "---|" * (len(t["runs"]) + 1)]
  for k in range(t["iterations"]):
    cells = [f"{c:.3f} ({lo:.3f}-{hi:.3f})" for c, lo, hi in (run[k] for run in t["per_seed"])]
    lines.append(f"| pi_{k} | " + " | ".join(cells) + f" | {f(t['mean'][k])} |")
  lines += ["", "| paired gain | mean over seeds (95% t-interval) |", "|---|---|"]
  for k, g in enumerate(t["gains"]):
    lines.append(f"| pi_{k + 1} - pi_{k} | {g[0]:+.3f} ({g[1]:+.3f} to {g[2]:+.3f}) |")
  g = t["gain_over_pi0"]
  if len(t["gains"]) > 1:  # with one iteration the total is the one paired gain above
    lines.append(f"| pi_{t['iterations'] - 1} - pi_0 | {g[0]:+.3f} ({g[1]:+.3f} to {g[2]:+.3f}) |")
  lines += ["", f"behaviour staff: {f(t['behavior'])}; last iterate above it in "
            f"{sum(t['last_above_behavior'])} of {len(t['runs'])} seeds", "",
            "| Q_k | top-1 (chance) | Spearman | gain of Q's pick (best possible) | truth reliability | "
            "logs-only corr(A, G): held-out tenth | every randomised turn, cross-fitted | deployed conversion |",
            "|---|---|---|---|---|---|---|---|"]
  for k, r in enumerate(t["ranking"]):
    v = lambda m, spec: "-" if np.isnan(r[m][0]) else format(r[m][0], spec)  # noqa: E731  (-: not measured)
    lines.append(f"| Q_{k} | {v('rank_top1', '.2f')} ({v('rank_top1_chance', '.2f')}) | {v('rank_spearman', '+.2f')} | "
                 f"{v('rank_pick_gain', '+.3f')} ({v('rank_best_gain', '.3f')}) | "
                 f"{v('rank_truth_reliability', '.2f')} | {v('logged_adv_corr', '+.2f')} | "
                 f"{v('logged_cv_adv_corr', '+.2f')} | {v('deployed_conversion', '.3f')} |")
  if any(np.isnan(r["rank_top1"][0]) for r in t["ranking"]):
    lines += ["", "-: not measured (a run without loop.rank_states, or a Q_k without logs that allow it)"]
  return "\n".join(lines)


def main(argv):
  del argv
  summaries, names = [], []
  for wd in _WORKDIRS.value:
    path = os.path.join(wd, "summary.json")
    if not os.path.exists(path):
      raise errors.DataError(f"{path} not found: is the run in {wd} finished?")
    with open(path) as f:
      summaries.append(json.load(f))
    names.append(os.path.basename(os.path.normpath(wd)))
  table = summarize(summaries, names)
  text = markdown(table)
  print(text)
  if _OUT.value:
    io_utils.atomic_write_text(_OUT.value + ".md", text + "\n")
    io_utils.atomic_write_json(_OUT.value + ".json", table)


if __name__ == "__main__":
  cli.run(main)
