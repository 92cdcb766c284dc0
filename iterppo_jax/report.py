"""What a person looks at after a run: a text table and a plot of conversion per iteration."""

from __future__ import annotations

from iterppo_jax import io_utils


def table(summary: dict) -> str:
  """Conversion (95% interval), turns, accept rate and KL to pi_0 per iteration, plus the reference lines."""
  rows = ["| policy | conversion (95% CI) | mean turns | accept | KL to pi_0 |", "|---|---|---|---|---|"]
  s = summary.get("pretrained")
  if s:
    rows.append(f"| pretrained, before SFT | {s['conversion']:.3f} ({s['conversion_lo']:.3f}-{s['conversion_hi']:.3f}) | "
                f"{s['mean_turns']:.2f} | {s['accept_rate']:.3f} | - |")
  for k, s in enumerate(summary["iterations"]):
    rows.append(f"| pi_{k} | {s['conversion']:.3f} ({s['conversion_lo']:.3f}-{s['conversion_hi']:.3f}) | "
                f"{s['mean_turns']:.2f} | {s['accept_rate']:.3f} | {s.get('kl_to_pi0', 0.0):.2f} |")
  for name, s in summary.get("reference", {}).items():
    rows.append(f"| {name} (scripted) | {s['conversion']:.3f} ({s['conversion_lo']:.3f}-{s['conversion_hi']:.3f}) | "
                f"{s['mean_turns']:.2f} | {s['accept_rate']:.3f} | - |")
  seconds = summary.get("phase_seconds")
  if seconds:
    rows += ["", "where the time went: " + ", ".join(f"{name} {value:.0f} s" for name, value in
                                                    sorted(seconds.items(), key=lambda kv: -kv[1]))]
  ranking = summary.get("q_ranking")
  if ranking:
    rows += ["", "Q_k's ranking of actions against the simulator's true Q^{pi_k} (q_ranking.py): top-1 = Q_k's pick is "
             "the true best; gain = true Q of Q_k's pick minus the candidates' mean (best possible in brackets)", "",
             "| Q_k | states x candidates | top-1 (chance) | Spearman | pairwise | gain (best) | true-Q s.e. "
             "(reliability) | deployed conversion |", "|---|---|---|---|---|---|---|---|"]
    for k, r in enumerate(ranking):
      if not r or "rank_top1" not in r:
        continue
      rows.append(f"| Q_{k} | {r['rank_states']:.0f} x {r['rank_candidates']:.1f} | {r['rank_top1']:.2f} "
                  f"({r['rank_top1_chance']:.2f}) | {r['rank_spearman']:+.2f} | {r['rank_pairwise']:.2f} | "
                  f"{r['rank_pick_gain']:+.3f} ({r['rank_best_gain']:.3f}) | {r['rank_true_se']:.3f} "
                  f"({r.get('rank_truth_reliability', float('nan')):.2f}) | "
                  f"{r.get('deployed_conversion', float('nan')):.3f} |")
  return "\n".join(rows)


def plot_conversion(summary: dict, path: str) -> str:
  """Conversion per iteration with 95% intervals and the behaviour/oracle lines; returns the PNG path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  its = summary["iterations"]
  xs = list(range(len(its)))
  ys = [s["conversion"] for s in its]
  err = [[s["conversion"] - s["conversion_lo"] for s in its], [s["conversion_hi"] - s["conversion"] for s in its]]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label="Iterative PPO pi_k")
  styles = {"behavior": ("tab:gray", "--"), "oracle": ("tab:green", ":")}
  for name, s in summary.get("reference", {}).items():
    color, ls = styles.get(name, ("black", "-."))
    ax.axhline(s["conversion"], color=color, linestyle=ls, label=f"{name} (scripted)")
  ax.set_xlabel("iteration k")
  ax.set_ylabel("conversion (95% interval)")
  ax.set_xticks(xs)
  ax.set_ylim(0, 1)
  ax.legend(loc="best", fontsize=8)
  ax.set_title("Conversion of pi_k on held-out simulated conversations")
  fig.tight_layout()
  return io_utils.save_figure(fig, path)
