r"""What the dialogue-state tracker misses: true Q left inside its cells, and the hidden fields it follows.

  python -m experiments.tracker_residuals --workdirs=runs/support_s0,runs/support_s1 --iterations=0,1,2,3 \
      [--out=docs/results/support_tracker_residuals.md]

Pools the true-Q sets data/ranking_<k>.json of the given loop runs (measured in the loop, loop.rank_states > 0)
and prints the residual variance against the Monte Carlo noise and, per act kind, the hidden-state fields most
correlated with the residual (iterppo_jax/studies/tracker_residuals.py). Nothing is fitted.
"""

from absl import flags

from experiments import cli
from iterppo_jax import errors
from iterppo_jax import io_utils
from iterppo_jax.studies import tracker_residuals

_WORKDIRS = cli.define(flags.DEFINE_list, "workdirs", None, "Loop runs that measured a ranking (loop.rank_states).")
_ITERATIONS = cli.define(flags.DEFINE_list, "iterations", ["0"], "Which true-Q sets k of each run to pool.")
_OUT = cli.define(flags.DEFINE_string, "out", "", "Also write the table (markdown) here.")


def main(argv):
  del argv
  if not _WORKDIRS.value:
    cli.fail(errors.EXIT_USAGE, "--workdirs: give one or more loop runs")
  try:
    ks = [int(k) for k in _ITERATIONS.value]
  except ValueError:
    cli.fail(errors.EXIT_USAGE, f"--iterations: expected integers, got {','.join(_ITERATIONS.value)}")
  rows = [r for wd in _WORKDIRS.value for k in ks for r in tracker_residuals.pairs(wd, k)]
  text = tracker_residuals.table(tracker_residuals.residuals(rows))
  print(text)
  if _OUT.value:
    command = (f"python -m experiments.tracker_residuals --workdirs={','.join(_WORKDIRS.value)} "
               f"--iterations={','.join(map(str, ks))}")
    io_utils.atomic_write_text(_OUT.value, f"```bash\n{command}\n```\n\n{text}\n")


if __name__ == "__main__":
  cli.run(main)
