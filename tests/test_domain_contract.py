"""What every registered domain must do (docs/domains.md), checked once for all of them.

Each domain's own test file keeps what is particular to it (its conversion bands, its parser, its credit
assignment); a new domain passes this file by being added to `registry.DOMAINS` (an outside one: see
tests/test_domain_plugin.py).
"""

import copy

import numpy as np
import pytest

from configs import booking as booking_config
from configs import negotiation as negotiation_config
from configs import sales as sales_config
from configs import support as support_config
from iterppo_jax import conversation as conv_lib
from iterppo_jax.envs import base, policies, registry

CONFIGS = {"sales": sales_config, "support": support_config, "booking": booking_config,
           "negotiation": negotiation_config}
DOMAINS = sorted(registry.DOMAINS)


def _env_config(domain, mode="sr"):
  c = CONFIGS[domain].get_config().env
  c.business_user = mode
  return c


def _env(domain, mode="sr"):
  return registry.make_env(_env_config(domain, mode))


def _behaviour(domain):
  return registry.make_policy(domain, "behavior", _env_config(domain))


def test_every_domain_has_a_config():
  assert DOMAINS == sorted(CONFIGS)


@pytest.mark.parametrize("domain", DOMAINS)
def test_logs_depend_on_the_seed_only_and_survive_jsonl(domain, tmp_path):
  env, policy = _env(domain), _behaviour(domain)
  a = env.play(policy, 60, seed=5, batch_size=16)
  b = env.play(policy, 60, seed=5, batch_size=60)  # the batch size does not change the logs
  c = env.play(policy, 60, seed=6, batch_size=16)
  for name, records in (("a", a), ("b", b), ("c", c)):
    conv_lib.write_jsonl(str(tmp_path / f"{name}.jsonl"), records)
  assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
  assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()
  back = conv_lib.read_jsonl(str(tmp_path / "a.jsonl"))  # validates every line
  assert [conv_lib.dumps(r) for r in back] == [conv_lib.dumps(r) for r in a]
  assert all(r.domain == domain and r.end_reason in env.end_reasons for r in back)
  # A record read back from JSON (lists, not tuples) restores to the state the live record restores to.
  r = next(r for r in back if len(r.agent_steps()) > 2)
  live = next(x for x in a if x.id == r.id)
  assert env.restore(r, r.agent_steps()[2]).hidden == env.restore(live, live.agent_steps()[2]).hidden


@pytest.mark.parametrize("domain", DOMAINS)
def test_restore_rebuilds_the_live_hidden_state_at_every_turn(domain):
  env, policy = _env(domain), _behaviour(domain)
  episodes = env.reset(16, seed=11)
  snapshots = {}
  while any(not e.done for e in episodes):
    live = [e for e in episodes if not e.done]
    for e in live:
      snapshots[(e.uid, len(e.record.turns))] = copy.deepcopy(e.hidden)
    env.step(live, policy([e.observation() for e in live]))
  records = {e.uid: e.record for e in episodes}
  for (uid, n_turns), hidden in snapshots.items():
    restored = env.restore(records[uid], n_turns)
    assert restored.hidden == hidden, (uid, n_turns)
    assert restored.record.turns == records[uid].turns[:n_turns]
  assert len(snapshots) > 40
  other = next(d for d in DOMAINS if d != domain)
  foreign = _env(other).play(_behaviour(other), 1, seed=0)[0]
  with pytest.raises(ValueError):
    env.restore(foreign, 1)


@pytest.mark.parametrize("domain", DOMAINS)
def test_abstaining_is_logged_and_with_no_business_user_the_conversation_ends(domain):
  abstain = policies.FunctionPolicy(lambda o: "", "abstain")
  records = _env(domain).play(abstain, 20, seed=0)
  suggestions = [t for r in records for t in r.turns if t.role == "suggestion"]
  assert suggestions and all(t.abstain and t.text == "" for t in suggestions)
  assert {t.feedback for r in records for t in r.turns if t.role == "business"} == {"none"}
  # In `direct` mode nobody else writes: the business sends nothing and the episode ends.
  assert all(r.end_reason == "business_silent" for r in _env(domain, "direct").play(abstain, 10, seed=0))


@pytest.mark.parametrize("domain", DOMAINS)
def test_the_registry_builds_every_policy_by_name(domain):
  env = _env(domain)
  episodes = env.reset(4, seed=0)
  observations = [e.observation() for e in episodes]
  for name in ("behavior", "oracle", "random", "explore", "staff_per_turn"):
    policy = registry.make_policy(domain, name, _env_config(domain))
    suggestions = policy(observations)
    assert len(suggestions) == 4 and all(isinstance(s, str) for s in suggestions), name
  assert all(s.strip() for s in registry.make_policy(domain, "oracle", _env_config(domain))(observations))
  with pytest.raises(ValueError):
    registry.make_policy(domain, "no_such_policy", _env_config(domain))


@pytest.mark.parametrize("domain", DOMAINS)
def test_true_q_prefers_the_oracle_to_an_off_topic_message_and_leaves_episodes_alone(domain):
  env = _env(domain, "direct")
  oracle = registry.make_policy(domain, "oracle", _env_config(domain, "direct"))
  episodes = env.reset(10, seed=3)
  env.step(episodes, oracle([e.observation() for e in episodes]))
  live = [e for e in episodes if not e.done]
  assert len(live) >= 6
  before = [conv_lib.dumps(e.record) for e in live]
  good = oracle([e.observation() for e in live])
  bad = ["Nice weather today, isn't it?"] * len(live)
  q_good, se_good = env.estimate_q(live, good, oracle, gamma=0.95, n_rollouts=16, seed=0)
  q_bad, _ = env.estimate_q(live, bad, oracle, gamma=0.95, n_rollouts=16, seed=0)
  assert np.all((0 <= q_good) & (q_good <= 1)) and np.all(np.isfinite(se_good))
  assert np.mean(q_good) > np.mean(q_bad)
  assert [conv_lib.dumps(e.record) for e in live] == before


@pytest.mark.parametrize("domain", DOMAINS)
def test_summaries_count_every_end_reason(domain):
  records = _env(domain).play(_behaviour(domain), 60, seed=1)
  s = base.summarize(records)
  assert sum(v for k, v in s.items() if k.startswith("end/")) == pytest.approx(1.0)
  for f in ("accept", "edit", "influenced", "reject"):
    assert 0 <= s[f"{f}_rate"] <= 1
  assert 0 <= s["conversion_lo"] <= s["conversion"] <= s["conversion_hi"] <= 1


def test_a_script_may_word_its_acts_from_the_transcript():
  """Script.say sees the transcript (the agent's side never sees the hidden state); without it the shipped
  policies word acts with business_text, unchanged."""
  from iterppo_jax.envs import sales
  env = _env("sales")
  episodes = env.reset(6, seed=2)
  observations = [e.observation() for e in episodes]
  plain = policies.OraclePolicy(sales.SCRIPT)(observations)
  again = [e.observation() for e in env.reset(6, seed=2)]
  assert policies.OraclePolicy(sales.SCRIPT._replace(say=None))(again) == plain

  def say(act, turns, rng):
    return f"You said '{turns[-1].text[:20]}'. " + sales.business_text(act, rng)
  worded = policies.OraclePolicy(sales.SCRIPT._replace(say=say))([e.observation() for e in env.reset(6, seed=2)])
  assert all(w.endswith(p) and w.startswith("You said '") for w, p in zip(worded, plain))
  staff = policies.StaffPolicy(sales.SCRIPT._replace(say=say), 0.5)(observations)
  assert all(s.startswith("You said '") for s in staff)


@pytest.mark.parametrize("domain", DOMAINS)
def test_the_share_of_suggestions_read_as_no_act(domain):
  """registry.off_topic_share: how much of a free-text policy's output the simulator reads as small talk."""
  import dataclasses
  records = _env(domain).play(_behaviour(domain), 20, seed=3, batch_size=20)
  scripted = registry.off_topic_share(domain, records)
  assert 0 <= scripted < 0.5  # the staff's scripts say something the simulator reads

  def chatter(r):  # every suggestion replaced by small talk the parser cannot read
    return dataclasses.replace(r, turns=[dataclasses.replace(t, text="Lovely weather we are having.")
                                         if t.role == "suggestion" and not t.abstain else t for t in r.turns])
  assert registry.off_topic_share(domain, [chatter(r) for r in records]) == 1.0


@pytest.mark.parametrize("domain", DOMAINS)
def test_the_domain_handle_is_the_modules_protocol(domain):
  """registry.domain(env section): the one handle the loop builds; it hands out what the module functions do."""
  handle = registry.domain(_env_config(domain))
  assert handle.name == domain
  records = handle.make_env().play(handle.policy("behavior"), 3, seed=0)
  assert records == _env(domain).play(_behaviour(domain), 3, seed=0)
  turns = records[0].turns[:records[0].agent_steps()[1]]
  rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
  assert handle.candidates()(turns, rng_a) == registry.candidate_fn(domain)(turns, rng_b)
  np.testing.assert_equal(handle.off_topic_share(records), registry.off_topic_share(domain, records))


def test_an_unknown_domain_fails_when_the_handle_is_built():
  env = _env_config("sales")
  env.domain = "no_such_domain"
  with pytest.raises(registry.errors.SettingsError, match="unknown domain 'no_such_domain'"):
    registry.domain(env)


@pytest.mark.parametrize("domain", DOMAINS)
def test_the_staff_write_with_the_domains_script(domain):
  """base.StaffEnv's writing hooks: an edit keeps the suggestion inside it; a rewrite says the act the suggestion
  proposed (its kind), in the staff's templates; the staff's own message is an act of the domain's parser."""
  env, script = _env(domain), registry.script(domain)
  record = env.play(_behaviour(domain), 1, seed=4)[0]
  turns = record.turns[:record.agent_steps()[1]]
  episode = env.restore(record, record.agent_steps()[1])
  rng = np.random.default_rng(0)
  for act in script.candidate_acts(script.visible_facts(turns)):
    text = script.business_text(act, rng)
    assert text in env.edit(text, rng)
    assert env.read_business(env.rewrite(episode.hidden, text, rng)).kind == act.kind
  staff = env.staff_message(episode.hidden, record, rng)
  assert env.read_business(staff).kind != "off_topic"


@pytest.mark.parametrize("domain", DOMAINS)
def test_staff_per_turn_plays_the_oracle_with_its_skill_at_every_turn(domain):
  """The per-turn staff mixture: at skill ~1 every act is the oracle's; at the domain's skill, about that share."""
  from iterppo_jax.envs import policies  # pylint: disable=import-outside-toplevel
  env = _env(domain)
  script = registry.script(domain)
  episodes = env.reset(64, seed=1)
  env.step(episodes, registry.make_policy(domain, "behavior", _env_config(domain))(
      [e.observation() for e in episodes]))
  observations = [e.observation() for e in episodes if not e.done]
  _, act_key = registry.tracker(domain)
  oracle = registry.oracle_fn(domain)

  def oracle_share(policy):
    hits = [act_key(o.conversation.turns, text) == act_key(o.conversation.turns, oracle(o.conversation.turns, o.rng))
            for o, text in zip(observations, policy(observations))]
    return float(np.mean(hits))

  assert oracle_share(policies.PerTurnStaffPolicy(script, 0.999)) == 1.0
  skill = _env_config(domain).skill_mean
  share = oracle_share(policies.PerTurnStaffPolicy(script, skill))
  assert 0.0 < share < 1.0  # some mistakes, some oracle acts (a mistake may coincide with the oracle's act)
  assert registry.make_policy(domain, "staff_per_turn", _env_config(domain)).name == "staff_per_turn"
