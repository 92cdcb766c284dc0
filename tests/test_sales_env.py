"""The sales simulator: conversion bands, multi-turn credit assignment, true Q (what every domain must do:
test_domain_contract.py)."""

import time

import numpy as np
import pytest

from iterppo_jax.envs import base, policies, sales


def _conversion(env, policy, n, seed=0):
  return base.summarize(env.play(policy, n, seed=seed))


@pytest.fixture(scope="module")
def sr_env():
  return sales.SalesEnv()


@pytest.fixture(scope="module")
def direct_env():
  return sales.SalesEnv(business_user=base.BusinessUserConfig(mode="direct"))


@pytest.fixture(scope="module")
def behaviour_sr(sr_env):
  start = time.perf_counter()
  records = sr_env.play(sales.make_sales_policy("behavior"), 5000, seed=0)
  rate = 5000 / (time.perf_counter() - start)
  print(f"\nsimulated 5000 SR conversations at {rate:.0f} conversations/s")
  return records


def test_conversion_bands(sr_env, direct_env, behaviour_sr):
  behaviour = base.summarize(behaviour_sr)
  oracle = _conversion(sr_env, sales.make_sales_policy("oracle"), 5000)
  random_direct = _conversion(direct_env, sales.make_sales_policy("random"), 5000)
  behaviour_direct = _conversion(direct_env, sales.make_sales_policy("behavior"), 5000)
  print({"behaviour_sr": behaviour["conversion"], "oracle_sr": oracle["conversion"],
         "behaviour_direct": behaviour_direct["conversion"], "random_direct": random_direct["conversion"]})
  assert 0.10 <= behaviour["conversion"] <= 0.35
  assert 0.10 <= behaviour_direct["conversion"] <= 0.35
  assert oracle["conversion"] >= 1.8 * behaviour["conversion"]
  assert random_direct["conversion"] < 0.05
  # In the SR setting the business user rejects gibberish and writes its own message instead.
  random_sr = _conversion(sr_env, sales.make_sales_policy("random"), 2000)
  assert random_sr["reject_rate"] > 0.6
  assert random_sr["conversion"] < behaviour["conversion"]


def test_four_business_behaviours_and_end_reasons(behaviour_sr):
  s = base.summarize(behaviour_sr)
  for f in ("accept", "edit", "influenced", "reject"):
    assert s[f"{f}_rate"] > 0.05, f
  assert abs(sum(s[f"{f}_rate"] for f in ("accept", "edit", "influenced", "reject")) - 1) < 1e-9
  for reason in ("outcome", "customer_left"):
    assert s[f"end/{reason}"] > 0.01
  # The outcome flag comes from the classifier over customer text and agrees with the truth here.
  assert all(r.outcome == r.metadata["true_outcome"] for r in behaviour_sr)
  # Edited and influenced messages keep the suggestion's dialogue act.
  for r in behaviour_sr[:300]:
    for sug, sent in zip(r.turns, r.turns[1:]):
      if sug.role == "suggestion" and sent.role == "business" and sent.feedback in ("edit", "influenced"):
        assert sales.parse_business(sent.text).kind == sales.parse_business(sug.text).kind


def test_early_turn_changes_what_later_turns_earn(direct_env):
  """Two policies that differ only at the first turn: ask the need vs. guess a product."""

  def guess_first(obs):
    if obs.turn == 0:
      return sales.business_text(sales.Act("recommend", product=sales.product_for("laptop", 1)), obs.rng)
    return sales.business_text(sales.oracle_act(sales.visible_facts(obs.conversation.turns)), obs.rng)

  oracle = _conversion(direct_env, sales.make_sales_policy("oracle"), 3000)
  guess = _conversion(direct_env, policies.FunctionPolicy(guess_first, "guess_first"), 3000)
  print("oracle", oracle["conversion"], "guess first", guess["conversion"])
  assert guess["conversion_hi"] < oracle["conversion_lo"]
  assert oracle["conversion"] - guess["conversion"] > 0.08


def test_true_q_separates_good_and_bad_suggestions(direct_env):
  episodes = direct_env.reset(12, seed=3)
  # Advance two rounds with the oracle so the states are mid-conversation.
  oracle = sales.make_sales_policy("oracle")
  for _ in range(2):
    live = [e for e in episodes if not e.done]
    direct_env.step(live, oracle([e.observation() for e in live]))
  live = [e for e in episodes if not e.done]
  assert len(live) >= 8
  good = oracle([e.observation() for e in live])
  bad = ["Nice weather today, isn't it?"] * len(live)
  q_good, se_good = direct_env.estimate_q(live, good, oracle, gamma=0.95, n_rollouts=48, seed=0)
  q_bad, se_bad = direct_env.estimate_q(live, bad, oracle, gamma=0.95, n_rollouts=48, seed=0)
  assert np.mean(q_good - q_bad) > 0.1
  assert np.mean(q_good > q_bad) >= 0.75
  assert np.all(se_good < 0.1)
  # Estimating Q does not touch the episodes themselves.
  assert all(len(e.record.agent_steps()) == 2 for e in live)
