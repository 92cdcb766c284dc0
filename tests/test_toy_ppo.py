"""The closed-form property behind Iterative PPO's inner step, on a one-token "bandit".

With a reward r(a) and a KL penalty beta * KL(pi || pi_ref), the exact maximiser of E_pi[r] - beta KL(pi || pi_ref)
is pi*(a) ∝ pi_ref(a) exp(r(a) / beta) (PAPER.md, "Why it works"). A tabular policy trained with the PPO maths of
iterppo_jax/ppo.py (sampled actions, token_rewards with the k1 estimator, a scalar value baseline, GAE with
gamma = lam = 1, whitened advantages, clipped policy and value losses, several epochs of minibatches) must land on
pi*. A bug in the KL sign, the reward placement, the advantage sign or the ratio would move it away.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iterppo_jax import ppo

REWARDS = jnp.array([1.0, 0.2, -0.5, 0.8, 0.0, 1.5, -1.0, 0.3])  # r(a), |A| = 8
REF_LOGITS = jnp.array([0.5, -0.3, 1.0, 0.0, -1.0, 0.2, 0.7, -0.5])  # a non-uniform pi_ref

NUM_ITERATIONS = 120
BATCH = 4096
EPOCHS = 4
MINIBATCHES = 4
CLIP_EPS = 0.2


def _optimal_policy(beta):
  return jax.nn.softmax(jax.nn.log_softmax(REF_LOGITS) + REWARDS / beta)


@functools.partial(jax.jit, static_argnames=("beta",))
def _train(key, beta):
  """Runs NUM_ITERATIONS rollouts + PPO updates; returns the final policy probabilities."""
  ref_logprobs_table = jax.nn.log_softmax(REF_LOGITS)
  params = {"logits": REF_LOGITS, "value": jnp.zeros(())}  # start at pi_ref, as RLHF does
  total_updates = NUM_ITERATIONS * EPOCHS * MINIBATCHES
  optimizer = optax.adam(optax.linear_schedule(0.05, 0.0, total_updates))
  opt_state = optimizer.init(params)
  mask = jnp.ones((BATCH, 1), bool)  # single-token responses

  def loss_fn(params, batch):
    logprobs = jax.nn.log_softmax(params["logits"])[batch["actions"]]
    values = jnp.broadcast_to(params["value"], logprobs.shape)
    pg_loss, pg_aux = ppo.policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], batch["mask"], CLIP_EPS)
    vf_loss, _ = ppo.value_loss(values, batch["old_values"], batch["returns"], batch["mask"], 1.0)
    return pg_loss + 0.5 * vf_loss, pg_aux

  def update(carry, minibatch):
    params, opt_state = carry
    grads, _ = jax.grad(loss_fn, has_aux=True)(params, minibatch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  def iteration(carry, step):
    params, opt_state = carry
    key_sample, key_shuffle = jax.random.split(jax.random.fold_in(key, step))
    # Rollout: one token a ~ pi per prompt.
    actions = jax.random.categorical(key_sample, params["logits"], shape=(BATCH, 1))
    old_logprobs = jax.nn.log_softmax(params["logits"])[actions]
    ref_logprobs = ref_logprobs_table[actions]
    rewards, _ = ppo.token_rewards(REWARDS[actions[:, 0]], old_logprobs, ref_logprobs, mask, beta, "k1")
    old_values = jnp.broadcast_to(params["value"], (BATCH, 1))
    advantages, returns = ppo.gae(rewards, old_values, mask, 1.0, 1.0)
    advantages = ppo.whiten(advantages, mask)
    batch = {"actions": actions, "old_logprobs": old_logprobs, "advantages": advantages, "returns": returns,
             "old_values": old_values, "mask": mask}

    def epoch(carry, epoch_key):
      order = jax.random.permutation(epoch_key, BATCH).reshape(MINIBATCHES, BATCH // MINIBATCHES)
      minibatches = jax.tree.map(lambda x: x[order], batch)
      return jax.lax.scan(update, carry, minibatches)

    carry, _ = jax.lax.scan(epoch, (params, opt_state), jax.random.split(key_shuffle, EPOCHS))
    return carry, None

  (params, _), _ = jax.lax.scan(iteration, (params, opt_state), jnp.arange(NUM_ITERATIONS))
  return jax.nn.softmax(params["logits"])


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_ppo_converges_to_kl_regularised_optimum(beta):
  policy = np.asarray(_train(jax.random.key(0), beta))
  optimum = np.asarray(_optimal_policy(beta))
  reference = np.asarray(jax.nn.softmax(REF_LOGITS))
  total_variation = 0.5 * np.abs(policy - optimum).sum()
  # The target is far from the start, so passing is not an accident of the initialisation.
  assert 0.5 * np.abs(reference - optimum).sum() > 0.2
  assert total_variation < 0.05, (beta, policy.round(3), optimum.round(3))
