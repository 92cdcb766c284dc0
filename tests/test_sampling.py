"""Tests for sampling.py: greedy against an argmax loop over full forward passes, returned
log-probs against a full forward pass, per-row end tokens, padding sides, no recompilation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iterppo_jax import sampling
from iterppo_jax.models import transformer as tr

VOCAB, PAD, P, N = 61, 0, 6, 5


@pytest.fixture(scope='module')
def model():
  config = tr.TransformerConfig.tiny(VOCAB, num_layers=2, embed_dim=64, mlp_dim=128, num_heads=4,
                                     num_kv_heads=2, head_dim=16, max_len=64,
                                     tie_embeddings=False)
  return tr.Transformer(config, rngs=nnx.Rngs(0))


@nnx.jit
def full_logits(model, tokens, valid):
  return model(tokens, tr.positions_from_valid(valid), valid=valid)[0]


def prompts(lengths=(6, 3, 1), seed=0, side='left'):
  """[B,P] prompts with `lengths` real tokens per row; the same tokens whichever padding side."""
  rng = np.random.default_rng(seed)
  real = [rng.integers(1, VOCAB, size=n).astype(np.int32) for n in lengths]
  pad = [np.full(P - n, PAD, np.int32) for n in lengths]
  rows = [np.concatenate([p, r] if side == 'left' else [r, p]) for r, p in zip(real, pad)]
  valid = [np.concatenate([p == -1, r >= 0] if side == 'left' else [r >= 0, p == -1])
           for r, p in zip(real, pad)]
  return jnp.asarray(np.stack(rows)), jnp.asarray(np.stack(valid))


def run(model, tokens, valid, seed=0, **kwargs):
  graphdef, state = nnx.split(model)
  options = dict(max_new_tokens=N, eos_id=VOCAB - 1, pad_id=PAD)
  options.update(kwargs)
  return sampling.sample(graphdef, state, tokens, valid, jax.random.key(seed), **options)


def test_greedy_equals_argmax_loop(model):
  tokens, valid = prompts()
  out = run(model, tokens, valid, greedy=True, ignore_eos=True)
  for row in range(tokens.shape[0]):
    sequence = list(np.asarray(tokens[row])[np.asarray(valid[row])])
    for _ in range(N):
      # Right-padded to one fixed length, so the reference compiles once.
      length = len(sequence)
      seq = jnp.asarray([sequence + [PAD] * (P + N - length)], jnp.int32)
      logits = full_logits(model, seq, jnp.arange(P + N)[None] < length)
      sequence.append(int(jnp.argmax(logits[0, length - 1])))
    np.testing.assert_array_equal(out.tokens[row], sequence[-N:])
  assert bool(jnp.all(out.valid)) and list(out.lengths) == [N] * 3


def test_logprobs_match_full_forward(model):
  tokens, valid = prompts(seed=1)
  out = run(model, tokens, valid, temperature=0.7, top_p=0.9, seed=3, ignore_eos=True)
  sequence = jnp.concatenate([out.prompt_tokens, out.tokens], axis=1)
  sequence_valid = jnp.concatenate([out.prompt_valid, out.valid], axis=1)
  logp = jax.nn.log_softmax(full_logits(model, sequence, sequence_valid), axis=-1)
  # The token in slot P + i is predicted at slot P + i - 1.
  expected = jnp.take_along_axis(logp[:, P - 1:-1], out.tokens[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(out.logprobs, expected, atol=1e-4)
  # Temperature/top-p change the sampling distribution, not the policy log-probs.
  assert not np.allclose(out.logprobs, out.sampling_logprobs)


def test_untempered_sampling_logprobs_equal_policy_logprobs(model):
  tokens, valid = prompts(seed=2)
  out = run(model, tokens, valid, seed=5, ignore_eos=True)
  np.testing.assert_allclose(out.logprobs, out.sampling_logprobs, atol=1e-5)


def test_stops_at_end_token_per_row(model):
  """Take the token row 0 produces at step 2 as the end token: each row must stop at its own
  first occurrence of it, then emit padding."""
  tokens, valid = prompts(seed=4)
  free = run(model, tokens, valid, greedy=True, ignore_eos=True)
  eos = int(free.tokens[0, 2])
  out = run(model, tokens, valid, greedy=True, eos_id=[eos, VOCAB + 5])
  for row in range(tokens.shape[0]):
    produced = list(np.asarray(free.tokens[row]))
    length = produced.index(eos) + 1 if eos in produced else N
    assert int(out.lengths[row]) == length
    np.testing.assert_array_equal(out.valid[row], np.arange(N) < length)
    np.testing.assert_array_equal(out.tokens[row, :length], produced[:length])
    assert np.all(np.asarray(out.tokens[row, length:]) == PAD)
    assert np.all(np.asarray(out.logprobs[row, length:]) == 0)
  assert int(out.lengths[0]) == 3


def test_all_rows_stop_when_end_token_is_certain():
  """A GPT-2-style model whose final LayerNorm outputs the constant e_0 (scale 0, bias e_0) and
  whose tied embedding has column 0 zero except at the end token: logits are 50 for the end
  token and 0 elsewhere, so every sampled row ends after one token and the loop exits."""
  eos = VOCAB - 1
  config = tr.TransformerConfig.tiny(VOCAB, num_layers=1, embed_dim=32, mlp_dim=64, num_heads=2,
                                     num_kv_heads=2, head_dim=16, max_len=64, style='gpt2')
  model = tr.Transformer(config, rngs=nnx.Rngs(0))
  norm = model.trunk.final_norm
  norm.scale.set_value(jnp.zeros_like(norm.scale[...]))
  norm.bias.set_value(jnp.zeros_like(norm.bias[...]).at[0].set(1.))
  embedding = model.trunk.embedding[...]
  model.trunk.embedding.set_value(embedding.at[:, 0].set(0.).at[eos, 0].set(50.))
  tokens, valid = prompts(seed=6)
  out = run(model, tokens, valid, seed=1, eos_id=eos)
  np.testing.assert_array_equal(out.tokens[:, 0], eos)
  np.testing.assert_array_equal(out.lengths, 1)
  np.testing.assert_array_equal(out.valid[:, 1:], False)
  assert np.all(np.asarray(out.tokens[:, 1:]) == PAD)
  # With ignore_eos the rows keep going (and keep choosing the end token).
  forced = run(model, tokens, valid, seed=1, eos_id=eos, ignore_eos=True)
  np.testing.assert_array_equal(forced.lengths, N)


def test_left_and_right_padding_agree(model):
  left = run(model, *prompts(side='left'), greedy=True)
  right = run(model, *prompts(side='right'), greedy=True)
  np.testing.assert_array_equal(left.tokens, right.tokens)
  np.testing.assert_array_equal(left.prompt_tokens, right.prompt_tokens)
  np.testing.assert_allclose(left.logprobs, right.logprobs, atol=1e-5)


def test_no_recompilation_across_batches_and_temperatures(model):
  run(model, *prompts(seed=7), temperature=0.8)
  before = sampling.num_traces()
  run(model, *prompts(lengths=(2, 5, 4), seed=8), temperature=0.8, seed=1)
  run(model, *prompts(lengths=(1, 1, 6), seed=9), temperature=1.3, seed=2)
  assert sampling.num_traces() == before


def test_tiny_top_p_is_greedy(model):
  tokens, valid = prompts(seed=10)
  greedy = run(model, tokens, valid, greedy=True)
  nucleus = run(model, tokens, valid, top_p=1e-6, seed=11)
  np.testing.assert_array_equal(greedy.tokens, nucleus.tokens)
  np.testing.assert_allclose(nucleus.sampling_logprobs, 0., atol=1e-6)


def test_top_p_filter_keeps_smallest_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.isfinite(np.asarray(sampling.top_p_filter(logits, 0.75)))
  np.testing.assert_array_equal(kept, [[True, True, False, False]])
  kept = np.isfinite(np.asarray(sampling.top_p_filter(logits, 0.9)))
  np.testing.assert_array_equal(kept, [[True, True, True, False]])


def test_remat_model_samples_as_the_plain_one(model):
  """A model built with remat (a training memory option) samples the same tokens: the sampler's loop runs no
  backward pass, and remat of a module the loop closes over once failed with a TraceContextError."""
  remat = tr.Transformer(dataclasses.replace(model.config, remat=True), rngs=nnx.Rngs(0))
  tokens, valid = prompts()
  plain, rematted = (run(m, tokens, valid, seed=3, ignore_eos=True) for m in (model, remat))
  np.testing.assert_array_equal(rematted.tokens, plain.tokens)
  np.testing.assert_allclose(rematted.logprobs, plain.logprobs, atol=1e-6)
