"""LoRA in the loop (issue #18): SFT, PPO's policy and critic and the Q-fit train adapters on frozen bases.

Checked on the tiny sales loop: every checkpoint holds adapters (and a critic's or Q-model's head), never a base
weight; the exported (merged) policy gives the adapted model's logits; a run stopped inside PPO resumes to the
same adapters and goes on to a second iteration (Q_1 warm-started from Q_0's adapters); pi_1 rebuilt from pi_0
and its adapters, as a resumed run rebuilds it, is the exported model.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import sales as sales_config
from iterppo_jax import checkpoint as ckpt_lib
from iterppo_jax import loop
from iterppo_jax import train_state as ts
from iterppo_jax.models import hf as hf_lib
from iterppo_jax.models import lora as lora_lib
from iterppo_jax.models import transformer as tf


def lora_config(**loop_overrides):
  c = sales_config.get_config("tiny")
  c.loop.tensorboard = False
  c.loop.iterations = 1
  c.lora.rank = 4
  c.lora.targets = ("q_proj", "v_proj", "up", "down")
  c.qfit.method = "td"  # a target network of LoraParams too
  for k, v in loop_overrides.items():
    c.loop[k] = v
  return c


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lora"))
  c = lora_config()
  c.export_dir = os.path.join(workdir, "export")
  return workdir, loop.run(c, workdir)


def saved_keys(workdir, name, step):
  with open(os.path.join(workdir, "checkpoints", name, str(step), "state", "_METADATA")) as f:
    return list(json.load(f)["tree_metadata"])


def adapters(workdir, name, step):
  c = ckpt_lib.Checkpointer(workdir, name)
  tree, _ = c.restore(step)
  c.close()
  return tree


def test_checkpoints_hold_adapters_and_heads_only(lora_run):
  workdir, summary = lora_run
  assert len(summary["iterations"]) == 2
  for name, step in (("policy", 0), ("policy", 1)):
    keys = saved_keys(workdir, name, step)
    # one layer x four targets x (A, B)
    assert len(keys) == 8 and all("lora_a" in k or "lora_b" in k for k in keys), keys
  q_keys = saved_keys(workdir, "qmodel", 0)
  assert {k for k in q_keys if "lora" not in k} == {"('head_bias', 'value')", "('head_kernel', 'value')"}
  ppo_keys = [k for k in saved_keys(workdir, "ppo/0", max(int(s) for s in os.listdir(os.path.join(
      workdir, "checkpoints", "ppo/0")) if s.isdigit()))]
  params = [k for k in ppo_keys if "'params'" in k]
  assert params and all("lora" in k or "head" in k for k in params), params
  assert not any("embedding" in k for k in ppo_keys)


def test_merged_export_equals_the_adapted_model(lora_run):
  workdir, summary = lora_run
  run, logs = loop.setup(lora_config(), workdir)  # the finished run, read back
  _, pi0 = loop.train_pi0(run, logs)  # the base rebuilt, the SFT adapters read and merged
  lora = run.lora("policy")
  a1 = loop.restore_params(run, "policy", 1, jax.eval_shape(
      lambda p: lora_lib.init_adapters(p, lora, jax.random.key(0)), pi0))
  graphdef = loop.run_policy_graphdef(run)
  adapted = ts.Trainable(graphdef=graphdef, tx=None, state_shardings=None, mesh=None, lora=lora)
  lora_params = ts.LoraParams(frozen=pi0, adapters=a1)
  cfg, exported = hf_lib.load_pretrained(summary["export_dir"])
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, run.tokenizer.vocab_size, (3, 20)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(20), (3, 20))
  want = adapted.merge(lora_params)(tokens, positions)[0]  # W + (alpha / r) A B formed inside the model's call
  exported_graph = jax.eval_shape(lambda: nnx.split(tf.Transformer(cfg, rngs=nnx.Rngs(0))))[0]
  got = nnx.merge(exported_graph, exported)(tokens, positions)[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  # pi_1 rebuilt as a resumed run does (pi_0 plus the adapters of checkpoint 'policy' 1) is what was exported
  rebuilt = nnx.merge(graphdef, loop.load_policy(run, 1, pi0))(tokens, positions)[0]
  np.testing.assert_allclose(np.asarray(rebuilt), np.asarray(got), atol=1e-6)
  # ... and the adapters moved the policy (so the equality is not pi_0's)
  before = nnx.merge(graphdef, pi0)(tokens, positions)[0]
  assert float(jnp.max(jnp.abs(before - want))) > 1e-4
  b = [np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(a1)[0] if "lora_b" in jax.tree_util.keystr(p)]
  assert b and all(np.abs(x).max() > 0 for x in b)


def test_resume_inside_ppo_then_a_second_iteration(lora_run, tmp_path):
  workdir, _ = lora_run
  resumed = str(tmp_path / "resumed")
  with pytest.raises(loop.Interrupted):
    loop.run(lora_config(stop_after_ppo_step=2), resumed)
  more = loop.run(lora_config(iterations=2), resumed)  # finishes iteration 0, then one more
  for a, b in zip(jax.tree.leaves(adapters(workdir, "policy", 1)), jax.tree.leaves(adapters(resumed, "policy", 1))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Q_1 started from Q_0's adapters and head (qfit.init='previous'); pi_2 is kept as adapters on pi_1.
  assert len(more["iterations"]) == 3
  assert all("lora" in k for k in saved_keys(resumed, "policy", 2))
  assert {k for k in saved_keys(resumed, "qmodel", 1) if "lora" not in k} == {"('head_bias', 'value')",
                                                                             "('head_kernel', 'value')"}


def test_a_lora_q_models_target_network_moves_its_adapters_only():
  """TD's Polyak target of a LoRA Q-model: the adapters and head average, the frozen trunk stays bit for bit."""
  import optax
  from iterppo_jax import qfit
  from iterppo_jax import sharding
  from iterppo_jax.models import heads
  cfg = tf.TransformerConfig.tiny(vocab_size=40, num_layers=1, embed_dim=16, mlp_dim=32, num_heads=2,
                                  num_kv_heads=1, head_dim=8, max_len=16)
  lora = lora_lib.LoraConfig(rank=2, alpha=4.0, train_full=heads.ScalarModel.head_names())
  trainable, state = ts.init_trainable(lambda: heads.ScalarModel(cfg, rngs=nnx.Rngs(0)), optax.adam(1e-2),
                                       sharding.make_mesh([("data", -1)]), with_target=True, lora=lora)
  frozen = [np.asarray(x) for x in jax.tree.leaves(state.params.frozen)]
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, 40, (4, 10)).astype(np.int32), "positions": np.tile(np.arange(10), (4, 1)),
           "valid": np.ones((4, 10), bool), "last_index": np.full(4, 9, np.int32),
           "target": rng.uniform(size=4).astype(np.float32)}
  step = qfit.make_qfit_step(trainable, tau=0.3)
  for _ in range(3):
    state, _ = step(state, batch)
  for a, b, c in zip(frozen, jax.tree.leaves(state.params.frozen), jax.tree.leaves(state.target_params.frozen)):
    np.testing.assert_array_equal(a, np.asarray(b))
    np.testing.assert_array_equal(a, np.asarray(c))
  moved = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
           zip(jax.tree.leaves(state.params.adapters), jax.tree.leaves(state.target_params.adapters))]
  assert any(moved)  # the target lags the online adapters
