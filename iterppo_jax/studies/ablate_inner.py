"""Ablation of the inner solver: Iterative PPO with ppo, grpo and rloo at the same sampled responses per iteration.

The command line is experiments/ablate_inner.py (--workdir, --inners).

Every solver samples ppo.steps x ppo.batch_size responses per iteration (GRPO/RLOO: ppo.batch_size / group.size
states, group.size responses each). The phases that do not depend on the solver (behaviour logs, tokenizer, SFT
pi_0, its evaluation, Q_0) run once into workdir/_shared, which is then copied to workdir/<inner>/ and resumed
there: the loop's resume is exact (tests/test_loop.py), so every solver starts from the very same pi_0 and Q_0.
Writes workdir/ablate_inner.jsonl (one row per solver x iteration: conversion with its 95% interval, KL(pi_k ||
pi_{k-1}) on D_{k-1}'s states, the inner solver's wall time); `table` and `plot` (ablate_inner.png) show them.
Rerunning with the same workdir resumes every solver where it stopped.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

from iterppo_jax import errors
from iterppo_jax import io_utils
from iterppo_jax import loop
from iterppo_jax import metrics as metrics_lib
from iterppo_jax import settings

# What run_ablation leaves in the workdir, next to a run directory per solver; and the plot's usual name there.
ROWS_FILE = "ablate_inner.jsonl"
PLOT_FILE = "ablate_inner.png"


def run_ablation(config, workdir: str, inners=settings.INNER_SOLVERS) -> list[dict]:
  """Runs (or resumes) the loop once per inner solver from a shared prefix; returns and writes the rows."""
  unknown = sorted(set(inners) - set(settings.INNER_SOLVERS))
  if unknown or not inners:
    raise errors.SettingsError(f"inners must be a non-empty subset of {settings.INNER_SOLVERS}, got {list(inners)}")
  typed = settings.parse(config)  # loop.run checks every setting of each solver's copy
  if typed.loop.logs:
    raise errors.SettingsError("the ablation runs the simulator loop; loop.logs (one offline iteration) is not "
                               "supported")
  if any(i != "ppo" for i in inners) and typed.ppo.batch_size % typed.group.size:
    raise errors.SettingsError(f"ppo.batch_size {typed.ppo.batch_size} (responses per batch) must be a multiple of "
                               f"group.size {typed.group.size} for GRPO/RLOO to sample as many responses as PPO")
  shared = os.path.join(workdir, "_shared")
  prefix = copy.deepcopy(config)
  prefix.loop.stop_after_phase = "qfit/0"  # everything before the first inner step is solver-independent
  try:
    loop.run(prefix, shared)
  except loop.Interrupted:
    pass
  rows = []
  for inner in inners:
    run_dir = os.path.join(workdir, inner)
    if not os.path.exists(run_dir):
      shutil.rmtree(run_dir + ".tmp", ignore_errors=True)  # left by a copy that was killed
      shutil.copytree(shared, run_dir + ".tmp")
      os.replace(run_dir + ".tmp", run_dir)  # a half-copied prefix is never mistaken for a run
    c = copy.deepcopy(config)
    c.inner = inner
    rows.extend(solver_rows(inner, loop.run(c, run_dir), metrics_lib.read_metrics(run_dir)))
  io_utils.atomic_write_rows(os.path.join(workdir, ROWS_FILE), rows)
  return rows


def read_rows(workdir: str) -> list[dict]:
  """The rows run_ablation wrote into workdir."""
  return io_utils.read_rows(os.path.join(workdir, ROWS_FILE))


def reference(workdir: str, inner: str) -> dict:
  """The scripted reference lines (behaviour staff, oracle) of a solver's run: the same scripted policies and
  evaluation seed for every solver, so any one of them serves the plot."""
  with open(os.path.join(workdir, inner, "summary.json")) as f:
    return json.load(f)["reference"]


def solver_rows(inner: str, summary: dict, records: list[dict]) -> list[dict]:
  """One row per evaluated pi_k of a run: its summary's evaluation plus the metrics of the step that made it."""
  kl, seconds = {}, {}
  for r in records:  # the last record wins: a resumed phase logs again
    if "improve/kl_to_pi_k" in r:
      kl[r["iteration"] + 1] = r["improve/kl_to_pi_k"]
    if "time/ppo" in r:  # the inner step's phase timer (loop.run names it 'ppo' whatever the solver)
      seconds[r["iteration"] + 1] = r["time/ppo"]
  return [{"inner": inner, "iteration": k, "conversion": s["conversion"], "conversion_lo": s["conversion_lo"],
           "conversion_hi": s["conversion_hi"], "kl_to_prev": kl.get(k), "inner_seconds": seconds.get(k),
           "accept_rate": s["accept_rate"], "kl_to_pi0": s.get("kl_to_pi0")}
          for k, s in enumerate(summary["iterations"])]


def table(rows: list[dict]) -> str:
  """Markdown table of the rows (KL and time are '-' for pi_0, which no inner step made)."""
  out = ["| solver | policy | conversion (95% CI) | KL(pi_k \\|\\| pi_{k-1}) | inner step s | KL to pi_0 |",
         "|---|---|---|---|---|---|"]
  fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
  for r in rows:
    out.append(f"| {r['inner']} | pi_{r['iteration']} | {r['conversion']:.3f} ({r['conversion_lo']:.3f}-"
               f"{r['conversion_hi']:.3f}) | {fmt(r['kl_to_prev'], '.3f')} | {fmt(r['inner_seconds'], '.0f')} | "
               f"{fmt(r['kl_to_pi0'], '.2f')} |")
  return "\n".join(out)


def plot(rows: list[dict], path: str, reference: dict | None = None) -> str:
  """Conversion per iteration with 95% interval bars, one line per solver, and the scripted reference lines
  (a run summary's 'reference': behaviour staff, oracle) when given; returns the PNG path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  inners = list(dict.fromkeys(r["inner"] for r in rows))
  fig, ax = plt.subplots(figsize=(6, 4))
  for j, inner in enumerate(inners):
    mine = [r for r in rows if r["inner"] == inner]
    xs = [r["iteration"] + 0.06 * (j - (len(inners) - 1) / 2) for r in mine]  # side by side, not on top
    ys = [r["conversion"] for r in mine]
    err = [[r["conversion"] - r["conversion_lo"] for r in mine], [r["conversion_hi"] - r["conversion"] for r in mine]]
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label=inner)
  styles = {"behavior": ("tab:gray", "--"), "oracle": ("tab:green", ":")}
  for name, s in (reference or {}).items():
    color, ls = styles.get(name, ("black", "-."))
    ax.axhline(s["conversion"], color=color, linestyle=ls, label=f"{name} (scripted)")
  ax.set_xticks(sorted({r["iteration"] for r in rows}))
  ax.set_xlabel("iteration k")
  ax.set_ylabel("conversion of pi_k (95% interval)")
  ax.set_title("Inner solver: same sampled responses per iteration")
  ax.legend(loc="best", fontsize=8)
  fig.tight_layout()
  return io_utils.save_figure(fig, path)
