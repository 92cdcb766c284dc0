"""Builds the TFDS dataset (array_record, no TensorFlow needed) of logged conversations from JSONL files.

  python -m experiments.simulate --config=configs/sales.py:tiny --workdir=/tmp/sim
  python -m experiments.build_dataset --logs='/tmp/sim/*.jsonl' --workdir=/tmp/sim
  python -m experiments.build_dataset --logs='/tmp/logs/*.jsonl' --workdir=/tmp/ds --skip_invalid --overwrite

The dataset lands in WORKDIR/conversations/1.1.0; read it with `tfds_conversations.load(WORKDIR)`.
"""

import glob

from absl import flags

from experiments import cli
from iterppo_jax import conversation as conv_lib
from iterppo_jax import tfds_conversations

_LOGS = cli.define(flags.DEFINE_string, "logs", None, "Glob (or comma-separated globs) of JSONL log files.",
                            required=True)
_WORKDIR = cli.define(flags.DEFINE_string, "workdir", None, "TFDS data dir the dataset is written under.", required=True)
_SKIP_INVALID = cli.define(flags.DEFINE_bool, "skip_invalid", False, "Skip and count malformed lines instead of failing.")
_HELDOUT = cli.define(flags.DEFINE_float, "heldout_fraction", 0.0,
                               "Share of conversation ids (by hash) in a 'heldout' split.")
_OVERWRITE = cli.define(flags.DEFINE_bool, "overwrite", False, "Replace an existing dataset of the same version.")


def main(argv):
  del argv
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()  # one summary at the end reads better in logs than per-split bars
  paths = []
  for pattern in _LOGS.value.split(","):
    matches = sorted(glob.glob(pattern.strip()))
    if not matches:
      raise conv_lib.ConversationFormatError(f"no log files match {pattern.strip()!r} (--logs); expected a glob "
                                             "of JSONL files")
    paths.extend(matches)
  # Every log is validated before anything is written; errors end as one line (cli.guard).
  builder = tfds_conversations.build(paths, _WORKDIR.value, skip_invalid=_SKIP_INVALID.value,
                                     heldout_fraction=_HELDOUT.value, overwrite=_OVERWRITE.value)
  report = builder.report
  print(f"dataset dir: {tfds_conversations.dataset_dir(_WORKDIR.value)}")
  print(f"version: {builder.version}")
  print(f"files: {len(paths)}  records: {report.read}")
  for name, split in sorted(builder.info.splits.items()):
    print(f"  split {name}: {split.num_examples}")
  if report.skipped:
    print(f"skipped {report.skipped} invalid line(s); first errors:")
    for err in report.errors[:5]:
      print(f"  {err}")


if __name__ == "__main__":
  cli.run(main)
