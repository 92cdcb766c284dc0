"""Q-quality ablation (issue #10): degrade Q on purpose, watch Q's error, pi_{k+1}'s conversion and the bound.

The command line is experiments/ablate_q.py (--workdir, --variants, --report_only).

Variants of the base config, each a run of the loop in workdir/<variant>/:
  baseline             the config as given
  fewer_conversations  the Q-fit sees a quarter of each D_k's conversations (qfit.data_fraction = 0.25)
  flip_10, flip_30     each D_k conversation's outcome label is flipped with probability 0.1 / 0.3 before the
                       Q-fit (qfit.label_flip): a noisy outcome classifier
  small_q              a Q-model of half the policy's layers, width and heads, from scratch (qfit.model.*)
  few_qfit_steps       a quarter of the Q-fit steps (qfit.steps)
Only the Q-fit changes; PPO still sees all of D_k's states and every evaluation uses clean labels. The phases
before the first Q-fit (behaviour logs, tokenizer, SFT pi_0, its evaluation, the reference lines) run once into
workdir/_shared and are copied into every variant, whose run then resumes from there (the loop's resume is
exact, tests/test_loop.py), so all variants start from the very same pi_0.

Per variant and iteration k it reads what the loop wrote: Q_k's error against the simulator's Monte Carlo true
Q on sampled held-out states (qfit/<k> in progress.json: true_q_mae, true_q_max_err, true_q_corr) and the
label error of the data it was fitted on, KL(pi_{k+1} || pi_k) (improve/kl_to_pi_k in metrics.jsonl), pi_{k+1}'s
conversion (eval/<k+1>), and from the evaluation logs (data/eval_<k>.jsonl) the discounted value of the start
state, so the realised improvement V(pi_{k+1}) - V(pi_k) stands next to beta KL - 2 eps_Q (bound.py). Writes
workdir/ablate_q.jsonl (one row per variant x iteration), ablate_q.md (the tables) and ablate_q.png.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Callable

from iterppo_jax import bound
from iterppo_jax import conversation as conv_lib
from iterppo_jax import errors
from iterppo_jax import io_utils
from iterppo_jax import loop
from iterppo_jax import metrics as metrics_lib
from iterppo_jax import settings
from iterppo_jax import workdir as workdir_lib


def _small_q(config) -> dict:
  m = config.model
  heads = max(m.num_heads // 2, 1)
  kv = min(max(m.num_kv_heads // 2, 1), heads)
  while heads % kv:  # grouped-query attention needs whole groups
    kv -= 1
  return {"qfit.model.num_layers": max(m.num_layers // 2, 1), "qfit.model.num_heads": heads,
          "qfit.model.num_kv_heads": kv, "qfit.model.head_dim": m.head_dim,
          "qfit.model.embed_dim": heads * m.head_dim, "qfit.model.mlp_dim": max(m.mlp_dim // 2, 8)}


# name -> overrides of the base config (dotted keys), computed from its typed settings so sizes stay relative.
VARIANTS: dict[str, Callable] = {
    "baseline": lambda c: {},
    "fewer_conversations": lambda c: {"qfit.data_fraction": 0.25},
    "flip_10": lambda c: {"qfit.label_flip": 0.1},
    "flip_30": lambda c: {"qfit.label_flip": 0.3},
    "small_q": _small_q,
    "few_qfit_steps": lambda c: {"qfit.steps": max(c.qfit.steps // 4, 1)},
}

# What run_ablation and write_report leave in the workdir.
ROWS_FILE = "ablate_q.jsonl"
TABLES_FILE = "ablate_q.md"
PLOT_FILE = "ablate_q.png"


# ---- configs ----

def apply_overrides(config, overrides: dict):
  """A copy of `config` with dotted keys set; a key the config lacks is a ValueError naming it."""
  out = copy.deepcopy(config)
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    node = out
    for part in path:
      if part not in node:
        node = None
        break
      node = node[part]
    if node is None or leaf not in node:
      raise errors.SettingsError(f"config key {key!r} does not exist; this variant needs the Q-ablation keys "
                                 "(qfit.label_flip, qfit.data_fraction, qfit.model.*) in the config and the loop")
    node[leaf] = value
  return out


# Variants that change the transformer Q-model, which the dialogue-state table (qfit.view=dialogue_state) has not.
TOKEN_ONLY = ("small_q", "few_qfit_steps")


def variant_config(config, name: str):
  if name not in VARIANTS:
    raise errors.SettingsError(f"unknown variant {name!r}; expected one of {list(VARIANTS)}")
  typed = settings.parse(config)  # loop.run checks every setting of the variant's copy
  if name in TOKEN_ONLY and typed.qfit.view != "tokens":
    raise errors.SettingsError(f"variant {name!r} changes the transformer Q-model, but qfit.view is "
                               f"{typed.qfit.view!r}: run it with --config.qfit.view=tokens")
  return apply_overrides(config, VARIANTS[name](typed))


# ---- reading a run ----

def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _last_by_iteration(records: list[dict], key: str) -> dict[int, float]:
  out = {}
  for r in records:  # the last record wins: a resumed phase logs again
    if key in r and "iteration" in r:
      out[int(r["iteration"])] = r[key]
  return out


def variant_rows(variant: str, run_dir: str) -> list[dict]:
  """One row per finished iteration k of a run (Q_k fitted, pi_{k+1} evaluated), from the files it wrote."""
  typed = settings.parse(_read_json(os.path.join(run_dir, "config.json")))  # the run's record, as loop.run read it
  gamma, beta = typed.gamma, typed.ppo.kl_coef
  progress = workdir_lib.Progress(run_dir).done
  metrics_path = os.path.join(run_dir, metrics_lib.METRICS_FILENAME)
  records = metrics_lib.read_metrics(metrics_path) if os.path.exists(metrics_path) else []
  kl = _last_by_iteration(records, "improve/kl_to_pi_k")
  eval_logs = lambda k: conv_lib.read_jsonl(os.path.join(run_dir, "data", f"eval_{k}.jsonl"))  # noqa: E731
  rows, k = [], 0
  while f"eval/{k + 1}" in progress and f"qfit/{k}" in progress:
    q, before, after = progress[f"qfit/{k}"], progress[f"eval/{k}"], progress[f"eval/{k + 1}"]
    row = {"variant": variant, "k": k,
           "conversion_k": before["conversion"], "conversion_k_lo": before["conversion_lo"],
           "conversion_k_hi": before["conversion_hi"],
           "conversion": after["conversion"], "conversion_lo": after["conversion_lo"],
           "conversion_hi": after["conversion_hi"],
           "q_mae": q.get("true_q_mae"), "q_max_err": q.get("true_q_max_err"), "q_corr": q.get("true_q_corr"),
           "q_auc": q.get("auc"), "label_error": q.get("label_error_rate"), "kl_to_prev": kl.get(k)}
    if row["kl_to_prev"] is not None and row["q_mae"] is not None:
      row.update(bound.logged_bound_row(k, eval_logs(k), eval_logs(k + 1), gamma=gamma, beta=beta,
                                        kl=row["kl_to_prev"], eps_q_mean=row["q_mae"], eps_q_max=row["q_max_err"]))
    rows.append(row)
    k += 1
  return rows


# ---- running ----

def run_ablation(config, workdir: str, variants=tuple(VARIANTS), report_only: bool = False) -> list[dict]:
  """Runs (or resumes, or with report_only just reads) every variant; returns and writes the rows."""
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown or not variants:
    raise errors.SettingsError(f"variants must be a non-empty subset of {list(VARIANTS)}, got {list(variants)}")
  if settings.parse(config).loop.logs:
    raise errors.SettingsError("the ablation measures Q against the simulator; loop.logs (one offline iteration) "
                               "has none")
  rows = []
  if not report_only:
    configs = {v: variant_config(config, v) for v in variants}  # a missing key fails before any work
    shared = os.path.join(workdir, "_shared")
    prefix = copy.deepcopy(config)
    prefix.loop.stop_after_phase = "collect/0"  # everything before the first Q-fit is variant-independent
    try:
      loop.run(prefix, shared)
    except loop.Interrupted:
      pass
  for v in variants:
    run_dir = os.path.join(workdir, v)
    if not report_only:
      if not os.path.exists(run_dir):
        shutil.rmtree(run_dir + ".tmp", ignore_errors=True)  # left by a copy that was killed
        shutil.copytree(shared, run_dir + ".tmp")
        os.replace(run_dir + ".tmp", run_dir)  # a half-copied prefix is never mistaken for a run
      loop.run(configs[v], run_dir)
    if os.path.exists(os.path.join(run_dir, "progress.json")):
      rows.extend(variant_rows(v, run_dir))
  io_utils.atomic_write_rows(os.path.join(workdir, ROWS_FILE), rows)
  return rows


def read_rows(workdir: str) -> list[dict]:
  """The rows run_ablation wrote into workdir."""
  return io_utils.read_rows(os.path.join(workdir, ROWS_FILE))


# ---- what a person reads ----

def _fmt(v, spec: str) -> str:
  return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
  """Per variant and iteration: Q_k's error, the KL of the step, and pi_{k+1}'s conversion."""
  out = ["| variant | k | Q_k MAE vs true Q | Q_k max err | Q_k corr | label error | KL(pi_k+1 \\|\\| pi_k) | "
         "conversion pi_k | conversion pi_k+1 (95% CI) |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['variant']} | {r['k']} | {_fmt(r['q_mae'], '.3f')} | {_fmt(r['q_max_err'], '.3f')} | "
               f"{_fmt(r['q_corr'], '.2f')} | {_fmt(r['label_error'], '.3f')} | {_fmt(r['kl_to_prev'], '.3f')} | "
               f"{r['conversion_k']:.3f} | {r['conversion']:.3f} ({r['conversion_lo']:.3f}-{r['conversion_hi']:.3f}) |")
  return "\n".join(out)


def report(rows: list[dict]) -> str:
  """Both tables as markdown: the ablation, then the bound check (rows that have its numbers)."""
  checked = [r for r in rows if "bound" in r]
  text = "## Q-quality ablation\n\n" + table(rows)
  text += ("\n\n## Improvement bound: V(pi_k+1) - V(pi_k) against beta KL - 2 eps_Q (times H, the discounted "
           "number of decisions)\n\n" + (bound.table(checked) if checked else "(no iteration with KL and eps_Q)"))
  return text + "\n"


def plot(rows: list[dict], path: str) -> str:
  """Left: conversion of pi_k per variant (95% bars). Right: Q_k's mean and max error against the true Q."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  variants = list(dict.fromkeys(r["variant"] for r in rows))
  fig, (ax_c, ax_q) = plt.subplots(1, 2, figsize=(11, 4))
  for j, v in enumerate(variants):
    mine = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["k"])
    shift = 0.05 * (j - (len(variants) - 1) / 2)  # side by side, not on top
    points = [(0, mine[0]["conversion_k"], mine[0]["conversion_k_lo"], mine[0]["conversion_k_hi"])]
    points += [(r["k"] + 1, r["conversion"], r["conversion_lo"], r["conversion_hi"]) for r in mine]
    xs, ys, lo, hi = zip(*points)
    line = ax_c.errorbar([x + shift for x in xs], ys, yerr=[[y - a for y, a in zip(ys, lo)],
                                                           [b - y for y, b in zip(ys, hi)]],
                         marker="o", capsize=3, label=v)
    with_q = [r for r in mine if r["q_mae"] is not None]
    if with_q:
      color = line.lines[0].get_color()
      ax_q.plot([r["k"] for r in with_q], [r["q_mae"] for r in with_q], marker="o", color=color, label=f"{v} mean")
      maxes = [r for r in with_q if r["q_max_err"] is not None]
      if maxes:
        ax_q.plot([r["k"] for r in maxes], [r["q_max_err"] for r in maxes], marker="x", linestyle="--",
                  color=color, label=f"{v} max")
  ks = sorted({r["k"] for r in rows})
  ax_c.set_xticks(list(range(max(ks) + 2)))
  ax_c.set_ylim(bottom=0)
  ax_q.set_xticks(ks)
  ax_c.set_xlabel("policy pi_k")
  ax_c.set_ylabel("conversion (95% interval)")
  ax_c.set_title("Conversion per iteration")
  ax_c.legend(loc="best", fontsize=7)
  ax_q.set_xlabel("iteration k")
  ax_q.set_ylabel("|Q_k - Q^pi_k| (mean o, max x)")
  ax_q.set_title("Q error against the simulator's Monte Carlo Q")
  ax_q.legend(loc="best", fontsize=7)
  fig.tight_layout()
  return io_utils.save_figure(fig, path)


def write_report(rows: list[dict], workdir: str) -> tuple[str, str]:
  """Writes ablate_q.md and ablate_q.png (the plot only when there are rows); returns their paths."""
  md = os.path.join(workdir, TABLES_FILE)
  io_utils.atomic_write_text(md, report(rows))
  png = plot(rows, os.path.join(workdir, PLOT_FILE)) if rows else ""
  return md, png
