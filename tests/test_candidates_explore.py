"""Candidate acts (what a Q-model ranks at a state) and the exploratory policy, in every domain: the oracle's act
among the candidates, one per kind, texts that parse back; 'explore' plays, explores and is deterministic; the
sales explorer's logs are those it wrote before the generic explorer existed."""

import functools
import hashlib
import importlib

import numpy as np
import pytest

from iterppo_jax import conversation as conv_lib
from iterppo_jax.envs import policies, registry, sales

DOMAINS = ("sales", "support", "booking", "negotiation")


def _config(domain):
  return importlib.import_module(f"configs.{domain}").get_config("tiny")


def _module(domain):
  return importlib.import_module(f"iterppo_jax.envs.{domain}")


def _script(domain):
  return sales.SCRIPT if domain == "sales" else _module(domain).SCRIPT


@functools.lru_cache(maxsize=None)
def _env(domain):
  return registry.make_env(_config(domain).env)


@functools.lru_cache(maxsize=None)
def _play(domain, policy, n, seed):
  return _env(domain).play(registry.make_policy(domain, policy, _config(domain).env), n, seed=seed)


def _states(domain):
  """Transcripts up to each decision of 50 behaviour conversations."""
  return [r.turns[:i] for r in _play(domain, "behavior", 50, 0) for i in r.agent_steps()]


def _suggested_kinds(domain, records):
  parse = _module(domain).parse_business
  return [[parse(t.text).kind for t in r.turns if t.role == "suggestion"] for r in records]


# ---- candidate acts ----

@pytest.mark.parametrize("domain", DOMAINS)
def test_candidate_acts_hold_the_oracle_one_act_per_kind_and_parse_back(domain):
  script, parse = _script(domain), _module(domain).parse_business
  rng = np.random.default_rng(0)
  states, sizes, lists = _states(domain), set(), set()
  assert len(states) > 100
  for turns in states:
    v = script.visible_facts(turns)
    acts = script.candidate_acts(v)
    assert script.oracle_act(v) in acts, (turns, acts)
    assert len({a.kind for a in acts}) == len(acts), acts
    assert 4 <= len(acts) <= 10, acts
    assert script.candidate_acts(script.visible_facts(turns)) == acts  # deterministic, order included
    for act in acts:
      for _ in range(4):  # several templates of the act
        text = script.business_text(act, rng)
        assert parse(text).kind == act.kind, (act, text)
        assert parse(text) == act, (act, text)  # parameters too: what is ranked is what is sent
    sizes.add(len(acts))
    lists.add(tuple(acts))
  assert len(lists) > 5  # the candidates follow the state (parameters, the oracle's act)
  # candidate_texts: one text per candidate, in their order, from the same random stream.
  turns = states[len(states) // 2]
  texts = policies.candidate_texts(script, turns, np.random.default_rng(1))
  acts = script.candidate_acts(script.visible_facts(turns))
  assert [parse(t) for t in texts] == acts
  rng = np.random.default_rng(1)
  assert texts == [script.business_text(a, rng) for a in acts]


def test_sales_candidates_subsume_the_action_ranking_experiment():
  from experiments import q_action_ranking as qar  # pylint: disable=g-import-not-at-top
  from iterppo_jax.envs import sales  # pylint: disable=g-import-not-at-top
  for turns in _states("sales"):
    v = sales.visible_facts(turns)
    acts = sales.candidate_acts(v)
    assert tuple(a.kind for a in acts[:len(qar.KINDS)]) == qar.KINDS
    rng = np.random.default_rng(len(turns))
    texts = [sales.business_text(a, rng) for a in acts[:len(qar.KINDS)]]
    assert texts == qar.candidates(v, np.random.default_rng(len(turns)))


# ---- the exploratory policy ----

@pytest.mark.parametrize("domain", DOMAINS)
def test_explore_plays_explores_and_is_deterministic(domain):
  explore = registry.make_policy(domain, "explore", _config(domain).env)
  assert explore.name == "explore"
  records = _play(domain, "explore", 100, 0)
  assert len(records) == 100 and {r.policy for r in records} == {"explore"}
  assert all(r.agent_steps() for r in records)
  # Same seeds, same customers: the explorer's acts differ from the staff's at some turns ...
  explored = _suggested_kinds(domain, records)
  staffed = _suggested_kinds(domain, _play(domain, "behavior", 100, 0))
  assert explored != staffed
  # ... and it tries every candidate act kind (the staff's mistakes do not cover them all in every domain).
  script = _script(domain)
  opening = script.candidate_acts(script.visible_facts(records[0].turns[:1]))
  assert {a.kind for a in opening} <= {k for kinds in explored for k in kinds}
  # Deterministic for a seed; the staff member's skill belongs to the conversation, rollout clones included.
  again = _env(domain).play(registry.make_policy(domain, "explore", _config(domain).env), 100, seed=0)
  assert [conv_lib.dumps(r) for r in again] == [conv_lib.dumps(r) for r in records]
  other = _env(domain).play(explore, 100, seed=1)
  assert [conv_lib.dumps(r) for r in other] != [conv_lib.dumps(r) for r in records]
  if domain != "sales":
    assert isinstance(explore, policies.ScriptExplorePolicy)
    assert explore.skill_mean == _config(domain).env.skill_mean
    uid = records[0].id
    assert explore.skill(uid + "/q3") == explore.skill(uid) != explore.skill(records[1].id)


def test_explore_eps_extremes():
  script, env, parse = _script("support"), _env("support"), _module("support").parse_business
  # eps = 0 is the staff population alone (here skilled: the oracle's acts); eps = 1 plays candidates only.
  for eps, skill_mean, allowed in ((0.0, 0.999, lambda v: [script.oracle_act(v)]), (1.0, 0.2, script.candidate_acts)):
    for r in env.play(policies.ScriptExplorePolicy(script, eps=eps, skill_mean=skill_mean), 30, seed=0):
      for i in r.agent_steps():
        assert parse(r.turns[i].text) in allowed(script.visible_facts(r.turns[:i])), (eps, r.turns[:i + 1])
  with pytest.raises(ValueError, match="eps"):
    policies.ScriptExplorePolicy(script, eps=1.5)
  with pytest.raises(ValueError, match="skill_mean"):
    policies.ScriptExplorePolicy(script, skill_mean=1.0)


# The sales explorer (personas, random acts) as it logged before the generic explorer was added: the roles and
# texts of its first 20 conversations with seed 7 on configs/sales.py:tiny, and the first one's texts.
SALES_EXPLORE_SHA256 = "46140175c4e8f6f68cf7296ebd421e630fd88074f7048eb08bb3ee54a2e20416"
SALES_EXPLORE_FIRST = (
    "Hello, can you help me?\nCertainly. What kind of product do you need? I remain at your disposal.\n"
    "Certainly. What kind of product do you need? I remain at your disposal.\nI'm looking for a tablet.\n")


def test_sales_explore_logs_unchanged():
  explore = registry.make_policy("sales", "explore", _config("sales").env)
  assert isinstance(explore, sales.ExploratoryPolicy)
  records = _env("sales").play(explore, 20, seed=7)
  assert "\n".join(t.text for t in records[0].turns).startswith(SALES_EXPLORE_FIRST)
  text = "\n\n".join("\n".join(f"{t.role}:{t.text}" for t in r.turns) for r in records)
  assert hashlib.sha256(text.encode()).hexdigest() == SALES_EXPLORE_SHA256


# ---- the loop: D_0 from the explorer, Q_0 by FQE, in the domains beyond sales (sales: tests/test_fqe.py) ----

@pytest.mark.slow
@pytest.mark.parametrize("domain", ("support", "booking", "negotiation"))
def test_loop_runs_on_exploratory_logs_with_fqe(domain, tmp_path):
  from iterppo_jax import loop  # pylint: disable=g-import-not-at-top
  config = _config(domain)
  config.loop.tensorboard = False
  config.loop.first_data = "explore"
  config.qfit.method = "fqe"
  config.loop.iterations = 1
  summary = loop.run(config, str(tmp_path))
  assert len(summary["iterations"]) == 2  # pi_0, pi_1
  records = conv_lib.read_jsonl(str(tmp_path / "data" / "explore.jsonl"))
  assert len(records) == config.loop.conversations
  assert {r.policy for r in records} == {"explore"} and {r.domain for r in records} == {domain}
