r"""Where each setting is read, found in the source (iterppo_jax/studies/config_readers.py).

  python -m experiments.config_readers                 # every key and the functions that read it
  python -m experiments.config_readers --shared_only   # keys read in more than one library module (studies aside)

Prints a markdown table: the key, how many library modules read it (studies/ and experiments/ aside: they steer
and measure runs), and every function that reads it; then the keys no code reads.
"""

import os

from absl import flags

from experiments import cli
from iterppo_jax.studies import config_readers

_SHARED_ONLY = cli.define(flags.DEFINE_bool, "shared_only", False,
                          "Only the keys read in more than one library module.")


def main(argv):
  del argv
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  found = config_readers.readers(root)
  print(config_readers.table(found, shared_only=_SHARED_ONLY.value))
  print(f"\nkeys no code reads: {', '.join(config_readers.unread(found)) or 'none'}")


if __name__ == "__main__":
  cli.run(main)
