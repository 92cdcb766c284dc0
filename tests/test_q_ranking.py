"""The ranking diagnostic (q_ranking.py) on a toy domain whose true Q is known in closed form, and its metrics."""

import dataclasses

import numpy as np
import pytest

from iterppo_jax import conversation as conv_lib
from iterppo_jax import q_ranking
from iterppo_jax.envs import base

WANTS = ("red", "green", "blue")
BUY = {True: 0.8, False: 0.2}  # P(buy | the offered colour is / is not the wanted one)


@dataclasses.dataclass
class Wish:
  colour: str


class ColourShop(base.TextEnv):
  """One decision: the customer says which colour they want; an offer of it sells with p 0.8, another with 0.2.

  So Q(s, 'offer c') = 0.8 if c is the wanted colour else 0.2, whatever policy follows (the episode ends).
  """

  domain = "colour"

  def new_hidden(self, rng):
    return Wish(WANTS[int(rng.integers(3))])

  def opening(self, hidden, rng):
    return f"I want something {hidden.colour}."

  def customer_reply(self, hidden, business_text, rng):
    buys = rng.random() < BUY[hidden.colour in business_text]
    return ("I'll buy it." if buys else "No thanks."), int(buys)

  def classify_outcome(self, customer_text):
    return int("buy" in customer_text)

  def judge(self, hidden, record, suggestion):
    return "good"

  def metadata(self, hidden):
    return {"colour": hidden.colour}

  def restore(self, record, n_turns):
    return self.restored_episode(record, n_turns, Wish(record.metadata["colour"]))


def offers(turns, rng):
  del turns, rng
  return [f"May I offer the {c} one?" for c in WANTS]


def closed_form_q(record, candidates):
  return [BUY[record.metadata["colour"] in c] for c in candidates]


def test_metrics_on_hand_made_rankings():
  true = np.asarray([[0.1, 0.5, 0.9], [0.3, 0.2, 0.1]])
  perfect = q_ranking.ranking_metrics(true * 10, true)
  assert perfect["top1"] == 1 and perfect["spearman"] == pytest.approx(1) and perfect["pairwise"] == 1
  assert perfect["pick_gain"] == pytest.approx(perfect["best_gain"]) == pytest.approx(np.mean([0.4, 0.1]))
  reverse = q_ranking.ranking_metrics(-true, true)
  assert reverse["top1"] == 0 and reverse["spearman"] == pytest.approx(-1) and reverse["pairwise"] == 0
  assert reverse["pick_gain"] == pytest.approx(np.mean([-0.4, -0.1]))
  assert perfect["top1_chance"] == pytest.approx(1 / 3)
  # A constant Q ties every pair (1/2) and picks the first candidate; a masked candidate is ignored.
  flat = q_ranking.ranking_metrics(np.zeros((2, 3)), true)
  assert flat["pairwise"] == 0.5 and np.isnan(flat["spearman"])
  masked = q_ranking.ranking_metrics(np.asarray([[0., 1., 99.]]), np.asarray([[0.2, 0.8, 0.]]),
                                     np.asarray([[True, True, False]]))
  assert masked["top1"] == 1 and masked["pick_gain"] == pytest.approx(0.3)
  assert "pick_gain_own" not in masked
  # Against pi_k's own samples (candidate 0 of each state): Q's pick minus their mean true Q.
  own = np.asarray([[True, False, False], [True, True, False]])
  with_own = q_ranking.ranking_metrics(true * 10, true, own=own)
  assert with_own["pick_gain_own"] == pytest.approx(np.mean([0.9 - 0.1, 0.3 - 0.25]))
  assert with_own["best_gain_own"] == pytest.approx(with_own["pick_gain_own"])
  assert q_ranking.ranking_metrics(-true, true, own=own)["pick_gain_own"] == pytest.approx(np.mean([0.0, -0.15]))
  # With the truth's standard errors (0.08 each: 0.113 for a difference): state 0's leaders are 0.4 apart, state
  # 1's 0.1, and the reverse pick is 0.8 and 0.2 below the best: a clear best and a clear miss in state 0 only.
  se = np.full_like(true, 0.08)
  assert "clear_miss" not in perfect
  noisy_reverse = q_ranking.ranking_metrics(-true, true, se=se)
  assert noisy_reverse["clear_best"] == 0.5 and noisy_reverse["clear_miss"] == 0.5
  assert q_ranking.ranking_metrics(true, true, se=se)["clear_miss"] == 0.0
  assert q_ranking.ranking_metrics(-true, true, se=se * 10)["clear_miss"] == 0.0  # all within noise


def test_true_q_of_the_action_set_matches_the_closed_form():
  env = ColourShop(business_user=base.BusinessUserConfig(mode="direct"), max_turns=1)
  records = env.play(policies_any_offer(), 60, seed=0)
  action_set = q_ranking.build_action_set(env, records, policies_any_offer(), offers, n_states=12,
                                          policy_samples=1, rollouts=300, gamma=0.95, seed=1,
                                          render_fn=lambda turns, context: conv_lib.render_state(turns, None, context))
  assert len(action_set.prompts) == 12 and action_set.rollouts == 300
  by_id = {r.id: r for r in records}
  for (rid, _), cands, q, se in zip(action_set.where, action_set.candidates, action_set.true_q, action_set.true_se):
    assert len(cands) == 3  # the policy's sample is one of the offers: duplicates are dropped
    expected = closed_form_q(by_id[rid], cands)
    assert np.all(np.abs(q[:3] - expected) <= 4 * se[:3] + 1e-9), (q, expected, se)
  # A Q-model equal to the closed form ranks perfectly; one that likes 'red' everywhere is at chance.
  exact = np.concatenate([closed_form_q(by_id[rid], c) for (rid, _), c in zip(action_set.where,
                                                                                action_set.candidates)])
  good = q_ranking.ranking_metrics(action_set.unflatten(exact), action_set.true_q, action_set.mask)
  assert good["top1"] == 1 and good["spearman"] > 0.8 and good["pick_gain"] > 0.3
  _, actions = action_set.pairs()
  red = np.asarray([float("red" in a) for a in actions])
  bad = q_ranking.ranking_metrics(action_set.unflatten(red), action_set.true_q, action_set.mask)
  assert bad["top1"] < 0.7 and bad["pick_gain"] < good["pick_gain"] - 0.2
  # Saved and loaded, the measurement is the same.
  again = q_ranking.ActionSet.from_json(action_set.to_json())
  np.testing.assert_array_equal(again.true_q, action_set.true_q)
  assert again.candidates == action_set.candidates


def policies_any_offer():
  from iterppo_jax.envs import policies
  return policies.FunctionPolicy(lambda o: offers(None, None)[int(o.rng.integers(3))], name="offer")


def test_logged_metrics_estimate_the_pick_gain_without_a_simulator():
  rng = np.random.default_rng(0)
  n = 6000
  wanted = rng.integers(3, size=n)
  taken = rng.integers(3, size=n)  # uniform over 3 candidates: propensity 1/3
  returns = (rng.random(n) < np.where(taken == wanted, 0.8, 0.2)).astype(float)
  truth = [np.where(np.arange(3) == w, 0.8, 0.2) for w in wanted]
  good = q_ranking.logged_ranking_metrics(truth, taken, returns)
  # The greedy pick's true gain over the candidates' mean is 0.8 - 0.4 = 0.4.
  assert abs(good["ips_pick_gain"] - 0.4) < 4 * good["ips_pick_gain_se"] and good["adv_corr"] > 0.3
  wrong = [np.where(np.arange(3) == (w + 1) % 3, 1.0, 0.0) for w in wanted]
  bad = q_ranking.logged_ranking_metrics(wrong, taken, returns)
  assert abs(bad["ips_pick_gain"] + 0.2) < 4 * bad["ips_pick_gain_se"] and bad["adv_corr"] < 0


def test_reliability_says_how_much_of_the_measured_truth_is_noise():
  q = np.asarray([[0.1, 0.5, 0.9], [0.2, 0.4, 0.6]])
  exact = q_ranking.ActionSet([("a", 1), ("b", 1)], ["s", "t"], [["x", "y", "z"]] * 2, [["script"] * 3] * 2, q,
                              np.zeros_like(q), rollouts=10)
  assert exact.reliability() == pytest.approx(1.0)
  noisy = q_ranking.ActionSet(exact.where, exact.prompts, exact.candidates, exact.source, q,
                              np.full_like(q, np.sqrt(np.mean([np.var(r, ddof=1) for r in q]) / 2)), rollouts=10)
  assert noisy.reliability() == pytest.approx(0.5)


def test_top1_ceiling_is_what_the_exact_q_scores_against_a_noisy_truth():
  q = np.asarray([[0.2, 0.5, 0.1], [0.3, 0.3, 0.0], [0.4, 0.0, 0.0]])
  sets = dict(where=[("a", 1), ("b", 1), ("c", 1)], prompts=["s", "t", "u"],
              candidates=[["x", "y", "z"], ["x", "y", "z"], ["x"]], source=[["script"] * 3] * 2 + [["script"]],
              rollouts=8)
  exact = q_ranking.ActionSet(true_q=q, true_se=np.zeros_like(q), **sets)
  # No noise: the measured best is the real best where it is unique; a tie is split by argmax (first), so the
  # second state scores 1 too; the one-candidate state is not counted.
  assert exact.top1_ceiling() == 1.0
  tied = q_ranking.ActionSet(true_q=q, true_se=np.full_like(q, 0.05), **sets)
  # State 1 is 0.3 clear of the rest (6 s.e.): always found; state 2's two tied leaders split about evenly.
  assert abs(tied.top1_ceiling(draws=4000) - (1.0 + 0.5) / 2) < 0.03
  assert tied.top1_ceiling(seed=3) == tied.top1_ceiling(seed=3)
  lone = q_ranking.ActionSet(true_q=q[2:], true_se=np.zeros_like(q[2:]), where=[("c", 1)], prompts=["u"],
                             candidates=[["x"]], source=[["script"]], rollouts=8)
  assert np.isnan(lone.top1_ceiling())


def test_spearman_ceiling_is_what_the_exact_q_correlates_with_a_noisy_truth():
  q = np.asarray([[0.0, 0.1, 0.2, 0.3], [0.3, 0.3, 0.3, 0.3]])  # the second state has nothing to rank
  sets = dict(where=[("a", 1), ("b", 1)], prompts=["s", "t"], candidates=[["w", "x", "y", "z"]] * 2,
              source=[["script"] * 4] * 2, rollouts=8)
  assert q_ranking.ActionSet(true_q=q, true_se=np.zeros_like(q), **sets).spearman_ceiling() == 1.0
  clear = q_ranking.ActionSet(true_q=q, true_se=np.full_like(q, 0.005), **sets).spearman_ceiling()
  noisy = q_ranking.ActionSet(true_q=q, true_se=np.full_like(q, 0.2), **sets)
  # 20 s.e. between neighbours: the order never changes; 0.5 s.e.: the exact Q's order is often another
  assert clear == 1.0 and 0.2 < noisy.spearman_ceiling() < 0.9
  assert noisy.spearman_ceiling(seed=1) == noisy.spearman_ceiling(seed=1)


def test_candidates_share_their_rollouts_random_numbers_and_the_truth_reads_its_noise_from_them():
  """Common random numbers: rollout r of every candidate at a state draws the same customer's uniform u, so in
  ColourShop an offer sells where u < p (0.8 for the wanted colour, 0.2 else). The two wrong offers' returns are
  equal rollout by rollout (a difference without noise), and wanted minus wrong is 1 where 0.2 <= u < 0.8:
  variance 0.6 x 0.4 = 0.24 per rollout, not the 0.16 + 0.16 = 0.32 of independent rollouts."""
  env = ColourShop(business_user=base.BusinessUserConfig(mode="direct"), max_turns=1)
  records = env.play(policies_any_offer(), 60, seed=0)
  rollouts = 400
  aset = q_ranking.build_action_set(env, records, policies_any_offer(), offers, n_states=10, policy_samples=0,
                                    rollouts=rollouts, gamma=0.95, seed=1,
                                    render_fn=lambda turns, context: conv_lib.render_state(turns, None, context))
  assert aset.paired and aset.returns.shape == (10, 3, rollouts)
  np.testing.assert_allclose(aset.true_q, aset.returns.mean(-1))
  by_id = {r.id: r for r in records}
  paired_var, unpaired_var = [], []
  for i, ((rid, _), cands) in enumerate(zip(aset.where, aset.candidates)):
    wanted = [j for j, c in enumerate(cands) if by_id[rid].metadata["colour"] in c]
    wrong = [j for j in range(3) if j not in wanted]
    np.testing.assert_array_equal(aset.returns[i, wrong[0]], aset.returns[i, wrong[1]])
    assert aset.diff_se()[i, wrong[0], wrong[1]] == 0
    paired_var.append(aset.diff_se()[i, wanted[0], wrong[0]] ** 2 * rollouts)
    unpaired_var.append(np.hypot(aset.true_se[i, wanted[0]], aset.true_se[i, wrong[0]]) ** 2 * rollouts)
  assert abs(np.mean(paired_var) - 0.24) < 0.03 and abs(np.mean(unpaired_var) - 0.32) < 0.03
  # The noise read from the pairs is half the unpaired reading: per rollout, the errors' deviations from their
  # state's mean have variances (4 + 1 + 1) / 9 x 0.24, over M - 1 = 2: 0.08, against a mean se^2 x R of 0.16.
  noise = lambda paired: 1 - aset.reliability(paired=paired)  # noise / within-state variance  # noqa: E731
  assert abs(noise(True) / noise(False) - 0.5) < 0.1
  again = q_ranking.ActionSet.from_json(aset.to_json())
  np.testing.assert_allclose(again.returns, aset.returns, atol=1e-6)
  assert again.reliability() == pytest.approx(aset.reliability())


def test_paired_returns_remove_the_noise_the_candidates_share():
  """Returns = the candidate's value + a rollout's shock shared by every candidate + a little of its own noise:
  unpaired, the shared shock drowns the 0.05 steps between candidates; paired, it cancels."""
  rng = np.random.default_rng(0)
  q = np.asarray([[0.1, 0.15, 0.2], [0.3, 0.25, 0.2]])
  shared = rng.normal(0, 0.5, size=(2, 1, 64))
  returns = q[:, :, None] + shared + rng.normal(0, 0.01, size=(2, 3, 64))
  kw = dict(where=[("a", 1), ("b", 1)], prompts=["s", "t"], candidates=[["x", "y", "z"]] * 2,
            source=[["script"] * 3] * 2, rollouts=64)
  se = returns.std(-1, ddof=1) / 8
  paired = q_ranking.ActionSet(true_q=returns.mean(-1), true_se=se, returns=returns, **kw)
  unpaired = q_ranking.ActionSet(true_q=returns.mean(-1), true_se=se, **kw)
  assert paired.reliability() > 0.95 and unpaired.reliability() < 0.5
  assert unpaired.reliability() == pytest.approx(paired.reliability(paired=False))
  assert paired.top1_ceiling() == 1.0 and unpaired.top1_ceiling() < 0.8
  assert paired.spearman_ceiling() == 1.0 and unpaired.spearman_ceiling() < 0.8
  assert paired.top1_ceiling(seed=2) == paired.top1_ceiling(seed=2)
  # clear misses and clear bests judged with the paired differences' errors
  reverse = -paired.true_q
  assert q_ranking.ranking_metrics(reverse, paired.true_q, se=paired.true_se,
                                   diff_se=paired.diff_se())["clear_miss"] == 1.0
  assert q_ranking.ranking_metrics(reverse, unpaired.true_q, se=unpaired.true_se)["clear_miss"] == 0.0
  with pytest.raises(ValueError, match="keeps no rollout returns"):
    unpaired.reliability(paired=True)
  assert "returns" not in unpaired.to_json() and q_ranking.ActionSet.from_json(unpaired.to_json()).returns is None


def test_step_reach_in_closed_form():
  beta = 0.1
  # one state with two equally likely acts valued 0 and 1: the tilt puts e^(1/beta) / (1 + e^(1/beta)) on the
  # better one; a state with one act cannot be raised; means are weighted by decisions
  w = np.exp(1 / beta) / (1 + np.exp(1 / beta))
  r = q_ranking.step_reach([np.array([0.0, 1.0]), np.array([0.3, 0.3, 0.3, 0.3])], beta)
  assert r["q_sd_in_state"] == pytest.approx(2 * 0.5 / 6)
  assert r["step_raise"] == pytest.approx(2 * (w - 0.5) / 6)
  # the states' values 0.5 (2 decisions) and 0.3 (4): their s.d. over decisions
  assert r["q_sd_of_state_value"] == pytest.approx(np.std([0.5, 0.5, 0.3, 0.3, 0.3, 0.3]))
  # a larger beta raises less, and the raise tends to Var / beta for small spreads
  q = [np.array([0.0, 0.01, 0.02])]
  assert q_ranking.step_reach(q, 0.2)["step_raise"] < q_ranking.step_reach(q, 0.02)["step_raise"]
  assert q_ranking.step_reach(q, 1.0)["step_raise"] == pytest.approx(np.var(q[0]) / 1.0, rel=0.02)
  assert q_ranking.step_reach(q, 1.0)["q_sd_of_state_value"] == 0.0  # one state
  # stable where Q / beta overflows exp
  assert q_ranking.step_reach([np.array([0.0, 1000.0])], 1e-3)["step_raise"] == pytest.approx(500.0)
