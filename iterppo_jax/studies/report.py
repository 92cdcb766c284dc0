"""What a person looks at: a run's table and plot, and the whole report of issue #10.

`table` and `plot_conversion` show one run of the loop (loop.run writes them next to its summary.json).

`build_report` makes the report (the command line is experiments/report.py) in sections; configs/report.py says
which run, on which domains, with which sub-config overrides (read once, typed and checked with every sub-config
before any section runs: `load`):
  simulator     behaviour / oracle / random conversion per domain and business user, with 95% intervals and the
                median conversation length (registry.make_env / make_policy, envs/base.summarize), one cached
                file per cell in workdir/simulator/<domain>/
  baselines     studies/baselines.run_all, table and plot per domain, in workdir/baselines/<domain>/
  ablate_q      studies/ablate_q.run_ablation and write_report, in workdir/ablate_q/<domain>/
  ablate_inner  studies/ablate_inner.run_ablation, table and plot, in workdir/ablate_inner/<domain>/
  bound         bound.py's table of every ablation iteration that logged KL and eps_Q (runs nothing itself)
and writes workdir/report.md (date, machine, commands, each table, each plot as a relative link, the wall time of
each section) and workdir/report.json, rewritten after every section so a long run shows what is done.

Reuse: the pieces are resumable, and a finished piece leaves workdir/<section>/<domain>/report_done.json with
the settings it ran with; a rerun with the same settings reads its rows back and runs nothing (status 'reused'),
one with other settings calls the piece again, which reuses whatever of its own work still fits. A workdir holds
one preset: a rerun with another preset is refused.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
import platform
import shlex
import time

import jax
import numpy as np

from iterppo_jax import bound
from iterppo_jax import errors
from iterppo_jax import io_utils
from iterppo_jax import settings
from iterppo_jax.envs import base
from iterppo_jax.envs import registry
from iterppo_jax.studies import ablate_inner
from iterppo_jax.studies import ablate_q
from iterppo_jax.studies import baselines as baselines_lib


# ---- a run's table and plot (loop.run) ----

def table(summary: dict, beside: dict | None = None, beside_label: str = "") -> str:
  """Conversion (95% interval), turns, accept rate and KL to pi_0 per iteration, plus the reference lines.

  `beside` (another run's summary.json, e.g. the 0.6M model's demo next to a SmolLM2 run) adds a column with
  that run's conversion on the row of the same name; "-" where one run has a row the other lacks.
  """
  def conv(s: dict) -> str:
    return f"{s['conversion']:.3f} ({s['conversion_lo']:.3f}-{s['conversion_hi']:.3f})"

  def named_rows(run: dict) -> list[tuple[str, dict, str]]:
    out = [("pretrained, before SFT", run["pretrained"], "-")] if run.get("pretrained") else []
    out += [(f"pi_{k}", s, f"{s.get('kl_to_pi0', 0.0):.2f}") for k, s in enumerate(run["iterations"])]
    return out + [(f"{name} (scripted)", s, "-") for name, s in run.get("reference", {}).items()]

  own = named_rows(summary)
  header = "| policy | conversion (95% CI) | mean turns | accept | KL to pi_0 |"
  rule = "|---|---|---|---|---|"
  if beside is None:
    rows = [header, rule] + [f"| {label} | {conv(s)} | {s['mean_turns']:.2f} | {s['accept_rate']:.3f} | {kl} |"
                             for label, s, kl in own]
  else:
    other = {label: s for label, s, _ in named_rows(beside)}
    labels = [label for label, _, _ in own]
    # the other run's extra iterations go after this run's last pi_k, before the scripted references
    at = max((i + 1 for i, label in enumerate(labels) if label.startswith("pi_")), default=len(labels))
    labels[at:at] = [label for label in other if label.startswith("pi_") and label not in labels]
    labels += [label for label in other if label not in labels]
    mine = {label: (s, kl) for label, s, kl in own}
    rows = [header + f" {beside_label or 'beside'}: conversion (95% CI) |", rule + "---|"]
    for label in labels:
      s, kl = mine.get(label, (None, "-"))
      cells = [conv(s), f"{s['mean_turns']:.2f}", f"{s['accept_rate']:.3f}", kl] if s else ["-", "-", "-", "-"]
      rows.append(f"| {label} | " + " | ".join(cells) + f" | {conv(other[label]) if label in other else '-'} |")
  seconds = summary.get("phase_seconds")
  if seconds:
    rows += ["", "where the time went: " + ", ".join(f"{name} {value:.0f} s" for name, value in
                                                    sorted(seconds.items(), key=lambda kv: -kv[1]))]
  ranking = [(k, r) for k, r in enumerate(summary.get("q_ranking") or []) if r and "rank_top1" in r]
  nan = float("nan")
  if ranking:  # runs without the measurement (loop.rank_states=0) print no empty table
    rows += ["", "Q_k's ranking of actions against the simulator's true Q^{pi_k} (q_ranking.py): top-1 = Q_k's pick is "
             "the true best; gain = true Q of Q_k's pick minus the candidates' mean, and minus pi_k's own samples' "
             "(best possible in brackets); the exact Q^{pi_k}'s expected top-1 against this noisy truth beside "
             "the chance level", "",
             "| Q_k | states x candidates | top-1 (chance, exact Q's) | Spearman | pairwise | gain (best) | "
             "gain over pi_k (best) | true-Q s.e. (reliability) | deployed conversion |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, r in ranking:
      rows.append(f"| Q_{k} | {r['rank_states']:.0f} x {r['rank_candidates']:.1f} | {r['rank_top1']:.2f} "
                  f"({r['rank_top1_chance']:.2f}, {r.get('rank_truth_top1_ceiling', nan):.2f}) | "
                  f"{r['rank_spearman']:+.2f} | "
                  f"{r['rank_pairwise']:.2f} | {r['rank_pick_gain']:+.3f} ({r['rank_best_gain']:.3f}) | "
                  f"{r.get('rank_pick_gain_own', nan):+.3f} ({r.get('rank_best_gain_own', nan):.3f}) | "
                  f"{r['rank_true_se']:.3f} "
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


# ---- the whole report: its files ----

DONE_FILE = "report_done.json"
SECTIONS = ("simulator", "baselines", "ablate_q", "ablate_inner", "bound")


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


# ---- sub-configs ----

def parse_override(text: str) -> tuple[str, object]:
  """'dotted.key=value' -> (key, value); the value is a Python literal where it parses as one, else a string."""
  key, sep, raw = text.partition("=")
  if not sep or not key.strip():
    raise errors.SettingsError(f"an override must read 'dotted.key=value', got {text!r}")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw  # a bare word such as policy or sr
  return key.strip(), value


def set_key(config, key: str, value) -> None:
  """config[key] = value for a dotted key; a missing key or a value of the wrong type is a ValueError naming it."""
  *path, leaf = key.split(".")
  node = config
  for part in path:
    if part not in node or not hasattr(node[part], "items"):
      raise errors.SettingsError(f"override {key!r}: the config has no section {part!r}")
    node = node[part]
  if leaf not in node:
    raise errors.SettingsError(f"override {key!r}: the config has no key {leaf!r}")
  try:
    node[leaf] = value
  except TypeError as e:
    raise errors.SettingsError(f"override {key!r}: expected a value of type {type(node[leaf]).__name__}, "
                               f"got {value!r}") from e


def _config_file(domain: str) -> str:
  """A built-in domain's own config file; a domain given by import path runs on the sales config's settings
  with env.domain set to its path (docs/domains.md)."""
  return domain if domain in registry.DOMAINS else "sales"


def config_spec(domain: str, config_arg: str) -> str:
  return f"configs/{_config_file(domain)}.py" + (f":{config_arg}" if config_arg else "")


def piece_config(domain: str, config_arg: str, overrides=()):
  """configs/<domain>.py with its colon argument and the overrides applied (a copy, checked before any work)."""
  registry.module(domain)  # a built-in name or an importable domain module, else a message naming both
  config = importlib.import_module(f"configs.{_config_file(domain)}").get_config(config_arg or None)
  config.env.domain = domain
  for text in overrides:
    set_key(config, *parse_override(text))
  return config


def piece_command(module: str, domain: str, section, workdir: str, *extra: str) -> str:
  """The piece's own command line that makes (or, with the report's workdir, reuses) the same runs."""
  args = [f"--config={config_spec(domain, section.config_arg)}", f"--workdir={workdir}", *extra]
  if domain not in registry.DOMAINS:
    args.append(f"--config.env.domain={domain}")
  args += [f"--config.{key}" for key in section.overrides]
  return f"python -m experiments.{module} " + " ".join(shlex.quote(a) for a in args)


# ---- the simulator tables ----

def simulate_cell(domain: str, env_config, policy: str, business_user: str, conversations: int, seed: int,
                  batch_size: int) -> dict:
  """Plays one scripted policy in one domain and business-user mode; conversion, its interval, the rounds."""
  env_config = dataclasses.replace(env_config, business_user=business_user)
  env = registry.make_env(env_config)
  start = time.perf_counter()
  records = env.play(registry.make_policy(domain, policy, env_config), conversations, seed=seed,
                     batch_size=batch_size)
  rounds = [len(r.agent_steps()) for r in records]
  return {"domain": domain, "policy": policy, "business_user": business_user, "seed": seed,
          **base.summarize(records), "median_rounds": float(np.median(rounds)),
          "seconds": time.perf_counter() - start}


def simulator_rows(s, workdir: str, log=print) -> tuple[list[dict], int]:
  """Every (domain, policy, business user) cell, read from workdir/simulator/<domain>/<policy>_<mode>.json when
  it was played with the same size and seed; returns the rows and how many cells were simulated now."""
  rows, played = [], 0
  for domain in s.domains:
    env_config = settings.load_env(piece_config(domain, "").env)
    for policy in s.policies:
      for mode in s.business_users:
        path = os.path.join(workdir, "simulator", domain, f"{policy}_{mode}.json")
        row = _read_json(path) if os.path.exists(path) else None
        if not row or row["conversations"] != s.conversations or row["seed"] != s.seed:
          log(f"report: simulating {domain} {policy} {mode} ({s.conversations} conversations)")
          row = simulate_cell(domain, env_config, policy, mode, s.conversations, s.seed, s.batch_size)
          io_utils.atomic_write_json(path, row)
          played += 1
        rows.append(row)
  return rows, played


def simulator_table(rows: list[dict]) -> str:
  """Per domain and policy: conversion (95% Wilson interval) and median rounds in each business-user mode."""
  modes = list(dict.fromkeys(r["business_user"] for r in rows))
  head = (["domain", "policy"] + [f"conversion {m} (95% CI)" for m in modes] + [f"median rounds {m}" for m in modes])
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  cells = {(r["domain"], r["policy"], r["business_user"]): r for r in rows}
  for domain, policy in dict.fromkeys((r["domain"], r["policy"]) for r in rows):
    mine = [cells.get((domain, policy, m)) for m in modes]
    conv = ["-" if r is None else f"{r['conversion']:.3f} ({r['conversion_lo']:.3f}-{r['conversion_hi']:.3f})"
            for r in mine]
    rounds = ["-" if r is None else f"{r['median_rounds']:g}" for r in mine]
    out.append("| " + " | ".join([domain, policy] + conv + rounds) + " |")
  return "\n".join(out)


def simulator_plot(rows: list[dict], path: str) -> str:
  """Grouped bars: conversion of each policy and business-user mode per domain, with 95% intervals."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  domains = list(dict.fromkeys(r["domain"] for r in rows))
  groups = list(dict.fromkeys((r["policy"], r["business_user"]) for r in rows))
  width = 0.8 / len(groups)
  colors = dict(zip(dict.fromkeys(p for p, _ in groups), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  hatches = dict(zip(dict.fromkeys(m for _, m in groups), ("", "//", "..", "xx")))
  cells = {(r["domain"], r["policy"], r["business_user"]): r for r in rows}
  fig, ax = plt.subplots(figsize=(9, 4))
  for j, (policy, mode) in enumerate(groups):
    mine = [(i, cells[(d, policy, mode)]) for i, d in enumerate(domains) if (d, policy, mode) in cells]
    ys = np.asarray([r["conversion"] for _, r in mine])
    err = [ys - [r["conversion_lo"] for _, r in mine], [r["conversion_hi"] for _, r in mine] - ys]
    ax.bar([i - 0.4 + width * (j + 0.5) for i, _ in mine], ys, width, yerr=err, capsize=2,
           color=colors[policy], hatch=hatches[mode], edgecolor="white", label=f"{policy} ({mode})")
  ax.set_xticks(range(len(domains)))
  ax.set_xticklabels(domains)
  ax.set_ylim(0, 1)
  ax.set_ylabel("conversion (95% interval)")
  ax.set_title("Scripted policies in each simulator")
  ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
  fig.tight_layout()
  return io_utils.save_figure(fig, path)


# ---- sections ----

def _section(name: str, domain: str, title: str, status: str, seconds: float, *, finished: str = "", tables=(),
             plots=(), commands=(), note: str = "") -> dict:
  """What the report shows of one section.

  status is 'ran' (in this invocation, perhaps resuming), 'reused' (finished by an earlier one, which took
  `seconds` and ended at `finished`) or 'derived' (read from other sections' runs).
  """
  return {"section": name, "domain": domain, "title": title, "status": status, "seconds": seconds,
          "finished": finished, "tables": list(tables), "plots": list(plots), "commands": list(commands),
          "note": note}


def _run_or_reuse(out_dir: str, settings: dict, run_fn, read_fn) -> tuple[list[dict], dict]:
  """read_fn() if out_dir's marker holds these settings, else run_fn() and write the marker.

  Returns the rows and {status, seconds, finished} for _section.
  """
  settings = json.loads(json.dumps(settings))  # tuples -> lists, as the marker reads back
  marker = os.path.join(out_dir, DONE_FILE)
  if os.path.exists(marker):
    done = _read_json(marker)
    if done["settings"] == settings:
      return read_fn(), {"status": "reused", "seconds": done["seconds"], "finished": done["finished"]}
  start = time.perf_counter()
  rows = run_fn()
  done = {"settings": settings, "seconds": time.perf_counter() - start,
          "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
  io_utils.atomic_write_json(marker, done)
  return rows, {"status": "ran", "seconds": done["seconds"], "finished": done["finished"]}


def _settings(domain: str, s, selection=()) -> dict:
  return {"config": config_spec(domain, s.config_arg), "overrides": list(s.overrides), "selection": list(selection)}


def simulator_section(s, workdir: str, log=print) -> dict:
  start = time.perf_counter()
  rows, played = simulator_rows(s, workdir, log)
  png = os.path.join(workdir, "simulator", "simulator.png")
  if played or not os.path.exists(png):
    simulator_plot(rows, png)
  seconds = time.perf_counter() - start if played else sum(r["seconds"] for r in rows)
  command = ("python -m experiments.simulate --config=configs/<domain>.py --workdir=/tmp/sim "
             f"--config.policy=<policy> --config.env.business_user=<sr|direct> "
             f"--config.num_conversations={s.conversations} --config.seed={s.seed}")
  note = (f"{s.conversations} conversations per cell, seed {s.seed}; rounds are the agent's decisions in a "
          "conversation. No learning: the scripted behaviour staff, the oracle and random text.")
  return _section("simulator", "", "Simulator: scripted policies per domain", "ran" if played else "reused",
                  seconds, tables=[simulator_table(rows)], plots=[png], commands=[command], note=note)


def baselines_section(s, domain: str, workdir: str, log=print) -> dict:
  config = piece_config(domain, s.config_arg, s.overrides)
  out = os.path.join(workdir, "baselines", domain)
  rows, done = _run_or_reuse(
      out, _settings(domain, s), lambda: baselines_lib.run_all(config, out, log),
      lambda: baselines_lib.read_rows(os.path.join(out, baselines_lib.ROWS_FILE)))
  png = os.path.join(out, "baselines.png")
  if done["status"] == "ran" or not os.path.exists(png):
    baselines_lib.plot(rows, png)
  typed = settings.load(config)
  b = typed.baselines
  note = (f"Budget {b.budget} simulated conversations per method, seeds {list(b.seeds)}, "
          f"{typed.loop.eval_conversations} evaluation conversations per policy; methods "
          f"{list(baselines_lib.method_fns(config))}.")
  return _section("baselines", domain, f"Baselines at equal budget: {domain}", **done,
                  tables=[baselines_lib.table(rows)], plots=[png],
                  commands=[piece_command("baselines", domain, s, out)], note=note)


def _bound_rows(rows: list[dict], label: str) -> list[dict]:
  return [{**r, "variant": f"{label}/{r['variant']}"} for r in rows if "bound" in r]


def _ablation(study, name: str, s, flag: str, selection, domain: str, workdir: str, log) -> tuple:
  """Runs (or reuses) `study`.run_ablation on configs/<domain>.py of section `s` for each of `selection`, into
  workdir/<name>/<domain>. Returns its directory, the rows, _run_or_reuse's status, the loop's iterations per
  run and the piece's own command (`--<flag>=` the selection)."""
  config = piece_config(domain, s.config_arg, s.overrides)
  out = os.path.join(workdir, name, domain)
  log(f"report: {name} {domain} {list(selection)}")
  rows, done = _run_or_reuse(
      out, _settings(domain, s, selection), lambda: study.run_ablation(config, out, tuple(selection)),
      lambda: study.read_rows(out))
  command = piece_command(name, domain, s, out, f"--{flag}={','.join(selection)}")
  return out, rows, done, settings.load(config).loop.iterations, command


def ablate_q_section(s, domain: str, workdir: str, log=print) -> tuple[dict, list[dict]]:
  """The Q-quality ablation's section and its bound rows (labelled ablate_q/<domain>/<variant>)."""
  out, rows, done, iterations, command = _ablation(ablate_q, "ablate_q", s, "variants", s.variants, domain,
                                                   workdir, log)
  png = os.path.join(out, ablate_q.PLOT_FILE)
  if rows and (done["status"] == "ran" or not os.path.exists(png)):
    ablate_q.write_report(rows, out)
  note = (f"Variants {list(s.variants)}, {iterations} iteration(s) each from the same pi_0; Q_k's error is against "
          "the simulator's Monte Carlo Q on sampled held-out states.")
  section = _section("ablate_q", domain, f"Q-quality ablation: {domain}", **done,
                     tables=[ablate_q.table(rows)], plots=[png] if rows else [], commands=[command], note=note)
  return section, _bound_rows(rows, f"ablate_q/{domain}")


def ablate_inner_section(s, domain: str, workdir: str, log=print) -> tuple[dict, list[dict]]:
  """The inner-solver ablation's section and its bound rows (each solver's run read as an ablate_q variant)."""
  out, rows, done, iterations, command = _ablation(ablate_inner, "ablate_inner", s, "inners", s.inners, domain,
                                                   workdir, log)
  png = os.path.join(out, ablate_inner.PLOT_FILE)
  if done["status"] == "ran" or not os.path.exists(png):
    ablate_inner.plot(rows, png, ablate_inner.reference(out, s.inners[0]))
  bound_rows = []
  for inner in s.inners:
    bound_rows += _bound_rows(ablate_q.variant_rows(inner, os.path.join(out, inner)), f"ablate_inner/{domain}")
  note = f"Solvers {list(s.inners)}, {iterations} iteration(s) each from the same pi_0 and Q_0."
  section = _section("ablate_inner", domain, f"Inner-solver ablation: {domain}", **done,
                     tables=[ablate_inner.table(rows)], plots=[png], commands=[command], note=note)
  return section, bound_rows


def bound_section(rows: list[dict]) -> dict:
  note = ("Per iteration: the realised V(pi_k+1) - V(pi_k) (paired on the same evaluation customers, discounted "
          "from the start state) next to beta KL - 2 eps_Q, times H, the discounted number of decisions "
          "(iterppo_jax/bound.py). From the ablation runs above; nothing extra is run.")
  text = bound.table(rows) if rows else "(no iteration with KL and eps_Q: enable ablate_q or ablate_inner)"
  return _section("bound", "", "Improvement bound", "derived", 0.0, tables=[text], note=note)


# ---- the report ----

def machine() -> dict:
  """Where the report ran: the numbers every wall time depends on."""
  return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
          "load_average": [round(x, 2) for x in os.getloadavg()], "jax": jax.__version__,
          "devices": [str(d) for d in jax.devices()]}


def _seconds(s: dict) -> str:
  if s["status"] == "derived":
    return "-"
  if s["status"] == "ran":
    return f"{s['seconds']:.0f}"
  return f"{s['seconds']:.0f} (an earlier run{', finished ' + s['finished'] if s['finished'] else ''})"


def _name(s: dict) -> str:
  return s["section"] + (f" ({s['domain']})" if s.get("domain") else "")


def render(header: dict, sections: list[dict], pending=()) -> str:
  """report.md: the header (date, machine, commands, wall time per section), then each section's tables and plots.

  Args:
    header: {date, command, preset, machine (see machine()), seconds (this invocation so far)}.
    sections: _section dicts, in order; plot paths relative to the report's directory.
    pending: names of sections not run yet (listed in the time table).
  """
  m = header["machine"]
  lines = ["# Iterative PPO: the report of issue #10", "",
           f"Made {header['date']} by `{header['command']}` (preset `{header['preset']}`).", "",
           f"Machine: {m['platform']}, Python {m['python']}, {m['cpus']} CPU cores (load average "
           f"{' / '.join(str(x) for x in m['load_average'])} at the start), JAX {m['jax']} on "
           f"{', '.join(m['devices'])}. This invocation took {header['seconds']:.0f} s.", "",
           "| section | status | wall time s |", "|---|---|---|"]
  lines += [f"| {_name(s)} | {s['status']} | {_seconds(s)} |" for s in sections]
  lines += [f"| {name} | pending | - |" for name in pending]
  commands = [c for s in sections for c in s["commands"]]
  if commands:
    lines += ["", "Each piece on its own (with these workdirs it reuses this report's runs):", "", "```bash",
              *commands, "```"]
  for s in sections:
    lines += ["", f"## {s['title']}", ""]
    if s["note"]:
      lines += [s["note"], ""]
    for table in s["tables"]:
      lines += [table, ""]
    for plot in s["plots"]:
      lines += [f"![{s['title']}]({plot})", ""]
  return "\n".join(lines).rstrip() + "\n"


# ---- configs/report.py's settings, typed and checked before any section runs. No field has a default: the
# config file holds every value and why, and a key it lost is named (settings.build) ----

@dataclasses.dataclass(frozen=True)
class Simulator:
  enabled: bool
  domains: tuple[str, ...]
  policies: tuple[str, ...]  # each domain's scripted policies (registry.make_policy)
  business_users: tuple[str, ...]
  conversations: int  # per cell
  seed: int
  batch_size: int


@dataclasses.dataclass(frozen=True)
class Piece:
  """A section that runs a piece per domain on configs/<domain>.py, with its colon argument and overrides."""
  enabled: bool
  domains: tuple[str, ...]
  config_arg: str
  overrides: tuple[str, ...]  # 'dotted.key=value', as --config.key=value would set


@dataclasses.dataclass(frozen=True)
class AblateQ(Piece):
  variants: tuple[str, ...]  # of ablate_q.VARIANTS


@dataclasses.dataclass(frozen=True)
class AblateInner(Piece):
  inners: tuple[str, ...]  # of settings.INNER_SOLVERS


@dataclasses.dataclass(frozen=True)
class Bound:
  enabled: bool


@dataclasses.dataclass(frozen=True)
class Settings:
  """The report's settings (configs/report.py), typed and frozen: what build_report and its sections read."""
  preset: str
  simulator: Simulator
  baselines: Piece
  ablate_q: AblateQ
  ablate_inner: AblateInner
  bound: Bound


PRESETS = ("small", "full", "tiny")
BUSINESS_USERS = tuple(settings.CHOICES["env.business_user"])
COUNTS = {"simulator.conversations": 1, "simulator.seed": 0, "simulator.batch_size": 1}
# Piece section -> (its selection key, the names it accepts).
_SELECTIONS = {"baselines": ("", ()), "ablate_q": ("variants", tuple(ablate_q.VARIANTS)),
               "ablate_inner": ("inners", tuple(settings.INNER_SOLVERS))}


def load(config) -> Settings:
  """configs/report.py's ConfigDict as typed `Settings`, checked before any section runs: its own keys (an
  unknown or missing key, a value of the wrong type, a bad choice or size: one errors.SettingsError naming the
  key, the value and what is allowed), and every sub-config an enabled section would run, with its overrides,
  through the settings its piece loads (settings.load; the baselines' own checks too)."""
  typed = settings.build(Settings, config)
  settings.check_keys(typed, {"preset": PRESETS}, COUNTS, {})
  if not any(getattr(typed, name).enabled for name in SECTIONS):
    raise errors.SettingsError(f"no section is enabled; expected at least one of {list(SECTIONS)}")
  s = typed.simulator
  if s.enabled:
    if not s.domains or not s.policies or not s.business_users:
      raise errors.SettingsError("config.simulator.domains, policies and business_users must be non-empty")
    bad = sorted(set(s.business_users) - set(BUSINESS_USERS))
    if bad:
      raise errors.SettingsError(f"config.simulator.business_users must be of {BUSINESS_USERS}, got {bad}")
    for domain in s.domains:
      env_config = settings.load_env(piece_config(domain, "").env)
      for policy in s.policies:
        registry.make_policy(domain, policy, env_config)  # an unknown name fails here, not after other domains
  for name, (key, allowed) in _SELECTIONS.items():
    s = getattr(typed, name)
    if not s.enabled:
      continue
    if not s.domains:
      raise errors.SettingsError(f"config.{name}.domains must be non-empty")
    if key and (not getattr(s, key) or set(getattr(s, key)) - set(allowed)):
      raise errors.SettingsError(f"config.{name}.{key} must be a non-empty subset of {list(allowed)}, got "
                                 f"{list(getattr(s, key))}")
    for domain in s.domains:
      c = piece_config(domain, s.config_arg, s.overrides)
      if name == "baselines":
        baselines_lib.check_config(c)
      else:
        settings.load(c)
  return typed


def build_report(config, workdir: str, command: str, log=print) -> str:
  """Runs (or reuses) every enabled section of `config` (configs/report.py, checked first: `load`) into workdir
  and writes workdir/report.md; returns its path."""
  config = load(config)
  os.makedirs(workdir, exist_ok=True)
  state_path = os.path.join(workdir, "report.json")
  if os.path.exists(state_path):
    earlier = _read_json(state_path)["preset"]
    if earlier != config.preset:
      raise errors.SettingsError(f"{workdir} holds a '{earlier}' report; a '{config.preset}' one needs another workdir")
  start = time.perf_counter()
  header = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": command, "preset": config.preset,
            "machine": machine(), "seconds": 0.0}
  plan = [(name, domain) for name in SECTIONS if getattr(config, name).enabled
          for domain in (getattr(config, name).domains if name in _SELECTIONS else ("",))]
  sections, bound_rows = [], []
  md_path = os.path.join(workdir, "report.md")

  def write(pending):
    header["seconds"] = time.perf_counter() - start
    shown = [{**s, "plots": [os.path.relpath(p, workdir) for p in s["plots"]]} for s in sections]
    io_utils.atomic_write_text(md_path, render(header, shown, [f"{n} ({d})" if d else n for n, d in pending]))
    io_utils.atomic_write_json(state_path, {**header, "sections": [
        {k: s[k] for k in ("section", "domain", "status", "seconds", "finished")} for s in sections]})

  for i, (name, domain) in enumerate(plan):
    s = getattr(config, name)
    if name == "simulator":
      sections.append(simulator_section(s, workdir, log))
    elif name == "baselines":
      sections.append(baselines_section(s, domain, workdir, log))
    elif name == "ablate_q":
      section, rows = ablate_q_section(s, domain, workdir, log)
      sections.append(section)
      bound_rows += rows
    elif name == "ablate_inner":
      section, rows = ablate_inner_section(s, domain, workdir, log)
      sections.append(section)
      bound_rows += rows
    else:
      sections.append(bound_section(bound_rows))
    log(f"report: {_name(sections[-1])} {sections[-1]['status']}, wall time s: {_seconds(sections[-1])}")
    write(plan[i + 1:])
  return md_path
