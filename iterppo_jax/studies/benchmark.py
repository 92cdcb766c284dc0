"""Times the jitted pieces of Iterative PPO on random tokens (issue #7): the rows, the tables and the sweep's cells.

The command line is experiments/benchmark.py, whose docstring says what every row and column measures; it
reads configs/benchmark.py once into typed, checked `Settings` (`load`), sets XLA_FLAGS before run_benchmark
first touches a device, and runs a sweep's cells each in a process of its own.
experiments/benchmark_suite.py reads back the JSON that runs write (iteration_parts, failure_line) and makes its
report with `suite_report`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from iterppo_jax import errors
from iterppo_jax import ppo, qfit, sampling, settings, sft, sharding, solvers
from iterppo_jax import train_state as ts
from iterppo_jax.models import heads
from iterppo_jax.models import lora as lora_lib
from iterppo_jax.models import transformer as tf

EOS_ID, PAD_ID = 2, 0
PIECES = ("sampler", "sft", "qfit", "ppo")


# ---- configs/benchmark.py's settings, typed and checked before any device is touched. No field has a default:
# the config file holds every key's value and why, and a key it lost is named (settings.build) ----

@dataclasses.dataclass(frozen=True)
class Model:
  style: str
  num_layers: int
  embed_dim: int
  mlp_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  vocab_size: int
  tie_embeddings: bool
  rope_theta: float
  dtype: str
  param_dtype: str
  remat: bool


@dataclasses.dataclass(frozen=True)
class Lora:
  rank: int  # 0: full fine-tuning
  alpha: float
  targets: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Batch:
  prompts: int  # B
  prompt_len: int  # P
  new_tokens: int  # N


@dataclasses.dataclass(frozen=True)
class Ppo:
  epochs: int
  minibatch_size: int  # 0: the whole batch
  kl_coef: float


@dataclasses.dataclass(frozen=True)
class Sweep:
  new_tokens: tuple[int, ...]
  prompts: tuple[int, ...]
  workloads: tuple[str, ...]
  cell_timeout_s: int  # 0: no limit


@dataclasses.dataclass(frozen=True)
class Settings:
  """A benchmark's settings (configs/benchmark.py), typed and frozen: what this module and its command read."""
  workload: str
  seed: int
  iterations: int
  peak_tflops: float
  peak_hbm_gbps: float
  xla_flags: str
  pieces: tuple[str, ...]
  json_out: str
  sweep: Sweep
  model: Model
  lora: Lora
  batch: Batch
  ppo: Ppo
  learning_rate: float
  mesh: tuple[tuple[str, int], ...]


DTYPES = ("float32", "bfloat16", "float16")
CHOICES = {"model.style": ("llama", "gpt2"), "model.dtype": DTYPES, "model.param_dtype": DTYPES}
COUNTS = {"seed": 0, "iterations": 1,  # each row is the mean of the calls after the compiling one: one at least
          "model.num_layers": 1, "model.embed_dim": 1, "model.mlp_dim": 1, "model.num_heads": 1,
          "model.num_kv_heads": 1, "model.head_dim": 1, "model.vocab_size": 4,  # random tokens are ids 3 and up
          "batch.prompts": 1, "batch.prompt_len": 1, "batch.new_tokens": 1, "ppo.epochs": 1,
          "ppo.minibatch_size": 0, "lora.rank": 0, "sweep.cell_timeout_s": 0}
REALS = {"peak_tflops": (0.0, math.inf, True, False), "peak_hbm_gbps": (0.0, math.inf, True, False),
         "learning_rate": (0.0, math.inf, False, False), "model.rope_theta": (0.0, math.inf, False, False),
         "ppo.kl_coef": (0.0, math.inf, True, False), "lora.alpha": (0.0, math.inf, False, False)}


def is_sweep(config: Settings) -> bool:
  """Whether the command runs a sweep (cells in processes of their own) rather than one table."""
  return bool(config.sweep.new_tokens or config.sweep.prompts or config.sweep.workloads)


def load(config) -> Settings:
  """configs/benchmark.py's ConfigDict as typed `Settings`, every key checked before any work: an unknown or
  missing key, a value of the wrong type, a choice, size or rate out of range, or a rule between keys is one
  errors.SettingsError naming the key, the value and what is allowed."""
  typed = settings.build(Settings, config)
  settings.check_keys(typed, CHOICES, COUNTS, REALS)
  unknown = sorted(set(typed.pieces) - set(PIECES))
  if unknown:
    raise errors.SettingsError(f"config.pieces: unknown benchmark pieces {unknown}; expected some of {PIECES}")
  for key in ("new_tokens", "prompts"):
    bad = [n for n in getattr(typed.sweep, key) if isinstance(n, bool) or not isinstance(n, int) or n < 1]
    if bad:
      raise errors.SettingsError(f"config.sweep.{key} must hold integers >= 1, got {bad}")
  if typed.model.num_heads % typed.model.num_kv_heads:
    raise errors.SettingsError(f"config.model.num_kv_heads ({typed.model.num_kv_heads}) must divide "
                               f"model.num_heads ({typed.model.num_heads})")
  if typed.lora.rank and (not typed.lora.targets or set(typed.lora.targets) - set(lora_lib.ALL_TARGETS)):
    raise errors.SettingsError(f"config.lora.targets must be a non-empty tuple of {', '.join(lora_lib.ALL_TARGETS)}, "
                               f"got {typed.lora.targets!r}")
  # A sweep's cells set their own batch.prompts, each checked in its own process (a cell that cannot split its
  # batch is a failed row, not the end of the sweep).
  if not is_sweep(typed) and typed.batch.prompts % _minibatch(typed):
    raise errors.SettingsError(f"config.batch.prompts ({typed.batch.prompts}) must be a multiple of "
                               f"ppo.minibatch_size ({typed.ppo.minibatch_size})")
  return typed


def _clock():
  return time.perf_counter(), time.process_time()


def _timed_step(step, state, batch, iterations: int):
  """_timed of a jitted `step(state, batch) -> (state, metrics)` whose state is donated: each call takes the state
  the last one returned. Returns (_timed's result, the final state)."""
  holder = {"state": state}

  def once():
    holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready(metrics)
  return _timed(once, iterations), holder["state"]


def _timed(fn, iterations):
  """(first call s, mean wall s, mean process CPU s) of fn, the means over the `iterations` calls after the first.

  fn must block on its own result.
  """
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  wall, cpu = [], []
  for _ in range(iterations):
    w, c = _clock()
    fn()
    wall.append(time.perf_counter() - w)
    cpu.append(time.process_time() - c)
  return first, float(np.mean(wall)), float(np.mean(cpu))


def _row(name, first, steady, cpu, tokens, flops=0.0, peak_flops=0.0, hbm_bytes=0.0, peak_bandwidth=0.0):
  """A table row; MFU and HBM are shares of the configured peaks (0 when the peak is not configured)."""
  return {"name": name, "ms": 1e3 * steady, "cpu_ms": 1e3 * cpu, "tokens_per_s": tokens / steady,
          "compile_s": max(first - steady, 0.0), "mfu": (flops / steady / peak_flops) if peak_flops else 0.0,
          "hbm": (hbm_bytes / steady / peak_bandwidth) if peak_bandwidth else 0.0}


def _traffic(n_params, param_bytes, model_config, B, P, N):
  """Lower bounds on the bytes each piece must move through device memory: weights and KV cache only.

  Activations are left out (they can stay on chip for small batches), so the HBM share is a floor.
    forward pass over whole sequences: the weights once;
    sampling: the weights at the prefill and at every one of the N - 1 decoding forwards, plus every step's read
      of the KV cache filled so far (2 L K H values per slot per row);
    training step: weights read forward and backward, the gradient written, and AdamW reading parameter,
      gradient and both moments and writing parameter and moments (f32): 10 parameter-sized transfers.
  """
  c = model_config
  weights = n_params * param_bytes
  slot = 2 * c.num_layers * c.num_kv_heads * c.head_dim * jnp.dtype(c.dtype).itemsize * B
  kv_reads = sum((P + i + 1) * slot for i in range(N - 1))
  return {"forward": weights, "sample": N * weights + kv_reads, "train": 10 * n_params * 4}


def _minibatch(config: Settings) -> int:
  """config.ppo.minibatch_size, 0 meaning the whole batch (issue #7's one minibatch)."""
  return config.ppo.minibatch_size or config.batch.prompts


def run_benchmark(config: Settings) -> list[dict]:
  """Runs every timing of `config` (configs/benchmark.py's settings, `load`) and returns the table rows."""
  m, b = config.model, config.batch
  B, P, N = b.prompts, b.prompt_len, b.new_tokens
  minibatch = _minibatch(config)
  model_config = tf.TransformerConfig(
      vocab_size=m.vocab_size, num_layers=m.num_layers, embed_dim=m.embed_dim, mlp_dim=m.mlp_dim,
      num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, max_len=P + N, style=m.style,
      tie_embeddings=m.tie_embeddings, rope_theta=m.rope_theta, dtype=m.dtype, param_dtype=m.param_dtype,
      remat=m.remat)
  mesh = sharding.make_mesh(list(config.mesh))
  rng = np.random.default_rng(config.seed)
  tx = lambda: optax.adamw(config.learning_rate)  # noqa: E731
  make_policy = lambda: tf.Transformer(model_config, rngs=nnx.Rngs(config.seed))  # noqa: E731
  make_scalar = lambda: heads.ScalarModel(model_config, rngs=nnx.Rngs(config.seed + 1))  # noqa: E731
  lora = lora_lib.LoraConfig.from_section(config.lora)
  scalar_lora = lora_lib.LoraConfig.from_section(config.lora, train_full=heads.ScalarModel.head_names())

  prompt_tokens = jnp.asarray(rng.integers(3, m.vocab_size, size=(B, P)), jnp.int32)
  prompt_valid = jnp.ones((B, P), bool)
  L = P + N
  sequence = {"tokens": rng.integers(3, m.vocab_size, size=(B, L)).astype(np.int32),
              "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)), "valid": np.ones((B, L), bool),
              "loss_mask": (np.arange(L) >= P)[None].repeat(B, 0).astype(np.float32),
              "last_index": np.full((B,), L - 1, np.int32), "target": rng.uniform(size=B).astype(np.float32)}
  rows = []
  peak = config.peak_tflops * 1e12 * jax.device_count()
  bandwidth = config.peak_hbm_gbps * 1e9 * jax.device_count()
  with sharding.use_mesh(mesh):
    policy, policy_state = ts.init_trainable(make_policy, tx(), mesh, lora=lora)
    # Model FLOPs (Kaplan et al.): 2 per parameter per token forward, 6 forward + backward.
    n = tf.num_params(policy_state.params.frozen if lora else policy_state.params)
    fwd, train = (lambda t: 2.0 * n * t), (lambda t: 6.0 * n * t)  # noqa: E731
    traffic = _traffic(n, jnp.dtype(m.param_dtype).itemsize, model_config, B, P, N)

    pieces = set(config.pieces)

    # ---- sampler ----
    sampled_params = policy.merged_params(policy_state.params)  # LoRA: the sampler runs on merged weights

    def sample_once(key=jax.random.key(config.seed)):
      out = sampling.sample(policy.graphdef, sampled_params, prompt_tokens, prompt_valid, key,
                            max_new_tokens=N, eos_id=EOS_ID, pad_id=PAD_ID, ignore_eos=True)
      jax.block_until_ready(out.tokens)
    if "sampler" in pieces:
      rows.append(_row("sampler", *_timed(sample_once, config.iterations), B * N, fwd(B * L), peak,
                       traffic["sample"], bandwidth))

    # ---- SFT and Q-fit steps ----
    sft_batch = ts.device_batch({k: sequence[k] for k in ("tokens", "positions", "valid", "loss_mask")}, mesh)
    if "sft" in pieces:
      timing, policy_state = _timed_step(sft.make_sft_step(policy), policy_state, sft_batch, config.iterations)
      rows.append(_row("sft step", *timing, B * L, train(B * L), peak, traffic["train"], bandwidth))

    q_tr, q_state = ts.init_trainable(make_scalar, tx(), mesh, lora=scalar_lora)
    q_batch = ts.device_batch({k: sequence[k] for k in ("tokens", "positions", "valid", "last_index", "target")},
                              mesh)
    if "qfit" in pieces:
      timing, q_state = _timed_step(qfit.make_qfit_step(q_tr), q_state, q_batch, config.iterations)
      rows.append(_row("qfit step", *timing, B * L, train(B * L), peak, traffic["train"], bandwidth))
    q_params = q_state.params

    if "ppo" not in pieces:
      return rows

    # ---- one PPO iteration, by phase: the pieces solvers.train runs (PPO's row), timed one by one ----
    critic, critic_state = ts.init_trainable(make_scalar, tx(), mesh, lora=scalar_lora)
    ref_params = ts.copy_params(policy.merged_params(policy_state.params))
    cfg = ppo.PPOConfig(kl_coef=config.ppo.kl_coef, epochs=config.ppo.epochs,
                        minibatch_size=minibatch, max_new_tokens=N)
    solver = solvers.SOLVERS["ppo"]
    reuse_logprobs = ppo.sampler_logprobs_reusable(policy, policy_state.params)
    programs = solver.programs(policy, critic, ppo.make_q_reward_fn(q_tr), cfg, P, B, reuse_logprobs)
    take = solvers.make_take_rows(mesh, programs.update_keys)
    kl_coef = jnp.float32(cfg.kl_coef)
    prompts = {"tokens": np.asarray(prompt_tokens), "valid": np.asarray(prompt_valid)}
    state = ppo.PPOState(policy=policy_state, critic=critic_state)
    phases = {"generation": [], "scoring": [], "update": []}

    def generate(params, i):
      out = solvers.sample(policy, params, prompts, np.arange(B), jax.random.key(i), cfg, eos_id=EOS_ID,
                           pad_id=PAD_ID, ignore_eos=True)
      jax.block_until_ready(out.tokens)
      return out

    for i in range(config.iterations + 1):
      t0 = _clock()
      out = generate(state.policy.params, i)
      t1 = _clock()
      exp = programs.experience(state, ref_params, q_params, out, kl_coef)
      jax.block_until_ready(exp)
      t2 = _clock()
      state, step_metrics = solvers.run_epochs(
          programs.update, take, state, exp, B, cfg.minibatch_size, cfg.epochs,
          lambda epoch, i=i: np.random.default_rng([config.seed, i, epoch + 1]).permutation(B))
      jax.device_get(step_metrics)
      t3 = _clock()
      for name, (a, z) in (("generation", (t0, t1)), ("scoring", (t1, t2)), ("update", (t2, t3))):
        phases[name].append((z[0] - a[0], z[1] - a[1]))
    n_updates = cfg.epochs * (B // cfg.minibatch_size)
    tokens = {"generation": B * N, "scoring": B * L, "update": n_updates * cfg.minibatch_size * L}
    # Scoring runs the reference, critic and reward passes, and the policy's unless its log-probs come from the
    # sampler (float32 compute); the update trains two models.
    passes = 3 if reuse_logprobs else 4
    flops = {"generation": fwd(B * L), "scoring": passes * fwd(B * L), "update": 2 * train(tokens["update"])}
    hbm = {"generation": traffic["sample"], "scoring": passes * traffic["forward"],
           "update": 2 * n_updates * traffic["train"]}

    def phase_row(name, times, n_tokens, n_flops, n_bytes):
      """A row from one phase's (wall, cpu) per call: the first call, then the mean of the others."""
      steady = [float(np.mean([t[column] for t in times[1:]])) for column in (0, 1)]
      return _row(name, times[0][0], *steady, n_tokens, n_flops, peak, n_bytes, bandwidth)

    def summed(phase_times):
      """Per call, the sum of the phases' (wall, cpu): the whole iteration."""
      return [tuple(map(sum, zip(*calls))) for calls in zip(*phase_times)]

    for name, times in phases.items():
      rows.append(phase_row(f"ppo {name}", times, tokens[name], flops[name], hbm[name]))
    rows.append(phase_row("ppo iteration", summed(phases.values()), B * L, sum(flops.values()),
                          sum(hbm.values())))

    # ---- the same iteration as solvers.train runs it when one update takes the whole batch (ppo.fuses): the
    # update's policy and critic passes also give the old log-probs and values, so scoring runs only the
    # reference and the reward model, inside the update's program ----
    if ppo.fuses(cfg, B):
      fused_phases = {"generation": [], "fused": []}
      for i in range(config.iterations + 1):
        t0 = _clock()
        out = generate(state.policy.params, i)
        t1 = _clock()
        state, metrics, _ = programs.fused(state, ref_params, q_params, out, kl_coef)
        jax.device_get(metrics)
        t2 = _clock()
        for name, (a, z) in (("generation", (t0, t1)), ("fused", (t1, t2))):
          fused_phases[name].append((z[0] - a[0], z[1] - a[1]))
      fused_flops = 2 * fwd(B * L) + 2 * train(B * L)
      fused_hbm = 2 * traffic["forward"] + 2 * traffic["train"]
      rows.append(phase_row("ppo scoring+update, fused", fused_phases["fused"], B * L, fused_flops, fused_hbm))
      rows.append(phase_row("ppo iteration, fused", summed(fused_phases.values()), B * L,
                            flops["generation"] + fused_flops, hbm["generation"] + fused_hbm))
  return rows


def format_table(rows, title="") -> str:
  lines = [title] if title else []
  lines.append(f"{'piece':<27}{'ms':>10}{'cpu ms':>10}{'tokens/s':>12}{'compile s':>11}{'MFU':>8}{'HBM':>8}")
  for r in rows:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
    hbm = f"{100 * r['hbm']:.1f}%" if r["hbm"] else "-"
    lines.append(f"{r['name']:<27}{r['ms']:>10.1f}{r['cpu_ms']:>10.1f}{r['tokens_per_s']:>12.0f}"
                 f"{r['compile_s']:>11.2f}{mfu:>8}{hbm:>8}")
  return "\n".join(lines)


def peak_memory_bytes() -> int | None:
  """The first local device's peak allocation so far (GPU/TPU), or None where jax does not report it (CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def table_title(config: Settings) -> str:
  """The table's title: the workload's shapes, the PPO settings, the number of calls and the devices."""
  m, b = config.model, config.batch
  return (f"workload {config.workload}: {m.num_layers} layers, width {m.embed_dim}, vocab {m.vocab_size}, "
          f"{m.dtype} compute over {m.param_dtype} params{', remat' if m.remat else ''}; {b.prompts} prompts x "
          f"{b.prompt_len} tokens, {b.new_tokens} new; PPO {config.ppo.epochs} epoch(s) of minibatches of "
          f"{_minibatch(config)}; mean of {config.iterations} calls after the first; "
          f"devices {jax.devices()}")


def sweep_cells(config: Settings) -> list[dict]:
  """The sweep's cells: every (workload, new_tokens, prompts), an empty axis standing for the config's own value."""
  return [{"workload": w, "new_tokens": n, "prompts": p}
          for w in (config.sweep.workloads or (config.workload,))
          for n in (config.sweep.new_tokens or (config.batch.new_tokens,))
          for p in (config.sweep.prompts or (config.batch.prompts,))]


def failure_line(output: str, returncode: int) -> str:
  """The line of a failed run's output that says why: its last exception line (not jax's traceback note)."""
  lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
  errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b|^[\w.]+Error:", ln)]
  return ((errors or lines or [f"exit status {returncode}"])[-1])[:200]


def iteration_parts(rows: dict) -> tuple[float, float, dict]:
  """(generation ms, scoring + update ms, the iteration's row) from one run's rows by name: the fused iteration
  where it ran (what solvers.train runs for one epoch of one minibatch), else the separate passes."""
  fused = "ppo iteration, fused" in rows
  rest = rows["ppo scoring+update, fused"]["ms"] if fused else rows["ppo scoring"]["ms"] + rows["ppo update"]["ms"]
  return rows["ppo generation"]["ms"], rest, rows["ppo iteration, fused" if fused else "ppo iteration"]


def format_sweep(results) -> str:
  """The scaling table: per cell generation, decoding per token, scoring + update and the whole iteration."""
  lines = [f"{'workload':<12}{'prompts':>8}{'new':>6}{'gen ms':>10}{'ms/token':>10}{'score+upd ms':>14}"
           f"{'iter ms':>10}{'iter MFU':>10}{'peak GiB':>10}  status"]
  for r in results:
    rows = {row["name"]: row for row in r["rows"]}
    peak = f"{r['peak_bytes'] / 2**30:.1f}" if r.get("peak_bytes") else "-"
    if r["error"] or "ppo generation" not in rows:
      lines.append(f"{r['workload']:<12}{r['prompts']:>8}{r['new_tokens']:>6}{'-':>10}{'-':>10}{'-':>14}{'-':>10}"
                   f"{'-':>10}{peak:>10}  failed: {r['error']}")
      continue
    gen, rest, iteration = iteration_parts(rows)
    mfu = f"{100 * iteration['mfu']:.1f}%" if iteration["mfu"] else "-"
    lines.append(f"{r['workload']:<12}{r['prompts']:>8}{r['new_tokens']:>6}{gen:>10.1f}{gen / r['new_tokens']:>10.2f}"
                 f"{rest:>14.1f}{iteration['ms']:>10.1f}{mfu:>10}{peak:>10}  ok")
  return "\n".join(lines)


def machine() -> dict:
  """What the numbers were measured on, for the JSON and docs/performance.md: device kind and count, jax, UTC date."""
  device = jax.devices()[0]
  return {"device_kind": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "date": time.strftime("%Y-%m-%d", time.gmtime())}


# ---- experiments/benchmark_suite.py's report, from the JSON its steps wrote ----

# Issue #7's peers, seconds per PPO iteration, one run each (ppo_0p5b on one H100 80GB, ppo_tiny on a 2-core CPU).
PEERS = {"ppo_0p5b": {"google-tunix 0.1.7": 2.14, "TRL 0.29.1": 7.47},
         "ppo_tiny": {"google-tunix 0.1.7": 1.81, "TRL 0.29.1": 1.39}}
TARGET_S = 0.5  # issue #7's target for both workloads


def _percent(x) -> str:
  return f"{100 * x:.1f}%" if x else "-"


def _gib(n) -> str:
  return f"{n / 2**30:.1f}" if n else "-"


def _cell_rows(cells: list[dict]) -> list[str]:
  """Markdown rows of a sweep: one per cell, its iteration split into generation and scoring + update."""
  lines = []
  for c in cells:
    rows = {r["name"]: r for r in c.get("rows", [])}
    label = f"| {c['workload']} | {c['prompts']} | {c['new_tokens']} |"
    if c.get("error") or "ppo generation" not in rows:
      lines.append(f"{label} - | - | - | - | {_gib(c.get('peak_bytes'))} | failed: {c.get('error', '')} |")
      continue
    gen, rest, iteration = iteration_parts(rows)
    lines.append(f"{label} {gen:.1f} ({gen / c['new_tokens']:.2f} per token) | {rest:.1f} | {iteration['ms']:.1f} | "
                 f"{_percent(iteration['mfu'])} | {_gib(c.get('peak_bytes'))} | ok |")
  return lines


def suite_report(out: str, steps: tuple[str, ...], workload: str = "ppo_0p5b") -> str:
  """experiments/benchmark_suite.py's suite.md: the tables of every step (of `steps`) whose JSON is in `out`,
  headed by the machine and date they came from."""
  results = {}
  for step in steps:
    path = os.path.join(out, f"{step}.json")
    if os.path.exists(path):
      with open(path) as f:
        results[step] = json.load(f)
  if not results:
    raise FileNotFoundError(f"no step results ({', '.join(s + '.json' for s in steps)}) in {out!r}")
  lines = []
  for step, result in results.items():
    m = result.get("machine")
    if m:
      lines.append(f"- {step}: measured {m['date']} on {m['device_count']} x {m['device_kind']} ({m['platform']}, "
                   f"{m['cpu_count']} CPU cores, jax {m['jax']})")
    else:
      lines.append(f"- {step}: failed: {result.get('error', 'no machine recorded')}")
  phases = results.get("phases", {})
  if phases.get("rows"):
    lines += ["", phases["title"], "", "| piece | ms | tokens/s | MFU | HBM share |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | {_percent(r['mfu'])} | {_percent(r['hbm'])} |"
              for r in phases["rows"]]
    lines += ["", f"Peak device memory: {_gib(phases.get('peak_bytes'))} GiB."]
    rows = {r["name"]: r for r in phases["rows"]}
    if "ppo generation" in rows:
      _, _, iteration = iteration_parts(rows)
      peers = ", ".join(f"{name} {s:.2f} s" for name, s in PEERS.get(workload, {}).items())
      lines += ["", f"One PPO iteration: **{iteration['ms'] / 1e3:.3f} s** (issue #7's target {TARGET_S} s"
                    + (f"; peers: {peers}" if peers else "") + ")."]
  for step, title in (("scaling", "How cost grows (one PPO iteration per cell)"),
                      ("largest", "The largest Llama shape whose whole iteration runs")):
    cells = results.get(step, {}).get("cells")
    if cells:
      lines += ["", f"{title}:", "", "| workload | prompts | new tokens | generation ms | scoring + update ms | "
                "iteration ms | iteration MFU | peak GiB | status |", "|---|---|---|---|---|---|---|---|---|"]
      lines += _cell_rows(cells)
  return "\n".join(lines) + "\n"
