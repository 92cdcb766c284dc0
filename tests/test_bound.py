"""The improvement bound (bound.py) against a two-state, two-action example worked out by hand.

The example (gamma = 1/2, beta = 1 / ln 3, so a Q-hat gap of 1 between two actions is an odds ratio of 3):

  s0: a0 -> reward 0.01, the episode ends;   a1 -> reward 0.24, then s1
  s1: a0 -> reward 1.99, ends;               a1 -> reward 1.01, ends
  pi = uniform in both states;  Q-hat = [[0, 1], [2, 1]]

By hand:
  Q^pi(s1, .) = (1.99, 1.01), V^pi(s1) = 1.5
  Q^pi(s0, .) = (0.01, 0.24 + 0.5 * 1.5) = (0.01, 0.99), V^pi(s0) = 0.5
  |Q-hat - Q^pi| = 0.01 in all four pairs, so eps = 0.01
  pi'(.|s0) ∝ (1/2)(e^0, e^{ln 3}) = (1/4, 3/4);  pi'(.|s1) ∝ (1/2)(3^2, 3^1) -> (3/4, 1/4)
  KL(pi' || pi) = 3/4 ln(3/2) + 1/4 ln(1/2) = (3/4) ln 3 - ln 2 = 0.1308120 in both states
  beta KL = 3/4 - ln 2 / ln 3 = 0.75 - 0.6309298 = 0.1190702;  per-state bound = 0.1190702 - 0.02 = 0.0990702
  E_{pi'}[Q-hat] - E_pi[Q-hat] = 0.75 - 0.5 = 0.25 (s0), 1.75 - 1.5 = 0.25 (s1)   (>= beta KL)
  A(s0) = 1/4 * 0.01 + 3/4 * 0.99 - 0.5 = 0.245;  A(s1) = 3/4 * 1.99 + 1/4 * 1.01 - 1.5 = 0.245  (>= 0.0990702)
  V^{pi'}(s1) = 1.745;  V^{pi'}(s0) = 1/4 * 0.01 + 3/4 * (0.24 + 0.5 * 1.745) = 0.836875
  improvement = 0.836875 - 0.5 = 0.336875
  occupancy of pi' from s0: d'(s0) = 1, d'(s1) = gamma * 3/4 = 0.375, H = 1.375
  performance difference: 1 * 0.245 + 0.375 * 0.245 = 0.336875 (= the improvement)
  value-level bound: 1.375 * 0.0990702 = 0.1362216 <= 0.336875
"""

import math

import numpy as np
import pytest

from iterppo_jax import bound
from iterppo_jax import conversation as conv_lib

BETA = 1 / math.log(3)
GAMMA = 0.5


def example():
  p = np.zeros((2, 2, 2))
  p[0, 1, 1] = 1.0  # s0, a1 -> s1; every other (s, a) ends the episode
  r = np.array([[0.01, 0.24], [1.99, 1.01]])
  pi = np.full((2, 2), 0.5)
  q_hat = np.array([[0.0, 1.0], [2.0, 1.0]])
  return p, r, pi, q_hat


def test_hand_worked_two_state_example():
  p, r, pi, q_hat = example()
  out = bound.tabular_bound_check(p, r, pi, q_hat, beta=BETA, gamma=GAMMA, start=0)
  np.testing.assert_allclose(out["q_true"], [[0.01, 0.99], [1.99, 1.01]], atol=1e-12)
  np.testing.assert_allclose(out["v_old"], [0.5, 1.5], atol=1e-12)
  assert out["eps"] == pytest.approx(0.01)
  np.testing.assert_allclose(out["pi_new"], [[0.25, 0.75], [0.75, 0.25]], atol=1e-12)
  kl = 0.75 * math.log(3) - math.log(2)
  np.testing.assert_allclose(out["kl"], [kl, kl], atol=1e-12)
  assert kl == pytest.approx(0.1308120, abs=1e-7)
  np.testing.assert_allclose(out["surrogate_gain"], [0.25, 0.25], atol=1e-12)
  np.testing.assert_allclose(out["advantage"], [0.245, 0.245], atol=1e-12)
  np.testing.assert_allclose(out["state_bound"], [0.0990702, 0.0990702], atol=1e-7)
  np.testing.assert_allclose(out["v_new"], [0.836875, 1.745], atol=1e-12)
  np.testing.assert_allclose(out["occupancy"], [1.0, 0.375], atol=1e-12)
  assert out["improvement"] == pytest.approx(0.336875, abs=1e-12)
  assert out["pdl_sum"] == pytest.approx(0.336875, abs=1e-12)  # the performance-difference identity
  assert out["horizon"] == pytest.approx(1.375)
  assert out["value_bound"] == pytest.approx(0.1362216, abs=1e-7)
  assert out["per_state_holds"] and out["holds"]
  # The bookkeeping row lays out the same numbers.
  row = out["row"]
  assert row["beta_kl"] == pytest.approx(0.1190702, abs=1e-7)
  assert row["eps_q"] == pytest.approx(0.01) and row["eps_q_stat"] == "max"
  assert row["bound"] == pytest.approx(0.0990702, abs=1e-7)
  assert row["bound_value"] == pytest.approx(out["value_bound"], abs=1e-12)
  assert row["improvement_lo"] == row["improvement_hi"] == pytest.approx(0.336875)
  assert row["holds"] and not row["refuted"]


def test_closed_form_is_the_regularised_maximiser():
  # At the closed form, E_{pi'}[Q-hat] - beta KL = beta log E_pi[exp(Q-hat / beta)]: s0 gives ln 2 / ln 3.
  _, _, pi, q_hat = example()
  pi_new = bound.soft_improvement(pi, q_hat, BETA)
  objective = np.sum(pi_new * q_hat, 1) - BETA * bound.kl_per_state(pi_new, pi)
  assert objective[0] == pytest.approx(math.log(2) / math.log(3))
  # Any other policy scores less (a grid over the two-action simplex).
  for a in np.linspace(0.01, 0.99, 25):
    other = np.array([[a, 1 - a], [a, 1 - a]])
    assert np.all(np.sum(other * q_hat, 1) - BETA * bound.kl_per_state(other, pi) <= objective + 1e-12)


def test_bound_breaks_for_a_policy_that_is_not_the_maximiser():
  # The guarantee needs pi' to solve the regularised problem: a pi' that moves to the worse action in s1 has
  # a large KL (so a large "bound") but a negative advantage there. This is the optimisation slack PPO adds.
  p, r, pi, _ = example()
  v_old, q = bound.policy_evaluation(p, r, pi, GAMMA)
  wrong = np.array([[0.5, 0.5], [0.05, 0.95]])
  advantage = np.sum(wrong * q, 1) - v_old
  assert advantage[1] == pytest.approx(0.05 * 1.99 + 0.95 * 1.01 - 1.5)  # -0.449
  assert advantage[1] < 0 < BETA * bound.kl_per_state(wrong, pi)[1]  # even with eps = 0 the bound fails


def test_bound_row_arithmetic_and_verdicts():
  row = bound.bound_row(3, improvement=0.02, improvement_se=0.01, kl=0.8, beta=0.05, eps_q_mean=0.1,
                        eps_q_max=0.3, horizon=2.0)
  assert row["beta_kl"] == pytest.approx(0.04)
  assert row["bound"] == pytest.approx(0.04 - 0.6)  # uses the max
  assert row["bound_value"] == pytest.approx(2 * (0.04 - 0.6))
  assert row["improvement_lo"] == pytest.approx(0.02 - 1.959964 * 0.01)
  assert row["holds"] and not row["refuted"]
  mean_only = bound.bound_row(0, improvement=0.01, improvement_se=0.001, kl=2.0, beta=0.05, eps_q_mean=0.01)
  assert mean_only["eps_q_stat"] == "mean" and mean_only["bound"] == pytest.approx(0.08)
  assert not mean_only["holds"] and mean_only["refuted"]  # 0.01 + 0.002 < 0.08
  close = bound.bound_row(0, improvement=0.07, improvement_se=0.01, kl=2.0, beta=0.05, eps_q_mean=0.01)
  assert not close["holds"] and not close["refuted"]
  assert "REFUTED" in bound.table([mean_only]) and "no (within CI)" in bound.table([close])


def conv(cid, flags_after, abstain_first=False, silent_end=False):
  """A conversation with one decision before each customer reply; `flags_after` are those replies' flags."""
  turns = [conv_lib.Turn("customer", "hi", flag=0)]
  for j, f in enumerate(flags_after):
    abstain = abstain_first and j == 0
    turns += [conv_lib.Turn("suggestion", "" if abstain else "s", abstain=abstain),
              conv_lib.Turn("business", "m", feedback="none" if abstain else "accept"),
              conv_lib.Turn("customer", "c", flag=f)]
  if silent_end:
    turns.append(conv_lib.Turn("suggestion", "s"))
  return conv_lib.Conversation(cid, "sales", "p", turns, outcome=float(any(flags_after)))


def test_start_values_horizon_and_improvement_from_logs():
  a = conv("a", [0, 1])  # G = 0 + 0.5 * 1 = 0.5, decisions 2 -> 1 + 0.5
  b = conv("b", [1])  # G = 1, decisions 1 -> 1
  c = conv("c", [0], abstain_first=True, silent_end=True)  # G = 0, decisions 2 -> 1.5
  np.testing.assert_allclose(bound.start_returns([a, b, c], GAMMA), [0.5, 1.0, 0.0])
  assert bound.discounted_horizon([a, b, c], GAMMA) == pytest.approx((1.5 + 1 + 1.5) / 3)
  v = bound.value_estimate([a, b, c], GAMMA)
  assert v["value"] == pytest.approx(0.5)
  assert v["value_se"] == pytest.approx(0.5 / math.sqrt(3))  # sample std of (0.5, 1, 0) is 0.5
  old = [conv("x", [0]), conv("y", [1]), conv("z", [0])]
  new = [conv("x", [0, 1]), conv("y", [1]), conv("z", [1])]
  imp = bound.improvement_estimate(old, new, GAMMA)
  assert imp["paired"] and imp["improvement"] == pytest.approx(0.5)
  # differences: x 0.5 - 0, y 1 - 1, z 1 - 0 = (0.5, 0, 1): mean 0.5, std 0.5, se 0.5 / sqrt(3)
  assert imp["improvement_se"] == pytest.approx(0.5 / math.sqrt(3))
  unpaired = bound.improvement_estimate(old, list(reversed(new)), GAMMA)
  assert not unpaired["paired"]
  var_old, var_new = np.var([0, 1, 0], ddof=1), np.var([0.5, 1, 1], ddof=1)
  assert unpaired["improvement_se"] == pytest.approx(math.sqrt(var_old / 3 + var_new / 3))
  row = bound.logged_bound_row(1, old, new, gamma=GAMMA, beta=0.05, kl=1.0, eps_q_mean=0.1, eps_q_max=0.2)
  assert row["horizon"] == pytest.approx((1.5 + 1 + 1) / 3)
  assert row["bound_value"] == pytest.approx(row["horizon"] * (0.05 - 0.4))
  assert row["value_old"] == pytest.approx(1 / 3) and row["value_new"] == pytest.approx(5 / 6)


def test_bad_input_is_named():
  p, r, pi, q_hat = example()
  with pytest.raises(ValueError, match="gamma"):
    bound.policy_evaluation(p, r, pi, 1.0)
  with pytest.raises(ValueError, match="probability distribution"):
    bound.policy_evaluation(p, r, np.array([[0.5, 0.6], [0.5, 0.5]]), GAMMA)
  with pytest.raises(ValueError, match="beta"):
    bound.soft_improvement(pi, q_hat, 0.0)
  with pytest.raises(ValueError, match="no decision"):
    bound.start_returns([conv_lib.Conversation("e", "sales", "p", [conv_lib.Turn("customer", "hi", flag=0)], 0.0)],
                        GAMMA)
