"""Tests for models/lora.py: LoRA adapters merged into the transformer's frozen parameters.

Checked: B = 0 leaves the model unchanged; training the adapters alone moves the loss and not the
base; each merged weight computes x W + (alpha / r) x A B; the merged export loads back (hf) to the
adapted model's logits; the trainable count is rank * (in + out) per target; bad configs are refused;
the same on a critic built by heads.py with its head trained in full.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from iterppo_jax import sharding
from iterppo_jax.models import heads
from iterppo_jax.models import hf
from iterppo_jax.models import lora
from iterppo_jax.models import transformer as tr

V, B, T = 61, 4, 12
ALL = lora.ALL_TARGETS


def small_config(style='llama', **overrides):
  base = dict(num_layers=2, embed_dim=32, mlp_dim=64, num_heads=4, num_kv_heads=2, head_dim=8,
              max_len=32, style=style, tie_embeddings=style == 'gpt2')
  return tr.TransformerConfig.tiny(vocab_size=V, **{**base, **overrides})


def tokens_and_positions(seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, V)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  return tokens, positions


@functools.lru_cache(maxsize=None)
def split_model(config, seed=0):
  """(graphdef, params) of a Transformer, built once per config."""
  return nnx.split(tr.Transformer(config, rngs=nnx.Rngs(seed)))


def init_adapters(base, cfg, key):
  return lora.init_adapters(base, cfg, key)


@functools.partial(jax.jit, static_argnums=0)
def logits_of(graphdef, params, tokens, positions):
  return nnx.merge(graphdef, params)(tokens, positions)[0]


merge = jax.jit(lora.merge, static_argnums=2)  # one compile instead of eager ops per shape


def randomise_b(adapters, seed=1, scale=0.05):
  """Non-zero B everywhere, so an adapter's effect is visible."""
  rng = np.random.default_rng(seed)
  return nnx.from_flat_state([
      (path, var.replace(jnp.asarray(scale * rng.standard_normal(var.get_value().shape), jnp.float32))
       if path[-1] == 'lora_b' else var) for path, var in nnx.to_flat_state(adapters)])


def lm_loss(model, batch):
  tokens, positions = batch
  logits = model(tokens, positions)[0]
  logp = jax.nn.log_softmax(logits[:, :-1])
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return nll.mean(), {}


def host(tree):
  return [np.array(x) for x in jax.tree.leaves(tree)]


def train(objective, adapters, base, batch, steps=8, learning_rate=1e-2):
  """Adam on the adapters only; returns (adapters, losses)."""
  tx = optax.adam(learning_rate)

  @jax.jit
  def step(adapters, opt_state, base):
    (loss, _), grads = jax.value_and_grad(objective, has_aux=True)(adapters, base, batch)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  opt_state = tx.init(adapters)
  losses = []
  for _ in range(steps):
    adapters, opt_state, loss = step(adapters, opt_state, base)
    losses.append(float(loss))
  return adapters, losses


@pytest.mark.parametrize('style', ['llama', 'gpt2'])
def test_zero_b_is_the_base_model_exactly(style):
  config = small_config(style)
  graphdef, base = split_model(config)
  targets = tuple(t for t in ALL if not (style == 'gpt2' and t == 'gate'))
  cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=targets)
  adapters = init_adapters(base, cfg, jax.random.key(1))
  tokens, positions = tokens_and_positions()
  merged = merge(base, adapters, cfg)
  np.testing.assert_array_equal(logits_of(graphdef, merged, tokens, positions),
                                logits_of(graphdef, base, tokens, positions))
  # ... and A is not zero (else the test above would be trivially true of any B).
  a = [v.get_value() for p, v in nnx.to_flat_state(adapters) if p[-1] == 'lora_a']
  assert len(a) == 2 * len(targets) and all(float(jnp.abs(x).max()) > 0 for x in a)


def test_each_merged_weight_is_w_plus_scaled_a_b():
  """W' applied to x equals x W + (alpha / r) (x A) B, for every target's layout (o_proj: 2 in-axes)."""
  config = small_config()
  _, base = split_model(config)
  cfg = lora.LoraConfig(rank=3, alpha=6.0, targets=ALL)
  adapters = randomise_b(init_adapters(base, cfg, jax.random.key(2)))
  merged = dict(nnx.to_flat_state(merge(base, adapters, cfg)))
  rng = np.random.default_rng(3)
  flat_base = dict(nnx.to_flat_state(base))
  flat_adapters = dict(nnx.to_flat_state(adapters))
  checked = set()
  for path, var in flat_base.items():
    if path[-1] not in lora.TARGETS or 'blocks' not in path:
      np.testing.assert_array_equal(merged[path].get_value(), var.get_value())
      continue
    n_in = lora.TARGETS[path[-1]][1]
    w = var.get_value()
    a, b = flat_adapters[path + ('lora_a',)].get_value(), flat_adapters[path + ('lora_b',)].get_value()
    assert a.shape == w.shape[:n_in] + (3,) and b.shape == (3,) + w.shape[n_in:]
    w, a, b = (np.asarray(t, np.float64) for t in (w, a, b))
    x = rng.standard_normal((5,) + w.shape[:n_in])
    unadapted = np.tensordot(x, w, axes=n_in)
    expected = unadapted + (6.0 / 3) * np.tensordot(np.tensordot(x, a, axes=n_in), b, axes=1)
    got = np.tensordot(x, np.asarray(merged[path].get_value(), np.float64), axes=n_in)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(got - unadapted).max() > 1e-3  # the adapter acts
    # A keeps W's input-axis names, B its output-axis names; the rank axis is replicated.
    names = sharding.variable_logical_names(var)
    assert sharding.variable_logical_names(flat_adapters[path + ('lora_a',)]) == names[:n_in] + (None,)
    assert sharding.variable_logical_names(flat_adapters[path + ('lora_b',)]) == (None,) + names[n_in:]
    checked.add(path[-1])
  assert checked == set(ALL)


def test_training_moves_adapters_only_and_lowers_the_loss():
  config = small_config()
  graphdef, base = split_model(config)
  cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=ALL)
  adapters = init_adapters(base, cfg, jax.random.key(1))
  base_before, adapters_before = host(base), host(adapters)
  objective = lora.adapted_loss(lm_loss, graphdef, cfg)
  trained, losses = train(objective, adapters, base, tokens_and_positions())
  assert losses[-1] < losses[0] - 0.05, losses
  for before, after in zip(base_before, host(base)):
    np.testing.assert_array_equal(before, after)  # frozen, bit for bit
  moved = [not np.array_equal(x, y) for x, y in zip(adapters_before, host(trained))]
  assert all(moved), moved  # every A and B got an update (B from zero, then A through B)


def test_merged_export_equals_the_adapted_model(tmp_path):
  """The issue's test: a LoRA run's merged export equals the adapted model's logits."""
  config = small_config()
  graphdef, base = split_model(config)
  cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=ALL)
  adapters = init_adapters(base, cfg, jax.random.key(1))
  trained, _ = train(lora.adapted_loss(lm_loss, graphdef, cfg), adapters, base,
                     tokens_and_positions(), steps=4)
  tokens, positions = tokens_and_positions(seed=5)
  # The adapted model as the training step sees it (merge inside the jitted loss).
  adapted = jax.jit(lambda a, b: logits_of(graphdef, lora.merge(b, a, cfg), tokens, positions))(
      trained, base)
  base_logits = logits_of(graphdef, base, tokens, positions)
  assert float(jnp.abs(adapted - base_logits).max()) > 1e-3  # the adapters changed the model

  merged = merge(base, trained, cfg)
  np.testing.assert_allclose(logits_of(graphdef, merged, tokens, positions), adapted, atol=1e-5)
  out = hf.export(config, merged, str(tmp_path / 'merged'))
  loaded_config, loaded = hf.load_pretrained(out)
  loaded_graphdef = hf.abstract_model(loaded_config)[0]
  np.testing.assert_allclose(logits_of(loaded_graphdef, loaded, tokens, positions), adapted,
                             atol=1e-5)


def test_trainable_count_is_rank_times_in_plus_out():
  config = small_config()
  _, base = split_model(config)
  D, F, N, K, H, L = 32, 64, 4, 2, 8, 2
  r = 2
  cfg = lora.LoraConfig(rank=r, alpha=4.0, targets=ALL)
  adapters = init_adapters(base, cfg, jax.random.key(0))
  per_layer = r * ((D + N * H) + 2 * (D + K * H) + (N * H + D) + 2 * (D + F) + (F + D))
  assert tr.num_params(adapters) == L * per_layer == lora.num_adapter_params(base, cfg)
  assert tr.num_params(adapters) < tr.num_params(base) / 10
  # Shapes before arrays: adapters of an abstract base, as a sharded init would plan them.
  abstract_base = jax.eval_shape(lambda: base)
  only_q_cfg = lora.LoraConfig(rank=r, alpha=4.0, targets=('q_proj',))
  only_q = jax.eval_shape(lambda b: lora.init_adapters(b, only_q_cfg, jax.random.key(0)), abstract_base)
  assert tr.num_params(only_q) == L * r * (D + N * H)
  # The optimizer state covers the adapters only: adam keeps two moments per adapter scalar.
  opt_state = optax.adam(1e-3).init(adapters)
  assert tr.num_params(opt_state) == 2 * tr.num_params(adapters) + 1  # + the step count


@pytest.mark.parametrize('kwargs, message', [
    (dict(rank=4, alpha=1.0, targets=('q_proj', 'wq')), "'wq'"),
    (dict(rank=0, alpha=1.0), 'rank must be an integer >= 1, got 0'),
    (dict(rank=2.5, alpha=1.0), 'rank must be an integer >= 1, got 2.5'),
    (dict(rank=4, alpha=0.0), 'alpha must be > 0'),
    (dict(rank=4, alpha=1.0, targets='q_proj'), "the string 'q_proj'"),
])
def test_bad_configs_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message.replace('.', r'\.').replace('(', r'\(')):
    lora.LoraConfig(**kwargs)


def test_targets_the_model_lacks_are_refused():
  _, base = split_model(small_config('gpt2'))
  with pytest.raises(ValueError, match=r"\['gate'\] not found"):
    lora.init_adapters(base, lora.LoraConfig(rank=2, alpha=2.0, targets=('gate',)), jax.random.key(0))
  both = lora.LoraConfig(rank=2, alpha=2.0, targets=('up',), train_full=('trunk/blocks/1/mlp/up',))
  with pytest.raises(ValueError, match=r"\['trunk/blocks/1/mlp/up'\] are also adapted"):
    lora.init_adapters(base, both, jax.random.key(0))
  with pytest.raises(ValueError, match="'value_head'"):
    lora.init_adapters(base, lora.LoraConfig(rank=2, alpha=2.0, train_full=('value_head',)),
                       jax.random.key(0))


def test_critic_adapters_on_the_trunk_and_head_in_full():
  config = small_config()
  policy = nnx.merge(*split_model(config))
  critic = heads.scalar_model_from_policy(policy, rngs=nnx.Rngs(1))
  graphdef, base = nnx.split(critic)
  cfg = lora.LoraConfig(rank=2, alpha=4.0, targets=('q_proj', 'v_proj', 'up', 'down'),
                        train_full=('head_kernel', 'head_bias'))
  trainable = init_adapters(base, cfg, jax.random.key(1))
  assert tr.num_params(trainable) == lora.num_adapter_params(base, cfg) + config.embed_dim + 1
  tokens, positions = tokens_and_positions()
  values_of = jax.jit(lambda params: nnx.merge(graphdef, params)(tokens, positions))
  np.testing.assert_array_equal(values_of(merge(base, trainable, cfg)), values_of(base))
  targets = jax.random.normal(jax.random.key(9), (B, T))

  def value_loss(model, batch):
    tokens, positions = batch
    return jnp.mean((model(tokens, positions) - targets) ** 2), {}

  base_before, trainable_before = host(base), host(trainable)
  trained, losses = train(lora.adapted_loss(value_loss, graphdef, cfg), trainable, base,
                          (tokens, positions))
  assert losses[-1] < losses[0], losses
  for before, after in zip(base_before, host(base)):
    np.testing.assert_array_equal(before, after)
  assert all(not np.array_equal(x, y) for x, y in zip(trainable_before, host(trained)))
  merged = merge(base, trained, cfg)
  head = dict(nnx.to_flat_state(merged))[('head_kernel',)].get_value()
  np.testing.assert_array_equal(head, dict(nnx.to_flat_state(trained))[('head_kernel',)].get_value())
  adapted = jax.jit(lambda a, b: nnx.merge(graphdef, lora.merge(b, a, cfg))(tokens, positions))(
      trained, base)
  np.testing.assert_allclose(values_of(merged), adapted, atol=1e-5)
  assert float(jnp.abs(adapted - values_of(base)).max()) > 1e-3
