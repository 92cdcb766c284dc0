"""Q-fit maths and evaluation metrics (iterppo_jax/qfit.py) against NumPy loops and hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iterppo_jax import qfit
from iterppo_jax import stats


def _returns_reference(rewards, mask, gamma):
  batch, length = rewards.shape
  out = np.zeros((batch, length))
  for b in range(batch):
    running = 0.0
    for t in reversed(range(length)):
      if mask[b, t]:
        running = rewards[b, t] + gamma * running
        out[b, t] = running
  return out


def _td_lambda_reference(rewards, values_next, dones, mask, gamma, lam):
  batch, length = rewards.shape
  out = np.zeros((batch, length))
  for b in range(batch):
    later = None  # G of the next valid turn
    for t in reversed(range(length)):
      if not mask[b, t]:
        continue
      if dones[b, t]:
        g = rewards[b, t]
      else:
        following = values_next[b, t] if later is None else later
        g = rewards[b, t] + gamma * ((1 - lam) * values_next[b, t] + lam * following)
      out[b, t] = g
      later = g
  return out


def _turn_batch(seed, batch=7, turns=6):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, turns + 1, size=batch)
  mask = np.arange(turns)[None, :] < lengths[:, None]
  rewards = np.where(mask, (rng.random((batch, turns)) < 0.2).astype(float), 0.0)
  values_next = rng.random((batch, turns))
  dones = np.zeros((batch, turns), bool)
  dones[np.arange(batch), lengths - 1] = True
  dones[0, lengths[0] - 1] = False  # one truncated log: must bootstrap from values_next
  return rewards, values_next, dones, mask


def _j(x, dtype=jnp.float32):
  return jnp.asarray(x, dtype)


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5])
def test_discounted_returns_matches_loop(gamma):
  rewards, _, _, mask = _turn_batch(0)
  got = jax.jit(qfit.discounted_returns)(_j(np.where(mask, rewards, np.nan)), jnp.asarray(mask), gamma)
  np.testing.assert_allclose(got, _returns_reference(rewards, mask, gamma), rtol=1e-6, atol=1e-6)


def test_discounted_returns_interior_holes():
  rewards = np.array([[1.0, 5.0, 2.0, 0.0]])
  mask = np.array([[1, 0, 1, 0]], bool)
  got = qfit.discounted_returns(_j(rewards), jnp.asarray(mask), 0.5)
  np.testing.assert_allclose(got, [[2.0, 0.0, 2.0, 0.0]])


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.0), (0.9, 0.5), (0.95, 0.9), (1.0, 1.0), (0.8, 1.0)])
def test_td_lambda_matches_loop(gamma, lam):
  rewards, values_next, dones, mask = _turn_batch(1)
  values_dirty = np.where(dones | ~mask, np.nan, values_next)  # unused successor values must not leak
  got = jax.jit(qfit.td_lambda_targets)(_j(rewards), _j(values_dirty), jnp.asarray(dones), jnp.asarray(mask),
                                        gamma, lam)
  np.testing.assert_allclose(got, _td_lambda_reference(rewards, values_next, dones, mask, gamma, lam),
                             rtol=1e-5, atol=1e-6)


def test_td_lambda_limits():
  rewards, values_next, dones, mask = _turn_batch(2)
  args = (_j(rewards), _j(values_next), jnp.asarray(dones), jnp.asarray(mask))
  # lam = 0 is TD(0)
  np.testing.assert_allclose(qfit.td_lambda_targets(*args, 0.9, 0.0), qfit.td_targets(*args, 0.9), atol=1e-6)
  np.testing.assert_allclose(
      qfit.td_targets(*args, 0.9),
      np.where(mask, rewards + 0.9 * (1 - dones) * values_next, 0.0), atol=1e-6)
  # lam = 1 with done at the end of every row is the Monte Carlo return
  dones_all = np.zeros_like(dones)
  dones_all[np.arange(len(mask)), mask.sum(1) - 1] = True
  mc_args = (_j(rewards), _j(values_next), jnp.asarray(dones_all), jnp.asarray(mask))
  np.testing.assert_allclose(qfit.td_lambda_targets(*mc_args, 0.9, 1.0),
                             qfit.discounted_returns(_j(rewards), jnp.asarray(mask), 0.9), atol=1e-6)


def test_mc_loss():
  logits = jnp.array([0.0, 2.0, -1.0, 7.0])
  targets = jnp.array([1.0, 0.0, 0.81, 1.0])
  p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  t = np.asarray(targets, np.float64)
  expected = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  np.testing.assert_allclose(qfit.mc_loss(logits, targets, "bce"), expected.mean(), rtol=1e-5)
  np.testing.assert_allclose(qfit.mc_loss(logits, targets, "bce", mask=jnp.array([1, 1, 0, 0])),
                             expected[:2].mean(), rtol=1e-5)
  np.testing.assert_allclose(qfit.mc_loss(logits, targets, "mse"), np.mean((np.asarray(logits) - t) ** 2),
                             rtol=1e-5)
  # BCE on soft targets is minimised at sigmoid(x) = target
  grad = jax.grad(lambda x: qfit.mc_loss(x, jnp.array([0.81]), "bce"))(jnp.array([np.log(0.81 / 0.19)]))
  np.testing.assert_allclose(grad, [0.0], atol=1e-6)
  with pytest.raises(ValueError):
    qfit.mc_loss(logits, targets, "hinge")


def test_polyak_and_periodic_copy():
  target = {"w": jnp.zeros(3), "b": {"c": jnp.array(4.0)}}
  online = {"w": jnp.ones(3), "b": {"c": jnp.array(0.0)}}
  mixed = qfit.polyak_update(target, online, 0.25)
  np.testing.assert_allclose(mixed["w"], [0.25] * 3)
  np.testing.assert_allclose(mixed["b"]["c"], 3.0)
  assert jax.tree.structure(mixed) == jax.tree.structure(target)
  np.testing.assert_allclose(qfit.polyak_update(target, online, 1.0)["w"], online["w"])
  copy = jax.jit(qfit.periodic_copy, static_argnums=3)
  np.testing.assert_allclose(copy(target, online, jnp.int32(10), 5)["w"], online["w"])
  np.testing.assert_allclose(copy(target, online, jnp.int32(11), 5)["w"], target["w"])


def test_brier():
  assert stats.brier([0.5, 0.5], [0, 1]) == pytest.approx(0.25)
  assert stats.brier([0.9, 0.2, 0.6], [1, 0, 0]) == pytest.approx((0.01 + 0.04 + 0.36) / 3)


def test_expected_calibration_error():
  probs = [0.05, 0.15, 0.12, 0.95, 1.0, 0.55]
  outcomes = [0, 1, 0, 1, 1, 0]
  # bins: [0,.1): {0.05|0}; [.1,.2): {0.15|1, 0.12|0}; [.5,.6): {0.55|0}; [.9,1]: {0.95|1, 1.0|1}
  expected = (1 * 0.05 + 2 * abs(0.135 - 0.5) + 1 * 0.55 + 2 * abs(0.975 - 1.0)) / 6
  assert stats.expected_calibration_error(probs, outcomes, n_bins=10) == pytest.approx(expected)
  assert stats.expected_calibration_error([0.3, 0.3, 0.3], [0, 1, 0], n_bins=10) == pytest.approx(abs(0.3 - 1 / 3))
  # A perfectly calibrated forecaster within each bin
  assert stats.expected_calibration_error([0.25] * 4 + [0.75] * 4, [1, 0, 0, 0, 1, 1, 1, 0]) == pytest.approx(0.0)


def test_auc_with_ties():
  # pos scores {0.8, 0.5, 0.5}, neg scores {0.5, 0.2}: pairs (pos > neg) count 1, ties 0.5
  # 0.8 beats both (2); each 0.5 ties 0.5 (0.5) and beats 0.2 (1) -> total 2 + 1.5 + 1.5 = 5 of 6
  scores = [0.8, 0.5, 0.5, 0.5, 0.2]
  labels = [1, 1, 1, 0, 0]
  assert stats.auc(scores, labels) == pytest.approx(5 / 6)
  assert stats.auc([0.3] * 4, [1, 0, 1, 0]) == pytest.approx(0.5)
  assert stats.auc([0.1, 0.2, 0.9], [0, 0, 1]) == pytest.approx(1.0)
  assert np.isnan(stats.auc([0.1, 0.2], [1, 1]))


def test_auc_matches_pairwise_reference():
  rng = np.random.default_rng(3)
  scores = rng.integers(0, 6, size=60) / 5.0  # many ties
  labels = rng.random(60) < 0.4
  pos, neg = scores[labels], scores[~labels]
  pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
  assert stats.auc(scores, labels) == pytest.approx(pairwise)


def test_pearson():
  rng = np.random.default_rng(4)
  x = rng.normal(size=50)
  y = 2 * x + rng.normal(size=50)
  assert stats.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
  assert stats.pearson(x, 3 * x + 1) == pytest.approx(1.0)
  assert np.isnan(stats.pearson(x, np.ones(50)))


def test_bootstrap_override_replaces_the_successor_and_cuts_the_trace():
  # One conversation of three decisions, the outcome after the last; the second decision was a randomised draw.
  rewards = np.asarray([0.0, 0.0, 1.0], np.float32)
  next_index = np.asarray([1, 2, -1])
  done = np.asarray([False, False, True])
  q_logged = np.asarray([0.1, 0.2, 0.3], np.float32)
  own = np.asarray([0.5, np.nan, np.nan], np.float32)  # Q_bar(s_1, pi's own action)
  gamma = 0.9
  td0 = qfit.bootstrap_targets(q_logged, rewards, next_index, done, gamma, None, own)
  np.testing.assert_allclose(td0, [gamma * 0.5, gamma * 0.3, 1.0], rtol=1e-6)
  # lambda = 1 is Monte Carlo up to the cut: decision 0 does not see the reward that followed the draw.
  lam1 = qfit.bootstrap_targets(q_logged, rewards, next_index, done, gamma, 1.0, own)
  np.testing.assert_allclose(lam1, [gamma * 0.5, gamma, 1.0], rtol=1e-6)
  plain = qfit.bootstrap_targets(q_logged, rewards, next_index, done, gamma, 1.0)
  np.testing.assert_allclose(plain, [gamma ** 2, gamma, 1.0], rtol=1e-6)
