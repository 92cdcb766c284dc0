r"""docs/results.md's ranking tables (finding 7) from q_ranking_ablation's JSON files.

  python -m experiments.ranking_table --files='docs/results/ranking_precise/*.json' [--variant=table_sarsa]

Prints one row per (domain, D_0, seed, k) for `--variant`, then, for the Q-models fitted on the staff's logs
(k = 0 with loop.first_data=behavior) and on pi_k's own deployments, each `--compare` variant's mean over the
(run, k) sets where all of them were measured, and, where the files have it, the reference of pi_k's mode (the
candidates ranked by how often D_k logged their act at the state, no Q; loop's rank_mode_*). Beside top-1's
chance level: the top-1 the exact Q^{pi_k} would expect against that noisy truth (q_ranking.ActionSet.top1_ceiling;
for older files computed from their truth file when it is on this machine, else nan). Files of one run, k and
variant on independent truths (q_ranking_ablation --truth_draw) are pooled into one row over all their states
(`pool`).
"""

import glob
import json
import os

from absl import flags

from experiments import cli
from iterppo_jax import errors
from iterppo_jax import q_ranking

NAN = float("nan")

_FILES = cli.define(flags.DEFINE_string, "files", "docs/results/ranking_precise/*.json",
                    "q_ranking_ablation --out files (they carry domain, seed and first_data).")
_VARIANT = cli.define(flags.DEFINE_string, "variant", "table_sarsa", "The variant of the per-run table.")
_COMPARE = cli.define(flags.DEFINE_list, "compare", ["table_sarsa", "table_lambda_05", "table_lambda_1", "table_mc"],
                      "Variants compared on the (run, k) sets where each of them was measured.")


def pool(rows: list[dict]) -> dict:
  """One row from rows of the same Q_k scored on independent truths: each rank_* measure is the rows' mean weighted
  by their states counted, rank_states their sum and `draws` how many were pooled. For the per-state means (top-1,
  its chance, the gains, the clear misses) that is their mean over the union of the states; Spearman (over states
  where Q_k is not constant), pairwise accuracy (over pairs), the own-sample gains and the truth's reliability are
  weighted by states too, which is exact only where those counts are proportional to the states."""
  if len(rows) == 1:
    return rows[0]
  n = sum(r["rank_states"] for r in rows)
  out = {k: v for k, v in rows[0].items() if not k.startswith("rank_")}
  names = {name for r in rows for name in r if name.startswith("rank_") and name != "rank_states"}
  for name in sorted(names):  # a measure some files lack (written before it existed) pools to nan
    value = lambda r: NAN if r.get(name) is None else r[name]  # noqa: E731
    out[name] = sum(value(r) * r["rank_states"] for r in rows) / n
  return {**out, "rank_states": n, "draws": len(rows)}


def load(pattern: str) -> dict:
  """(domain, first_data, seed, k, variant) -> row, pooled over the files' truth draws (`pool`)."""
  draws = {}
  for path in sorted(glob.glob(pattern)):
    with open(path) as f:
      d = json.load(f)
    ceilings = {}  # files written before the ceilings were measured: from their truth file, where it is here
    names = ("rank_truth_top1_ceiling", "rank_truth_spearman_ceiling")
    if any(n not in r for r in d["rows"] for n in names) and os.path.exists(d.get("truth", "")):
      truth = q_ranking.ActionSet.load(d["truth"])
      ceilings = dict(zip(names, (truth.top1_ceiling(), truth.spearman_ceiling())))
    for r in d["rows"]:
      for n, v in ceilings.items():
        r.setdefault(n, v)
      key = (d["domain"], d["first_data"], d["seed"], d["iteration"], r["variant"])
      by_draw = draws.setdefault(key, {})
      draw = d.get("truth_draw", 0)  # files written before --truth_draw: the first draw
      if draw in by_draw:
        raise errors.DataError(f"{path}: {key[0]} seed {key[2]} Q_{key[3]} {key[4]} on truth draw {draw} is also in "
                               f"{by_draw[draw][0]}; expected one file per run, k and draw")
      by_draw[draw] = (path, r)
  if not draws:
    raise errors.DataError(f"no q_ranking_ablation file matches {pattern!r}")
  return {key: pool([r for _, (_, r) in sorted(by_draw.items())]) for key, by_draw in draws.items()}


def reliability(row: dict) -> str:
  """The truth's reliability, read from its paired rollouts, with the unpaired reading beside it where the file
  has both (q_ranking.ActionSet.reliability; files written before rollouts were kept have the unpaired alone)."""
  unpaired = row.get("rank_truth_reliability_unpaired")
  text = f"{row['rank_truth_reliability']:.2f}"
  return text if unpaired is None or unpaired != unpaired else f"{text} ({unpaired:.2f} unpaired)"


def _mean(rows: list[dict], name: str) -> float:
  """The rows' mean of a measure; nan where a row lacks it (a file written before it was measured)."""
  return sum(NAN if r.get(name) is None else r[name] for r in rows) / len(rows)


def on_staff_logs(first_data: str, k: int) -> bool:
  return k == 0 and first_data == "behavior"


def tables(rows: dict, variant: str, variants) -> str:
  out = ["| domain | D_0 | seed | Q_k | top-1 (chance, exact Q's) | Spearman (exact Q's) | pairwise | "
         "clear misses (clear best) | gain of Q's pick (best) | "
         "truth reliability | states |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for (dom, fd, seed, k, v), r in sorted(rows.items()):
    if v == variant:
      out.append(f"| {dom} | {fd} | {seed} | Q_{k} | {r['rank_top1']:.2f} ({r['rank_top1_chance']:.2f}, "
                 f"{r.get('rank_truth_top1_ceiling', float('nan')):.2f}) | "
                 f"{r['rank_spearman']:+.2f} ({r.get('rank_truth_spearman_ceiling', float('nan')):+.2f}) | "
                 f"{r['rank_pairwise']:.2f} | {r.get('rank_clear_miss', NAN):.2f} ({r.get('rank_clear_best', NAN):.2f}) | "
                 f"{r['rank_pick_gain']:+.3f} "
                 f"({r['rank_best_gain']:.3f}) | {reliability(r)} | {r['rank_states']}"
                 f"{' (%d draws)' % r['draws'] if r.get('draws') else ''} |")
  for title, staff in (("fitted on the staff's logs (k = 0, first_data=behavior)", True),
                       ("fitted on pi_k's own deployments", False)):
    runs = sorted({key[:4] for key in rows if on_staff_logs(key[1], key[3]) == staff
                   and all(key[:4] + (v,) in rows for v in variants)})
    if not runs:
      continue
    out += ["", f"The variants compared, {title}: mean over {len(runs)} (run, k) sets "
            f"({', '.join(f'{d} s{s} Q_{k}' + (' (D_0 ' + fd + ')' if k == 0 else '') for d, fd, s, k in runs)})", "",
            "| variant | what | top-1 | Spearman | gain of Q's pick | over pi_k's own samples |",
            "|---|---|---|---|---|---|"]
    for v in variants:
      picked = [rows[run + (v,)] for run in runs]
      out.append(f"| {v} | {picked[0]['what']} | {_mean(picked, 'rank_top1'):.2f} | "
                 f"{_mean(picked, 'rank_spearman'):+.2f} | {_mean(picked, 'rank_pick_gain'):+.3f} | "
                 f"{_mean(picked, 'rank_pick_gain_own'):+.3f} |")
    # the reference every Q-model must beat (loop.rank_actions' rank_mode_*, the same truths): pi_k's preference
    modes = [rows[run + (variants[0],)] for run in runs]
    if all(r.get("rank_mode_top1") is not None for r in modes):
      out.append(f"| pi_k's mode | no Q: the act D_k logged most at the state on top | "
                 f"{_mean(modes, 'rank_mode_top1'):.2f} | {_mean(modes, 'rank_mode_spearman'):+.2f} | "
                 f"{_mean(modes, 'rank_mode_pick_gain'):+.3f} | {_mean(modes, 'rank_mode_pick_gain_own'):+.3f} |")
  return "\n".join(out)


def main(argv):
  del argv
  print(tables(load(_FILES.value), _VARIANT.value, _COMPARE.value))


if __name__ == "__main__":
  cli.run(main)
