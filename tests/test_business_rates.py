"""The simulated business user behaves at its configured rates (issue #8), within sampling error.

For every logged suggestion we rebuild the live state just before it (SalesEnv.restore), ask the business user's
own judge for its quality, and form the configured probabilities of (accept, edit, influenced, reject) for that
quality and the persona's assist_trust, exactly as envs/base.py draws them. The observed counts must match the
summed probabilities within 4 standard deviations; a policy that abstains with a set probability must show that
rate too, and the business's silence must match `silent_prob`.
"""

import numpy as np
import pytest

from iterppo_jax.envs import base
from iterppo_jax.envs import sales

ABSTAIN_P = 0.2


def _mixed_policy():
  """Behaviour staff that abstain with probability ABSTAIN_P (a per-observation draw from its own stream)."""
  staff = sales.make_sales_policy("behavior")

  def act(observations):
    texts = staff(observations)
    return ["" if o.rng.random() < ABSTAIN_P else t for o, t in zip(observations, texts)]

  act.name = "behavior_abstain"
  return act


@pytest.fixture(scope="module")
def logs():
  return sales.SalesEnv().play(_mixed_policy(), 1500, seed=11)


def test_feedback_matches_the_configured_rates(logs):
  env = sales.SalesEnv()
  rates = env.business_user.rates
  expected, observed = np.zeros(4), np.zeros(4)
  variance = np.zeros(4)
  for record in logs:
    for i in record.agent_steps():
      sug = record.turns[i]
      if sug.abstain or i + 1 >= len(record.turns) or record.turns[i + 1].role != "business":
        continue
      ep = env.restore(record, i)
      quality = env.judge(ep.hidden, ep.record, sug.text)
      p = np.asarray(rates[base.QUALITIES.index(quality)], dtype=np.float64)
      p[:2] *= ep.hidden.assist_trust
      p /= p.sum()
      feedback = record.turns[i + 1].feedback
      # An unrelated rejection is followed by the staff's own message unless the business falls silent, which
      # ends the episode with no business turn (skipped above): correct the reject probability for that.
      p[3] *= 1 - env.business_user.silent_prob
      p /= p.sum()
      expected += p
      variance += p * (1 - p)
      observed[base.FEEDBACK_ORDER.index(feedback)] += 1
  assert observed.sum() > 3000
  z = (observed - expected) / np.sqrt(variance)
  assert np.all(np.abs(z) < 4), dict(zip(base.FEEDBACK_ORDER, np.round(z, 2)))
  # And the four behaviours really differ by quality: a test that ignored quality would fail the check above.
  assert observed[0] / observed.sum() > 0.2 and observed[3] / observed.sum() > 0.15


def test_abstain_rate_and_business_silence(logs):
  s = base.summarize(logs)
  n = sum(len(r.agent_steps()) for r in logs)
  assert abs(s["abstain_rate"] - ABSTAIN_P) < 4 * np.sqrt(ABSTAIN_P * (1 - ABSTAIN_P) / n)
  # Silence can only follow a decision where the business writes its own message (abstain or reject).
  own = sum(1 for r in logs for t in r.turns if t.role == "business" and t.feedback in ("none", "reject"))
  silent = sum(r.end_reason == "business_silent" for r in logs)
  p = base.BusinessUserConfig().silent_prob
  trials = own + silent
  assert abs(silent / trials - p) < 4 * np.sqrt(p * (1 - p) / trials) + 1e-3
