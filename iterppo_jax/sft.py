"""Behaviour cloning (SFT) of pi_0 on logged business messages: Iterative PPO's warm start (PAPER.md, step 1).

The loss is the next-token negative log-likelihood of the action tokens only (data.encode_pairs' loss_mask):
the model learns what the business sent given the state, never to predict the customer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from iterppo_jax import data as data_lib
from iterppo_jax import metrics as metrics_lib
from iterppo_jax import train_state as ts
from iterppo_jax.ppo import masked_mean


def token_nll(model, batch):
  """Per-token NLL of tokens[:, 1:] given the prefix, and the matching mask. Shapes [B, L-1]."""
  logits, _, _ = model(batch["tokens"], batch["positions"], valid=batch["valid"])
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  targets = batch["tokens"][:, 1:]
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits[:, :-1], axis=-1) == targets)
  return nll, correct, batch["loss_mask"][:, 1:]


def sft_loss(model, batch):
  nll, correct, mask = token_nll(model, batch)
  loss = masked_mean(nll, mask)
  return loss, {"accuracy": masked_mean(correct.astype(jnp.float32), mask), "tokens": jnp.sum(mask)}


def make_sft_step(trainable: ts.Trainable):
  """`step(state, batch) -> (state, metrics)`, batch from data.encode_pairs (action loss only)."""
  return ts.make_train_step(trainable, sft_loss)


_KEYS = ("tokens", "positions", "valid", "loss_mask")


def make_eval_fn(trainable: ts.Trainable):
  def evaluate(params, batch):
    model = trainable.merge(params)
    nll, correct, mask = token_nll(model, batch)
    mask = mask * batch["batch_valid"][:, None]  # rows repeated to fill the last batch count once
    return jnp.sum(nll * mask), jnp.sum(correct * mask), jnp.sum(mask)
  return jax.jit(evaluate)


def evaluate(eval_fn, params, arrays: dict, batch_size: int, mesh) -> dict:
  """Mean action NLL and token accuracy over all rows (padded to whole batches, padding masked)."""
  total = correct = count = 0.0
  arrays = {k: arrays[k] for k in _KEYS}
  for batch in data_lib.batch_iterator(arrays, batch_size, seed=0, shuffle=False, drop_remainder=False):
    n, c, m = eval_fn(params, ts.device_batch(batch, mesh))
    total, correct, count = total + float(n), correct + float(c), count + float(m)
  return {"nll": total / max(count, 1.0), "accuracy": correct / max(count, 1.0)}


def train_sft(trainable: ts.Trainable, state: ts.TrainState, arrays: dict, *, steps: int,
              batch_size: int, seed: int, writer=None, log_every: int = 50, desc: str = "sft",
              start_step: int = 0):
  """Runs `steps` SFT steps over shuffled epochs of `arrays`; returns the new state and last metrics."""
  step_fn = make_sft_step(trainable)
  arrays = {k: arrays[k] for k in _KEYS}
  it = data_lib.batch_iterator(arrays, batch_size, seed=seed, epochs=1_000_000, shuffle=True)
  for _ in range(start_step):  # a resumed run continues the same data order
    next(it)
  last = {}
  for i in metrics_lib.progress(range(start_step, steps), total=steps - start_step, desc=desc):
    state, m = step_fn(state, ts.device_batch(next(it), trainable.mesh))
    if (i + 1) % log_every == 0 or i + 1 == steps:
      last = {f"sft/{k}": float(v) for k, v in m.items()}
      if writer is not None:
        writer.write(i + 1, last, phase=desc)
  return state, last
