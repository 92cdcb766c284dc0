r"""One command for the whole report of issue #10: simulator tables, baselines, the ablations, the bound.

  python -m experiments.report --config=configs/report.py --workdir=/tmp/report            # small: < 1 h, 2 cores
  python -m experiments.report --config=configs/report.py:full --workdir=/tmp/report_full  # full: ~30 h
  python -m experiments.report --config=configs/report.py:tiny --workdir=/tmp/report_tiny  # minutes, for tests

Runs (or reuses) the sections configs/report.py enables (simulator, baselines, ablate_q, ablate_inner, bound;
iterppo_jax/studies/report.py says what each does) and writes workdir/report.md (date, machine, commands, each
table, each plot as a relative link, the wall time of each section) and workdir/report.json, rewritten after
every section so a long run shows what is done. A rerun with the same workdir reuses finished sections; a workdir
holds one preset.
"""

import os
import shlex
import sys

import jax
from absl import flags
from absl import logging

from experiments import cli
from iterppo_jax.studies import report

_CONFIG = cli.define_config("configs/report.py")
_WORKDIR = cli.define(flags.DEFINE_string, "workdir", None, "Where every section and report.md go.", required=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
  command = "python -m experiments.report " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  print(f"workdir: {os.path.abspath(_WORKDIR.value)}  devices: {jax.devices()}")
  path = report.build_report(_CONFIG.value, _WORKDIR.value, command)
  print(f"report: {os.path.abspath(path)}")


if __name__ == "__main__":
  cli.run(main, default="configs/report.py")
