"""The booking simulator: conversion bands, parser and calendar, early-turn credit, restore and true Q,
determinism, JSONL round trip, and one tiny Iterative PPO run on configs/booking.py:tiny."""

import copy
import os

import numpy as np
import pytest

from configs import booking as booking_config
from iterppo_jax import checkpoint as ckpt_lib
from iterppo_jax import conversation as conv_lib
from iterppo_jax import loop
from iterppo_jax.envs import base, booking, policies, registry, sales


def _summary(env, name, n, seed=0):
  return base.summarize(env.play(booking.make_booking_policy(name), n, seed=seed))


def _oracle_text(obs):
  return booking.business_text(booking.oracle_act(booking.visible_facts(obs.conversation.turns)), obs.rng)


@pytest.fixture(scope="module")
def sr_env():
  return booking.BookingEnv()


@pytest.fixture(scope="module")
def direct_env():
  return booking.BookingEnv(business_user=base.BusinessUserConfig(mode="direct"))


@pytest.fixture(scope="module")
def behaviour_sr(sr_env):
  return sr_env.play(booking.make_booking_policy("behavior"), 600, seed=0)


def test_conversion_bands(sr_env, direct_env, behaviour_sr):
  behaviour = base.summarize(behaviour_sr)
  rates = {"behaviour_sr": behaviour["conversion"],
           "behaviour_direct": _summary(direct_env, "behavior", 600)["conversion"],
           "oracle_sr": _summary(sr_env, "oracle", 400)["conversion"],
           "oracle_direct": _summary(direct_env, "oracle", 400)["conversion"],
           "random_direct": _summary(direct_env, "random", 400)["conversion"]}
  print(rates)
  assert 0.15 <= rates["behaviour_sr"] <= 0.30
  assert 0.10 <= rates["behaviour_direct"] <= 0.35
  assert rates["oracle_sr"] > 0.7 and rates["oracle_direct"] > 0.7
  assert rates["random_direct"] < 0.05
  # In the SR setting the business user rejects gibberish and writes its own message instead.
  random_sr = _summary(sr_env, "random", 300)
  assert random_sr["reject_rate"] > 0.6
  assert random_sr["conversion"] < rates["behaviour_sr"]


def test_parser_reads_every_business_template():
  rng = np.random.default_rng(0)
  slot, slot2 = ("tuesday", 17, "dana"), ("saturday", 9, None)
  acts = [booking.Act(k) for k in booking.BUSINESS_TEMPLATES if k not in ("offer", "alternatives")]
  acts += [booking.Act("offer", slots=(slot,), service="colouring"), booking.Act("offer", slots=(slot2,)),
           booking.Act("alternatives", slots=(slot, slot2), service="massage")]
  env = booking.BookingEnv()
  for act in acts:
    for _ in range(12):  # every template of the act, with and without the business user's edits
      text = booking.business_text(act, rng)
      assert booking.parse_business(text) == act, text
      assert booking.parse_business(env.edit(text, rng)) == act
  assert booking.parse_business("I can do Friday at 2 pm with Ben.").slots == (("friday", 14, "ben"),)
  assert booking.parse_business("").kind == "off_topic"
  assert booking.parse_business("Hello, how about lunch?").kind == "greet"


def test_calendar_leaves_every_customer_a_slot_and_some_only_few(sr_env):
  episodes = sr_env.reset(300, seed=2)
  counts = [len(booking.fitting_free_slots(e.hidden)) for e in episodes]
  assert min(counts) >= 1
  assert sum(c <= 2 for c in counts) >= 15  # scarce combinations exist, so a guessed offer rarely fits
  assert max(counts) >= 8
  # The week's taken cells are a pure function of the conversation's calendar seed.
  a, b = episodes[0].hidden.calendar_seed, episodes[1].hidden.calendar_seed
  assert booking.taken_cells(a) == booking.taken_cells(a) and booking.taken_cells(a) != booking.taken_cells(b)
  # Colouring takes two hours: it never starts before the lunch break or at the last evening hour.
  assert all(h not in (11, 18) for _, h, _ in booking.template_slots("colouring"))
  assert all(st in ("anna", "dana") for _, _, st in booking.template_slots("colouring"))


def test_four_business_behaviours_end_reasons_and_classifier(sr_env, behaviour_sr):
  s = base.summarize(behaviour_sr)
  for f in ("accept", "edit", "influenced", "reject"):
    assert s[f"{f}_rate"] > 0.05, f
  for reason in ("outcome", "customer_left"):
    assert s[f"end/{reason}"] > 0.01
  # The outcome flag comes from the classifier over customer text and agrees with the truth here.
  assert all(r.outcome == r.metadata["true_outcome"] for r in behaviour_sr)
  flagged = {t.text for r in behaviour_sr for t in r.turns if t.role == "customer" and t.flag}
  assert flagged and flagged <= {"Yes, please book it. See you then!", "Perfect, book me in. See you then!",
                                 "Lovely, please book it."}
  unflagged = [t.text for r in behaviour_sr for t in r.turns if t.role == "customer" and not t.flag]
  assert not any(sr_env.classify_outcome(t) for t in unflagged)
  assert sr_env.classify_outcome("Yes, please book it. See you then!") == 1
  assert sr_env.classify_outcome("Your website shows Tuesday at 10am as unavailable.") == 0
  # Edited and influenced messages keep the suggestion's dialogue act.
  for r in behaviour_sr:
    for sug, sent in zip(r.turns, r.turns[1:]):
      if sug.role == "suggestion" and sent.role == "business" and sent.feedback in ("edit", "influenced"):
        assert booking.parse_business(sent.text) == booking.parse_business(sug.text)


def test_early_turn_changes_what_later_turns_earn(direct_env):
  """Two policies that differ only at the first turn: ask the service vs. offer a guessed slot."""

  def guess_first(obs):
    if obs.turn == 0:
      act = booking.Act("offer", slots=(("monday", 9, "anna"),), service="haircut")
      return booking.business_text(act, obs.rng)
    return _oracle_text(obs)

  ask = base.summarize(direct_env.play(policies.FunctionPolicy(_oracle_text, "ask_first"), 800, seed=0))
  guess = base.summarize(direct_env.play(policies.FunctionPolicy(guess_first, "guess_first"), 800, seed=0))
  print("ask first", ask["conversion"], "guess first", guess["conversion"])
  assert guess["conversion_hi"] < ask["conversion_lo"]
  assert ask["conversion"] - guess["conversion"] > 0.15


def test_transcript_reading_and_restore_match_the_hidden_state(sr_env):
  """At every logged turn: Visible knows exactly what the customer told, and restore rebuilds the state."""
  episodes = sr_env.reset(60, seed=11)
  policy = booking.make_booking_policy("behavior")
  snapshots = {}
  while any(not e.done for e in episodes):
    live = [e for e in episodes if not e.done]
    for e in live:
      snapshots[(e.uid, len(e.record.turns))] = copy.deepcopy(e.hidden)
    sr_env.step(live, policy([e.observation() for e in live]))
  records = {e.uid: e.record for e in episodes}
  for (uid, n_turns), hidden in snapshots.items():
    restored = sr_env.restore(records[uid], n_turns)
    assert restored.hidden == hidden, (uid, n_turns)
    assert len(restored.record.turns) == n_turns
    v = booking.visible_facts(records[uid].turns[:n_turns])
    assert (v.service is not None) == hidden.service_known and v.service in (None, hidden.service)
    assert (v.days is not None) == hidden.days_known and v.days in (None, hidden.days)
    assert (v.period is not None) == hidden.period_known and v.period in (None, hidden.period)
    assert (v.staff is not None) == hidden.staff_known
    assert v.staff in (None, "any", hidden.staff_pref)
    assert (v.agreed is None) == (hidden.agreed is None)
  assert len(snapshots) > 200


def test_true_q_from_restored_states_separates_good_and_bad(sr_env, direct_env):
  records = direct_env.play(booking.make_booking_policy("oracle"), 30, seed=3)
  # Restore each conversation after its third decision's customer reply (mid-way through the questions).
  states = [direct_env.restore(r, r.agent_steps()[3]) for r in records if len(r.agent_steps()) > 4][:12]
  assert len(states) >= 8
  oracle = booking.make_booking_policy("oracle")
  good = oracle([e.observation() for e in states])
  bad = ["Shall I book that for you?"] * len(states)  # booking before any slot was agreed
  q_good, se_good = direct_env.estimate_q(states, good, oracle, gamma=0.95, n_rollouts=24, seed=0)
  q_bad, _ = direct_env.estimate_q(states, bad, oracle, gamma=0.95, n_rollouts=24, seed=0)
  assert np.mean(q_good - q_bad) > 0.1
  assert np.mean(q_good > q_bad) >= 0.75
  assert np.all(se_good < 0.12)
  assert all(len(e.record.agent_steps()) == 3 for e in states)  # estimating Q leaves the episodes alone


def test_abstain_and_bad_input(sr_env, direct_env):
  abstain = policies.FunctionPolicy(lambda o: "", "abstain")
  recs = sr_env.play(abstain, 40, seed=0)
  assert all(t.abstain and t.text == "" for r in recs for t in r.turns if t.role == "suggestion")
  assert {t.feedback for r in recs for t in r.turns if t.role == "business"} == {"none"}
  assert sum(r.outcome for r in recs) > 0  # the staff's own messages can still book
  # With nobody else to write, abstaining means the business sends nothing and the episode ends.
  assert all(r.end_reason == "business_silent" for r in direct_env.play(abstain, 20, seed=0))
  with pytest.raises(ValueError, match="unknown booking policy"):
    booking.make_booking_policy("nope")
  sales_record = sales.SalesEnv().play(sales.make_sales_policy("oracle"), 1, seed=0)[0]
  with pytest.raises(ValueError, match="not logged by BookingEnv"):
    sr_env.restore(sales_record, 1)
  with pytest.raises(ValueError, match="n_turns"):
    sr_env.restore(recs[0], 999)


def test_registry_and_tiny_iterative_ppo_run(tmp_path):
  config = booking_config.get_config("tiny")
  config.loop.tensorboard = False
  assert isinstance(registry.make_env(config.env), booking.BookingEnv)
  assert registry.make_policy("booking", "oracle", config.env).name == "oracle"
  summary = loop.run(config, str(tmp_path))
  assert len(summary["iterations"]) == 3  # pi_0, pi_1, pi_2
  assert set(summary["reference"]) == {"behavior", "oracle"}
  for name, steps in (("policy", [0, 1, 2]), ("qmodel", [0, 1])):
    c = ckpt_lib.Checkpointer(str(tmp_path), name)
    assert c.all_steps() == steps
    c.close()
  logged = conv_lib.read_jsonl(os.path.join(tmp_path, "data", "behavior.jsonl"))
  assert logged and all(r.domain == "booking" for r in logged)
