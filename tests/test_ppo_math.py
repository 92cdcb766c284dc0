"""PPO maths (iterppo_jax/ppo.py) against slow NumPy references and hand-computed cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iterppo_jax import ppo


def _gae_reference(rewards, values, mask, gamma, lam):
  """Plain loop: successor = next valid token, V = A = 0 after the last valid token."""
  batch, length = rewards.shape
  advantages = np.zeros((batch, length))
  for b in range(batch):
    next_value, next_advantage = 0.0, 0.0
    for t in reversed(range(length)):
      if not mask[b, t]:
        continue
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      advantages[b, t] = delta + gamma * lam * next_advantage
      next_value, next_advantage = values[b, t], advantages[b, t]
  returns = np.where(mask, advantages + values, 0.0)
  return advantages, returns


def _right_padded_mask(rng, batch, length):
  lengths = rng.integers(0, length + 1, size=batch)
  lengths[0] = length  # one full row
  return np.arange(length)[None, :] < lengths[:, None]


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (0.5, 0.5)])
def test_gae_matches_loop_reference(gamma, lam):
  rng = np.random.default_rng(0)
  batch, length = 6, 9
  rewards = rng.normal(size=(batch, length))
  values = rng.normal(size=(batch, length))
  mask = _right_padded_mask(rng, batch, length)
  # Garbage at masked positions must not leak into the results.
  rewards_dirty = np.where(mask, rewards, np.nan)
  values_dirty = np.where(mask, values, 1e6)
  gae = jax.jit(ppo.gae)
  advantages, returns = gae(jnp.asarray(rewards_dirty, jnp.float32), jnp.asarray(values_dirty, jnp.float32),
                            jnp.asarray(mask), gamma, lam)
  expected_advantages, expected_returns = _gae_reference(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(returns, expected_returns, rtol=1e-5, atol=1e-5)


def test_gae_skips_interior_masked_tokens():
  rng = np.random.default_rng(1)
  batch, length = 5, 8
  rewards = rng.normal(size=(batch, length))
  values = rng.normal(size=(batch, length))
  mask = rng.random((batch, length)) < 0.6  # arbitrary holes, not a prefix
  advantages, returns = ppo.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                                jnp.asarray(mask, jnp.float32), 0.97, 0.9)
  expected_advantages, expected_returns = _gae_reference(rewards, values, mask, 0.97, 0.9)
  np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(returns, expected_returns, rtol=1e-5, atol=1e-5)
  # Deleting the masked tokens gives the same answer on the remaining ones.
  for b in range(batch):
    kept = mask[b]
    if kept.any():
      a_compact, _ = _gae_reference(rewards[b:b + 1, kept], values[b:b + 1, kept], np.ones((1, kept.sum()), bool),
                                    0.97, 0.9)
      np.testing.assert_allclose(np.asarray(advantages)[b, kept], a_compact[0], rtol=1e-5, atol=1e-5)


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
  rewards = jnp.array([[1.0, 2.0, 3.0, 0.0]])
  values = jnp.array([[0.5, 0.5, 0.5, 9.0]])
  mask = jnp.array([[1, 1, 1, 0]])
  advantages, returns = ppo.gae(rewards, values, mask, 1.0, 1.0)
  np.testing.assert_allclose(returns, [[6.0, 5.0, 3.0, 0.0]], atol=1e-6)
  np.testing.assert_allclose(advantages, [[5.5, 4.5, 2.5, 0.0]], atol=1e-6)


def test_token_rewards_score_at_last_valid_token():
  logprobs = jnp.array([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
  ref_logprobs = jnp.array([[-1.5, -1.0, -0.5, -9.0], [-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
  score = jnp.array([10.0, 20.0, 30.0])
  rewards, kl_sum = ppo.token_rewards(score, logprobs, ref_logprobs, mask, kl_coef=0.1, estimator="k1")
  kl_row0 = np.array([0.5, -1.0, 0.0])
  np.testing.assert_allclose(rewards[0], np.concatenate([-0.1 * kl_row0 + [0, 0, 10.0], [0.0]]), atol=1e-6)
  np.testing.assert_allclose(rewards[1], [0, 0, 0, 20.0], atol=1e-6)
  np.testing.assert_allclose(rewards[2], [0, 0, 0, 0], atol=1e-6)  # empty row gets nothing
  np.testing.assert_allclose(kl_sum, [kl_row0.sum(), 0.0, 0.0], atol=1e-6)


def test_token_rewards_nonprefix_mask_uses_last_true():
  mask = jnp.array([[1, 0, 1, 0, 0]], bool)
  zeros = jnp.zeros((1, 5))
  rewards, _ = ppo.token_rewards(jnp.array([1.0]), zeros, zeros, mask, 0.0, "k3")
  np.testing.assert_allclose(rewards, [[0, 0, 1.0, 0, 0]])


def test_kl_estimators_match_exact_kl():
  p_logits = jnp.array([1.0, 0.2, -0.5, 0.3, -1.2])
  q_logits = jnp.array([0.1, 0.9, -0.2, -0.4, 0.5])
  log_p = jax.nn.log_softmax(p_logits)
  log_q = jax.nn.log_softmax(q_logits)
  exact = float(jnp.sum(jnp.exp(log_p) * (log_p - log_q)))
  n = 200_000
  samples = jax.random.categorical(jax.random.key(0), p_logits, shape=(n,))
  logprobs, ref_logprobs = log_p[samples], log_q[samples]
  for name in ("k1", "k3"):
    estimates = np.asarray(ppo.kl_penalty(logprobs, ref_logprobs, name), np.float64)
    standard_error = estimates.std() / np.sqrt(n)
    assert abs(estimates.mean() - exact) < 4 * standard_error + 1e-4, (name, estimates.mean(), exact)
  k3 = ppo.kl_penalty(logprobs, ref_logprobs, "k3")
  assert float(jnp.min(k3)) >= 0.0
  k2 = ppo.kl_penalty(logprobs, ref_logprobs, "k2")
  assert float(jnp.min(k2)) >= 0.0
  k1 = ppo.kl_penalty(logprobs, ref_logprobs, "k1")
  assert float(jnp.min(k1)) < 0.0  # k1 is unbiased but not per-sample non-negative, unlike k3
  with pytest.raises(ValueError, match="k4"):
    ppo.kl_penalty(logprobs, ref_logprobs, "k4")


def test_policy_loss_clipping_hand_computed():
  old_logprobs = jnp.zeros((1, 4))
  # ratios 1.5, 0.5, 1.1, 3.0 (the last one masked and must be ignored)
  logprobs = jnp.log(jnp.array([[1.5, 0.5, 1.1, 3.0]]))
  advantages = jnp.array([[1.0, 1.0, -2.0, 100.0]])
  mask = jnp.array([[1, 1, 1, 0]])
  loss, aux = jax.jit(ppo.policy_loss)(logprobs, old_logprobs, advantages, mask, 0.2)
  # token 0: A>0, ratio 1.5 -> clipped at 1.2: max(-1.5, -1.2) = -1.2 (clip active)
  # token 1: A>0, ratio 0.5 -> max(-0.5, -0.8) = -0.5 (unclipped is pessimistic)
  # token 2: A<0, ratio 1.1 inside the range: 2.2
  np.testing.assert_allclose(loss, (-1.2 - 0.5 + 2.2) / 3, rtol=1e-5)
  np.testing.assert_allclose(aux["clipfrac"], 1 / 3, rtol=1e-5)
  ratios = np.array([1.5, 0.5, 1.1])
  np.testing.assert_allclose(aux["approx_kl"], np.mean(ratios - 1 - np.log(ratios)), rtol=1e-5)
  # Gradient flows only through the unclipped tokens 1 and 2: d/dlogp of -A*ratio = -A*ratio.
  grad = jax.grad(lambda lp: ppo.policy_loss(lp, old_logprobs, advantages, mask, 0.2)[0])(logprobs)
  np.testing.assert_allclose(grad, [[0.0, -0.5 / 3, 2.2 / 3, 0.0]], rtol=1e-5, atol=1e-7)


def test_value_loss_clipping_hand_computed():
  old_values = jnp.array([[0.0, 0.0, 0.0]])
  values = jnp.array([[1.0, 0.1, -1.0]])
  returns = jnp.array([[2.0, 1.0, 5.0]])
  mask = jnp.array([[1, 1, 0]])
  loss, aux = ppo.value_loss(values, old_values, returns, mask, 0.2)
  # token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24 (clip active)
  # token 1: unclipped (0.1-1)^2 = 0.81 = clipped (inside the range) -> 0.81
  np.testing.assert_allclose(loss, 0.5 * (3.24 + 0.81) / 2, rtol=1e-5)
  np.testing.assert_allclose(aux["vf_clipfrac"], 0.5, rtol=1e-5)


def test_whiten_masked_statistics():
  rng = np.random.default_rng(2)
  x = rng.normal(3.0, 5.0, size=(4, 7))
  mask = _right_padded_mask(rng, 4, 7)
  x_dirty = jnp.asarray(np.where(mask, x, np.inf), jnp.float32)
  white = np.asarray(jax.jit(ppo.whiten)(x_dirty, jnp.asarray(mask)))
  np.testing.assert_allclose(white[mask].mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(white[mask].std(), 1.0, atol=1e-4)
  assert np.all(white[~mask] == 0.0)
  scaled = np.asarray(ppo.whiten(x_dirty, jnp.asarray(mask), shift_mean=False))
  np.testing.assert_allclose(scaled[mask].mean(), x[mask].mean(), rtol=1e-4)
  np.testing.assert_allclose(scaled[mask].std(), 1.0, atol=1e-4)


def test_entropy_from_logits():
  logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [0.0, -jnp.inf, -jnp.inf, -jnp.inf], [jnp.nan] * 4]])
  mask = jnp.array([[1, 1, 0]])
  # uniform over 4 -> log 4; one-hot -> 0; third token masked (even NaN logits are ignored)
  np.testing.assert_allclose(ppo.entropy_from_logits(logits, mask), np.log(4) / 2, rtol=1e-6)


def test_masked_mean_ignores_masked_and_empty():
  x = jnp.array([1.0, jnp.nan, 3.0])
  assert float(ppo.masked_mean(x, jnp.array([1, 0, 1]))) == 2.0
  assert float(ppo.masked_mean(x, jnp.zeros(3))) == 0.0


def test_adaptive_kl_controller():
  update = functools.partial(ppo.update_kl_coef, target=6.0, horizon=10_000, n_steps=256)
  assert update(0.1, observed_kl=12.0) > 0.1
  assert update(0.1, observed_kl=1.0) < 0.1
  np.testing.assert_allclose(update(0.1, observed_kl=6.0), 0.1)
  # proportional error is clipped at +-0.2
  np.testing.assert_allclose(update(0.1, observed_kl=1e6), 0.1 * (1 + 0.2 * 256 / 10_000), rtol=1e-6)
  assert ppo.update_kl_coef(0.1, 100.0, None, 10_000, 256) == 0.1  # fixed coefficient
  # jittable with a traced coefficient
  out = jax.jit(ppo.update_kl_coef, static_argnums=(2, 3))(jnp.float32(0.1), jnp.float32(12.0), 6.0, 10_000.0, 256)
  assert float(out) > 0.1
