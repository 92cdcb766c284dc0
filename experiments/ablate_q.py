"""Q-quality ablation (issue #10): degrade Q on purpose, watch Q's error, pi_{k+1}'s conversion and the bound.

  python -m experiments.ablate_q --workdir=/tmp/ablate_q                     # configs/sales.py, hours on CPU
  python -m experiments.ablate_q --config=configs/sales.py:tiny --workdir=/tmp/aq_tiny --variants=baseline,flip_30
  python -m experiments.ablate_q --workdir=/tmp/ablate_q --report_only       # tables and plot from the runs so far

Runs the loop once per variant of the base config in workdir/<variant>/ (baseline, fewer_conversations, flip_10,
flip_30, small_q, few_qfit_steps: iterppo_jax/studies/ablate_q.py says what each changes), all from the same
pi_0, and writes workdir/ablate_q.jsonl (one row per variant x iteration: Q_k's error against the simulator's
true Q, KL(pi_{k+1} || pi_k), pi_{k+1}'s conversion, the improvement bound), ablate_q.md (the tables) and
ablate_q.png. Rerunning with the same --workdir resumes every variant where it stopped.
"""

import os

from absl import flags
from absl import logging

from experiments import cli
from iterppo_jax.studies import ablate_q

_CONFIG = cli.define_config("configs/sales.py")
_WORKDIR = cli.define(flags.DEFINE_string, "workdir", None, "Where the runs, the tables and the plot go.",
                      required=True)
_VARIANTS = cli.define(flags.DEFINE_list, "variants", list(ablate_q.VARIANTS),
                       f"Variants to run, of {list(ablate_q.VARIANTS)}.")
_REPORT_ONLY = cli.define(flags.DEFINE_bool, "report_only", False, "Only read the variants' runs so far; run nothing.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
  workdir = _WORKDIR.value
  rows = ablate_q.run_ablation(_CONFIG.value, workdir, tuple(_VARIANTS.value), report_only=_REPORT_ONLY.value)
  md, png = ablate_q.write_report(rows, workdir)
  print(ablate_q.report(rows))
  print(f"rows: {os.path.abspath(os.path.join(workdir, ablate_q.ROWS_FILE))}")
  print(f"tables: {os.path.abspath(md)}")
  if png:
    print(f"plot: {os.path.abspath(png)}")


if __name__ == "__main__":
  cli.run(main)
