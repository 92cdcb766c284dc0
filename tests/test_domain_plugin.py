"""A domain from outside the package, as a new user writes one (docs/domains.md): defined in this file, named by
import path in `env.domain`, run through the loop and the report's simulator table with no edit to iterppo_jax.

The toy domain, "scarves": the customer wants a scarf of one of three colours and says which only when asked;
offering the right colour sells it, a wrong one sends them away, small talk changes nothing. The best act is to
ask first, then offer the named colour.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import pytest

from configs import report as report_config
from configs import sales as sales_config
from iterppo_jax import errors
from iterppo_jax import loop
from iterppo_jax.envs import base
from iterppo_jax.envs import policies
from iterppo_jax.envs import registry
from iterppo_jax.studies import report

COLOURS = ("red", "green", "blue")
PATH = "toy_domains.scarves"  # the import path a user's package would have


# ---- the domain module's protocol: make_env, make_policy, SCRIPT (and the optional tracker) ----

@dataclasses.dataclass(frozen=True)
class Act:
  kind: str  # ask | offer | chat
  colour: str = ""


@dataclasses.dataclass(frozen=True)
class Visible:
  colour: str  # '' until the customer said it


@dataclasses.dataclass
class Hidden:
  colour: str


def parse(text: str) -> Act:
  low = text.lower()
  if "which colour" in low:
    return Act("ask")
  for c in COLOURS:
    if f"{c} scarf" in low:
      return Act("offer", c)
  return Act("chat")


def visible_facts(turns) -> Visible:
  for t in turns:
    if t.role == "customer" and t.text.startswith("I would like "):
      return Visible(t.text.removeprefix("I would like ").rstrip("."))
  return Visible("")


def oracle_act(v: Visible) -> Act:
  return Act("offer", v.colour) if v.colour else Act("ask")


def staff_act(v: Visible, skill: float, rng: np.random.Generator) -> Act:
  return oracle_act(v) if rng.random() < skill else Act("offer", COLOURS[int(rng.integers(3))])


def business_text(act: Act, rng: np.random.Generator) -> str:
  if act.kind == "ask":
    return ("Which colour would you like?", "Sure, which colour do you prefer?")[int(rng.integers(2))]
  if act.kind == "offer":
    return f"How about our {act.colour} scarf?"
  return "Lovely weather today."


def candidate_acts(v: Visible) -> list[Act]:
  return [Act("ask")] + [Act("offer", c) for c in COLOURS] + [Act("chat")]


SCRIPT = policies.Script(visible_facts, oracle_act, staff_act, business_text, candidate_acts)


def dialogue_state(turns) -> tuple:
  return (bool(visible_facts(turns).colour),)


def act_key(turns, text: str) -> tuple:
  act, v = parse(text), visible_facts(turns)
  return (act.kind, act.kind == "offer" and act.colour == v.colour)


class ScarfEnv(base.TextEnv):
  domain = "scarves"

  def __init__(self, skill_mean: float = 0.4, **kwargs):
    super().__init__(**kwargs)
    self.skill_mean = skill_mean

  def new_hidden(self, rng):
    return Hidden(COLOURS[int(rng.integers(3))])

  def opening(self, hidden, rng):
    return "Hi, I am looking for a scarf."

  def _react(self, hidden: Hidden, text: str) -> tuple[str | None, int]:
    act = parse(text)
    if act.kind == "ask":
      return f"I would like {hidden.colour}.", 0
    if act.kind == "offer" and act.colour == hidden.colour:
      return "Great, I will take it!", 1
    if act.kind == "offer":
      return None, 0
    return "Okay.", 0

  def customer_reply(self, hidden, business_text_, rng):
    return self._react(hidden, business_text_)

  def classify_outcome(self, customer_text):
    return int("take it" in customer_text)

  def judge(self, hidden, record, suggestion):
    return "good" if parse(suggestion) == oracle_act(visible_facts(record.turns)) else "bad"

  def staff_message(self, hidden, record, rng):
    return business_text(staff_act(visible_facts(record.turns), self.skill_mean, rng), rng)

  def edit(self, suggestion, rng):
    return suggestion + " Thanks!"

  def rewrite(self, hidden, suggestion, rng):
    return business_text(parse(suggestion), rng)

  def metadata(self, hidden):
    return {"colour": hidden.colour}

  def restore(self, record, n_turns):
    hidden = Hidden(record.metadata["colour"])
    for t in record.turns[:n_turns]:
      if t.role == "business":
        self._react(hidden, t.text)
    return self.restored_episode(record, n_turns, hidden)


def make_env(env_config) -> ScarfEnv:
  return ScarfEnv.from_config(env_config, skill_mean=env_config.skill_mean)


def make_policy(name: str, env_config):
  return policies.lookup("scarves", name, {
      "behavior": lambda: policies.StaffPolicy(SCRIPT, env_config.skill_mean),
      "oracle": lambda: policies.OraclePolicy(SCRIPT), "random": policies.RandomTextPolicy,
      "explore": lambda: policies.ScriptExplorePolicy(SCRIPT, skill_mean=env_config.skill_mean)})


@pytest.fixture(autouse=True)
def toy_package(monkeypatch):
  """This file, importable as toy_domains.scarves (what `pip install -e my_pkg` would give a user)."""
  monkeypatch.setitem(sys.modules, PATH, sys.modules[__name__])


# ---- the tests ----

def test_the_registry_takes_an_import_path_and_names_what_is_wrong():
  env_config = sales_config.get_config("tiny").env
  env_config.domain = PATH
  env = registry.make_env(env_config)
  oracle = env.play(registry.make_policy(PATH, "oracle", env_config), 40, seed=0)
  staff = env.play(registry.make_policy(PATH, "behavior", env_config), 200, seed=0)
  assert base.summarize(oracle)["conversion"] > 0.9
  assert 0.2 < base.summarize(staff)["conversion"] < 0.8
  assert {r.domain for r in oracle} == {"scarves"}
  assert registry.tracker(PATH) == (dialogue_state, act_key)
  # A wrong domain or policy is a setting: the command line's one line and exit status 2, not an internal error.
  with pytest.raises(errors.SettingsError, match="unknown domain 'sale'.*import path"):
    registry.module("sale")
  with pytest.raises(errors.SettingsError, match="cannot import module 'no_such_pkg.domain'.*PYTHONPATH"):
    registry.module("no_such_pkg.domain")
  with pytest.raises(errors.SettingsError, match="lacks make_env, make_policy, SCRIPT"):
    registry.module("iterppo_jax.envs.base")
  with pytest.raises(errors.SettingsError, match="unknown scarves policy 'staff'; expected one of behavior, "):
    registry.make_policy(PATH, "staff", env_config)


def test_restore_replays_the_hidden_state():
  """Q^pi from a restored state equals the closed form: with the colour known, offering it sells now, small talk
  sells a turn later (the oracle offers it next), a wrong colour never."""
  env_config = sales_config.get_config("tiny").env
  env_config.domain, env_config.business_user = PATH, "direct"
  env = registry.make_env(env_config)
  record = env.play(registry.make_policy(PATH, "oracle", env_config), 1, seed=3)[0]
  assert [t.role for t in record.turns][:4] == ["customer", "suggestion", "business", "customer"]
  ep = env.restore(record, 4)  # after 'which colour?' and the answer
  oracle = registry.make_policy(PATH, "oracle", env_config)
  colour = record.metadata["colour"]
  wrong = next(c for c in COLOURS if c != colour)
  q, _ = env.estimate_q([ep] * 3, [f"How about our {colour} scarf?", "Lovely weather today.",
                                   f"How about our {wrong} scarf?"], oracle, gamma=0.9, n_rollouts=4)
  np.testing.assert_allclose(q, [1.0, 0.9, 0.0])


@pytest.mark.slow
# The dialogue-state view reads the most of the domain (its tracker as well); the token view's loop is the one
# tests/test_loop.py runs, and the domain adds nothing there that this run does not read.
@pytest.mark.parametrize("view", ["dialogue_state"])
def test_the_tiny_loop_runs_on_a_domain_from_outside(tmp_path, view):
  c = sales_config.get_config("tiny")
  c.env.domain = PATH
  c.qfit.view = view
  c.qfit.method = "mc" if view == "tokens" else "td"
  c.loop.iterations = 1
  c.loop.tensorboard = False
  workdir = str(tmp_path / view)
  summary = loop.run(c, workdir)
  assert len(summary["iterations"]) == 2  # pi_0 and pi_1, each evaluated
  assert all(0.0 <= h["conversion"] <= 1.0 for h in summary["iterations"])
  with open(os.path.join(workdir, "data", "eval_1.jsonl")) as f:
    assert {json.loads(line)["domain"] for line in f} == {"scarves"}
  with open(os.path.join(workdir, "data", "ranking_0.json")) as f:
    ranking = json.load(f)
  assert ranking  # Q_0's ranking was measured against the toy's true Q (restore + estimate_q)


def test_the_report_simulator_table_takes_the_domain(tmp_path):
  c = report_config.get_config("tiny")
  for section in ("baselines", "ablate_q", "ablate_inner", "bound"):
    c[section].enabled = False
  c.simulator.domains = (PATH,)
  c.simulator.conversations = 40
  rows, played = report.simulator_rows(c.simulator, str(tmp_path), log=lambda *_: None)
  assert played == 6  # three policies x two business-user modes
  assert {(r["domain"], r["policy"]) for r in rows} == {(PATH, p) for p in ("behavior", "oracle", "random")}
  oracle = [r for r in rows if r["policy"] == "oracle"]
  assert all(r["conversion"] > 0.8 for r in oracle)


def test_the_baselines_take_the_domain(tmp_path):
  """A domain from outside the package through baselines.run_all: scripted rows, pi_0 and filtered BC."""
  from iterppo_jax.studies import baselines
  c = sales_config.get_config("tiny")
  c.env.domain = PATH
  c.loop.tensorboard = False
  c.baselines.seeds = (0,)
  c.baselines.methods = ("oracle", "pi0", "filtered_bc")
  rows = baselines.run_all(c, str(tmp_path), log=lambda _: None)
  assert [r["method"] for r in rows] == ["oracle", "pi0", "filtered_bc"]
  assert rows[0]["conversion"] > 0.8 and all(0 <= r["conversion"] <= 1 for r in rows)
  with open(os.path.join(str(tmp_path), "seed_0", "filtered_bc_k2", "data", "eval_2.jsonl")) as f:
    assert {json.loads(line)["domain"] for line in f} == {"scarves"}
