"""studies/q_representation_probe.py (experiments.q_representation_probe): the frozen-feature Q heads and the linear probe."""

import numpy as np

from iterppo_jax.studies import q_representation_probe as probe


def _chain_data(n=3000, seed=0):
  """Two-step episodes: at s0 action a in {0, 1} leads to s1 = a; at s1 pi's action gives reward p[s1]."""
  rng = np.random.default_rng(seed)
  p = np.asarray([0.2, 0.8])
  a0 = rng.integers(2, size=n)
  r1 = (rng.random(n) < p[a0]).astype(np.float32)
  # Rows: decision 0 at s0 (feature = its action), then decision 1 at s1 (feature = 2 + s1, pi's only action).
  x = np.zeros((2 * n, 4), np.float32)
  x[0::2, 0], x[0::2, 1] = a0 == 0, a0 == 1
  x[1::2, 2], x[1::2, 3] = a0 == 0, a0 == 1
  rewards = np.zeros(2 * n, np.float32)
  rewards[1::2] = r1
  returns = rewards.copy()
  returns[0::2] = 0.9 * r1
  next_x = np.roll(x, -1, axis=0)
  live = np.zeros(2 * n, bool)
  live[0::2] = True
  return x, returns, rewards, next_x, live


def test_both_estimators_rank_the_two_actions():
  x, returns, rewards, next_x, live = _chain_data()
  train = np.ones(len(x), bool)
  for estimator in ("mc", "sarsa"):
    q = probe.fit_head(x, returns, rewards, next_x, live, train, estimator=estimator, gamma=0.9, sweeps=8,
                       steps=100)
    q0, q1 = q(np.eye(4, dtype=np.float32)[:2])
    # Q(s0, 1) = 0.9 * 0.8, Q(s0, 0) = 0.9 * 0.2: the order, and roughly the values.
    assert q1 > q0 and abs(q1 - 0.72) < 0.12 and abs(q0 - 0.18) < 0.12, (estimator, q0, q1)


def test_one_hot_and_linear_r2():
  feats, vocab = probe.one_hot([("a", 1), ("b", 1), ("a", 2)])
  assert feats.shape == (3, 4) and feats.sum(1).tolist() == [2, 2, 2]
  unseen, _ = probe.one_hot([("c", 1)], vocab)
  assert unseen.sum() == 1  # 'c' has no column, the second position's 1 has
  rng = np.random.default_rng(0)
  x = rng.normal(size=(400, 3))
  y = np.stack([x[:, 0] > 0, rng.random(400) > 0.5], 1).astype(float)
  r2 = probe.linear_r2(x, y, np.arange(400) % 5 != 0)
  assert r2[0] > 0.4 and r2[1] < 0.1


def test_reaction_training_learns_which_words_follow_which_message():
  from flax import nnx
  from iterppo_jax.models import transformer as tf

  class Words:  # a tokenizer stand-in: one id per distinct word
    def encode(self, text):
      return [3 + (hash(w) % 20) for w in text.split()]

  model = tf.Transformer(tf.TransformerConfig.tiny(32), rngs=nnx.Rngs(0))
  # Message A (token 5) is answered with words of one reply, message B (token 6) with another's.
  tokens = np.asarray([[1, 2, 5, 0], [1, 2, 6, 0]] * 32, np.int32)
  arrays = {"tokens": tokens, "positions": np.tile(np.arange(4), (64, 1)).astype(np.int32),
            "valid": tokens > 0, "last_index": np.full(64, 2, np.int32)}
  replies = ["too expensive", "i like it"] * 32
  first = probe.train_reaction(model, Words(), arrays, replies, steps=1, learning_rate=3e-3)
  last = probe.train_reaction(model, Words(), arrays, replies, steps=150, learning_rate=3e-3)
  assert last < 0.25 * first
