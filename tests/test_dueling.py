"""The dueling Q-model (models/heads.py): Q(s, a) = V(s) + A(s, a), V read where the state ends."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from iterppo_jax import ppo
from iterppo_jax import qfit
from iterppo_jax import sharding
from iterppo_jax import train_state as ts
from iterppo_jax.models import heads
from iterppo_jax.models import transformer as tf

VOCAB, P, N = 32, 6, 4


def _model():
  config = tf.TransformerConfig.tiny(VOCAB, num_layers=1, embed_dim=32, mlp_dim=64, num_heads=2, num_kv_heads=1,
                                     head_dim=16, max_len=P + N)
  return heads.ScalarModel(config, rngs=nnx.Rngs(0), dueling=True)


def _pairs(prompts, actions):
  """Right-padded [prompt | action | pad] rows as data.encode_pairs lays them out."""
  L = P + N
  tokens = np.zeros((len(prompts), L), np.int32)
  valid = np.zeros((len(prompts), L), bool)
  for b, (p, a) in enumerate(zip(prompts, actions)):
    tokens[b, :len(p) + len(a)] = p + a
    valid[b, :len(p) + len(a)] = True
  positions = np.where(valid, np.cumsum(valid, 1) - 1, 0).astype(np.int32)
  return {"tokens": tokens, "positions": positions, "valid": valid,
          "last_index": np.asarray([len(p) + len(a) - 1 for p, a in zip(prompts, actions)], np.int32),
          "state_index": np.asarray([len(p) - 1 for p in prompts], np.int32)}


def test_value_ignores_the_action_and_q_is_value_plus_advantage():
  model = _model()
  # Make the heads non-trivial so V and A differ from 0.
  model.value_bias[...] = jnp.asarray([0.3])
  model.head_bias[...] = jnp.asarray([-0.2])
  batch = _pairs([[3, 4, 5], [3, 4, 5], [7, 8]], [[9, 10], [11, 12, 13], [9]])
  q, v = qfit.q_and_v(model, {k: jnp.asarray(x) for k, x in batch.items()})
  assert np.isclose(v[0], v[1]) and not np.isclose(q[0], q[1])  # same state, other action: same V, other Q
  assert not np.isclose(v[0], v[2])  # another state: another V
  np.testing.assert_allclose(q, qfit.q_scalar(model, {k: jnp.asarray(x) for k, x in batch.items()}))


def test_ppo_reward_layout_gives_the_same_q_as_logged_pairs():
  """PPO scores [left-padded prompt | response] with state_index P-1; the Q-fit scores right-padded pairs."""
  model = _model()
  trainable, state = ts.init_trainable(lambda: model, optax.sgd(0.1),
                                       sharding.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)],
                                                          devices=jax.devices()[:1]))
  prompts, actions = [[3, 4, 5], [7, 8, 9, 10, 11]], [[12, 13], [14, 15, 16]]
  expected = qfit.make_predict_fn(trainable, "bce")(state.params, _pairs(prompts, actions))
  prompt_tokens = np.zeros((2, P), np.int32)
  prompt_valid = np.zeros((2, P), bool)
  response = np.zeros((2, N), np.int32)
  response_valid = np.zeros((2, N), bool)
  for b, (p, a) in enumerate(zip(prompts, actions)):
    prompt_tokens[b, P - len(p):], prompt_valid[b, P - len(p):] = p, True
    response[b, :len(a)], response_valid[b, :len(a)] = a, True
  tokens, valid, positions = ppo.sequence_layout(jnp.asarray(prompt_tokens), jnp.asarray(prompt_valid),
                                                 jnp.asarray(response), jnp.asarray(response_valid))
  last = jnp.asarray([len(a) - 1 for a in actions])
  score = ppo.make_q_reward_fn(trainable, "bce")(state.params, tokens, positions, valid, P + last,
                                                 jnp.full_like(last, P - 1))
  np.testing.assert_allclose(score, expected, atol=1e-5)


def test_fit_step_learns_the_action_effect_into_a():
  """Two actions at two states with returns that depend on the pair: after fitting, A orders the actions
  differently in the two states and V sits between them."""
  model = _model()
  trainable, state = ts.init_trainable(lambda: model, optax.adam(3e-2),
                                       sharding.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)],
                                                          devices=jax.devices()[:1]))
  prompts = [[3, 4, 5], [3, 4, 5], [6, 7, 8], [6, 7, 8]]
  actions = [[20], [21], [20], [21]]
  batch = {**_pairs(prompts, actions), "target": np.asarray([0.9, 0.1, 0.1, 0.9], np.float32)}
  step = qfit.make_qfit_step(trainable, kind="bce")
  for _ in range(150):
    state, metrics = step(state, ts.device_batch(batch, trainable.mesh))
  q, v = qfit.q_and_v(trainable.merge(state.params), {k: jnp.asarray(x) for k, x in batch.items()})
  q, v = jax.nn.sigmoid(q), jax.nn.sigmoid(v)
  np.testing.assert_allclose(q, batch["target"], atol=0.1)
  assert q[0] > q[1] and q[3] > q[2]  # the right action differs by state
  np.testing.assert_allclose(v, 0.5, atol=0.15)  # V: the state's mean return over the logged actions
