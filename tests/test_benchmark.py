"""iterppo_jax/studies/benchmark.py and its command line experiments/benchmark.py (a smoke run of every piece on a
workload smaller than ppo_tiny), and the changes behind its CPU numbers, each against the plain computation it
replaces: the custom-VJP dense, the LM head on response slots only, the sampler's log-probs in place of the policy's
scoring pass, minibatches cut on the device."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import benchmark as benchmark_main
from iterppo_jax import errors
from iterppo_jax import ppo, sampling, sharding, solvers
from iterppo_jax import train_state as ts
from iterppo_jax.models import heads
from iterppo_jax.models import transformer as tf
from iterppo_jax.studies import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("sampler", "sft step", "qfit step", "ppo generation", "ppo scoring", "ppo update", "ppo iteration")


def _config(arg):
  spec = importlib.util.spec_from_file_location("benchmark_config", os.path.join(ROOT, "configs", "benchmark.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("minibatch, lora_rank", [(4, 2), (8, 0)])
def test_benchmark_table(minibatch, lora_rank):
  """Smoke: 8 prompts in minibatches of 4 (separate scoring and update) with LoRA adapters training, or one
  minibatch (also fused) of full fine-tuning."""
  config = _config("smoke")
  config.iterations = 1
  config.ppo.minibatch_size = minibatch
  config.lora.rank = lora_rank
  rows = benchmark.run_benchmark(benchmark.load(config))
  fused = ("ppo scoring+update, fused", "ppo iteration, fused") if minibatch == 8 else ()
  assert [r["name"] for r in rows] == list(ROWS + fused)
  for r in rows:
    assert r["ms"] > 0 and r["tokens_per_s"] > 0 and r["compile_s"] >= 0, r
  table = benchmark.format_table(rows, "smoke")
  assert all(name in table for name in ROWS)
  print(table)


def test_workloads():
  tiny, big = _config(None), _config("ppo_0p5b")
  tiny_shape = (tiny.model.num_layers, tiny.model.embed_dim, tiny.model.vocab_size, tiny.batch.new_tokens)
  assert tiny_shape == (4, 256, 2048, 32)
  for workload in (tiny, big):  # issue 7: one epoch of one minibatch (0 = the whole batch)
    assert (workload.ppo.epochs, workload.ppo.minibatch_size) == (1, 0)
  assert (big.model.num_layers, big.model.embed_dim, big.model.num_heads, big.model.num_kv_heads) == (24, 896, 14, 2)
  assert (big.model.vocab_size, big.model.dtype, big.model.param_dtype) == (151936, "bfloat16", "float32")
  assert (big.batch.prompts, big.batch.new_tokens) == (32, 128)
  smol = _config("smollm2")  # SmolLM2-135M-Instruct's shapes (the GGUF's metadata, tests/test_gguf.py)
  assert (smol.model.num_layers, smol.model.embed_dim, smol.model.num_heads, smol.model.num_kv_heads,
          smol.model.vocab_size, smol.lora.rank) == (30, 576, 9, 3, 49152, 8)
  with pytest.raises(ValueError, match="unknown benchmark workload"):
    _config("nope")


_DELETE = object()


def _with(d: dict, key: str, value) -> dict:
  """d with its dotted key set to value (or deleted, for _DELETE)."""
  *path, leaf = key.split(".")
  node = d
  for part in path:
    node = node[part]
  if value is _DELETE:
    del node[leaf]
  else:
    node[leaf] = value
  return d


def test_every_workload_loads_as_typed_frozen_settings():
  import dataclasses
  from configs import benchmark as benchmark_config
  for name in benchmark_config.WORKLOADS:
    config = _config(name)
    typed = benchmark.load(config)
    assert typed.model.num_layers == config.model.num_layers and typed.batch.prompts == config.batch.prompts
    assert typed.mesh == tuple(tuple(a) for a in config.mesh) and typed.lora.targets == tuple(config.lora.targets)
    assert isinstance(typed.model.rope_theta, float) and isinstance(typed.peak_tflops, float)
  with pytest.raises(dataclasses.FrozenInstanceError):
    typed.batch.prompts = 3


@pytest.mark.parametrize("key, value, message", [
    ("batch.prompt", 3, r"^config\.batch\.prompt: unknown key; expected one of prompts, prompt_len, new_tokens$"),
    ("ppo.kl_coef", _DELETE, r"^config\.ppo\.kl_coef: missing; the section needs epochs, minibatch_size, kl_coef$"),
    ("model.remat", 1, r"^config\.model\.remat must be a bool, got 1$"),
    ("model.dtype", "fp8", r"^config\.model\.dtype must be one of float32, bfloat16, float16, got 'fp8'$"),
    ("iterations", 0, r"^config\.iterations must be an integer >= 1, got 0$"),
    ("learning_rate", 0.0, r"^config\.learning_rate must be a number in \(0, inf\), got 0.0$"),
    ("pieces", ("ppo", "sampling"), r"^config\.pieces: unknown benchmark pieces \['sampling'\]"),
    ("sweep.prompts", (4, 0), r"^config\.sweep\.prompts must hold integers >= 1, got \[0\]$"),
    ("model.num_kv_heads", 3, r"^config\.model\.num_kv_heads \(3\) must divide model\.num_heads \(2\)$"),
    ("batch.prompts", 6, r"^config\.batch\.prompts \(6\) must be a multiple of ppo\.minibatch_size \(4\)$"),
    ("lora.targets", ("q_proj", "qkv"), r"^config\.lora\.targets must be a non-empty tuple of q_proj"),
])
def test_a_bad_key_is_named_with_its_value_before_any_work(key, value, message):
  """configs/benchmark.py:smoke with one key wrong (lora.targets: with lora.rank 2, which reads them)."""
  d = _config("smoke").to_dict()  # a plain dict: a ConfigDict would refuse a value of another type itself
  d["lora"]["rank"] = 2
  benchmark.load(d)
  with pytest.raises(errors.SettingsError, match=message):
    benchmark.load(_with(d, key, value))


def test_a_sweeps_cells_check_their_own_batch():
  """The command of a sweep does not refuse a batch.prompts its cells replace; each cell checks its own."""
  d = _config("smoke").to_dict()
  d["batch"]["prompts"] = 6
  d["sweep"]["prompts"] = (4,)
  assert benchmark.is_sweep(benchmark.load(d))


# ---- the speed-ups compute the same numbers ----
# Each change behind the benchmark's numbers is checked against the plain computation it replaces.

SMALL = dict(vocab_size=67, num_layers=2, embed_dim=32, mlp_dim=64, num_heads=4, num_kv_heads=2, head_dim=8, max_len=16)


@pytest.mark.parametrize("spec,x_shape,w_shape", [("BTD,DF->BTF", (2, 3, 5), (5, 7)),
                                                  ("BTD,DNH->BTNH", (2, 3, 5), (5, 4, 6)),
                                                  ("BTNH,NHD->BTD", (2, 3, 4, 6), (4, 6, 5))])
@pytest.mark.parametrize("dtype,preferred", [(jnp.float32, None), (jnp.bfloat16, jnp.float32)])
def test_dense_gradient_is_autodiffs(spec, x_shape, w_shape, dtype, preferred):
  """transformer.dense (custom VJP, weight gradient laid out as the weight) against jnp.einsum under autodiff."""
  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape).astype(dtype)
  w = jax.random.normal(kw, w_shape).astype(dtype)
  out_shape = jnp.einsum(spec, x, w).shape
  cotangent = jax.random.normal(kc, out_shape)

  def loss(f):
    return lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * cotangent)
  ours = jax.grad(loss(lambda x, w: tf.dense(spec, x, w, preferred)), argnums=(0, 1))(x, w)
  theirs = jax.grad(loss(lambda x, w: jnp.einsum(spec, x, w, preferred_element_type=preferred)), argnums=(0, 1))(x, w)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for a, b in zip(ours, theirs):
    assert a.dtype == b.dtype == dtype and a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
  np.testing.assert_array_equal(tf.dense(spec, x, w, preferred),
                                jnp.einsum(spec, x, w, preferred_element_type=preferred))


def _small_ppo():
  """A policy, critic and Q-model of SMALL shape on a one-device mesh, and one sampled batch."""
  config = tf.TransformerConfig(**SMALL, tie_embeddings=False)
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  with sharding.use_mesh(mesh):
    policy, policy_state = ts.init_trainable(lambda: tf.Transformer(config, rngs=nnx.Rngs(0)), optax.adamw(1e-3), mesh)
    critic, critic_state = ts.init_trainable(lambda: heads.ScalarModel(config, rngs=nnx.Rngs(1)), optax.adamw(1e-3),
                                             mesh)
    q_tr, q_state = ts.init_trainable(lambda: heads.ScalarModel(config, rngs=nnx.Rngs(2)), optax.adamw(1e-3), mesh)
  prompt_tokens = jnp.asarray(np.random.default_rng(0).integers(3, SMALL["vocab_size"], size=(4, 6)), jnp.int32)
  prompt_valid = jnp.asarray(np.arange(6)[None] >= np.array([[0], [2], [4], [1]]))  # ragged, left-padded prompts
  return mesh, (policy, policy_state), (critic, critic_state), (q_tr, q_state), prompt_tokens, prompt_valid


def test_policy_response_logprobs_is_the_full_head_sliced():
  _, (policy, state), *_, prompt_tokens, prompt_valid = _small_ppo()
  model = policy.merge(state.params)
  response = jnp.asarray(np.random.default_rng(1).integers(3, SMALL["vocab_size"], size=(4, 5)), jnp.int32)
  tokens, valid, positions = ppo.sequence_layout(prompt_tokens, prompt_valid, response, jnp.ones((4, 5), bool))
  fast, fast_logits = ppo.policy_response_logprobs(model, tokens, positions, valid, 6)
  slow, slow_logits = ppo.response_logprobs(model(tokens, positions, valid=valid)[0], tokens, 6)
  assert fast.shape == (4, 5) and fast_logits.shape == (4, 5, SMALL["vocab_size"])
  np.testing.assert_allclose(fast, slow, atol=1e-5)
  np.testing.assert_allclose(fast_logits, slow_logits, atol=1e-5)


def test_sampler_logprobs_stand_in_for_the_policy_pass():
  """Experience from the sampler's log-probs (solvers.train, the benchmark) against the policy's own forward pass."""
  mesh, (policy, policy_state), (critic, critic_state), (q_tr, q_state), prompt_tokens, prompt_valid = _small_ppo()
  cfg = ppo.PPOConfig(kl_coef=0.1, max_new_tokens=5)
  with sharding.use_mesh(mesh):
    experience_fn = ppo.make_experience_fn(policy, critic, ppo.make_q_reward_fn(q_tr), cfg)
    ref_params = jax.tree.map(lambda p: p * 1.01, policy_state.params)  # a reference that differs from the policy
    for seed in range(2):
      out = sampling.sample(policy.graphdef, policy_state.params, prompt_tokens, prompt_valid, jax.random.key(seed),
                            max_new_tokens=5, eos_id=3, pad_id=0, temperature=0.8)
      args = (policy_state.params, ref_params, critic_state.params, q_state.params, out.prompt_tokens,
              out.prompt_valid, out.tokens, out.valid, jnp.float32(0.1))
      slow = experience_fn(*args)
      fast = experience_fn(*args, old_logprobs=out.logprobs)
      mask = np.asarray(out.valid)
      np.testing.assert_allclose(np.asarray(fast["old_logprobs"])[mask], np.asarray(slow["old_logprobs"])[mask],
                                 atol=1e-4)
      for key in ("advantages", "returns", "kl", "exact_kl_k1", "score", "old_values"):
        np.testing.assert_allclose(fast[key], slow[key], atol=1e-4, err_msg=key)
      assert float(np.abs(np.asarray(slow["kl"])).max()) > 1e-3  # the KL term is really exercised
    # One compiled program per variant, whatever the samples: nothing recompiles between iterations.
    assert experience_fn._cache_size() == 2


def test_take_rows_cuts_minibatches_on_device():
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  exp = {k: jnp.arange(12 * 3, dtype=jnp.float32).reshape(12, 3) + i for i, k in enumerate(ppo.UPDATE_KEYS)}
  exp["score"] = jnp.zeros(12)  # keys outside the update are left out
  idx = np.array([5, 0, 11, 2])
  batch = solvers.make_take_rows(mesh, ppo.UPDATE_KEYS)(exp, idx)
  assert set(batch) == set(ppo.UPDATE_KEYS)
  for k in ppo.UPDATE_KEYS:
    np.testing.assert_array_equal(batch[k], np.asarray(exp[k])[idx])


def test_sampler_logprobs_reused_in_float32_only():
  """bf16 decode and full forward round differently (~1e-2 in log-prob): there solvers.train keeps the policy pass."""
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  for dtype, reusable in (("float32", True), ("bfloat16", False)):
    config = tf.TransformerConfig(**SMALL, dtype=dtype)
    with sharding.use_mesh(mesh):
      policy, state = ts.init_trainable(lambda: tf.Transformer(config, rngs=nnx.Rngs(0)), optax.adamw(1e-3), mesh)
    assert ppo.sampler_logprobs_reusable(policy, state.params) is reusable


@pytest.mark.parametrize("entropy_coef,with_sampler_logprobs", [(0.0, True), (0.0, False), (0.01, False)])
def test_fused_step_equals_experience_then_update(entropy_coef, with_sampler_logprobs):
  """One epoch of one minibatch: the fused step (scoring shares the update's policy and critic passes) moves
  both models exactly as make_experience_fn followed by make_update_step, and reports the same numbers."""
  mesh, (policy, policy_state), (critic, critic_state), (q_tr, q_state), prompt_tokens, prompt_valid = _small_ppo()
  cfg = ppo.PPOConfig(kl_coef=0.1, max_new_tokens=5, epochs=1, minibatch_size=4, entropy_coef=entropy_coef)
  assert ppo.fuses(cfg, 4) and not ppo.fuses(cfg, 8)
  reward_fn = ppo.make_q_reward_fn(q_tr)
  with sharding.use_mesh(mesh):
    ref_params = jax.tree.map(lambda p: p * 1.01, policy_state.params)
    out = sampling.sample(policy.graphdef, policy_state.params, prompt_tokens, prompt_valid, jax.random.key(3),
                          max_new_tokens=5, eos_id=3, pad_id=0)
    old = out.logprobs if with_sampler_logprobs else None
    args = (out.prompt_tokens, out.prompt_valid, out.tokens, out.valid, jnp.float32(0.1))
    exp = ppo.make_experience_fn(policy, critic, reward_fn, cfg)(
        policy_state.params, ref_params, critic_state.params, q_state.params, *args, old_logprobs=old)
    copy = lambda s: jax.tree.map(jnp.copy, s)  # noqa: E731 (both steps donate their state)
    start = ppo.PPOState(policy=copy(policy_state), critic=copy(critic_state))
    slow_state, slow_metrics = ppo.make_update_step(policy, critic, cfg, 6)(
        start, solvers.make_take_rows(mesh, ppo.UPDATE_KEYS)(exp, np.arange(4)))
    start = ppo.PPOState(policy=copy(policy_state), critic=copy(critic_state))
    fast_state, fast_metrics, summary = ppo.make_fused_step(policy, critic, reward_fn, cfg, 6)(
        start, ref_params, q_state.params, *args, old_logprobs=old)
  for key in ("score", "kl", "exact_kl_k1", "mask"):
    np.testing.assert_allclose(summary[key], exp[key], atol=1e-5, err_msg=key)
  assert set(fast_metrics) == set(slow_metrics)
  for key in slow_metrics:
    np.testing.assert_allclose(fast_metrics[key], slow_metrics[key], atol=1e-5, rtol=1e-4, err_msg=key)
  assert float(slow_metrics["policy_grad_norm"]) > 0 and float(slow_metrics["value_grad_norm"]) > 0
  moved = 0.0
  for fast, slow, before in zip(jax.tree.leaves((fast_state.policy.params, fast_state.critic.params)),
                                jax.tree.leaves((slow_state.policy.params, slow_state.critic.params)),
                                jax.tree.leaves((policy_state.params, critic_state.params))):
    np.testing.assert_allclose(fast, slow, atol=1e-6)
    moved = max(moved, float(jnp.max(jnp.abs(slow - before))))
  assert moved > 1e-4  # the update really changed the parameters


def test_pieces_pick_the_rows():
  config = _config("smoke")
  config.iterations = 1
  config.pieces = ("qfit",)
  assert [r["name"] for r in benchmark.run_benchmark(benchmark.load(config))] == ["qfit step"]


def test_sweep_runs_each_cell_in_its_own_process_and_keeps_failures(capsys):
  """Issue #7's scaling table on the smoke shape: one process per cell; a cell that fails (6 prompts do not split
  into minibatches of 4) is a row saying why, and the other cells still run."""
  config = _config("smoke")
  config.sweep.new_tokens = (2, 4)
  config.sweep.prompts = (4, 6)
  config = benchmark.load(config)
  assert len(benchmark.sweep_cells(config)) == 4
  results = benchmark_main.run_sweep(config, ["--config=configs/benchmark.py:smoke", "--config.iterations=1",
                                              "--config.batch.prompts=99"])  # replaced by each cell's own value
  assert [(r["new_tokens"], r["prompts"], bool(r["error"])) for r in results] == [
      (2, 4, False), (2, 6, True), (4, 4, False), (4, 6, True)]
  assert all("multiple of ppo.minibatch_size" in r["error"] for r in results if r["error"])
  ok = results[0]
  names = [row["name"] for row in ok["rows"]]
  assert names[0] == "ppo generation" and "ppo iteration, fused" in names  # 4 prompts: one minibatch
  table = benchmark.format_sweep(results)
  assert table.count("  ok") == 2 and table.count("failed: ") == 2
