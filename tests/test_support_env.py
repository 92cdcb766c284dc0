"""The customer-support simulator: parser, customer mechanics, conversion bands, early-turn credit, true Q,
determinism, restore, the business user's behaviours, JSONL round trip, and one tiny Iterative PPO run."""

import copy
import os

import numpy as np
import pytest

from configs import support as support_config
from iterppo_jax import checkpoint as ckpt_lib
from iterppo_jax import conversation as conv_lib
from iterppo_jax import loop
from iterppo_jax.envs import base, policies, registry, support


def _summary(env, policy, n, seed=0):
  return base.summarize(env.play(policy, n, seed=seed))


def _policy(name):
  return support.make_support_policy(name, skill_mean=support_config.get_config().env.skill_mean)


@pytest.fixture(scope="module")
def sr_env():
  return registry.make_env(support_config.get_config().env)


@pytest.fixture(scope="module")
def direct_env():
  env_config = support_config.get_config().env
  env_config.business_user = "direct"
  return registry.make_env(env_config)


@pytest.fixture(scope="module")
def behaviour_sr(sr_env):
  return sr_env.play(_policy("behavior"), 1000, seed=0)


def _state(**dynamic):
  """A hidden state with a fixed profile (a crash solved by its second fix) and the given dynamic fields."""
  profile = dict(cause="crash", depth=1, device="phone", tech_skill=0.9, patience=99.0, trust=0.5,
                 opens_with_error=False, opens_with_device=False, opens_with_hint=False, skill=0.5,
                 assist_trust=1.0)
  profile.update(dynamic)
  return support.SupportState(**profile)


# ---- the language: parser, reply reader, outcome classifier ----

def test_every_business_template_parses_back_to_its_act():
  rng = np.random.default_rng(0)
  env = support.SupportEnv()
  acts = [support.Act(k) for k in ("greet", "ask_error", "ask_when", "ask_device", "escalate", "confirm",
                                   "close", "off_topic")]
  acts += [support.Act("fix", fix=f) for f in support.FIXES]
  acts += [support.Act("fix", fix=f, guided=True, device=d) for f in support.FIXES for d in support.DEVICES]
  for act in acts:
    for _ in range(12):
      text = support.business_text(act, rng)
      assert 3 <= len(text.split()) <= 20, text  # short messages, as the LM must imitate them
      assert support.parse_business(text) == act, text
      assert support.parse_business(env.edit(text, rng)) == act, text
  assert support.parse_business("").kind == "off_topic"
  with pytest.raises(ValueError, match="fix act needs"):
    support.business_text(support.Act("fix", fix="format the disk"), rng)
  with pytest.raises(ValueError, match="guided fix needs a device"):
    support.business_text(support.Act("fix", fix="reinstall", guided=True), rng)


def test_customer_replies_are_readable_and_the_classifier_reads_confirmations():
  for kind, options in support.REPLIES.items():
    for template in options:
      text = template.format(device="tablet")
      assert support.reply_kinds(text) == [kind], text
      assert support.classify_resolved(text) == int(kind in support.CONFIRM_KINDS), text
  for text in ("Thanks, that fixed it.", "OK. All resolved now!"):
    assert support.classify_resolved(text) == 1, text
  for text in ("It's not all resolved.", "That fixed it? No, it still isn't fixed.", "Is it resolved?",
               "That didn't fix it.", "Hold on, my problem isn't resolved!", ""):
    assert support.classify_resolved(text) == 0, text


# ---- the customer's mechanics ----

def test_fix_order_escalation_and_premature_close():
  env = support.SupportEnv()
  s = _state()
  # A heavy fix first is refused; the first fix of the sequence is tried but is not the one that works.
  assert env.transition(s, "Please uninstall and reinstall the app.") == "refuse_heavy"
  assert env.transition(s, "Please try restarting the app.") == "no_change"
  annoyed = s.annoyance
  assert env.transition(s, "Could you close the app and restart it?") == "already_tried"
  assert s.annoyance >= annoyed + 1.0
  assert env.transition(s, "I'll close this ticket now. Have a great day!") == "premature"
  assert env.transition(s, "Please update the app to the latest version.") == "resolved" and s.fixed
  assert env.transition(s, "Is everything working now?") == "confirmed"
  # A novice needs the steps for their own device for a hard fix.
  s = _state(cause="slow", depth=1, tech_skill=0.1, attempts=1, error_known=True)
  assert env.transition(s, "Please try clearing the app's cache.") == "stuck"
  steps = "open Settings, tap Apps, then Clear cache."
  assert env.transition(s, f"Here's how on your laptop: {steps}") == "wrong_steps"
  assert env.transition(s, f"Step by step on your phone: {steps}") == "resolved"
  # Escalation resolves a billing charge once it is described, and annoys on a simple issue.
  s = _state(cause="billing", depth=0)
  assert env.transition(s, "Let me pass this to our specialist team.") == "needs_details" and not s.fixed
  assert env.transition(s, "Does the app show any error message?") == "error/charge"
  assert env.transition(s, "I'll escalate your ticket to a specialist now.") == "specialist_resolved"
  assert s.fixed
  s = _state()
  assert env.transition(s, "I'll escalate your ticket to a specialist now.") == "escalate_simple"
  assert s.annoyance >= 1.5 and not s.fixed


def test_symptoms_identify_the_cause_only_together():
  for cause in support.CAUSES:
    v = support.Visible(error=support.ERROR_SYMPTOM[cause], when=support.WHEN_SYMPTOM[cause])
    assert support.candidate_causes(v) == [cause]
  ambiguous = [c for c in support.CAUSES
               if len(support.candidate_causes(support.Visible(error=support.ERROR_SYMPTOM[c]))) > 1]
  assert set(ambiguous) == {"login", "sync", "crash", "slow"}
  for c in support.CAUSES:  # the start time alone never names the cause
    assert len(support.candidate_causes(support.Visible(when=support.WHEN_SYMPTOM[c]))) > 1


# ---- rates, behaviours, credit assignment ----

def test_conversion_bands(sr_env, direct_env, behaviour_sr):
  behaviour = base.summarize(behaviour_sr)
  behaviour_direct = _summary(direct_env, _policy("behavior"), 1000)
  oracle = _summary(sr_env, _policy("oracle"), 600)
  oracle_direct = _summary(direct_env, _policy("oracle"), 600)
  random_direct = _summary(direct_env, _policy("random"), 600)
  print({"behaviour_sr": behaviour["conversion"], "behaviour_direct": behaviour_direct["conversion"],
         "oracle_sr": oracle["conversion"], "oracle_direct": oracle_direct["conversion"],
         "random_direct": random_direct["conversion"]})
  assert 0.15 <= behaviour["conversion"] <= 0.32
  assert 0.10 <= behaviour_direct["conversion"] <= 0.30
  assert oracle["conversion"] > 0.85 and oracle_direct["conversion"] > 0.85
  assert random_direct["conversion"] < 0.05
  # In the SR setting the business user rejects gibberish and writes its own message instead.
  random_sr = _summary(sr_env, _policy("random"), 600)
  assert random_sr["reject_rate"] > 0.6
  assert random_sr["conversion"] < behaviour["conversion"]


def test_four_business_behaviours_and_the_outcome_classifier(behaviour_sr):
  s = base.summarize(behaviour_sr)
  for f in base.FEEDBACK_ORDER:
    assert s[f"{f}_rate"] > 0.05, f
  for reason in ("outcome", "customer_left"):
    assert s[f"end/{reason}"] > 0.01
  # The outcome flag comes from the classifier over customer text and agrees with the truth here.
  assert all(r.outcome == r.metadata["true_outcome"] for r in behaviour_sr)
  flagged = [t for r in behaviour_sr for t in r.turns if t.role == "customer" and t.flag]
  assert len(flagged) == sum(r.outcome for r in behaviour_sr) > 0
  # Edited and influenced messages keep the suggestion's dialogue act.
  checked = 0
  for r in behaviour_sr[:300]:
    for sug, sent in zip(r.turns, r.turns[1:]):
      if sug.role == "suggestion" and sent.role == "business" and sent.feedback in ("edit", "influenced"):
        assert support.parse_business(sent.text).kind == support.parse_business(sug.text).kind
        checked += 1
  assert checked > 20


def test_early_turn_changes_what_later_turns_earn(direct_env):
  """Two policies that differ only at the first turn: ask for the error message vs. guess a fix."""

  def guess_first(obs):
    if obs.turn == 0:
      return support.business_text(support.Act("fix", fix="restart"), obs.rng)
    return support.business_text(support.oracle_act(support.visible_facts(obs.conversation.turns)), obs.rng)

  oracle = _summary(direct_env, support.make_support_policy("oracle"), 1500)
  guess = _summary(direct_env, policies.FunctionPolicy(guess_first, "guess_first"), 1500)
  print("oracle", oracle["conversion"], "guess first", guess["conversion"])
  assert guess["conversion_hi"] < oracle["conversion_lo"]
  assert oracle["conversion"] - guess["conversion"] > 0.08


# ---- ground truth: true Q, determinism, restore, records ----

def test_true_q_separates_good_and_bad_suggestions(direct_env):
  episodes = direct_env.reset(12, seed=3)
  oracle = support.make_support_policy("oracle")
  live = [e for e in episodes if not e.done]
  direct_env.step(live, oracle([e.observation() for e in live]))  # the error question
  live = [e for e in episodes if not e.done]
  assert len(live) >= 8
  good = oracle([e.observation() for e in live])
  bad = ["I'll close this ticket now. Have a great day!"] * len(live)
  q_good, se_good = direct_env.estimate_q(live, good, oracle, gamma=0.95, n_rollouts=32, seed=0)
  q_bad, _ = direct_env.estimate_q(live, bad, oracle, gamma=0.95, n_rollouts=32, seed=0)
  assert np.mean(q_good - q_bad) > 0.1
  assert np.mean(q_good > q_bad) >= 0.75
  assert np.all(se_good < 0.1)
  assert all(len(e.record.agent_steps()) == 1 for e in live)  # estimating Q leaves the episodes alone


def test_restore_replays_the_hidden_state_and_supports_true_q(sr_env):
  episodes = sr_env.reset(40, seed=11)
  policy = _policy("behavior")
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
  assert len(snapshots) > 100
  # Monte Carlo Q from restored mid-conversation states.
  picks = [k for k in snapshots if k[1] > 1][:6]
  restored = [sr_env.restore(records[uid], n) for uid, n in picks]
  oracle = support.make_support_policy("oracle")
  q, se = sr_env.estimate_q(restored, oracle([e.observation() for e in restored]), oracle, gamma=0.95,
                            n_rollouts=8, seed=0)
  assert q.shape == (6,) and np.all((0 <= q) & (q <= 1)) and np.all(np.isfinite(se))
  with pytest.raises(ValueError, match="not logged by SupportEnv"):
    sr_env.restore(conv_lib.Conversation("x", "sales", "p", records[picks[0][0]].turns, 0.0), 1)


def test_registry_and_policy_names():
  c = support_config.get_config()
  assert isinstance(registry.make_env(c.env), support.SupportEnv)
  assert registry.make_policy("support", "oracle", c.env).name == "oracle"
  with pytest.raises(ValueError, match="unknown support policy"):
    registry.make_policy("support", "expert", c.env)


# ---- one tiny Iterative PPO run on this domain ----

def test_tiny_loop_end_to_end(tmp_path):
  config = support_config.get_config("tiny")
  config.loop.tensorboard = False
  workdir = str(tmp_path / "run")
  summary = loop.run(config, workdir)
  assert len(summary["iterations"]) == 3  # pi_0, pi_1, pi_2
  assert set(summary["reference"]) == {"behavior", "oracle"}
  assert summary["reference"]["oracle"]["conversion"] > summary["reference"]["behavior"]["conversion"]
  for name, steps in (("policy", [0, 1, 2]), ("qmodel", [0, 1])):
    c = ckpt_lib.Checkpointer(workdir, name)
    assert c.all_steps() == steps
    c.close()
  logs = conv_lib.read_jsonl(os.path.join(workdir, "data", "behavior.jsonl"))
  assert logs and all(r.domain == "support" for r in logs)
