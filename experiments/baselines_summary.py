r"""Rows of several equal-budget runs (experiments.baselines) in one table, with paired differences by seed.

  python -m experiments.baselines_summary --rows=runs/eb_s0,runs/eb_s1,runs/eb_s2 [--against=iterative_ppo_k4] \
      [--out=docs/results/baselines_equal_budget/sales_s012]

Each --rows entry is a baselines workdir or a baselines.jsonl file (seeds run side by side in their own workdirs,
or extra methods added in another). An entry ending in @TAG names its methods METHOD@TAG: the same method run
with other settings (e.g. `runs/eb_rloo_s0@rloo` beside the default's rows) is then a method of its own, paired
with the others by seed (`--against=iterative_ppo_k4@rloo`). @TAG:M1+M2 tags only methods M1 and M2 of that
source (e.g. more seeds of that setting, run beside the other methods' rows in one workdir). Prints the table of
experiments.baselines (mean conversion per method, 95% t-interval over seeds) and `--against` minus every other
method, paired by seed (the same pi_0 and held-out customers: the comparison that removes seed-to-seed spread). With
--out, writes <out>.jsonl (the merged rows) and <out>.md. A (method, seed) in two sources, or two budgets, is refused.
"""

import os

from absl import flags

from experiments import cli
from iterppo_jax import errors
from iterppo_jax import io_utils
from iterppo_jax.studies import baselines

_ROWS = cli.define(flags.DEFINE_list, "rows", None, "Baselines workdirs or baselines.jsonl files, each optionally "
                   "with @TAG (its methods named METHOD@TAG) or @TAG:M1+M2 (only those methods).")
_AGAINST = cli.define(flags.DEFINE_string, "against", "", "The method the others are compared with (default: the "
                      "first iterative_ppo_k* row).")
_OUT = cli.define(flags.DEFINE_string, "out", "", "Write <out>.jsonl and <out>.md too.")


def main(argv):
  del argv
  sources = []
  for entry in _ROWS.value or []:
    head, at, tag = entry.rpartition("@")
    if not at or os.path.exists(entry):  # no tag (or a path that has an @ of its own)
      head, tag = entry, ""
    entry = head
    path = os.path.join(entry, baselines.ROWS_FILE) if os.path.isdir(entry) else entry
    if not os.path.exists(path):
      raise errors.DataError(f"--rows: {path} not found (a baselines workdir or its {baselines.ROWS_FILE})")
    rows = io_utils.read_rows(path)
    tag, _, only = tag.partition(":")
    present = {r["method"] for r in rows}
    only = set(only.split("+")) if only else present
    if missing := only - present:
      raise errors.DataError(f"--rows: {entry}@{tag}: {path} has no rows of {', '.join(sorted(missing))}")
    sources.append((path, [{**r, "method": f"{r['method']}@{tag}"} if tag and r["method"] in only else r
                           for r in rows]))
  if not sources:
    raise errors.SettingsError("--rows: give at least one baselines workdir or rows file")
  rows = baselines.merge_rows(sources)
  methods = list(dict.fromkeys(r["method"] for r in rows))
  against = _AGAINST.value or next((m for m in methods if m.startswith("iterative_ppo_k")), "")
  if against and against not in methods:
    raise errors.SettingsError(f"--against: {against} is not among the rows' methods {methods}")
  text = baselines.table(rows)
  if against:
    text += "\n\n" + baselines.paired_table(rows, against)
  print(text)
  if _OUT.value:
    io_utils.atomic_write_rows(_OUT.value + ".jsonl", rows)
    io_utils.atomic_write_text(_OUT.value + ".md", text + "\n")


if __name__ == "__main__":
  cli.run(main)
