"""Tests for models/transformer.py and models/heads.py: shapes, logical names, KV-cache
equivalence, padding invariance, GQA, remat and bf16."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iterppo_jax import sharding
from iterppo_jax.models import heads
from iterppo_jax.models import transformer as tr

STYLES = ['llama', 'gpt2']
LOGICAL_NAMES = {'vocab', 'embed', 'heads', 'kv_heads', 'kv', 'mlp', 'layers', 'norm', None}


def small_config(style='llama', **overrides):
  base = dict(num_layers=2, embed_dim=64, mlp_dim=128, num_heads=4, num_kv_heads=2, head_dim=16,
              max_len=64, style=style, tie_embeddings=style == 'gpt2')
  return tr.TransformerConfig.tiny(vocab_size=97, **{**base, **overrides})


def make_model(style='llama', seed=0, **overrides):
  return tr.Transformer(small_config(style, **overrides), rngs=nnx.Rngs(seed))


def left_padded_batch(lengths, total, vocab=97, seed=0):
  """Tokens [B,total] int32 and valid [B,total] bool, each row left-padded to `total`."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, size=(len(lengths), total)).astype(np.int32)
  valid = np.arange(total)[None, :] >= total - np.asarray(lengths)[:, None]
  tokens = np.where(valid, tokens, 0)
  return jnp.asarray(tokens), jnp.asarray(valid)


@nnx.jit
def call(model, tokens, positions, cache=None, cache_index=None, valid=None):
  """Jitted model call: eager op-by-op dispatch would dominate the test time."""
  return model(tokens, positions, None, cache, cache_index, valid=valid)


def forward(model, tokens, valid):
  return call(model, tokens, tr.positions_from_valid(valid), valid=valid)


@pytest.mark.parametrize('style', STYLES)
def test_builds_and_runs(style):
  model = make_model(style)
  tokens, valid = left_padded_batch([5, 8], 8)
  logits, hidden, cache = forward(model, tokens, valid)
  assert logits.shape == (2, 8, 97) and logits.dtype == jnp.float32
  assert hidden.shape == (2, 8, 64)
  assert cache is None
  assert np.all(np.isfinite(np.asarray(logits)))


def test_tiny_param_count():
  for style in STYLES:
    config = tr.TransformerConfig.tiny(vocab_size=1024, style=style)
    abstract = nnx.eval_shape(lambda: tr.Transformer(config, rngs=nnx.Rngs(0)))
    assert 2e6 <= tr.num_params(abstract) <= 4.5e6, (style, tr.num_params(abstract))


@pytest.mark.parametrize('style', STYLES)
def test_every_param_has_logical_names(style):
  model = make_model(style, tie_embeddings=False)
  params = nnx.state(model, nnx.Param)
  leaves = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  assert len(leaves) > 10
  for path, variable in leaves:
    names = sharding.variable_logical_names(variable)
    assert names is not None, jax.tree_util.keystr(path)
    assert len(names) == variable[...].ndim, jax.tree_util.keystr(path)
    assert set(names) <= LOGICAL_NAMES, (jax.tree_util.keystr(path), names)


def test_attention_mask_and_positions():
  valid = jnp.array([[False, True, True], [True, True, False]])
  mask = np.asarray(tr.make_attention_mask(valid))
  np.testing.assert_array_equal(mask[0], [[0, 0, 0], [0, 1, 0], [0, 1, 1]])
  np.testing.assert_array_equal(mask[1], [[1, 0, 0], [1, 1, 0], [0, 0, 0]])
  np.testing.assert_array_equal(tr.positions_from_valid(valid), [[0, 0, 1], [0, 1, 1]])


@pytest.mark.parametrize('style', STYLES)
@pytest.mark.parametrize('chunk', [1, 2])
def test_kv_cache_matches_full_forward(style, chunk):
  """Prefill a left-padded prompt, then decode the rest `chunk` tokens at a time."""
  model = make_model(style)
  total, prefill = 10, 6
  tokens, valid = left_padded_batch([10, 7, 3], total)  # last row: prefill is all padding
  positions = tr.positions_from_valid(valid)
  full_logits, _, _ = call(model, tokens, positions, valid=valid)

  cache = tr.init_cache(model.config, batch=3, cache_len=total)
  logits, _, cache = call(model, tokens[:, :prefill], positions[:, :prefill], cache, 0,
                          valid=valid[:, :prefill])
  pieces = [logits]
  for start in range(prefill, total, chunk):
    piece = slice(start, start + chunk)
    logits, _, cache = call(model, tokens[:, piece], positions[:, piece], cache, start,
                            valid=valid[:, piece])
    pieces.append(logits)
  cached_logits = jnp.concatenate(pieces, axis=1)
  mask = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(cached_logits)[mask], np.asarray(full_logits)[mask],
                             atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(cache['valid'], valid)


@pytest.mark.parametrize('style', STYLES)
def test_padding_invariance(style):
  """A padded row gives the same logits at its real tokens as the unpadded row alone."""
  model = make_model(style)
  tokens, valid = left_padded_batch([4, 9], 9, seed=1)
  alone = tokens[:1, 5:]
  alone_logits, _, _ = forward(model, alone, jnp.ones_like(alone, bool))
  batch_logits, _, _ = forward(model, tokens, valid)
  np.testing.assert_allclose(batch_logits[0, 5:], alone_logits[0], atol=1e-5, rtol=1e-5)
  # Right padding: the same row at the start of the window.
  right = jnp.zeros_like(tokens).at[0, :4].set(alone[0])
  right_valid = jnp.arange(9)[None] < jnp.array([[4], [9]])
  right_logits, _, _ = forward(model, right, right_valid)
  np.testing.assert_allclose(right_logits[0, :4], alone_logits[0], atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_equals_repeated_heads():
  """GQA with K kv heads is MHA whose kv projections are repeated over each group of G heads."""
  gqa = make_model('llama', num_heads=4, num_kv_heads=1)
  mha = make_model('llama', num_heads=4, num_kv_heads=4)
  state = nnx.state(gqa, nnx.Param)
  nnx.update(mha, state)  # copies every param; k/v (other shapes) are overwritten below
  for block_gqa, block_mha in zip(gqa.trunk.blocks, mha.trunk.blocks):
    for name in ('k_proj', 'v_proj'):
      kernel = getattr(block_gqa.attn, name)[...]
      getattr(block_mha.attn, name).set_value(jnp.repeat(kernel, 4, axis=1))
  tokens, valid = left_padded_batch([6, 3], 6)
  np.testing.assert_allclose(forward(gqa, tokens, valid)[0], forward(mha, tokens, valid)[0],
                             atol=1e-5, rtol=1e-5)


def test_remat_gives_same_gradients():
  tokens, valid = left_padded_batch([6, 4], 6)

  def loss(model):
    logits, _, _ = forward(model, tokens, valid)
    return jnp.mean(jax.nn.logsumexp(logits, -1))

  plain, remat = make_model('llama'), make_model('llama', remat=True)
  g_plain = nnx.jit(nnx.grad(loss))(plain)
  g_remat = nnx.jit(nnx.grad(loss))(remat)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_compute_keeps_f32_params_and_logits():
  f32 = make_model('llama')
  bf16 = make_model('llama', dtype='bfloat16')
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  tokens, valid = left_padded_batch([6, 4], 6)
  logits, hidden, _ = forward(bf16, tokens, valid)
  assert logits.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
  reference = np.asarray(forward(f32, tokens, valid)[0])
  np.testing.assert_allclose(np.asarray(logits)[np.asarray(valid)],
                             reference[np.asarray(valid)], atol=0.1)
  # The cache follows the compute dtype and decoding still runs.
  cache = tr.init_cache(bf16.config, 2, 8)
  assert cache['layers'][0]['k'].dtype == jnp.bfloat16
  out, _, _ = call(bf16, tokens, tr.positions_from_valid(valid), cache, 0, valid=valid)
  assert np.all(np.isfinite(np.asarray(out)))


# ---- heads ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('style', STYLES)
def test_scalar_model_from_policy_copies_trunk(style):
  policy = make_model(style)
  critic = heads.scalar_model_from_policy(policy, rngs=nnx.Rngs(1))
  tokens, valid = left_padded_batch([6, 3], 6)
  positions = tr.positions_from_valid(valid)
  values = nnx.jit(lambda m: m(tokens, positions, valid=valid))(critic)
  assert values.shape == (2, 6) and values.dtype == jnp.float32
  _, policy_hidden, _ = call(policy, tokens, positions, valid=valid)
  critic_hidden, _ = nnx.jit(lambda m: m(tokens, positions, valid=valid))(critic.trunk)
  np.testing.assert_array_equal(policy_hidden, critic_hidden)
  # Copied, not aliased: donating the policy's buffers must not delete the critic's.
  assert critic.trunk.embedding[...] is not policy.trunk.embedding[...]
  # Padding invariance of the values, as for the logits.
  alone = nnx.jit(lambda m: m(tokens[1:, 3:], positions[1:, 3:]))(critic)
  np.testing.assert_allclose(values[1, 3:], alone[0], atol=1e-5, rtol=1e-5)


def test_scalar_model_params_have_logical_names():
  model = heads.ScalarModel(small_config(), rngs=nnx.Rngs(0))
  variables = jax.tree.leaves(nnx.state(model, nnx.Param),
                              is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert all(sharding.variable_logical_names(v) is not None for v in variables)
  assert sharding.variable_logical_names(model.head_kernel) == ('embed', None)


def test_config_validation():
  with pytest.raises(ValueError):
    small_config(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError):
    small_config(style='t5')
  config = tr.TransformerConfig.llama_1b()
  assert dataclasses.replace(config, remat=True).remat
  n = tr.num_params(nnx.eval_shape(lambda: tr.Transformer(config, rngs=nnx.Rngs(0))))
  assert 1.1e9 < n < 1.4e9


# ---- out_slots: the last block computes only the slots a caller reads ----

@pytest.mark.parametrize('style,kv_heads', [('llama', 2), ('llama', 4), ('gpt2', 4)])
def test_out_slots_equal_slicing_the_full_output(style, kv_heads):
  """A static slice and a per-row gather give the full forward's hidden states at those slots, and a
  loss on them has the full forward's gradients (the last block's other slots feed nothing)."""
  model = make_model(style, num_kv_heads=kv_heads, remat=True)  # remat: the last block runs unrematted
  tokens, valid = left_padded_batch([9, 6, 4], 9, seed=2)
  positions = tr.positions_from_valid(valid)
  slots = jnp.asarray([[8, 3], [5, 8], [7, 7]], jnp.int32)

  @nnx.jit
  def hiddens(model):
    full, _ = model.trunk(tokens, positions, valid=valid)
    sliced, _ = model.trunk(tokens, positions, valid=valid, out_slots=(4, 5))
    gathered, _ = model.trunk(tokens, positions, valid=valid, out_slots=slots)
    return full, sliced, gathered

  full, sliced, gathered = hiddens(model)
  assert sliced.shape == (3, 5, 64) and gathered.shape == (3, 2, 64)
  np.testing.assert_allclose(sliced, full[:, 4:9], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(gathered, jnp.take_along_axis(full, slots[..., None], axis=1), atol=1e-5,
                             rtol=1e-5)

  def loss(model, out_slots):
    hidden, _ = model.trunk(tokens, positions, valid=valid, out_slots=out_slots)
    if out_slots is None:
      hidden = hidden[:, 4:9]
    return jnp.sum(jnp.sin(model.logits(hidden)))

  g_full = nnx.jit(nnx.grad(lambda m: loss(m, None)))(model)
  g_slots = nnx.jit(nnx.grad(lambda m: loss(m, (4, 5))))(model)
  leaves_full, leaves_slots = jax.tree.leaves(g_full), jax.tree.leaves(g_slots)
  assert len(leaves_full) == len(leaves_slots)
  for a, b in zip(leaves_full, leaves_slots):
    # f32 rounding: the embedding's gradient sums a row's cotangents in another order (seen: 4e-5).
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  assert any(float(jnp.max(jnp.abs(a))) > 0 for a in leaves_full)


def test_out_slots_in_a_cached_prefill():
  """The sampler's prefill (cache, last slot only) writes the same cache and the same last hidden."""
  model = make_model('llama')
  tokens, valid = left_padded_batch([7, 4], 7, seed=3)
  positions = tr.positions_from_valid(valid)
  cache = tr.init_cache(model.config, batch=2, cache_len=10)
  _, hidden, full_cache = call(model, tokens, positions, cache, 0, valid=valid)

  @nnx.jit
  def pruned(model, cache):
    return model(tokens, positions, None, cache, 0, valid=valid, out_slots=(6, 1))

  _, last, pruned_cache = pruned(model, cache)
  assert last.shape == (2, 1, 64)
  np.testing.assert_allclose(last[:, 0], hidden[:, 6], atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(full_cache), jax.tree.leaves(pruned_cache)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_scalar_model_out_slots():
  model = heads.ScalarModel(small_config('llama'), rngs=nnx.Rngs(4))
  tokens, valid = left_padded_batch([8, 5], 8, seed=4)
  positions = tr.positions_from_valid(valid)
  full = nnx.jit(lambda m: m(tokens, positions, valid=valid))(model)
  last = nnx.jit(lambda m: m(tokens, positions, valid=valid, out_slots=jnp.asarray([[7], [6]])))(model)
  np.testing.assert_allclose(last[:, 0], jnp.asarray([full[0, 7], full[1, 6]]), atol=1e-5, rtol=1e-5)


# ---- RoPE tables: host constants for small models, device sines beyond the limit ----

@pytest.mark.parametrize('scaling', ['', 'llama3'])
def test_rope_host_tables_equal_device_angles(scaling):
  """The host tables (small max_len) give the sines and cosines a device computation gives at the same
  positions, as the large-model path computes them; a position past max_len reads NaN, not a wrong angle."""
  small = tr.TransformerConfig(vocab_size=11, num_layers=1, embed_dim=32, mlp_dim=64, num_heads=2,
                               num_kv_heads=2, head_dim=16, max_len=50, rope_theta=500000.,
                               rope_scaling=scaling, rope_factor=8.0, rope_original_max_len=16)
  large = dataclasses.replace(small, max_len=tr._ROPE_TABLE_LIMIT)  # 8 angles a position: device path
  positions = jnp.asarray([[0, 1, 2, 49], [7, 7, 30, 48]], jnp.int32)
  host = jax.jit(lambda p: tr.rope_tables(small, p))(positions)
  device = jax.jit(lambda p: tr.rope_tables(large, p))(positions)
  angle = np.asarray(positions, np.float64)[..., None] * tr.rope_inv_freq(small).astype(np.float64)
  for h, d, exact in zip(host, device, (np.sin(angle), np.cos(angle))):
    assert h.shape == (2, 4, 8)
    np.testing.assert_allclose(h, d, atol=2e-6)
    np.testing.assert_allclose(h, exact, atol=1e-5)  # f32 angles: the rounding at position 49
  beyond = tr.rope_tables(small, jnp.asarray([[3, 50]], jnp.int32))
  assert np.all(np.isfinite(beyond[0][0, 0])) and np.all(np.isnan(beyond[0][0, 1]))
