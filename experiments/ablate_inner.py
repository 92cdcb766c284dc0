"""Ablation of the inner solver: Iterative PPO with ppo, grpo and rloo at the same sampled responses per iteration.

  python -m experiments.ablate_inner --workdir=/tmp/ablate                      # configs/sales.py, ~30 min on CPU
  python -m experiments.ablate_inner --config=configs/sales.py:tiny --workdir=/tmp/ablate_tiny --inners=grpo,rloo

Every solver samples ppo.steps x ppo.batch_size responses per iteration (GRPO/RLOO: ppo.batch_size / group.size
states, group.size responses each), all from the very same pi_0 and Q_0 (iterppo_jax/studies/ablate_inner.py).
Writes workdir/ablate_inner.jsonl (one row per solver x iteration: conversion with its 95% interval, KL(pi_k ||
pi_{k-1}) on D_{k-1}'s states, the inner solver's wall time), prints the table and plots ablate_inner.png.
Rerunning with the same --workdir resumes every solver where it stopped.
"""

import os

from absl import flags
from absl import logging

from experiments import cli
from iterppo_jax import settings
from iterppo_jax.studies import ablate_inner

_CONFIG = cli.define_config("configs/sales.py")
_WORKDIR = cli.define(flags.DEFINE_string, "workdir", None, "Where the runs, the table and the plot go.", required=True)
_INNERS = cli.define(flags.DEFINE_list, "inners", list(settings.INNER_SOLVERS), "Inner solvers to compare.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
  workdir = _WORKDIR.value
  inners = tuple(_INNERS.value)
  rows = ablate_inner.run_ablation(_CONFIG.value, workdir, inners)
  reference = ablate_inner.reference(workdir, inners[0])
  print(ablate_inner.table(rows))
  print(f"rows: {os.path.abspath(os.path.join(workdir, ablate_inner.ROWS_FILE))}")
  print(f"plot: {os.path.abspath(ablate_inner.plot(rows, os.path.join(workdir, ablate_inner.PLOT_FILE), reference))}")


if __name__ == "__main__":
  cli.run(main)
