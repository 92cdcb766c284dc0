"""Gradient accumulation (optax.MultiSteps through train_state.make_optimizer) equals one larger batch."""

import jax
import numpy as np
from flax import nnx

from iterppo_jax import sft
from iterppo_jax import sharding
from iterppo_jax import train_state as ts
from iterppo_jax.models import transformer as tf


def test_two_micro_batches_equal_one_batch():
  cfg = tf.TransformerConfig(vocab_size=32, num_layers=1, embed_dim=32, mlp_dim=64, num_heads=2, num_kv_heads=1,
                             head_dim=16, max_len=12)
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  rng = np.random.default_rng(0)
  B, L = 8, 12
  batch = {"tokens": rng.integers(0, 32, (B, L)).astype(np.int32),
           "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)), "valid": np.ones((B, L), bool),
           # Every row has the same number of loss tokens, so the mean over the batch is the mean of halves.
           "loss_mask": (np.arange(L) >= 6)[None].repeat(B, 0).astype(np.float32)}
  make = lambda: tf.Transformer(cfg, rngs=nnx.Rngs(0))

  def train(grad_accum, batches):
    opt = ts.OptimizerConfig(learning_rate=1e-2, warmup_steps=1, grad_accum=grad_accum)
    trainable, state = ts.init_trainable(make, ts.make_optimizer(opt), mesh)
    step = sft.make_sft_step(trainable)
    for b in batches:
      state, _ = step(state, ts.device_batch(b, mesh))
    return state.params

  halves = [{k: v[:B // 2] for k, v in batch.items()}, {k: v[B // 2:] for k, v in batch.items()}]
  accumulated = train(2, halves)
  full = train(1, [batch])
  start = train(1, [])  # the initial parameters, built the same (jitted) way
  moved = False
  for a, b, s in zip(jax.tree.leaves(accumulated), jax.tree.leaves(full), jax.tree.leaves(start)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    moved |= not np.allclose(np.asarray(a), np.asarray(s))
  assert moved  # the optimizer did update (after the second micro-batch)
  # After only one micro-batch nothing has been applied yet.
  one = train(2, halves[:1])
  for a, s in zip(jax.tree.leaves(one), jax.tree.leaves(start)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(s))
