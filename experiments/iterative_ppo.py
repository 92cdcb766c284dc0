"""Runs Iterative PPO on the sales simulator (or one offline iteration on your logs).

  python -m experiments.iterative_ppo                       # defaults: configs/sales.py, a fresh workdir
  python -m experiments.iterative_ppo --workdir=/tmp/ippo --config.loop.iterations=4
  python -m experiments.iterative_ppo --config.loop.logs='/data/chats/*.jsonl' --workdir=/tmp/offline
  python -m experiments.iterative_ppo --config=configs/sales_smollm.py:laptop --workdir=/tmp/smol \
      --beside=/tmp/demo --beside_label="0.6M model"  # the table gets a column with /tmp/demo's conversion

  python -m experiments.iterative_ppo --workdir=/tmp/ippo_shrunk --branch_from=/tmp/ippo --config.qfit.shrink=5
      # the same pi_0 as /tmp/ippo (no SFT), other Q-fit settings: a paired ablation

Rerunning with the same --workdir (and the same settings; more loop.iterations may be asked for) resumes from
the last completed phase; --config.resume=False refuses a workdir that already holds a run.
With --config.distributed=True the same command runs on every host of a multi-process run
(docs/multihost.md).
"""

import json
import os
import time

import jax
from absl import flags
from absl import logging

from experiments import cli
from iterppo_jax import distributed
from iterppo_jax import errors
from iterppo_jax import loop
from iterppo_jax import settings
from iterppo_jax import workdir as workdir_lib
from iterppo_jax.studies import report

_CONFIG = cli.define_config("configs/sales.py")
_WORKDIR = cli.define(flags.DEFINE_string, "workdir", None, "Run directory (default: a fresh one under ./runs/).")
_BRANCH_FROM = cli.define(flags.DEFINE_string, "branch_from", None, "Workdir of another run of the same settings "
                          "up to pi_0: this run starts from its pi_0 (SFT checkpoint, evaluation, behaviour logs) and "
                          "may change only later phases' settings (qfit, ppo, ...: workdir.BRANCHABLE).")
_BESIDE = cli.define(flags.DEFINE_string, "beside", None, "Workdir of another finished run (e.g. the 0.6M "
                     "model's demo): its conversion is printed in a column beside this run's table.")
_BESIDE_LABEL = cli.define(flags.DEFINE_string, "beside_label", "beside", "Header of the --beside column.")


def read_beside(path: str) -> dict:
  """The summary.json of the run at `path` (a workdir or the file itself); a bad path exits with status 2."""
  file = os.path.join(path, "summary.json") if os.path.isdir(path) else path
  try:
    with open(file) as f:
      summary = json.load(f)
    if not summary.get("iterations"):
      raise ValueError("no 'iterations' in it")
    return summary
  except (OSError, ValueError) as e:
    cli.fail(errors.EXIT_USAGE, f"--beside={path}: {file} is not the summary.json of a finished run of "
             f"experiments.iterative_ppo ({type(e).__name__}: {e})")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", time.strftime("iterative_ppo_%Y%m%d_%H%M%S"))
  # every key known, every choice, size and rule between keys, before anything is written
  s = settings.load(config)
  beside = read_beside(_BESIDE.value) if _BESIDE.value else None  # checked before any work, like the config
  distributed.initialize(s.distributed, s.cluster)  # before anything touches a device
  if _BRANCH_FROM.value and workdir_lib.branch_from(_BRANCH_FROM.value, config, workdir):
    print(f"branched from the pi_0 of {os.path.abspath(_BRANCH_FROM.value)}")
  workdir_lib.check_resumable(config, workdir)
  print(f"workdir: {os.path.abspath(workdir)}  process {jax.process_index()} of {jax.process_count()}  "
        f"devices: {jax.devices()}")
  if not _WORKDIR.value:
    print(f"(interrupted? the same command with --workdir={workdir} continues from the last completed phase)")
  summary = loop.run(config, workdir)  # errors end as one line and an exit code (cli.guard; --debug: traceback)
  if not distributed.is_writer():
    print(f"process {jax.process_index()}: done (process 0 reports the run)")
    return
  if summary.get("offline"):
    print(f"offline iteration on {summary['conversations']} logged conversations")
    print(f"Q-fit: {summary['qfit']}")
    print(f"new policy: {summary['policy_checkpoint']}")
    return
  print(report.table(summary, beside, _BESIDE_LABEL.value) if beside else summary["table"])
  print(f"plot: {os.path.abspath(summary['plot'])}")
  print(f"metrics: {os.path.abspath(os.path.join(workdir, 'metrics.jsonl'))} (TensorBoard: --logdir {workdir})")
  print(f"logs of every iteration: {os.path.abspath(os.path.join(workdir, 'data'))}")
  print(f"checkpoints: {os.path.abspath(os.path.join(workdir, 'checkpoints'))}")
  print(f"took {summary['seconds']:.0f} s")


if __name__ == "__main__":
  cli.run(main)
