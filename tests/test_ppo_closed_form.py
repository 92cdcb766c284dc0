"""The closed form of Iterative PPO's inner step, through the real PPO code path and a real Transformer.

PAPER.md ("Why it works"): with a reward r(a) and a per-token penalty beta * KL(pi || pi_ref), the exact
maximiser of E_{a~pi}[r(a)] - beta KL(pi || pi_ref) is pi*(a) ∝ pi_ref(a) exp(r(a) / beta). tests/test_toy_ppo.py
checks it with a tabular policy and re-assembled maths; here nothing is re-implemented: a one-layer
``models.transformer.Transformer`` is trained by ``solvers.train`` (PPO's row) (the jitted sampler, ``make_experience_fn``
and ``make_update_step``) on a single-turn problem whose responses are exactly one token (max_new_tokens=1),
with a jittable reward table looked up at the response token. The policy's exact next-token distribution after
training must be within 0.05 total variation of pi*, and pi* far from pi_ref (so passing is no accident of the
start). A sign error in the KL reward, the reward placement, the advantage or the ratio, or an off-by-one in the
prompt/response slot bookkeeping of the scoring passes moves the fixed point and fails the test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from iterppo_jax import ppo
from iterppo_jax import sharding
from iterppo_jax import solvers
from iterppo_jax import train_state as ts
from iterppo_jax.models import heads
from iterppo_jax.models import transformer as tf

VOCAB = 8
PROMPT_TOKEN = 3
REWARDS = np.array([1.0, 0.2, -0.5, 0.8, 0.0, 1.5, -1.0, 0.3], np.float32)  # r(a) for each token a
REF_LOGITS = np.array([0.5, -0.3, 1.0, 0.0, -1.0, 0.2, 0.7, -0.5], np.float32)  # pi_ref = softmax of these
STEPS = 60  # PPO iterations (rollout + scoring + updates)
BATCH = 512  # single-token responses per iteration
MINIBATCH = 128
LEARNING_RATE = 1e-2


def _config():
  return tf.TransformerConfig.tiny(VOCAB, num_layers=1, embed_dim=32, mlp_dim=64, num_heads=2, num_kv_heads=2,
                                   head_dim=16, max_len=4, tie_embeddings=False)


def _reward_fn(table, tokens, positions, valid, last_index, state_index):
  """r(a) at the response's last (here: only) token; the signature of ppo.make_q_reward_fn's reward_fn."""
  del positions, valid, state_index
  action = jnp.take_along_axis(tokens, last_index[:, None], axis=1)[:, 0]
  return table[action]


def _next_token_probs(trainable, params):
  model = trainable.merge(params)
  tokens = jnp.full((1, 1), PROMPT_TOKEN, jnp.int32)
  logits, _, _ = model(tokens, jnp.zeros((1, 1), jnp.int32), valid=jnp.ones((1, 1), bool))
  return np.asarray(jax.nn.softmax(logits[0, -1]), np.float64)


def _total_variation(p, q):
  return 0.5 * float(np.abs(p - q).sum())


def _make_reference(config):
  """A fresh model whose next-token logits after the prompt are exactly REF_LOGITS (a non-uniform pi_ref).

  The LM head gets the rank-one correction W += h (target - h W) / |h|^2 for the prompt's final hidden state h,
  so the rest of the network stays as initialised.
  """
  model = tf.Transformer(config, rngs=nnx.Rngs(0))
  tokens = jnp.full((1, 1), PROMPT_TOKEN, jnp.int32)
  _, hidden, _ = model(tokens, jnp.zeros((1, 1), jnp.int32), valid=jnp.ones((1, 1), bool))
  h = hidden[0, -1].astype(jnp.float32)  # [D]
  w = model.lm_head[...]  # [D, V]
  model.lm_head[...] = w + jnp.outer(h, jnp.asarray(REF_LOGITS) - h @ w) / jnp.sum(h * h)
  return model


@pytest.mark.slow  # ~15 s per case on two cores
@pytest.mark.parametrize("beta,fused", [(0.5, False), (1.0, False), (1.0, True)])
def test_ppo_reaches_kl_regularised_optimum(beta, fused):
  """fused: one epoch of one minibatch per iteration, which solvers.train runs as ppo.make_fused_step."""
  config = _config()
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  epochs, minibatch, steps = (1, BATCH, 4 * STEPS) if fused else (2, MINIBATCH, STEPS)
  n_updates = steps * epochs * (BATCH // minibatch)
  # A decaying step size: Adam (and advantage whitening) keep the step ~lr however close the policy is to
  # pi*, so a constant lr would leave it jittering at a distance set by lr rather than converging.
  policy_tx = optax.adam(optax.linear_schedule(LEARNING_RATE, 0.0, n_updates))
  policy, policy_state = ts.init_trainable(lambda: _make_reference(config), policy_tx, mesh)
  ref_params = ts.copy_params(policy_state.params)  # pi_k: frozen, and a copy (the policy state is donated)
  critic, critic_state = ts.init_trainable(lambda: heads.ScalarModel(config, rngs=nnx.Rngs(1)),
                                           optax.adam(1e-2), mesh)

  pi_ref = _next_token_probs(policy, ref_params)
  optimum = pi_ref * np.exp(REWARDS / beta)
  optimum /= optimum.sum()
  # The target is far from the start and pi_ref is not uniform, so the test cannot pass by standing still.
  assert _total_variation(pi_ref, np.full(VOCAB, 1.0 / VOCAB)) > 0.15, pi_ref.round(3)
  assert _total_variation(pi_ref, optimum) > 0.3, (pi_ref.round(3), optimum.round(3))

  # k1 is the estimator whose per-token penalty log pi - log pi_ref makes the token-level return exactly
  # r(a) - beta log(pi(a) / pi_ref(a)), the per-state objective whose maximiser is pi*; entropy_coef = 0 (an
  # entropy bonus would move the optimum to pi_ref^(beta/(beta+c)) exp(r/(beta+c)) form). Whitening is on: its
  # mean subtraction is a batch baseline, and at pi* every sample's regularised return equals beta log Z, so
  # the centred advantages vanish exactly there, whatever the critic says: pi* is a fixed point of each batch
  # update, not only in expectation. The division by the std only rescales the step (Adam rescales anyway).
  cfg = ppo.PPOConfig(kl_coef=beta, kl_estimator="k1", entropy_coef=0.0, whiten_advantages=True, gamma=1.0,
                      lam=1.0, epochs=epochs, minibatch_size=minibatch, max_new_tokens=1, temperature=1.0)
  assert ppo.fuses(cfg, BATCH) is fused
  prompts = {"tokens": np.full((1, 1), PROMPT_TOKEN, np.int32), "valid": np.ones((1, 1), bool)}
  state = ppo.PPOState(policy=policy_state, critic=critic_state)
  state, metrics = solvers.train(solvers.SOLVERS["ppo"], policy, critic, solvers.init_state(state, beta),
                                 ref_params, _reward_fn, jnp.asarray(REWARDS), prompts, cfg, steps=steps,
                                 batch_size=BATCH, seed=0, eos_id=VOCAB - 1, pad_id=0)

  trained = _next_token_probs(policy, state.model.policy.params)
  tv = _total_variation(trained, optimum)
  print(f"beta={beta} TV(pi_ref, pi*)={_total_variation(pi_ref, optimum):.3f} TV(trained, pi*)={tv:.4f}")
  print("pi_ref ", pi_ref.round(3), "\npi*    ", optimum.round(3), "\ntrained", trained.round(3))
  assert metrics["ppo/response_len"] == 1.0
  assert tv < 0.05, (beta, trained.round(3), optimum.round(3))
  # The sampled KL estimate agrees with the exact KL(pi || pi_ref) of the trained policy's last rollout.
  exact_kl = float(np.sum(trained * np.log(trained / pi_ref)))
  assert abs(metrics["ppo/kl"] - exact_kl) < 0.1 + 0.2 * exact_kl, (metrics["ppo/kl"], exact_kl)
