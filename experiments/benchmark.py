"""Times the jitted pieces of Iterative PPO on random tokens and prints one table.

  python -m experiments.benchmark --config=configs/benchmark.py            # ppo_tiny on whatever jax sees
  python -m experiments.benchmark --config=configs/benchmark.py:ppo_0p5b   # for a GPU

Rows: the sampler alone (ignore_eos, so every row makes all its tokens), one SFT step, one Q-fit step, and one
PPO iteration split into generation (the sampler as train_ppo calls it), scoring (ppo.make_experience_fn: policy,
reference, critic and reward passes, token rewards, GAE) and update (every minibatch step of the iteration,
with train_ppo's host round trip). Each piece is called once to compile, then `iterations` more times; "ms" is the
steady-state mean, "compile s" the first call minus that mean. tokens/s counts generated tokens for sampling
and every sequence token (prompt + response) for the passes over whole sequences.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx

from experiments import cli
from iterppo_jax import ppo, qfit, sampling, sft, sharding
from iterppo_jax import train_state as ts
from iterppo_jax.models import heads
from iterppo_jax.models import transformer as tf

EOS_ID, PAD_ID = 2, 0


def _timed(fn, iterations):
  """(first call seconds, mean of the next `iterations` calls); fn must block on its own result."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(iterations):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, float(np.mean(times))


def _row(name, first, steady, tokens, flops=0.0, peak_flops=0.0):
  """A table row; MFU = model FLOPs per second / the device's peak (0 when the peak is not configured)."""
  return {"name": name, "ms": 1e3 * steady, "tokens_per_s": tokens / steady, "compile_s": max(first - steady, 0.0),
          "mfu": (flops / steady / peak_flops) if peak_flops else 0.0}


def run_benchmark(config) -> list[dict]:
  """Runs every timing of `config` (configs/benchmark.py) and returns the table rows."""
  m, b = config.model, config.batch
  B, P, N = b.prompts, b.prompt_len, b.new_tokens
  if B % config.ppo.minibatch_size:
    raise ValueError(f"batch.prompts {B} must be a multiple of ppo.minibatch_size {config.ppo.minibatch_size}")
  model_config = tf.TransformerConfig(
      vocab_size=m.vocab_size, num_layers=m.num_layers, embed_dim=m.embed_dim, mlp_dim=m.mlp_dim,
      num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, max_len=P + N, style=m.style,
      tie_embeddings=m.tie_embeddings, rope_theta=m.rope_theta, dtype=m.dtype, param_dtype=m.param_dtype,
      remat=m.remat)
  mesh = sharding.make_mesh([tuple(a) for a in config.mesh])
  rng = np.random.default_rng(config.seed)
  tx = lambda: optax.adamw(config.learning_rate)  # noqa: E731
  make_policy = lambda: tf.Transformer(model_config, rngs=nnx.Rngs(config.seed))  # noqa: E731
  make_scalar = lambda: heads.ScalarModel(model_config, rngs=nnx.Rngs(config.seed + 1))  # noqa: E731

  prompt_tokens = jnp.asarray(rng.integers(3, m.vocab_size, size=(B, P)), jnp.int32)
  prompt_valid = jnp.ones((B, P), bool)
  L = P + N
  sequence = {"tokens": rng.integers(3, m.vocab_size, size=(B, L)).astype(np.int32),
              "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)), "valid": np.ones((B, L), bool),
              "loss_mask": (np.arange(L) >= P)[None].repeat(B, 0).astype(np.float32),
              "last_index": np.full((B,), L - 1, np.int32), "target": rng.uniform(size=B).astype(np.float32)}
  rows = []
  peak = config.peak_tflops * 1e12 * jax.device_count()
  with sharding.use_mesh(mesh):
    policy, policy_state = ts.init_trainable(make_policy, tx(), mesh)
    # Model FLOPs (Kaplan et al.): 2 per parameter per token forward, 6 forward + backward.
    n = tf.num_params(policy_state.params)
    fwd, train = (lambda t: 2.0 * n * t), (lambda t: 6.0 * n * t)  # noqa: E731

    # ---- sampler ----
    def sample_once(key=jax.random.key(config.seed)):
      out = sampling.sample(policy.graphdef, policy_state.params, prompt_tokens, prompt_valid, key,
                            max_new_tokens=N, eos_id=EOS_ID, pad_id=PAD_ID, ignore_eos=True)
      jax.block_until_ready(out.tokens)
    rows.append(_row("sampler", *_timed(sample_once, config.iterations), B * N, fwd(B * L), peak))

    # ---- SFT and Q-fit steps ----
    sft_batch = ts.device_batch({k: sequence[k] for k in ("tokens", "positions", "valid", "loss_mask")}, mesh)
    holder = {"state": policy_state}

    def sft_once(step=sft.make_sft_step(policy)):
      holder["state"], metrics = step(holder["state"], sft_batch)
      jax.block_until_ready(metrics)
    rows.append(_row("sft step", *_timed(sft_once, config.iterations), B * L, train(B * L), peak))
    policy_state = holder.pop("state")

    q_tr, q_state = ts.init_trainable(make_scalar, tx(), mesh)
    q_batch = ts.device_batch({k: sequence[k] for k in ("tokens", "positions", "valid", "last_index", "target")},
                              mesh)
    holder["state"] = q_state

    def qfit_once(step=qfit.make_qfit_step(q_tr)):
      holder["state"], metrics = step(holder["state"], q_batch)
      jax.block_until_ready(metrics)
    rows.append(_row("qfit step", *_timed(qfit_once, config.iterations), B * L, train(B * L), peak))
    q_params = holder.pop("state").params

    # ---- one PPO iteration, by phase (the body of ppo.train_ppo) ----
    critic, critic_state = ts.init_trainable(make_scalar, tx(), mesh)
    ref_params = ts.copy_params(policy_state.params)
    cfg = ppo.PPOConfig(kl_coef=config.ppo.kl_coef, epochs=config.ppo.epochs,
                        minibatch_size=config.ppo.minibatch_size, max_new_tokens=N)
    experience_fn = ppo.make_experience_fn(policy, critic, ppo.make_q_reward_fn(q_tr), cfg)
    update_fn = ppo.make_update_step(policy, critic, cfg, P)
    state = ppo.PPOState(policy=policy_state, critic=critic_state)
    phases = {"generation": [], "scoring": [], "update": []}
    for i in range(config.iterations + 1):
      start = time.perf_counter()
      out = sampling.sample(policy.graphdef, state.policy.params, prompt_tokens, prompt_valid,
                            jax.random.key(i), max_new_tokens=N, eos_id=EOS_ID, pad_id=PAD_ID)
      jax.block_until_ready(out.tokens)
      generated = time.perf_counter()
      exp = experience_fn(state.policy.params, ref_params, state.critic.params, q_params, out.prompt_tokens,
                          out.prompt_valid, out.tokens, out.valid, jnp.float32(cfg.kl_coef))
      jax.block_until_ready(exp)
      scored = time.perf_counter()
      exp = jax.device_get(exp)
      for epoch in range(cfg.epochs):
        order = np.random.default_rng([config.seed, i, epoch]).permutation(B)
        for mb in range(B // cfg.minibatch_size):
          idx = order[mb * cfg.minibatch_size:(mb + 1) * cfg.minibatch_size]
          state, metrics = update_fn(state, ts.device_batch({k: exp[k][idx] for k in ppo._UPDATE_KEYS}, mesh))
      jax.block_until_ready(metrics)
      done = time.perf_counter()
      for name, seconds in (("generation", generated - start), ("scoring", scored - generated),
                            ("update", done - scored)):
        phases[name].append(seconds)
    response_tokens = B * N  # with a random policy, end tokens are rare: about every row runs to N
    n_updates = cfg.epochs * (B // cfg.minibatch_size)
    tokens = {"generation": response_tokens, "scoring": B * L, "update": n_updates * cfg.minibatch_size * L}
    # Scoring runs four forward passes (policy, reference, critic, reward model); the update trains two models.
    flops = {"generation": fwd(B * L), "scoring": 4 * fwd(B * L), "update": 2 * train(tokens["update"])}
    for name, times in phases.items():
      rows.append(_row(f"ppo {name}", times[0], float(np.mean(times[1:])), tokens[name], flops[name], peak))
    total = [sum(t) for t in zip(*phases.values())]
    rows.append(_row("ppo iteration", total[0], float(np.mean(total[1:])), B * L, sum(flops.values()), peak))
  return rows


def format_table(rows, title="") -> str:
  lines = [title] if title else []
  lines.append(f"{'piece':<16}{'ms':>12}{'tokens/s':>14}{'compile s':>12}{'MFU':>8}")
  for r in rows:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
    lines.append(f"{r['name']:<16}{r['ms']:>12.1f}{r['tokens_per_s']:>14.0f}{r['compile_s']:>12.2f}{mfu:>8}")
  return "\n".join(lines)


def main(argv):
  del argv
  config = flags.FLAGS.config
  m, b = config.model, config.batch
  title = (f"workload {config.workload}: {m.num_layers} layers, width {m.embed_dim}, vocab {m.vocab_size}, "
           f"{m.dtype} compute; {b.prompts} prompts x {b.prompt_len} tokens, {b.new_tokens} new; "
           f"mean of {config.iterations} calls after the first; devices {jax.devices()}")
  print(format_table(run_benchmark(config), title))


if __name__ == "__main__":
  # Defined here, not at import: tests import run_benchmark, and absl refuses a second --config definition.
  cli.define_config("configs/benchmark.py")
  cli.run(main, default="configs/benchmark.py")
