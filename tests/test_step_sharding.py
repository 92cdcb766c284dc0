"""The jitted steps give the same numbers on every mesh: SFT, Q-fit, the PPO scoring + update step, and the fused
PPO step (scoring inside the update, ppo.make_fused_step).

On 8 forced host CPU devices, one SFT step, one Q-fit step (TD target network on, so the Polyak update runs too),
the PPO experience function (policy, reference, critic and Q-reward passes, token rewards, GAE, whitening) and one
PPO update step (from one fixed, pre-built experience batch) run on meshes (data, fsdp, tensor) = 8x1x1, 2x4x1 and
2x2x2, under ``sharding.use_mesh`` so the activation constraints are live. Their losses, metrics and updated
parameters must equal the 1-device result to ~1e-5 relative, and a parameter named ('embed', 'mlp') must really
be split over fsdp and tensor on 2x2x2 (so the comparison is not between replicated copies).

XLA_FLAGS must be set before jax is imported, so the work runs in a subprocess (this file as a script) that
prints a JSON report; the tests assert on it. f32 throughout; every batch is 16 rows (divisible by 8).
"""

import json
import os
import subprocess
import sys

import pytest

MESHES = {"8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2)}
B, PROMPT, NEW = 16, 8, 4  # rows, prompt tokens, response tokens of the PPO batch
L = 16  # SFT / Q-fit sequence length
VOCAB = 64


def _worker() -> dict:
  import time

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from iterppo_jax import ppo, qfit, sampling, sft, sharding
  from iterppo_jax import train_state as ts
  from iterppo_jax.models import heads
  from iterppo_jax.models import transformer as tf

  config = tf.TransformerConfig.tiny(VOCAB, num_layers=1, embed_dim=64, mlp_dim=128, num_heads=4, num_kv_heads=2,
                                     head_dim=16, max_len=32, tie_embeddings=False)
  # Plain SGD: the update is -lr * grad, so comparing parameters compares gradients. (Adam's first step is
  # ~lr * sign(grad) and would amplify rounding noise in near-zero gradient entries into lr-sized differences.)
  tx = optax.sgd(0.5)
  rng = np.random.default_rng(0)

  # ---- fixed host batches ----
  lengths = rng.integers(L // 2, L + 1, size=B)
  valid = np.arange(L)[None] < lengths[:, None]
  tokens = np.where(valid, rng.integers(3, VOCAB, size=(B, L)), 0).astype(np.int32)
  positions = np.where(valid, np.arange(L)[None], 0).astype(np.int32)
  loss_mask = (valid & (np.arange(L)[None] >= 4)).astype(np.float32)
  sft_batch = {"tokens": tokens, "positions": positions, "valid": valid, "loss_mask": loss_mask}
  q_batch = {"tokens": tokens, "positions": positions, "valid": valid, "last_index": (lengths - 1).astype(np.int32),
             "target": rng.uniform(size=B).astype(np.float32)}
  prompt_len = rng.integers(2, PROMPT + 1, size=B)
  prompt_valid = np.arange(PROMPT)[None] >= (PROMPT - prompt_len)[:, None]  # left-padded
  prompt_tokens = np.where(prompt_valid, rng.integers(3, VOCAB, size=(B, PROMPT)), 0).astype(np.int32)

  # ---- one set of initial parameters, built once on one device and copied onto every mesh ----
  one = sharding.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)], devices=jax.devices()[:1])
  make_policy = lambda: tf.Transformer(config, rngs=nnx.Rngs(0))  # noqa: E731
  make_scalar = lambda: heads.ScalarModel(config, rngs=nnx.Rngs(1))  # noqa: E731
  _, s0 = ts.init_trainable(make_policy, tx, one)
  _, c0 = ts.init_trainable(make_scalar, tx, one)
  policy_init = jax.device_get(s0.params)
  scalar_init = jax.device_get(c0.params)
  # A response sampled once, so the PPO batch is realistic (right-padded after an end token).
  policy_graphdef = nnx.split(nnx.eval_shape(make_policy))[0]
  out = sampling.sample(policy_graphdef, s0.params, prompt_tokens, prompt_valid, jax.random.key(0),
                        max_new_tokens=NEW, eos_id=5, pad_id=0)
  response, response_valid = np.asarray(out.tokens), np.asarray(out.valid)
  ppo_cfg = ppo.PPOConfig(kl_coef=0.1, minibatch_size=B, max_new_tokens=NEW)

  def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

  def spec_list(spec):
    entries = [list(a) if isinstance(a, tuple) else a for a in spec]
    while entries and entries[-1] is None:
      entries.pop()
    return entries

  def run(mesh, fixed_experience):
    """Everything on one mesh; returns host copies of metrics and updated params, and the checked specs.

    The PPO update runs on `fixed_experience` (built on one device), not on this mesh's own experience, so
    its comparison is not blurred by differences upstream; None means this run's own experience (the reference
    run). Two updates on the same batch: the second sees a ratio != 1, so the clipping paths run too.
    """
    with sharding.use_mesh(mesh):
      res = {}
      trainable, state = ts.init_trainable(make_policy, tx, mesh, params=policy_init)
      spec = state.params["trunk"]["blocks"][0]["mlp"]["up"][...].sharding.spec
      state, metrics = sft.make_sft_step(trainable)(state, ts.device_batch(sft_batch, mesh))
      res["sft"] = (jax.device_get(metrics), flat(state.params))
      res["up_spec"] = spec_list(spec)
      res["up_spec_after"] = spec_list(state.params["trunk"]["blocks"][0]["mlp"]["up"][...].sharding.spec)

      q_tr, q_state = ts.init_trainable(make_scalar, tx, mesh, with_target=True, params=scalar_init)
      q_state, metrics = qfit.make_qfit_step(q_tr, tau=0.5)(q_state, ts.device_batch(q_batch, mesh))
      res["qfit"] = (jax.device_get(metrics), {**flat(q_state.params),
                                               **{"target" + k: v for k, v in flat(q_state.target_params).items()}})

      policy, p_state = ts.init_trainable(make_policy, tx, mesh, params=policy_init)
      critic, c_state = ts.init_trainable(make_scalar, tx, mesh, params=scalar_init)
      reward_tr, r_state = ts.init_trainable(make_scalar, tx, mesh, params=scalar_init)
      ref_params = ts.copy_params(p_state.params)
      experience_fn = ppo.make_experience_fn(policy, critic, ppo.make_q_reward_fn(reward_tr), ppo_cfg)
      put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))  # noqa: E731
      exp = experience_fn(p_state.params, ref_params, c_state.params, r_state.params, put(prompt_tokens),
                          put(prompt_valid), put(response), put(response_valid), jnp.float32(0.1))
      exp = jax.device_get(exp)
      res["experience"] = exp
      fixed_experience = exp if fixed_experience is None else fixed_experience
      update = ppo.make_update_step(policy, critic, ppo_cfg, PROMPT)
      state = ppo.PPOState(policy=p_state, critic=c_state)
      batch = ts.device_batch({k: fixed_experience[k] for k in ppo.UPDATE_KEYS}, mesh)
      state, _ = update(state, batch)
      state, metrics = update(state, batch)
      res["ppo"] = (jax.device_get(metrics), {**flat(state.policy.params),
                                              **{"critic" + k: v for k, v in flat(state.critic.params).items()}})

      # The fused scoring + update step (one epoch of one minibatch) from the same start, on this mesh's rows.
      _, p_state = ts.init_trainable(make_policy, tx, mesh, params=policy_init)
      _, c_state = ts.init_trainable(make_scalar, tx, mesh, params=scalar_init)
      fused = ppo.make_fused_step(policy, critic, ppo.make_q_reward_fn(reward_tr), ppo_cfg, PROMPT)
      state, metrics, _ = fused(ppo.PPOState(policy=p_state, critic=c_state), ref_params, r_state.params,
                                put(prompt_tokens), put(prompt_valid), put(response), put(response_valid),
                                jnp.float32(0.1))
      res["fused"] = (jax.device_get(metrics), {**flat(state.policy.params),
                                                **{"critic" + k: v for k, v in flat(state.critic.params).items()}})
      return res

  reference = run(one, None)
  fixed_experience = reference["experience"]

  policy_flat, scalar_flat = flat(policy_init), flat(scalar_init)
  initial = {"sft": policy_flat, "qfit": {**scalar_flat, **{"target" + k: v for k, v in scalar_flat.items()}},
             "ppo": {**policy_flat, **{"critic" + k: v for k, v in scalar_flat.items()}}}
  initial["fused"] = initial["ppo"]

  def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)) if a.size else 0.0

  report = {"num_devices": jax.device_count(), "meshes": {},
            "reference": {name: {k: float(v) for k, v in reference[name][0].items()}
                          for name in ("sft", "qfit", "ppo", "fused")},
            "response_tokens": int(response_valid.sum())}
  for name, (data, fsdp, tensor) in MESHES.items():
    mesh = sharding.make_mesh([("data", data), ("fsdp", fsdp), ("tensor", tensor)])
    start = time.perf_counter()
    res = run(mesh, fixed_experience)
    print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    entry = {"up_spec": res["up_spec"], "up_spec_after": res["up_spec_after"]}
    for step in ("sft", "qfit", "ppo", "fused"):
      metrics, params = res[step]
      ref_metrics, ref_params = reference[step]
      # Metrics on the scale max(|reference|, 1): some sit at ~0 (a mean of whitened advantages), where a
      # relative error would only measure rounding.
      entry[step] = {"metrics": max(float(abs(metrics[k] - ref_metrics[k]) / max(abs(ref_metrics[k]), 1.0))
                                    for k in ref_metrics),
                     "params": max(rel(params[k], ref_params[k]) for k in ref_params),
                     # The change the step made, on its own scale (params dwarf one SGD step), over all leaves.
                     "updates": rel(np.concatenate([(params[k] - initial[step][k]).ravel() for k in ref_params]),
                                    np.concatenate([(ref_params[k] - initial[step][k]).ravel()
                                                    for k in ref_params])),
                     "same_keys": sorted(params) == sorted(ref_params)}
    entry["experience"] = max(rel(res["experience"][k], reference["experience"][k])
                              for k in reference["experience"])
    report["meshes"][name] = entry
  return report


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
  result = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  print(json.dumps(out, indent=1))
  return out


def test_eight_devices(report):
  assert report["num_devices"] == 8
  assert report["response_tokens"] > B  # the PPO batch has real multi-token responses
  ppo_metrics = report["reference"]["ppo"]
  assert ppo_metrics["approx_kl"] > 0 and ppo_metrics["ratio_mean"] != 1.0  # the second update moved off ratio 1


def test_embed_mlp_param_is_sharded(report):
  assert report["meshes"]["2x2x2"]["up_spec"] == ["fsdp", "tensor"]
  assert report["meshes"]["2x2x2"]["up_spec_after"] == ["fsdp", "tensor"]  # the step's out_shardings keep it
  assert report["meshes"]["2x4x1"]["up_spec"] == ["fsdp"]
  assert report["meshes"]["8x1x1"]["up_spec"] == []


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("step", ["sft", "qfit", "ppo", "fused"])
def test_step_matches_single_device(report, mesh, step):
  entry = report["meshes"][mesh][step]
  assert entry["same_keys"]
  assert entry["metrics"] < 1e-5, (mesh, step, entry)
  assert entry["params"] < 1e-5, (mesh, step, entry)
  assert entry["updates"] < 1e-4, (mesh, step, entry)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_experience_matches_single_device(report, mesh):
  assert report["meshes"][mesh]["experience"] < 1e-5, report["meshes"][mesh]


if __name__ == "__main__":
  print(json.dumps(_worker()))
