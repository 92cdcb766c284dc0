"""Randomised turns (explore.py): one uniformly drawn suggestion per deployed conversation, its propensity, and
which Monte Carlo targets stay samples of Q^{pi} (data.examples_from_conversations)."""

import collections

import numpy as np
import pytest

from iterppo_jax import data
from iterppo_jax import explore
from iterppo_jax import loop
from iterppo_jax.envs import base, registry, sales
from configs import sales as sales_config


def _deploy(n=300, seed=4):
  cfg = sales_config.get_config().env
  env = registry.make_env(cfg)
  inner = registry.make_policy("sales", "behavior", cfg)
  wrapped = explore.RandomisedTurn(inner, registry.candidate_fn("sales"), env.max_turns, seed=9)
  return env, inner, env.play(wrapped, n, seed=seed), env.play(inner, n, seed=seed)


def test_one_uniform_turn_with_its_propensity_and_pi_everywhere_else():
  env, _, explored, plain = _deploy()
  turns, taken_share = collections.Counter(), []
  for r, p in zip(explored, plain):
    info = explore.explored(r)
    turns[info["turn"]] += 1
    steps = r.agent_steps()
    t = info["turn"]
    if "taken" not in info:  # the conversation ended before t*: it is pi's own conversation
      assert t >= len(steps) and r.turns == p.turns
      continue
    assert info["propensity"] == 1 / len(info["candidates"]) and len(set(info["candidates"])) == len(info["candidates"])
    assert r.turns[steps[t]].text == info["candidates"][info["taken"]]
    # Up to t* the conversation is exactly the one pi plays (same customer, same random streams).
    assert r.turns[:steps[t]] == p.turns[:steps[t]]
    # The first candidate is pi's own suggestion at t*, the rest the domain's scripted acts there.
    assert info["candidates"][0] == p.turns[steps[t]].text
    kinds = [sales.parse_business(c).kind for c in info["candidates"]]
    assert len(kinds) >= 6 and {"ask_need", "ask_budget", "recommend", "close"} <= set(kinds)
    taken_share.append(info["taken"] / (len(info["candidates"]) - 1))
  assert set(turns) <= set(range(env.max_turns)) and len(turns) >= 8  # t* spreads over [0, max_turns)
  assert 0.35 < np.mean(taken_share) < 0.65  # the draw at t* is uniform over the candidates
  # Deterministic: the same seeds deploy the same conversations.
  assert [r.turns for r in _deploy(40)[2]] == [r.turns for r in explored[:40]]


def test_targets_before_the_randomised_turn_are_left_out():
  _, _, explored, _ = _deploy(60)
  examples = data.examples_from_conversations(explored, gamma=0.95)
  by_conv = collections.defaultdict(list)
  for e in examples:
    by_conv[e.conversation_id].append(e)
  for r in explored:
    info = explore.explored(r)
    for e in by_conv[r.id]:
      assert e.target_valid == (e.turn >= info["turn"])
      assert e.explored == (e.turn == info["turn"])
  # Logs without randomised turns keep every target.
  plain = data.examples_from_conversations(_deploy(20)[3], gamma=0.95)
  assert all(e.target_valid and not e.explored for e in plain)


def test_explored_returns_are_unbiased_for_each_candidate():
  """At t* = 0 (the first suggestion) the mean return of each candidate act equals its true Q from the simulator."""
  cfg = sales_config.get_config().env
  env = sales.SalesEnv(business_user=base.BusinessUserConfig(mode="direct"), max_turns=cfg.max_turns)
  oracle = registry.make_policy("sales", "oracle", cfg)
  wrapped = explore.RandomisedTurn(oracle, registry.candidate_fn("sales"), max_turns=1, seed=2)  # t* = 0 always
  records = env.play(wrapped, 1500, seed=1)
  examples = [e for e in data.examples_from_conversations(records, gamma=0.95) if e.explored]
  assert len(examples) == 1500
  by_kind = collections.defaultdict(list)
  for e in examples:
    by_kind[sales.parse_business(e.suggestion).kind].append(e.target)
  # The truth, from the same opening states (restored) with the simulator's Monte Carlo Q.
  states = [env.restore(r, 1) for r in records[:60]]
  for kind in ("ask_need", "close"):
    rng = np.random.default_rng(0)
    texts = [sales.business_text(sales.Act(kind), rng) for _ in states]
    q, _ = env.estimate_q(states, texts, oracle, gamma=0.95, n_rollouts=20, seed=3)
    logged = np.asarray(by_kind[kind])
    se = logged.std() / np.sqrt(len(logged)) + q.std() / np.sqrt(len(q))
    assert abs(logged.mean() - q.mean()) < 4 * se + 0.02, (kind, logged.mean(), q.mean())
  # And the randomisation makes the acts' values differ as they really do: asking beats closing at the start.
  assert np.mean(by_kind["ask_need"]) > np.mean(by_kind["close"]) + 0.1


def test_a_language_model_policy_counts_what_its_budgets_cut(tmp_path):
  """Deployment warns with counts: prompts that lost tokens and suggestions that hit max_new_tokens."""
  from flax import nnx
  from iterppo_jax import conversation as conv_lib
  from iterppo_jax import lm_policy
  from iterppo_jax import tokenizer as tok_lib
  from iterppo_jax.models import transformer as tf
  env, _, records, _ = _deploy(20)
  tok = tok_lib.train_bpe(tok_lib.corpus_from_conversations(records), 300, str(tmp_path / "tok"))
  model = tf.Transformer(tf.TransformerConfig.tiny(tok.vocab_size, max_len=40), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  policy = lm_policy.LMPolicy("pi", graphdef, params, tok, max_prompt_len=24, max_new_tokens=4, seed=0)
  prompts = [conv_lib.render_state(r.turns[:r.agent_steps()[-1]]) for r in records[:6]]
  policy.generate(prompts)
  long = sum(len(ids) > 24 for ids in tok.encode_batch(prompts))
  assert policy.generated == 6 and policy.cut_prompts == long > 0
  assert 0 < policy.cut_actions <= 6  # an untrained model rarely ends within 4 tokens
  assert policy.truncation_note().startswith(f"pi: {long} of 6 prompts")
  # data.prompt_bucket: short prompts prefilled over their own width give the same greedy suggestions
  short = [conv_lib.render_state(r.turns[:r.agent_steps()[0]]) for r in records[:6]]
  assert max(len(ids) for ids in tok.encode_batch(short)) <= 40
  greedy = [lm_policy.LMPolicy("pi", graphdef, params, tok, max_prompt_len=64, max_new_tokens=4, seed=0,
                               greedy=True, prompt_bucket=b).generate(short) for b in (0, 8)]
  assert greedy[0] == greedy[1]


@pytest.mark.parametrize("domain", ["sales", "support", "booking", "negotiation"])
def test_every_domain_deploys_with_a_randomised_turn(domain):
  import importlib
  cfg = importlib.import_module(f"configs.{domain}").get_config("tiny").env
  env = registry.make_env(cfg)
  wrapped = explore.RandomisedTurn(registry.make_policy(domain, "behavior", cfg), registry.candidate_fn(domain),
                                   env.max_turns, seed=1)
  records = env.play(wrapped, 30, seed=2)
  reached = [explore.explored(r) for r in records if "taken" in explore.explored(r)]
  assert len(reached) >= 5
  for info in reached:
    assert len(info["candidates"]) >= 4 and info["propensity"] == 1 / len(info["candidates"])


def test_bootstrapping_uses_pi_own_action_where_the_draw_replaced_it():
  """TD targets of Q^{pi}: the decision before t* bootstraps from pi's own sample at t*, not the randomised draw."""
  _, _, explored, _ = _deploy(80)
  examples = data.examples_from_conversations(explored, gamma=0.95)
  seen = 0
  for r in explored:
    info = explore.explored(r)
    for e in (e for e in examples if e.conversation_id == r.id):
      if e.explored and info["taken"] != 0:
        assert e.own_action == info["candidates"][0] != e.suggestion
        seen += 1
      else:  # pi's own suggestion was logged (or the draw picked it): nothing to replace
        assert e.own_action is None
  assert seen >= 20


def test_several_randomised_turns_each_a_uniform_draw_and_mc_targets_from_the_last():
  """loop.explore_count = 3: three distinct turns per conversation, each reached one a uniform draw with its
  propensity; Monte Carlo targets count only from the last planned turn on, TD bootstraps from pi's own sample at
  every reached turn, and the logs-only measures see only the last (the others' returns include later draws)."""
  cfg = sales_config.get_config().env
  env = registry.make_env(cfg)
  inner = registry.make_policy("sales", "behavior", cfg)
  wrapped = explore.RandomisedTurn(inner, registry.candidate_fn("sales"), env.max_turns, seed=9, count=3)
  records, plain = env.play(wrapped, 200, seed=4), env.play(inner, 200, seed=4)
  examples = data.examples_from_conversations(records, gamma=0.95)
  by_conv = collections.defaultdict(list)
  for e in examples:
    by_conv[e.conversation_id].append(e)
  reached, replaced, several = 0, 0, 0
  for r, p in zip(records, plain):
    info = explore.explored(r)
    turns = explore.planned_turns(info)
    assert len(turns) == 3 == len(set(turns)) and turns == sorted(turns) and 0 <= turns[0] and turns[-1] < 12
    steps = r.agent_steps()
    first = turns[0]
    if first < len(steps):  # up to the first randomised turn the conversation is exactly pi's
      assert r.turns[:steps[first]] == p.turns[:steps[first]]
    else:
      assert r.turns == p.turns
    drawn = [t for t in turns if explore.draw_at(info, t) is not None]
    assert drawn == [t for t in turns if t < len(steps)]  # every turn the conversation reached, no other
    several += len(drawn) >= 2
    for e in by_conv[r.id]:
      draw = explore.draw_at(info, e.turn)
      assert e.explored == (draw is not None) == (e.turn in drawn)
      assert e.target_valid == (e.turn >= turns[-1])
      if draw is not None:
        reached += 1
        assert draw["propensity"] == 1 / len(draw["candidates"])
        assert e.suggestion == (draw["candidates"][draw["taken"]] or e.suggestion)
        if draw["taken"]:
          replaced += 1
          assert e.own_action == draw["candidates"][0] != e.suggestion
        else:
          assert e.own_action is None
  assert several >= 40 and reached >= 250 and replaced >= 150
  assert sum(loop._ranked_turn(e) for e in examples) < sum(e.explored for e in examples)
  assert all(e.target_valid for e in examples if loop._ranked_turn(e))
  # count = 1 is the one-turn format every earlier run logged, turn for turn
  one = explore.RandomisedTurn(inner, registry.candidate_fn("sales"), env.max_turns, seed=9, count=1)
  assert [r.turns for r in env.play(one, 30, seed=4)] == [r.turns for r in _deploy(30)[2]]


@pytest.mark.parametrize("meta", [{"turns": [3, 1], "draws": [{}, {}]}, {"turns": [1, 3], "draws": [{}]},
                                  {"turns": [], "draws": []}, {"turn": "2"}])
def test_a_malformed_explore_record_is_named(meta):
  from iterppo_jax import conversation as conv_lib
  record = conv_lib.Conversation(id="c7", domain="sales", policy="pi", turns=[], outcome=0,
                                  metadata={"explore": meta})
  with pytest.raises(conv_lib.ConversationFormatError, match="c7: metadata.explore must be an object"):
    explore.explored(record)


def test_count_out_of_range_is_refused():
  with pytest.raises(ValueError, match="count must be in"):
    explore.RandomisedTurn(lambda obs: [], lambda turns, rng: [], max_turns=4, seed=0, count=5)
