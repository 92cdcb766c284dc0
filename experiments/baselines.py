r"""Baselines at the same number of simulated conversations (iterppo_jax/studies/baselines.py).

  python -m experiments.baselines --config=configs/sales.py --workdir=/tmp/baselines       # hours on a 2-core CPU
  python -m experiments.baselines --config=configs/sales.py:tiny --workdir=/tmp/baselines_tiny   # minutes
  python -m experiments.baselines --workdir=/tmp/b --config.baselines.seeds='(0,)' \
      --config.baselines.methods='("pi0", "offline", "iterative_ppo")' --config.baselines.ks='(1, 4)'

Runs every method of config.baselines.methods for every seed at config.baselines.budget conversations, writes
workdir/baselines.jsonl (one row per method x seed), prints the table (mean conversion with a 95% interval over
seeds, conversations used, wall time) and plots workdir/baselines.png (conversion against conversations used).
Rerunning with the same --workdir reuses finished rows and resumes a method where it stopped.
"""

import os
import time

import jax
from absl import flags
from absl import logging

from experiments import cli
from iterppo_jax import settings
from iterppo_jax.studies import baselines

_CONFIG = cli.define_config("configs/sales.py")
_WORKDIR = cli.define(flags.DEFINE_string, "workdir", None, "Run directory (default: a fresh one under ./runs/).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", time.strftime("baselines_%Y%m%d_%H%M%S"))
  print(f"workdir: {os.path.abspath(workdir)}  devices: {jax.devices()}")
  b = settings.load(config).baselines
  print(f"budget: {b.budget} conversations; seeds: {list(b.seeds)}; methods: {list(baselines.method_fns(config))}")
  start = time.perf_counter()
  rows = baselines.run_all(config, workdir)
  print(baselines.table(rows))
  print(f"rows: {os.path.abspath(os.path.join(workdir, baselines.ROWS_FILE))}")
  print(f"plot: {os.path.abspath(baselines.plot(rows, os.path.join(workdir, 'baselines.png')))}")
  print(f"took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  cli.run(main)
