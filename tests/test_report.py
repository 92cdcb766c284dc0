"""iterppo_jax/studies/report.py: overrides and presets, the simulator tables, the markdown, and the tiny
report end to end.

The end-to-end test builds the tiny preset (every piece at configs/sales.py:tiny sizes, ~2.5 min on a loaded
2-core machine), then builds it again with every way of doing work replaced by a function that fails: the
second report must come entirely from the first one's files.
"""

import dataclasses
import os
import re

import pytest

from configs import report as report_config
from iterppo_jax import errors
from iterppo_jax import loop
from iterppo_jax.envs import base
from iterppo_jax.envs import registry
from iterppo_jax.studies import ablate_q
from iterppo_jax.studies import baselines as baselines_lib
from iterppo_jax.studies import report

TABLE_HEADERS = {  # section -> the start of its table's header row
    "simulator": "| domain | policy | conversion sr (95% CI) | conversion direct (95% CI) | median rounds sr |",
    "baselines": "| method | seeds | conversion (95% CI) | per seed | conversations used | wall time s |",
    "ablate_q": "| variant | k | Q_k MAE vs true Q | Q_k max err |",
    "ablate_inner": "| solver | policy | conversion (95% CI) | KL(pi_k \\|\\| pi_{k-1}) |",
    "bound": "| variant | k | V(pi_k) | V(pi_k+1) | improvement (95% CI) |",
}


# ---- overrides, sub-configs and presets ----


def test_overrides_are_literals_or_words_and_bad_ones_name_the_key():
  assert report.parse_override("baselines.seeds=(0, 1)") == ("baselines.seeds", (0, 1))
  assert report.parse_override("loop.tensorboard=False") == ("loop.tensorboard", False)
  assert report.parse_override("loop.first_data=policy") == ("loop.first_data", "policy")
  with pytest.raises(ValueError, match="dotted.key=value"):
    report.parse_override("baselines.budget")
  c = report.piece_config("booking", "tiny", ("baselines.budget=32", 'baselines.methods=("pi0", "offline")'))
  assert c.env.domain == "booking" and c.sft.steps == 6  # the domain's own config at its tiny sizes
  assert c.baselines.budget == 32 and tuple(c.baselines.methods) == ("pi0", "offline")
  assert report.piece_config("booking", "tiny").baselines.budget == 16  # a fresh config every time
  with pytest.raises(ValueError, match="'baselines.budgte'"):
    report.piece_config("sales", "tiny", ("baselines.budgte=3",))
  with pytest.raises(ValueError, match="'nope.budget'"):
    report.piece_config("sales", "tiny", ("nope.budget=3",))
  with pytest.raises(ValueError, match="'baselines.budget'.*int"):
    report.piece_config("sales", "tiny", ("baselines.budget=lots",))
  with pytest.raises(ValueError, match="unknown domain 'retail'"):
    report.piece_config("retail", "")


def test_presets_and_config_checks():
  small, full, tiny = (report_config.get_config(a) for a in (None, "full", "tiny"))
  assert (small.preset, full.preset, tiny.preset) == ("small", "full", "tiny")
  assert report_config.get_config("small").to_dict() == small.to_dict()
  assert small.ablate_inner.enabled and full.ablate_inner.enabled and tiny.ablate_inner.enabled
  assert tuple(small.ablate_inner.overrides) == ("loop.iterations=1",) and not full.ablate_inner.overrides
  assert tuple(small.ablate_q.variants) == ("baseline", "flip_10")
  assert tuple(full.baselines.domains) == ("sales", "support", "booking", "negotiation")
  assert not full.baselines.overrides and len(full.ablate_q.variants) == 6
  assert tiny.baselines.config_arg == tiny.ablate_q.config_arg == tiny.ablate_inner.config_arg == "tiny"
  for c in (small, full, tiny):
    typed = report.load(c)  # builds and checks every sub-config; runs nothing
    assert typed.preset == c.preset and typed.ablate_q.variants == tuple(c.ablate_q.variants)
    assert typed.baselines.overrides == tuple(c.baselines.overrides)
  small_baselines = report.piece_config("sales", small.baselines.config_arg, small.baselines.overrides)
  assert small_baselines.baselines.budget == 1536 and tuple(small_baselines.baselines.seeds) == (0,)
  with pytest.raises(ValueError, match="one preset"):
    report_config.get_config("full,tiny")
  with pytest.raises(ValueError, match="unknown config argument 'huge'"):
    report_config.get_config("huge")
  bad = report_config.get_config("tiny")
  bad.ablate_q.variants = ("baseline", "flip_50")
  with pytest.raises(ValueError, match="ablate_q.variants must be a non-empty subset"):
    report.load(bad)
  bad = report_config.get_config("tiny")
  bad.simulator.business_users = ("sr", "email")
  with pytest.raises(ValueError, match="business_users"):
    report.load(bad)
  bad = report_config.get_config("tiny")
  bad.baselines.overrides = ("baselines.budget=15", "baselines.ks=(2,)")  # K = 2 cannot split 15 conversations
  with pytest.raises(ValueError, match="budget 15"):
    report.load(bad)
  bad = report_config.get_config("tiny")
  for name in report.SECTIONS:
    bad[name].enabled = False
  with pytest.raises(ValueError, match="no section is enabled"):
    report.load(bad)


@pytest.mark.parametrize("key, value, message", [
    ("simulator.polices", ("oracle",), r"^config\.simulator\.polices: unknown key; expected one of enabled, "),
    ("ablate_q.variants", None, r"^config\.ablate_q\.variants: missing; the section needs enabled, domains, "),
    ("simulator.conversations", 0, r"^config\.simulator\.conversations must be an integer >= 1, got 0$"),
    ("simulator.seed", 0.5, r"^config\.simulator\.seed must be an integer, got 0\.5$"),
    ("baselines.overrides", "loop.iterations=1", r"^config\.baselines\.overrides must be a tuple, got "),
    ("preset", "huge", r"^config\.preset must be one of small, full, tiny, got 'huge'$"),
    ("ablate_inner.inners", ("ppo", "dpo"), r"^config\.ablate_inner\.inners must be a non-empty subset of "),
    # a sub-config's own setting, as the piece would load it
    ("ablate_inner.overrides", ("ppo.minibatch_size=3",), r"config\.ppo\.minibatch_size \(3\) must divide"),
])
def test_a_bad_key_is_named_with_its_value_before_any_section_runs(key, value, message):
  d = report_config.get_config("tiny").to_dict()  # a plain dict: a ConfigDict refuses a value of another type
  section, _, leaf = key.rpartition(".")
  node = d[section] if section else d
  if value is None:
    del node[leaf]
  else:
    node[leaf] = value
  with pytest.raises(errors.SettingsError, match=message):
    report.load(d)


# ---- the simulator tables ----


def test_simulator_section_plays_each_cell_once(tmp_path):
  c = report_config.get_config("tiny")
  c.simulator.domains = ("sales", "support")
  c.simulator.conversations = 40
  s = report.load(c).simulator
  workdir = str(tmp_path)
  section = report.simulator_section(s, workdir, log=lambda _: None)
  assert section["status"] == "ran"
  rows = {(d, p, m): report._read_json(os.path.join(workdir, "simulator", d, f"{p}_{m}.json"))
          for d in s.domains for p in s.policies for m in s.business_users}
  assert len(rows) == 12
  # A cell is what the shipped policy plays in that mode, summarised by envs/base.summarize.
  env_config = report.piece_config("support", "").env
  env_config.business_user = "direct"
  records = registry.make_env(env_config).play(registry.make_policy("support", "behavior", env_config), 40, seed=0)
  cell = rows[("support", "behavior", "direct")]
  assert cell["conversion"] == base.summarize(records)["conversion"]
  rounds = sorted(len(r.agent_steps()) for r in records)
  assert cell["median_rounds"] == (rounds[19] + rounds[20]) / 2  # 40 conversations: the mean of the middle two
  for d in s.domains:  # the oracle outsells the staff; random text sent verbatim never converts
    assert rows[(d, "oracle", "sr")]["conversion"] > rows[(d, "behavior", "sr")]["conversion"]
    assert rows[(d, "random", "direct")]["conversion"] == 0.0
  table = section["tables"][0]
  assert table.startswith(TABLE_HEADERS["simulator"])
  line = rows[("sales", "oracle", "direct")]
  assert (f"| sales | oracle | {rows[('sales', 'oracle', 'sr')]['conversion']:.3f} "
          f"({rows[('sales', 'oracle', 'sr')]['conversion_lo']:.3f}-") in table
  assert f"{line['conversion']:.3f} ({line['conversion_lo']:.3f}-{line['conversion_hi']:.3f})" in table
  assert os.path.getsize(section["plots"][0]) > 5000
  # A second call reads every cell back; a changed size plays again.
  stamps = {k: os.path.getmtime(os.path.join(workdir, "simulator", k[0], f"{k[1]}_{k[2]}.json")) for k in rows}
  again = report.simulator_section(s, workdir, log=lambda _: None)
  assert again["status"] == "reused" and again["tables"] == section["tables"]
  assert stamps == {k: os.path.getmtime(os.path.join(workdir, "simulator", k[0], f"{k[1]}_{k[2]}.json"))
                    for k in rows}
  s = dataclasses.replace(s, conversations=30)
  played = []
  assert report.simulator_section(s, workdir, log=played.append)["status"] == "ran" and len(played) == 12


# ---- the markdown ----


def test_render_lists_sections_times_commands_and_plots():
  header = {"date": "2026-11-25 10:00 UTC", "command": "python -m experiments.report --workdir=/tmp/r",
            "preset": "small", "seconds": 12.0,
            "machine": {"platform": "Linux-x", "python": "3.11.7", "cpus": 2, "load_average": [0.5, 0.4, 0.3],
                        "jax": "0.10.2", "devices": ["cpu:0"]}}
  sections = [
      report._section("simulator", "", "Simulator tables", "ran", 11.6, tables=["| a |\n|---|\n| 1 |"],
                      plots=["simulator/simulator.png"], commands=["python -m experiments.simulate ..."],
                      note="five thousand per cell"),
      report._section("baselines", "sales", "Baselines: sales", "reused", 3600.4, finished="2026-11-24 09:00:00",
                      tables=["| method |"], plots=["baselines/sales/baselines.png"],
                      commands=["python -m experiments.baselines --workdir=/tmp/r/baselines/sales"]),
      report._section("bound", "", "Improvement bound", "derived", 0.0, tables=["| variant |"]),
  ]
  md = report.render(header, sections, pending=["ablate_q (sales)"])
  assert md.startswith("# Iterative PPO: the report of issue #10\n")
  assert "Made 2026-11-25 10:00 UTC by `python -m experiments.report --workdir=/tmp/r` (preset `small`)" in md
  assert "2 CPU cores (load average 0.5 / 0.4 / 0.3 at the start), JAX 0.10.2 on cpu:0" in md
  assert "| simulator | ran | 12 |" in md
  assert "| baselines (sales) | reused | 3600 (an earlier run, finished 2026-11-24 09:00:00) |" in md
  assert "| bound | derived | - |" in md and "| ablate_q (sales) | pending | - |" in md
  assert "```bash\npython -m experiments.simulate ...\npython -m experiments.baselines" in md
  assert "## Simulator tables\n\nfive thousand per cell\n\n| a |\n|---|\n| 1 |\n\n![Simulator tables]" in md
  assert md.index("## Simulator tables") < md.index("## Baselines: sales") < md.index("## Improvement bound")
  assert re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md) == ["simulator/simulator.png", "baselines/sales/baselines.png"]


# ---- the tiny preset end to end ----


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("report"))
  log = []
  path = report.build_report(report_config.get_config("tiny"), workdir, "pytest tiny", log=log.append)
  return workdir, path, log


@pytest.mark.slow
def test_tiny_report_has_every_table_and_plot(tiny_report):
  workdir, path, _ = tiny_report
  assert path == os.path.join(workdir, "report.md")
  md = open(path).read()
  for section, head in TABLE_HEADERS.items():
    assert head in md, section
  for plot in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
    assert not os.path.isabs(plot) and os.path.getsize(os.path.join(workdir, plot)) > 5000, plot
  assert len(re.findall(r"!\[", md)) == 4  # simulator, baselines, ablate_q, ablate_inner
  for name in ("simulator", "baselines (sales)", "ablate_q (sales)", "ablate_inner (sales)"):
    assert re.search(rf"\| {re.escape(name)} \| ran \| \d+ \|", md), name
  # The tables are the pieces' own, on the rows they wrote.
  rows = baselines_lib.read_rows(os.path.join(workdir, "baselines", "sales", baselines_lib.ROWS_FILE))
  assert [r["method"] for r in rows] == ["behavior", "oracle", "pi0", "iterative_ppo_k1"]
  assert baselines_lib.table(rows) in md
  q_rows = ablate_q.read_rows(os.path.join(workdir, "ablate_q", "sales"))
  assert [(r["variant"], r["label_error"] > 0) for r in q_rows] == [("baseline", False), ("flip_30", True)]
  for label in ("ablate_q/sales/baseline", "ablate_q/sales/flip_30", "ablate_inner/sales/ppo",
                "ablate_inner/sales/rloo"):
    assert f"| {label} | 0 |" in md, label
  assert "--variants=baseline,flip_30" in md and "--inners=ppo,rloo" in md


@pytest.mark.slow
def test_second_report_reuses_everything(tiny_report, monkeypatch):
  workdir, path, _ = tiny_report
  first = open(path).read()
  cell = os.path.join(workdir, "simulator", "negotiation", "oracle_sr.json")
  stamp = os.path.getmtime(cell)

  def boom(*args, **kwargs):
    raise AssertionError("a reused report ran a piece")

  monkeypatch.setattr(report, "simulate_cell", boom)
  monkeypatch.setattr(baselines_lib, "run_all", boom)
  monkeypatch.setattr(loop, "run", boom)
  log = []
  report.build_report(report_config.get_config("tiny"), workdir, "pytest tiny again", log=log.append)
  md = open(path).read()
  assert os.path.getmtime(cell) == stamp
  for name in ("simulator", "baselines (sales)", "ablate_q (sales)", "ablate_inner (sales)"):
    assert re.search(rf"\| {re.escape(name)} \| reused \| \d+ \(an earlier run", md), name
  # Same tables as the first time (the header and the time table differ).
  assert md[md.index("## Simulator"):] == first[first.index("## Simulator"):]
  # A workdir holds one preset.
  with pytest.raises(ValueError, match="holds a 'tiny' report"):
    report.build_report(report_config.get_config("small"), workdir, "pytest small", log=log.append)


def _summary(convs, pretrained=None, ranked=False):
  def s(c):
    return {"conversion": c, "conversion_lo": c - 0.01, "conversion_hi": c + 0.01, "mean_turns": 5.0,
            "accept_rate": 0.5, "kl_to_pi0": 0.1}
  out = {"iterations": [s(c) for c in convs], "reference": {"behavior": s(0.2)},
         "q_ranking": [{"deployed_conversion": 0.1}] * (len(convs) - 1)}
  if ranked:
    out["q_ranking"][-1] = {"rank_top1": 0.5, "rank_states": 10, "rank_candidates": 4.0, "rank_top1_chance": 0.25,
                            "rank_spearman": 0.3, "rank_pairwise": 0.6, "rank_pick_gain": 0.02,
                            "rank_best_gain": 0.05, "rank_true_se": 0.01}
  if pretrained is not None:
    out["pretrained"] = s(pretrained)
  return out


def test_run_table_beside_another_run_and_no_empty_ranking_table():
  smol = _summary([0.05, 0.025, 0.03], pretrained=0.075)
  tiny = _summary([0.107, 0.205, 0.28, 0.365], ranked=True)
  plain = report.table(smol)
  assert "Q_k's ranking" not in plain  # no measurement, no empty table
  ranked = report.table(tiny)
  assert "| Q_2 |" in ranked and "| Q_0 |" not in ranked  # rows keep their k
  q2 = next(line for line in ranked.splitlines() if line.startswith("| Q_2 |"))
  assert q2.count("|") == 10 and "| +0.020 (0.050) | +nan (nan) |" in q2  # no pi_k samples measured: nan
  text = report.table(smol, tiny, "0.6M model")
  lines = [line for line in text.splitlines() if line.startswith("| ")]
  assert lines[0].endswith("| 0.6M model: conversion (95% CI) |")
  by_label = {line.split(" | ")[0][2:]: line for line in lines[1:]}
  assert list(by_label) == ["pretrained, before SFT", "pi_0", "pi_1", "pi_2", "pi_3", "behavior (scripted)"]
  assert by_label["pi_1"].endswith("| 0.025 (0.015-0.035) | 5.00 | 0.500 | 0.10 | 0.205 (0.195-0.215) |")
  assert by_label["pi_3"] == "| pi_3 | - | - | - | - | 0.365 (0.355-0.375) |"
  assert by_label["pretrained, before SFT"].endswith("| - | - |")
  assert all(line.count("|") == 7 for line in lines)


def test_a_bad_beside_run_is_one_line_before_any_work(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  (tmp_path / "other").mkdir()
  out = subprocess.run([sys.executable, "-m", "experiments.iterative_ppo", "--config=configs/sales.py:tiny",
                        f"--beside={tmp_path}/other", f"--workdir={tmp_path}/w"], cwd=root, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": root})
  assert out.returncode == 2
  assert f"--beside={tmp_path}/other: {tmp_path}/other/summary.json is not the summary.json" in out.stderr
  assert "Traceback" not in out.stderr and not os.path.exists(tmp_path / "w")
