"""The outer Iterative PPO loop (Algorithm 1 of Jiang et al. 2025; PAPER.md).

  setup:  behaviour logs -> tokenizer -> SFT pi_0 (behaviour cloning of what the business sent)
  for k = 0 .. K-1:
    collect   deploy pi_k in the simulator, log D_k (JSONL under workdir/data/)
    qfit      fit Q_k ~ Q^{pi_k} on D_k: a table over the domain's dialogue-state keys (qfit.view=dialogue_state,
              q_table.py; SARSA of pi_k or Monte Carlo) or a transformer on the rendered transcript
              (qfit.view=tokens; Monte Carlo, TD(0), TD(lambda) or FQE)
    ppo       solve max_pi E_{s~D_k, a~pi}[Q_k(s, a)] - beta KL(pi || pi_k) with token-level PPO -> pi_{k+1}
    eval      play pi_{k+1} on held-out simulated conversations: conversion (95% interval), turns, accept
              rate, KL to pi_0, and Q_k's calibration against true outcomes and the simulator's true Q

Every phase ends with a checkpoint and a line in workdir/progress.json, so rerunning with the same workdir
continues from the last completed phase (PPO also checkpoints inside the phase) and ends with the same
parameters as an uninterrupted run: all randomness is folded from (seed, iteration, phase, step).

With `loop.logs` set, one offline iteration runs on a user's own logs instead (no simulator): Q-fit on the
logs, PPO on their states, and the new policy is written to workdir/checkpoints/policy.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import re
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iterppo_jax import checkpoint as ckpt_lib
from iterppo_jax import conversation as conv_lib
from iterppo_jax import data as data_lib
from iterppo_jax import distributed
from iterppo_jax import errors
from iterppo_jax import explore
from iterppo_jax import io_utils
from iterppo_jax import label_noise
from iterppo_jax import lm_policy
from iterppo_jax import metrics as metrics_lib
from iterppo_jax import ppo as ppo_lib
from iterppo_jax import q_ranking
from iterppo_jax import q_table
from iterppo_jax import qfit as qfit_lib
from iterppo_jax import rendering
from iterppo_jax import sampling
from iterppo_jax import settings
from iterppo_jax import stats
from iterppo_jax import sft as sft_lib
from iterppo_jax import sharding
from iterppo_jax import solvers
from iterppo_jax import tokenizer as tok_lib
from iterppo_jax import train_state as ts
from iterppo_jax import workdir as workdir_lib
from iterppo_jax.envs import base as env_base
from iterppo_jax.envs import registry
from iterppo_jax.models import gguf as gguf_lib
from iterppo_jax.models import heads
from iterppo_jax.models import hf as hf_lib
from iterppo_jax.models import lora as lora_lib
from iterppo_jax.models import transformer as tf


# ---- building pieces from the config ----

def make_encoding(config: settings.Settings, tokenizer, renderer=rendering.TAGS) -> data_lib.Encoding:
  """The run's budgets (data.max_prompt_len, data.max_action_len, data.prompt_bucket) and rendering window
  (env.max_render_turns) with its tokenizer and renderer: the one place those keys are read. Every phase, study
  and entry point that encodes, renders or samples takes this object."""
  d = config.data
  return data_lib.Encoding(tokenizer, renderer, max_prompt_len=d.max_prompt_len, max_action_len=d.max_action_len,
                           max_render_turns=config.env.max_render_turns, prompt_bucket=d.prompt_bucket)


def model_config(config: settings.Settings, encoding: data_lib.Encoding) -> tf.TransformerConfig:
  """The policy's shape: model.*, or with model_dir the pretrained model's own (model.dtype, param_dtype and
  remat still ours), its vocabulary grown to the tokenizer's; its context a (prompt, action) row."""
  m = config.model
  if config.model_dir:
    if _is_gguf(config.model_dir):
      hf_cfg = gguf_lib.config_from_gguf(config.model_dir, dtype=m.dtype, param_dtype=m.param_dtype)
    else:
      hf_cfg = hf_lib.config_from_hf(hf_lib.read_config(config.model_dir), dtype=m.dtype, param_dtype=m.param_dtype)
    model_cfg = dataclasses.replace(hf_cfg, vocab_size=max(hf_cfg.vocab_size, encoding.tokenizer.vocab_size),
                                    remat=m.remat)
    if encoding.max_len > model_cfg.max_len:  # positions past the model's context would read outside its tables
      raise errors.SettingsError(
          f"config.data.max_prompt_len + data.max_action_len = {encoding.max_len} tokens exceeds the context of "
          f"{config.model_dir} ({model_cfg.max_len} tokens); lower them to fit")
    return model_cfg
  return tf.TransformerConfig(
      vocab_size=encoding.tokenizer.vocab_size, num_layers=m.num_layers, embed_dim=m.embed_dim, mlp_dim=m.mlp_dim,
      num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, max_len=encoding.max_len, style=m.style,
      tie_embeddings=m.tie_embeddings, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)


def q_model_config(run) -> tf.TransformerConfig:
  """The Q-model's shape: the policy's, with every non-zero qfit.model.* size in its place (issue #10)."""
  sizes = {n: v for n, v in dataclasses.asdict(run.config.qfit.model).items() if v}
  return dataclasses.replace(run.model_cfg, **sizes)


def optimizer(section, learning_rate: float | None = None) -> Any:
  """The optimizer a settings section (sft, qfit, ppo, ppo.critic) describes; `learning_rate` overrides its own
  (a study sweeping it keeps every other optimizer key read here, once)."""
  return ts.make_optimizer(ts.OptimizerConfig(
      learning_rate=section.learning_rate if learning_rate is None else learning_rate,
      warmup_steps=section.warmup_steps,
      weight_decay=section.weight_decay, clip_norm=section.clip_norm, grad_accum=section.grad_accum))


def seed_for(config: settings.Settings, *parts: int) -> int:
  """A seed folded from the run seed and (iteration, phase, ...), so a resume replays exactly."""
  return int(np.random.SeedSequence([config.seed, *parts]).generate_state(1)[0])


PHASE_IDS = {"behavior": 1, "sft": 2, "collect": 3, "qfit": 4, "ppo": 5, "eval": 6, "true_q": 7, "rank": 8}


def make_lm_policy(config: settings.Settings, name: str, graphdef, params, encoding: data_lib.Encoding, seed: int,
                   *, mesh=None, rules=None) -> lm_policy.LMPolicy:
  """An LM as a simulator policy, deployed as the run deploys it: the run's encoding (budgets, rendering
  window) and deployment temperature (loop.deploy_temperature, read here and in `sample_deployed` only). The
  one builder of an LMPolicy from settings (Run.lm_policy, studies/scaling.py, experiments/q_eval.py). With a
  `mesh` (this process's devices) it plays on a copy of the params there."""
  if mesh is not None:
    params = distributed.local_params(params, mesh)
  e = encoding
  return lm_policy.LMPolicy(name, graphdef, params, e.tokenizer, max_prompt_len=e.max_prompt_len,
                            max_new_tokens=e.max_action_len, seed=seed, temperature=config.loop.deploy_temperature,
                            renderer=e.renderer, max_render_turns=e.max_render_turns,
                            prompt_bucket=e.prompt_bucket, mesh=mesh, rules=rules)


def sample_deployed(config: settings.Settings, graphdef, params, encoding: data_lib.Encoding, prompts, samples: int,
                    key: jax.Array) -> tuple[dict, list[str]]:
  """`samples` responses of the LM to each prompt, sampled as it is deployed (loop.deploy_temperature), in
  batches of loop.play_batch rows (qfit.sample_next_actions): FQE's and SARSA's next actions of pi_k."""
  return qfit_lib.sample_next_actions(graphdef, params, encoding, prompts, samples, key=key,
                                      batch_size=config.loop.play_batch, temperature=config.loop.deploy_temperature)


@dataclasses.dataclass
class Run:
  """What a run holds while it goes: settings, workdir, world, tokenizer, mesh, writers, checkpoints."""
  config: settings.Settings  # the run's typed settings (settings.load of its ConfigDict): every phase reads these
  workdir: str
  domain: registry.Domain  # the domain of env.domain with the run's env settings
  env: env_base.TextEnv | None  # its simulator (None when the run learns from a user's logs)
  encoding: data_lib.Encoding  # tokenizer, renderer, budgets (make_encoding)
  model_cfg: tf.TransformerConfig
  mesh: Any
  writer: metrics_lib.MetricWriter
  progress: workdir_lib.Progress
  graphdef: Any = None
  rules: Any = sharding.DEFAULT_RULES  # logical axis -> mesh axes (config.mesh_rules over the defaults)
  local_mesh: Any = None  # multi-process runs: this process's own devices, where it plays (distributed.py)

  @property
  def tokenizer(self) -> tok_lib.Tokenizer:
    return self.encoding.tokenizer

  @property
  def renderer(self) -> rendering.Renderer:
    return self.encoding.renderer

  def checkpointer(self, name: str, max_to_keep: int | None = None) -> ckpt_lib.Checkpointer:
    return ckpt_lib.Checkpointer(self.workdir, name, max_to_keep=max_to_keep)

  def policy_trainable(self, params=None, lora=None, lora_seed=0):
    return ts.init_trainable(lambda: tf.Transformer(self.model_cfg, rngs=nnx.Rngs(seed_for(self.config, 0, 2))),
                             optimizer(self.config.sft), self.mesh, params=params, lora=lora, lora_seed=lora_seed)

  def lora(self, model: str, dueling: bool = False) -> lora_lib.LoraConfig | None:
    """How `model` ('policy' | 'critic' | 'qmodel') trains: LoRA adapters on a frozen base (config.lora, with
    a critic's or Q-model's head trained in full), or None for full fine-tuning."""
    section = self.config.lora
    if model not in section.models:
      return None
    head = () if model == "policy" else heads.ScalarModel.head_names(dueling)
    return lora_lib.LoraConfig.from_section(section, train_full=head)

  def lm_policy(self, name: str, graphdef, params, seed: int) -> lm_policy.LMPolicy:
    """The LM as a simulator policy. In a multi-process run each process plays on its own devices (a copy of
    the params there), so processes play their conversations independently."""
    return make_lm_policy(self.config, name, graphdef, params, self.encoding, seed, mesh=self.local_mesh,
                          rules=self.rules if self.local_mesh is not None else None)

  def play(self, policy, n: int, seed: int, name: str) -> list[conv_lib.Conversation]:
    """Plays n conversations with `policy` in loop.play_batch batches and keeps them as data/<name>.jsonl (read
    back if this phase already wrote them; play_and_log)."""
    return workdir_lib.play_and_log(self.workdir, self.env, self.config.loop.play_batch, policy, n, seed, name)

  @property
  def gamma(self) -> float:
    """The conversation MDP's discount: every return, target and true Q of the run uses it."""
    return self.config.gamma

  def examples(self, records):
    return self.encoding.examples(records, self.gamma)

  def log_name(self, j: int) -> str | None:
    """data/<name>.jsonl of D_j, the logs Q_j is fitted on: iter_<j>, except D_0 under loop.first_data=behavior
    or explore (those logs); j = -1 is the behaviour logs pi_0 was cloned from when pi_0 made D_0 (None
    otherwise: they are D_0 themselves)."""
    first = self.config.loop.first_data
    if j < 0:
      return "behavior" if first == "policy" else None
    return f"iter_{j}" if j or first == "policy" else first

  def arrays(self, examples, action="suggestion"):
    return self.encoding.arrays(examples, action)

  def sample_deployed(self, params, prompts, samples: int, key: jax.Array) -> tuple[dict, list[str]]:
    """pi's responses to `prompts` as deployed (module function sample_deployed), with the run's policy shape."""
    return sample_deployed(self.config, run_policy_graphdef(self), params, self.encoding, prompts, samples, key)

  def log(self, step: int, metrics: dict, phase: str, iteration: int | None = None) -> None:
    self.writer.write(step, metrics, phase=phase, iteration=iteration)


def save_params(run: Run, name: str, step: int, params, metadata=None) -> None:
  """Keeps `params` as workdir/checkpoints/<name>/<step> (public: the baselines and studies reuse run phases)."""
  c = run.checkpointer(name)
  c.save(step, params, metadata or {}, overwrite=True)
  c.close()


def restore_params(run: Run, name: str, step: int, template):
  """workdir/checkpoints/<name>/<step>, shaped and sharded like `template`."""
  c = run.checkpointer(name)
  tree, _ = c.restore(step, ckpt_lib.abstract_like(template))
  c.close()
  return tree


def save_trained(run: Run, name: str, step: int, params, metadata=None) -> None:
  """Keeps what training produced: for LoRA (ts.LoraParams) the adapters alone, not the frozen base."""
  save_params(run, name, step, ts.trainable_part(params), metadata)


def restore_trained(run: Run, name: str, step: int, template):
  """Inverse of save_trained: `template` gives shapes and shardings and, for LoRA, the frozen base."""
  return ts.attach_frozen(restore_params(run, name, step, ts.trainable_part(template)), template)


def load_policy(run: Run, step: int, previous):
  """pi_step's params from checkpoint 'policy' <step>. Trained with LoRA, that checkpoint holds the adapters
  PPO trained on the frozen pi_{step-1} (`previous`), and pi_step = pi_{step-1} + (alpha / r) A B."""
  lora = run.lora("policy")
  if lora is None:
    return restore_params(run, "policy", step, previous)
  template = jax.eval_shape(lambda p: lora_lib.init_adapters(p, lora, jax.random.key(0)), previous)
  adapters = restore_params(run, "policy", step, template)
  return ts.merged(ts.LoraParams(frozen=previous, adapters=adapters), lora)


# ---- phases ----

def setup(config, workdir: str) -> tuple[Run, list[conv_lib.Conversation]]:
  """Builds the run: behaviour (or user) logs, the tokenizer, the mesh and the writers.

  `config` is the run's ConfigDict: it is written to workdir/config.json, and the run reads the typed settings
  made from it (settings.load: every choice, size and rule between keys checked, before anything is written).
  """
  raw, config = config, settings.load(config)
  if config.loop.logs:  # a user's logs are read and validated in full before anything is written
    report = conv_lib.ReadReport()
    logs = conv_lib.read_glob(config.loop.logs, skip_invalid=config.loop.skip_invalid, report=report)
    if not logs:
      raise conv_lib.ConversationFormatError(f"{config.loop.logs}: no valid conversation ({report.skipped} lines "
                                             f"skipped; first: {report.errors[:1]})")
    if report.skipped:
      print(f"skipped {report.skipped} invalid lines; first: {report.errors[:3]}")
  os.makedirs(workdir, exist_ok=True)
  if distributed.is_writer():
    io_utils.atomic_write_text(os.path.join(workdir, "config.json"), raw.to_json_best_effort(indent=2))
  progress = workdir_lib.Progress(workdir)
  # Losses must stay finite; eval statistics may be NaN (an AUC with one class in a tiny held-out set).
  writer = metrics_lib.MetricWriter(workdir, tensorboard=config.loop.tensorboard,
                                    fail_on_nonfinite=("sft/loss", "qfit/loss", "ppo/policy_loss",
                                                       "ppo/value_loss"), active=distributed.is_writer())
  mesh = sharding.make_mesh([tuple(a) for a in config.mesh])
  domain = registry.domain(config.env)
  env = None if config.loop.logs else domain.make_env()
  if not config.loop.logs:
    behaviour = domain.policy("behavior")
    logs = workdir_lib.play_and_log(workdir, env, config.loop.play_batch, behaviour, config.sft.behavior_conversations,
                        seed_for(config, 0, PHASE_IDS["behavior"]), "behavior")
  tok_dir = os.path.join(workdir, "tokenizer")
  model_dir = config.model_dir
  if not distributed.is_writer():  # process 0 trains or loads it and keeps it in the workdir
    tokenizer = None
  elif os.path.isdir(tok_dir):
    tokenizer = tok_lib.load_tokenizer(tok_dir)
  elif config.tokenizer.path or model_dir:
    # A pretrained tokenizer gains our role / end-of-turn tokens; keep that version with the run.
    if not config.tokenizer.path and _is_gguf(model_dir):  # its vocabulary and chat template are in the file
      tokenizer = tok_lib.from_hf(gguf_lib.tokenizer_from_gguf(model_dir))
    else:
      tokenizer = tok_lib.load_tokenizer(config.tokenizer.path or model_dir)
    tokenizer.save(tok_dir)
  else:
    tokenizer = tok_lib.train_bpe(tok_lib.corpus_from_conversations(logs), config.tokenizer.vocab_size, tok_dir)
  distributed.barrier("tokenizer")
  if tokenizer is None:
    tokenizer = tok_lib.load_tokenizer(tok_dir)
  renderer = (rendering.chat(tokenizer.hf, config.data.system_prompt) if config.data.chat_template
              else rendering.TAGS)
  encoding = make_encoding(config, tokenizer, renderer)
  model_cfg = model_config(config, encoding)
  run = Run(config, workdir, domain, env, encoding, model_cfg, mesh, writer, progress,
            rules=sharding.rules_from_config(config.mesh_rules),
            local_mesh=distributed.local_mesh() if distributed.process_count() > 1 else None)
  return run, logs


def _is_gguf(model_dir: str) -> bool:
  """`model_dir` names a GGUF file (llama.cpp's single-file checkpoint) rather than a Hugging Face directory."""
  return model_dir.endswith(".gguf") and os.path.isfile(model_dir)


def load_pretrained(run: Run):
  """The parameters of config.model_dir (a GGUF file or a Hugging Face directory), with the vocabulary grown to
  the run's tokenizer (our role and turn tokens)."""
  model_dir, m = run.config.model_dir, run.model_cfg
  load = gguf_lib.load_gguf if _is_gguf(model_dir) else hf_lib.load_pretrained
  hf_cfg, params = load(model_dir, mesh=run.mesh, dtype=m.dtype, param_dtype=m.param_dtype)
  if run.model_cfg.vocab_size > hf_cfg.vocab_size:
    _, params = hf_lib.resize_vocab(hf_cfg, params, run.model_cfg.vocab_size, mesh=run.mesh)
  return params


def evaluate_pretrained(run: Run) -> dict:
  """loop.eval_pretrained: the pretrained model of config.model_dir deployed as loaded (the paper's prompted
  pi_0, before any SFT), on the same held-out customers as every pi_k."""
  done = run.progress.get("eval/pretrained")
  if done:
    return done
  return evaluate_policy(run, 0, load_pretrained(run), None, "pretrained", key="pretrained")


def train_pi0(run: Run, logs) -> tuple[ts.Trainable, Any]:
  """SFT pi_0 on what the business sent in the logs (checkpoint 'policy' step 0)."""
  c = run.config
  pretrained = None
  lora = run.lora("policy")
  # With LoRA the SFT checkpoint holds adapters only: a resumed run reads the base again.
  if c.model_dir and (lora is not None or not run.progress.get("sft")):
    pretrained = load_pretrained(run)
  trainable, state = run.policy_trainable(params=pretrained, lora=lora,
                                          lora_seed=seed_for(c, 0, PHASE_IDS["sft"], 1))
  if run.progress.get("sft"):
    return trainable, trainable.merged_params(restore_trained(run, "policy", 0, state.params))
  examples = [e for e in run.examples(logs) if e.sent is not None]
  arrays = run.arrays(examples, action="sent")
  note_truncation(run, arrays, "sft", 0)
  n_hold = max(len(examples) // 10, 1)
  held = {k: v[:n_hold] for k, v in arrays.items()}
  train = {k: v[n_hold:] for k, v in arrays.items()}
  eval_fn = sft_lib.make_eval_fn(trainable)
  measured = {k: v[:c.sft.eval_examples or n_hold] for k, v in held.items()}  # 0: all held out
  before = sft_lib.evaluate(eval_fn, state.params, measured, c.sft.batch_size, run.mesh)
  state, _ = sft_lib.train_sft(trainable, state, train, steps=c.sft.steps, batch_size=c.sft.batch_size,
                               seed=seed_for(c, 0, PHASE_IDS["sft"]), writer=run.writer, desc="sft")
  after = sft_lib.evaluate(eval_fn, state.params, measured, c.sft.batch_size, run.mesh) if c.sft.steps else before
  run.log(c.sft.steps, {"sft/heldout_nll_before": before["nll"], "sft/heldout_nll": after["nll"],
                        "sft/heldout_accuracy": after["accuracy"]}, phase="sft", iteration=0)
  save_trained(run, "policy", 0, state.params, {"phase": "sft"})
  run.progress.mark("sft", {"heldout_nll": after["nll"], "heldout_nll_before": before["nll"]})
  return trainable, trainable.merged_params(state.params)


def fit_q(run: Run, k: int, records, policy_params):
  """Q_k on D_k; returns (q trainable, params, eval metrics).

  qfit.init: 'policy' starts the trunk from pi_k, 'scratch' from a fresh init, 'previous' from Q_{k-1}
  (read back from its checkpoint, so a resumed run starts from exactly the same weights).
  """
  c = run.config
  q_cfg = c.qfit
  if q_cfg.view == "dialogue_state":
    return fit_q_table(run, k, records, policy_params)
  q_model = q_model_config(run)
  own_size = q_model != run.model_cfg  # a Q-model of its own size cannot start from a policy's trunk
  if own_size and q_cfg.init == "policy":
    # settings.check refuses this up front; a pretrained model_dir's size is known only here
    raise errors.SettingsError("config.qfit.init='policy' needs the policy's size; with qfit.model.* use 'scratch' "
                               "or 'previous'")
  dueling = q_cfg.head == "dueling"  # Q = V(s) + A(s, a) (models/heads.py)
  make_q = (lambda: heads.scalar_model_from_policy(nnx.merge(run_policy_graphdef(run), policy_params),
                                                    rngs=nnx.Rngs(seed_for(c, k, PHASE_IDS["qfit"])),
                                                    dueling=dueling))
  if q_cfg.init == "scratch" or own_size:  # own size with 'previous': Q_0 from scratch, then Q_k from Q_{k-1}
    make_q = lambda: heads.ScalarModel(q_model, rngs=nnx.Rngs(seed_for(c, k, PHASE_IDS["qfit"])),
                                       dueling=dueling)
  lora = run.lora("qmodel", dueling)  # adapters on the trunk and the head in full, or None
  lora_seed = seed_for(c, k, PHASE_IDS["qfit"], 4)
  trainable, state = ts.init_trainable(make_q, optimizer(q_cfg), run.mesh, with_target=q_cfg.method != "mc",
                                       lora=lora, lora_seed=lora_seed)
  if q_cfg.init == "previous" and k > 0 and not run.progress.get(f"qfit/{k}"):
    previous = restore_params(run, "qmodel", k - 1, ts.trainable_part(state.params))
    if lora is None:
      trainable, state = ts.init_trainable(make_q, optimizer(q_cfg), run.mesh, params=previous,
                                           with_target=q_cfg.method != "mc")
    else:  # Q_{k-1}'s adapters and head, on this iteration's base
      trainable, state = ts.init_trainable(make_q, optimizer(q_cfg), run.mesh, params=state.params.frozen,
                                           with_target=q_cfg.method != "mc", lora=lora, adapters=previous)
  done = run.progress.get(f"qfit/{k}")
  if done:
    return trainable, restore_trained(run, "qmodel", k, state.params), done
  records = _qfit_records(run, k, records)
  examples = run.examples(records)
  arrays = run.arrays(examples)
  note_truncation(run, arrays, f"qfit/{k}", k)
  # With randomised turns (explore.py) a Monte Carlo return before the conversation's t* is not a sample of
  # Q^{pi_k}: qfit.targets='unbiased' fits turns from t* on only (all turns of logs without randomised turns).
  # TD and FQE bootstrap from pi_k's own next action (at t* too: `own_next` below), so there every turn's target
  # is one of Q^{pi_k} and 'unbiased' keeps all turns.
  bootstrapped = q_cfg.method in ("td", "td_lambda", "fqe")
  usable = np.asarray([{"all": True, "unbiased": e.target_valid or bootstrapped,
                        "explored": e.explored and (e.target_valid or bootstrapped)}[q_cfg.targets]
                       for e in examples], bool)
  in_held = _held_out(examples)
  train_rows, held = ~in_held & usable, in_held & usable
  n_train = int(train_rows.sum())
  if n_train < q_cfg.batch_size:
    raise errors.SettingsError(_too_few_targets(k, n_train, len(examples), q_cfg.method,
                                                q_cfg.targets, q_cfg.batch_size, bootstrapped,
                                                any(e.explored for e in examples)))
  train = {k_: v[train_rows] for k_, v in arrays.items()}
  train["next_index"] = _reindex(arrays["next_index"], train_rows)
  next_actions = own_next = None
  if q_cfg.method in ("td", "td_lambda"):
    own_next = _own_next_pairs(run, [e for e, t in zip(examples, train_rows) if t], train["next_index"])
  if q_cfg.method == "fqe":  # off-policy: bootstrap from pi_k's own responses at the logged next states
    next_actions = _fqe_next_actions(run, k, policy_params, [e for e, t in zip(examples, train_rows) if t],
                                     train["next_index"])
  predict_fn = qfit_lib.make_predict_fn(trainable, q_cfg.kind)
  held_explored = [e for e, h in zip(examples, held) if h and _ranked_turn(e)]
  every = q_cfg.select_every if held_explored else 0
  chunks = [q_cfg.steps] if not every else [min(every, q_cfg.steps - s) for s in range(0, q_cfg.steps, every)]
  best = None
  for i, steps in enumerate(chunks):
    # One call without selection, as before; with qfit.select_every, chunks of that many steps, each scored by
    # the logs-only ranking measure on held-out randomised turns, and the best parameters are kept.
    state, _ = qfit_lib.fit_q(trainable, state, train, method=q_cfg.method, kind=q_cfg.kind, steps=steps,
                              batch_size=q_cfg.batch_size,
                              seed=seed_for(c, k, PHASE_IDS["qfit"]) if i == 0 else seed_for(c, k, PHASE_IDS["qfit"], 9, i),
                              gamma=run.gamma, lam=q_cfg.lam, refresh_every=q_cfg.refresh_every,
                              target_update=q_cfg.target_update, tau=q_cfg.tau, writer=run.writer,
                              desc=f"qfit/{k}", next_actions=next_actions, own_next=own_next)
    if every:
      score = _logged_ranking(_token_scorer(run, predict_fn, state.params, q_cfg.batch_size), records,
                              held_explored)["logged_adv_corr"]
      done = sum(chunks[:i + 1])
      run.log(done, {"qfit/select_adv_corr": score}, phase=f"qfit/{k}", iteration=k)
      if best is None or (np.isfinite(score) and not score <= best[0]):
        best = (score, done, ts.copy_params(state.params))
  if best is not None:
    state = state.replace(params=best[2])
  held_arrays = {k_: v[held] for k_, v in arrays.items()}
  q = qfit_lib.predict(predict_fn, state.params, held_arrays, q_cfg.batch_size, run.mesh)
  metrics = qfit_lib.evaluate_q(q, held_arrays["outcome"])
  metrics["target_corr"] = stats.pearson(q, held_arrays["target"])
  metrics["train_examples"] = n_train
  if best is not None:
    metrics["selected_step"] = best[1]
  _q_diagnostics(run, k, metrics, _token_scorer(run, predict_fn, state.params, q_cfg.batch_size), records, examples,
                 held, q, policy_params)
  save_trained(run, "qmodel", k, state.params, {"phase": "qfit", "iteration": k})
  run.progress.mark(f"qfit/{k}", metrics)
  return trainable, state.params, metrics


def _q_diagnostics(run: Run, k: int, metrics: dict, score, records, examples, held: np.ndarray, q_held,
                   policy_params, mode_score=None) -> None:
  """Adds the ranking and true-Q measures of Q_k to `metrics` (any Q-model: `score` is a _token_scorer or
  _table_scorer; `mode_score`, the table's _count_scorer, also ranks pi_k's mode on the same truth) and logs them
  under qfit/."""
  held_explored = [e for e, h in zip(examples, held) if h and _ranked_turn(e)]
  metrics.update(_logged_ranking(score, records, held_explored))
  if run.env is not None:  # each measure is off with its loop.*_states = 0
    metrics.update(_true_q_error(run, k, [e for e, h in zip(examples, held) if h], q_held, policy_params,
                                 records))
    metrics.update(rank_actions(run, k, score, policy_params, mode_score))
  if any("true_outcome" in r.metadata for r in records):  # simulator logs: how wrong the fitted labels are
    metrics.update({f"label_{n}": v for n, v in label_noise.classifier_error(records).items()})
  run.log(k, {f"qfit/{n}": v for n, v in metrics.items()}, phase="qfit_eval", iteration=k)


def _token_scorer(run: Run, predict_fn, q_params, batch_size: int):
  """score(turns, prompts, actions) -> Q per pair for the token Q-model (reads the rendered prompts)."""
  def score(turns, prompts, actions):
    del turns
    arrays = run.encoding.pairs(prompts, actions)
    return qfit_lib.predict(predict_fn, q_params, arrays, batch_size, run.mesh)

  return score


def _table_scorer(table: q_table.TableQ):
  """score(turns, prompts, actions) -> Q per pair for the dialogue-state Q-model (reads the transcripts)."""
  return lambda turns, prompts, actions: table.score_many(list(zip(turns, actions)))


_MODE_MEASURES = ("top1", "spearman", "pairwise", "pick_gain", "pick_gain_own")


def _count_scorer(table: q_table.TableQ):
  """score(turns, prompts, actions) -> how often D_k logged each pair's (state, act) cell: ranked by it, a state's
  candidates follow pi_k's own preference there (its mode on top), the reference of the rank_mode_* measures."""
  def score(turns, prompts, actions):
    del prompts
    return np.asarray([table.cells.get((table.state_fn(t), table.act_fn(t, a)), (0.0, 0))[1]
                       for t, a in zip(turns, actions)], np.float32)

  return score


def _step_reach(run: Run, table: q_table.TableQ, records, examples) -> dict[str, float]:
  """q_ranking.step_reach on pi_k's logged suggestions (the randomised turns left out) at the inner solver's beta:
  Q_k's spread over acts within a tracker state, against that of the states' values (docs/results.md, finding
  29), and the raise of E[Q_k] the improvement step's exact solution gives."""
  beta = solvers.SOLVERS[run.config.inner].config(run.config).kl_coef
  return q_ranking.step_reach([own for own, _ in _logged_q(table, records, examples).values() if own], beta)


def _held_out(examples) -> np.ndarray:
  """[N] bool: the examples of the held-out conversations (the last tenth, whole), for the Q-fit's diagnostics."""
  conv_ids = sorted({e.conversation_id for e in examples})
  held_ids = set(conv_ids[-max(len(conv_ids) // 10, 1):])
  return np.asarray([e.conversation_id in held_ids for e in examples])


def older_logs(run: Run, k: int) -> list[conv_lib.Conversation]:
  """The logs of iterations before k that qfit.pool adds to D_k (0: none; n: the n latest; -1: all). With
  loop.first_data=policy, the behaviour logs pi_0 was cloned from count as D_{-1}."""
  pool = run.config.qfit.pool
  first = -1 if pool < 0 else k - pool
  out = []
  for j in range(max(first, -1), k):
    name = run.log_name(j)
    if name:
      with contextlib.suppress(FileNotFoundError):  # e.g. no explore logs in a run that deployed pi_0
        out += workdir_lib.read_logs(run.workdir, name)
  return out


def _pi_k_samples(run: Run, k: int, policy_params, prompts, salt: int) -> tuple[dict, list[list[str]]]:
  """qfit.fqe_samples suggestions of pi_k (as deployed) at each prompt: the encoded (prompt, suggestion) pairs,
  prompt-major, and the texts per prompt."""
  m = run.config.qfit.fqe_samples
  pairs, texts = run.sample_deployed(policy_params, prompts, m,
                                     jax.random.key(seed_for(run.config, k, PHASE_IDS["qfit"], salt)))
  return pairs, [texts[i * m:(i + 1) * m] for i in range(len(prompts))]


def _own_samples(run: Run, k: int, policy_params, examples, salt: int) -> list[list[str]]:
  """pi_k's suggestions at each example's state, for SARSA on another's logs (_pi_k_samples)."""
  return _pi_k_samples(run, k, policy_params, [e.prompt for e in examples], salt)[1]


def fit_q_table(run: Run, k: int, records, policy_params):
  """Q_k as a table over the domain's dialogue-state keys (qfit.view=dialogue_state, q_table.py) on D_k.

  SARSA of pi_k (qfit.method td | fqe), TD(qfit.lam) (td_lambda) or Monte Carlo (mc, on the turns qfit.targets
  keeps); the last tenth of the conversations is held out for the same diagnostics as the token Q-model's.
  Returns (table, None, metrics); the table is kept as JSON, so a resumed run reads back the same Q.
  """
  c = run.config
  q_cfg = c.qfit
  state_fn, act_fn = run.domain.tracker()
  path = os.path.join(run.workdir, "checkpoints", "qtable", f"{k}.json")
  done = run.progress.get(f"qfit/{k}")
  if done and os.path.exists(path):
    return q_table.TableQ.load(path, state_fn, act_fn), None, done
  records = _qfit_records(run, k, records)
  examples = run.examples(records)
  # SARSA of pi_k bootstraps from pi_k's own next act: on logs pi_k made, the logged one; on logs of another
  # policy (D_0 from the staff or the explore policy, qfit.method=fqe, the older logs of qfit.pool), pi_k's
  # samples at the logged states (fitted Q evaluation, expected over qfit.fqe_samples draws).
  off_policy = q_cfg.next_act == "pi_k" and (q_cfg.method == "fqe" or run.log_name(k) != f"iter_{k}")
  own = _own_samples(run, k, policy_params, examples, 4) if off_policy and q_cfg.method != "mc" else None
  ds = q_table.decisions(records, examples, state_fn, act_fn, own_texts=own)
  held = _held_out(examples)
  older = older_logs(run, k)
  older_ds = []
  if older:  # fitted Q evaluation of pi_k on earlier iterations' logs
    older_examples = run.examples(older)
    older_ds = [dataclasses.replace(d, target_valid=False)  # their returns follow other policies: MC skips them
                for d in q_table.decisions(older, older_examples, state_fn, act_fn,
                                           own_texts=_own_samples(run, k, policy_params, older_examples, 5))]
  fit = functools.partial(_fit_table, q_cfg.method, q_cfg.targets == "all",
                          q_cfg.lam if q_cfg.method == "td_lambda" else 0.0, q_cfg.shrink, q_cfg.shrink_to,
                          q_cfg.pessimism, run.gamma, state_fn, act_fn)
  train = _table_train(ds, ~held, older_ds)
  metrics_pool = {"pooled_examples": len(older_ds)} if older_ds else {}
  metrics_pool["off_policy"] = float(own is not None)  # D_k bootstrapped from pi_k's samples
  table = fit(train)
  by_id = {r.id: r for r in records}
  held_examples = [e for e, h in zip(examples, held) if h]
  q = table.score_many([(data_lib.turns_before(by_id[e.conversation_id], e), e.suggestion) for e in held_examples])
  metrics = qfit_lib.evaluate_q(q, np.asarray([e.outcome for e in held_examples]))
  metrics["target_corr"] = stats.pearson(q, np.asarray([e.target for e in held_examples]))
  metrics["train_examples"] = (len(train) if q_cfg.method != "mc" or q_cfg.targets == "all"
                               else sum(d.target_valid for d in train))  # the decisions the table averages
  metrics["table_cells"] = len(table.cells)
  metrics.update(metrics_pool)
  metrics.update(_cross_fitted_ranking(run, records, examples, ds, older_ds, fit))
  if run.log_name(k) == f"iter_{k}":  # D_k holds pi_k's own suggestions: how far the step can climb Q_k
    metrics.update(_step_reach(run, table, records, examples))
  _q_diagnostics(run, k, metrics, _table_scorer(table), records, examples, held, q, policy_params,
                 mode_score=_count_scorer(table))
  if distributed.is_writer():
    table.save(path)
  distributed.barrier(f"qtable/{k}")
  run.progress.mark(f"qfit/{k}", metrics)
  return table, None, metrics


def _fit_table(method: str, all_turns: bool, lam: float, shrink: float, shrink_to: str, pessimism: float,
               gamma: float, state_fn, act_fn, train) -> q_table.TableQ:
  """The dialogue-state table on `train` (q_table.Decision list with indices into itself): Monte Carlo (method
  'mc', on every turn with all_turns) or SARSA / TD(lam), cells shrunk toward `shrink_to` by `shrink`."""
  if method == "mc":
    return q_table.fit_mc(train, state_fn, act_fn, all_turns=all_turns, shrink=shrink, shrink_to=shrink_to,
                          pessimism=pessimism)
  return q_table.fit_sarsa(train, gamma, state_fn, act_fn, lam=lam, shrink=shrink, shrink_to=shrink_to,
                           pessimism=pessimism)


def _table_train(ds, keep: np.ndarray, older_ds=()) -> list:
  """Copies of the decisions of D_k that `keep` marks, then the older logs' decisions, each successor index
  pointing into the new list. `keep` takes or leaves whole conversations, whose decisions are consecutive (a
  successor is the next decision), so successors stay inside the list."""
  train = [dataclasses.replace(d, next_index=-1 if d.next_index < 0 else j + 1)
           for j, d in enumerate(d for d, k_ in zip(ds, keep) if k_)]
  base = len(train)
  return train + [dataclasses.replace(d, next_index=-1 if d.next_index < 0 else d.next_index + base)
                  for d in older_ds]


def _cross_fitted_ranking(run: Run, records, examples, ds, older_ds, fit) -> dict:
  """The logs-only ranking measures on *every* randomised turn of D_k (logged_cv_*), not only the held-out
  tenth's: the conversations are split into qfit.cross_fit folds, and each fold's randomised turns are scored by
  a table fitted on the other folds (and the older logs), so no turn is scored by a table that saw its return.
  The held-out tenth has ~50 such turns a round, where corr(A_k, G)'s sampling error alone is about +-0.28
  (95%; docs/results.md, finding 31); all of them cut that about threefold (finding 32). {} with
  qfit.cross_fit < 2 or no randomised turns."""
  folds = run.config.qfit.cross_fit
  explored = np.asarray([_ranked_turn(e) for e in examples], bool)
  if folds < 2 or not explored.any():
    return {}
  conv_ids = sorted({e.conversation_id for e in examples})
  fold_of = {c: i % folds for i, c in enumerate(conv_ids)}
  fold = np.asarray([fold_of[e.conversation_id] for e in examples])
  q_candidates, taken, returns = [], [], []
  for f in range(min(folds, len(conv_ids))):
    scored = [e for e, x, g in zip(examples, explored, fold) if x and g == f]
    if scored:
      q, t, g = _candidate_scores(_table_scorer(fit(_table_train(ds, fold != f, older_ds))), records, scored)
      q_candidates += q
      taken += t
      returns += g
  out = q_ranking.logged_ranking_metrics(q_candidates, taken, np.asarray(returns))
  return {f"logged_cv_{n}": v for n, v in out.items()}


def _qfit_records(run: Run, k: int, records):
  """D_k as both Q-model views see it. Issue #10 degrades it on purpose (qfit.label_flip flips outcome labels,
  qfit.data_fraction keeps a share of the conversations); by default the records pass through unchanged."""
  q_cfg = run.config.qfit
  return label_noise.qfit_records(records, label_flip=q_cfg.label_flip, data_fraction=q_cfg.data_fraction,
                                  seed=seed_for(run.config, k, PHASE_IDS["qfit"], 3))


def note_truncation(run: Run, arrays: dict, what: str, k: int) -> None:
  """Prints (once per phase) and logs how many prompts and actions lost tokens to the data budgets."""
  n = max(len(arrays["tokens"]), 1)
  run.log(k, {f"data/{what}/prompt_cut_share": float(np.sum(arrays["prompt_cut"]) / n),
              f"data/{what}/action_cut_share": float(np.sum(arrays["action_cut"]) / n)}, phase="data", iteration=k)
  note = data_lib.truncation_note(arrays, what)
  if note:
    print(f"warning: {note}")


def _too_few_targets(k: int, n: int, total: int, method: str, targets: str, batch_size: int, bootstrapped: bool,
                     explored: bool) -> str:
  """The message for a Q-fit left with fewer training targets than one batch (what to change, what is kept);
  `bootstrapped`: fit_q's TD/FQE methods, which keep every turn."""
  why = ""
  if targets != "all" and not bootstrapped and explored:
    why = (" (Monte Carlo returns follow pi_k only from each conversation's last planned randomised turn on, which "
           "with several randomised turns per conversation lies past the end of most conversations: "
           "qfit.method=td uses every turn, or lower loop.explore_count)")
  return (f"qfit/{k}: {n} of {total} logged turns are training targets with qfit.method={method!r} and "
          f"qfit.targets={targets!r}, fewer than qfit.batch_size={batch_size}{why}; the logs of this run are kept: "
          f"--branch_from=<this workdir> with other qfit settings starts again from its pi_0")


def _ranked_turn(e: data_lib.Example) -> bool:
  """A randomised turn whose Monte Carlo return follows pi_k (with loop.explore_count > 1 the last one alone,
  explore.py): what the logs-only ranking measures score."""
  return e.explored and e.target_valid


def _logged_ranking(score, records, explored_examples) -> dict:
  """q_ranking.logged_ranking_metrics on held-out randomised turns (logs only; {} when there are none)."""
  if not explored_examples:
    return {}
  out = q_ranking.logged_ranking_metrics(*_candidate_scores(score, records, explored_examples))
  return {f"logged_{n}": v for n, v in out.items()}


def _candidate_scores(score, records, explored_examples) -> tuple[list, list, list]:
  """At each randomised turn: Q over its logged candidates, the index of the one taken, and the return G."""
  by_id = {r.id: r for r in records}
  infos = [explore.draw_at(explore.explored(by_id[e.conversation_id]), e.turn) for e in explored_examples]
  turns = [data_lib.turns_before(by_id[e.conversation_id], e) for e, info in zip(explored_examples, infos)
           for _ in info["candidates"]]
  prompts = [e.prompt for e, info in zip(explored_examples, infos) for _ in info["candidates"]]
  actions = [a for info in infos for a in info["candidates"]]
  q = score(turns, prompts, actions)
  q_candidates, pos = [], 0
  for info in infos:
    q_candidates.append(q[pos:pos + len(info["candidates"])])
    pos += len(info["candidates"])
  return q_candidates, [int(info["taken"]) for info in infos], [e.target for e in explored_examples]


def measure_action_set(run: Run, k: int, policy_params, *, draw: int = 0) -> q_ranking.ActionSet | None:
  """pi_k's candidates and their true Q^{pi_k} at loop.rank_states states of data/eval_<k>.jsonl (q_ranking.py),
  measured once and kept in data/ranking_<k>.json (read back when it exists; None without it when
  loop.rank_states is 0). `draw` > 0 draws another set of states, candidates and rollouts from the same logs
  (a second, independent truth for a study); 0 is the loop's own draw."""
  c = run.config
  path = os.path.join(run.workdir, "data", f"ranking_{k}.json")
  if os.path.exists(path):
    return q_ranking.ActionSet.load(path)
  if not c.loop.rank_states:
    return None
  records = workdir_lib.read_logs(run.workdir, f"eval_{k}")
  extra = (draw,) if draw else ()  # draw 0 keeps the seeds every earlier run measured with
  policy = run.lm_policy(f"pi_{k}", run_policy_graphdef(run), policy_params,
                         seed_for(c, k, PHASE_IDS["rank"], *extra))
  action_set = q_ranking.build_action_set(
      run.env, records, policy, run.domain.candidates(), n_states=c.loop.rank_states,
      policy_samples=c.loop.rank_policy_samples, rollouts=c.loop.rank_rollouts, gamma=run.gamma,
      seed=seed_for(c, k, PHASE_IDS["rank"], 1, *extra),
      render_fn=run.encoding.state)
  if distributed.is_writer():
    action_set.save(path)
  distributed.barrier(f"ranking/{k}")
  return action_set


def rank_actions(run: Run, k: int, score, policy_params, mode_score=None) -> dict:
  """Q_k's ranking of candidate actions against the simulator's true Q^{pi_k} (q_ranking.py).

  States come from pi_k's evaluation conversations (data/eval_<k>.jsonl); the candidates (pi_k's samples and the
  domain's scripted acts) and their true Q are measured once per pi_k and kept in data/ranking_<k>.json, so a
  resumed run, a later Q-model of the same policy and the report all use one measurement. With `mode_score` (a
  scorer of the same signature) the same candidates are also ranked by it: rank_mode_*, the reference of pi_k's
  mode a Q-model must beat.
  """
  action_set = measure_action_set(run, k, policy_params)
  if action_set is None:
    return {}
  prompts, actions = action_set.pairs()
  evals = {r.id: r for r in workdir_lib.read_logs(run.workdir, f"eval_{k}")}
  turns = [evals[cid].turns[:i] for (cid, i), cs in zip(action_set.where, action_set.candidates) for _ in cs]
  q = score(turns, prompts, actions)
  out = q_ranking.ranking_metrics(action_set.unflatten(q), action_set.true_q, action_set.mask, action_set.own,
                                  action_set.true_se, action_set.diff_se())
  if mode_score is not None:
    mode = q_ranking.ranking_metrics(action_set.unflatten(mode_score(turns, prompts, actions)), action_set.true_q,
                                     action_set.mask, action_set.own)
    out.update({f"mode_{n}": mode[n] for n in _MODE_MEASURES})
  out["true_se"] = float(np.mean(action_set.true_se[action_set.mask]))
  out["truth_reliability"] = action_set.reliability()  # paired (common random numbers) where returns are kept
  out["truth_reliability_unpaired"] = action_set.reliability(paired=False)  # as if rollouts were independent
  out["truth_top1_ceiling"] = action_set.top1_ceiling()  # what the exact Q^{pi_k} would score in top-1 here
  out["truth_spearman_ceiling"] = action_set.spearman_ceiling()  # and in within-state Spearman
  out["candidates"] = float(np.mean([len(cs) for cs in action_set.candidates]))
  return {f"rank_{n}": v for n, v in out.items()}


def _fqe_next_actions(run: Run, k: int, policy_params, examples, next_index: np.ndarray) -> dict:
  """FQE's (s_{i+1}, a'_m) pairs: qfit.fqe_samples responses of pi_k at the next state of every example.

  `examples` and `next_index` are the training rows; the pairs follow qfit.fqe_bootstrap_targets' layout.
  pi_k is sampled as it is deployed (loop.deploy_temperature), play_batch rows per compiled sampler call.
  """
  return _pi_k_samples(run, k, policy_params, [examples[j].prompt for j in next_index if j >= 0], 1)[0]


def _own_next_pairs(run: Run, examples, next_index: np.ndarray) -> dict:
  """qfit.fit_q's `own_next`: (s_{i+1}, pi_k's own action) where the logged a_{i+1} was a randomised draw."""
  rows = [i for i, j in enumerate(next_index) if j >= 0 and examples[j].own_action is not None]
  pairs = run.encoding.pairs([examples[next_index[i]].prompt for i in rows],
                             [examples[next_index[i]].own_action for i in rows])
  return {**pairs, "row": np.asarray(rows, np.int64)}


def _reindex(next_index: np.ndarray, keep: np.ndarray) -> np.ndarray:
  """next_index after dropping rows (whole conversations are dropped, so links stay inside `keep`)."""
  new_pos = np.cumsum(keep) - 1
  out = np.where(next_index >= 0, new_pos[np.maximum(next_index, 0)], -1)
  return out[keep].astype(np.int32)


def _true_q_error(run: Run, k: int, held_examples, q_pred, policy_params, records) -> dict:
  """Q_k against the simulator's Monte Carlo Q^{pi_k} on loop.true_q_states held-out logged (state, suggestion)
  pairs ({} with 0)."""
  c = run.config
  if not c.loop.true_q_states:
    return {}
  by_id = {r.id: r for r in records}
  rng = np.random.default_rng(seed_for(c, k, PHASE_IDS["true_q"]))
  pick = rng.choice(len(held_examples), size=min(c.loop.true_q_states, len(held_examples)), replace=False)
  episodes, suggestions = [], []
  for i in pick:
    e = held_examples[i]
    record = by_id[e.conversation_id]
    n_turns = record.agent_steps()[e.turn]
    episodes.append(run.env.restore(record, n_turns))
    suggestions.append("" if e.suggestion == conv_lib.ABSTAIN_TEXT else e.suggestion)
  policy = run.lm_policy(f"pi_{k}", run_policy_graphdef(run), policy_params, seed_for(c, k, PHASE_IDS["true_q"], 1))
  true_q, true_q_se = run.env.estimate_q(episodes, suggestions, policy, run.gamma,
                                         n_rollouts=c.loop.true_q_rollouts,
                                         seed=seed_for(c, k, PHASE_IDS["true_q"], 2))
  predicted = np.asarray(q_pred)[pick]
  return {"true_q_mae": float(np.mean(np.abs(predicted - true_q))),
          "true_q_max_err": float(np.max(np.abs(predicted - true_q))),  # eps_Q of the bound is a sup (bound.py)
          "true_q_corr": stats.pearson(predicted, true_q), "true_q_mean": float(np.mean(true_q)),
          "true_q_se": float(np.mean(true_q_se))}  # Monte Carlo noise of the true Q itself


def run_policy_graphdef(run: Run):
  """The policy's graph (static structure); params come from checkpoints or training."""
  if run.graphdef is None:
    # jax.eval_shape, not nnx.eval_shape: under the run's mesh the latter reads logical names as mesh axes
    run.graphdef = jax.eval_shape(lambda: nnx.split(tf.Transformer(run.model_cfg, rngs=nnx.Rngs(0))))[0]
  return run.graphdef


def improve_policy(run: Run, k: int, records, policy_params, q_trainable, q_params, pi0_params):
  """The single-turn step of iteration k with the solver config.inner; returns (pi_{k+1}'s params, what
  `save_trained` keeps of them: the same params, or with config.lora the adapters on pi_k, and metrics).

  The solver is the row config.inner of solvers.SOLVERS (ppo: token-level PPO with a critic; grpo | rloo: G
  responses per state with the group as baseline, no critic), run by solvers.train. All maximise
  E_{s~D_k, a~pi}[Q_k] - beta KL(pi || pi_k) on the same rollout and reward code and checkpoint the solver's
  state inside the phase (workdir/checkpoints/<inner>/<k>), so a resumed run replays exactly.
  Afterwards KL(pi_{k+1} || pi_k) is measured on states of D_k (improve/kl_to_pi_k).
  """
  c = run.config
  solver = solvers.SOLVERS[c.inner]  # checked by settings.check
  cfg = solver.config(c)
  ref_params = pi0_params if c.ppo.reference == "sft" else policy_params
  policy_tr, model = ts.init_trainable(
      lambda: tf.Transformer(run.model_cfg, rngs=nnx.Rngs(0)), optimizer(c.ppo), run.mesh,
      params=ts.copy_params(policy_params), lora=run.lora("policy"), lora_seed=seed_for(c, k, PHASE_IDS["ppo"], 3))
  critic_tr = None
  if solver.critic:
    critic_tr, critic_state = ts.init_trainable(
        lambda: heads.scalar_model_from_policy(nnx.merge(policy_tr.graphdef, policy_params),
                                               rngs=nnx.Rngs(seed_for(c, k, PHASE_IDS["ppo"]))),
        optimizer(c.ppo.critic), run.mesh, lora=run.lora("critic"), lora_seed=seed_for(c, k, PHASE_IDS["ppo"], 4))
    model = ppo_lib.PPOState(policy=model, critic=critic_state)
  state = solvers.init_state(model, cfg.kl_coef)
  ckpt = run.checkpointer(f"{solver.name}/{k}", max_to_keep=2)
  start = 0
  if ckpt.latest_step() is not None:
    restored, meta = ckpt.restore(None, ckpt_lib.abstract_like(_solver_checkpoint(state)))
    state, start = (solvers.SolverState(model=ts.attach_frozen(restored["state"], state.model),
                                        kl_coef=restored["kl_coef"]), int(meta["step"]))
  examples = run.examples(records)
  prompts = run.encoding.prompts([e.prompt for e in examples])

  steps = c.ppo.steps

  def on_step(step, state_):
    if step % c.ppo.checkpoint_every == 0 or step == steps:
      ckpt.save(step, _solver_checkpoint(state_), {"step": step}, overwrite=True)
    if c.loop.stop_after_ppo_step and step == c.loop.stop_after_ppo_step:
      raise Interrupted(f"stopped after {solver.name} step {step} (loop.stop_after_ppo_step)")

  if isinstance(q_trainable, q_table.TableQ):
    reward_fn = _table_reward_fn(run, q_trainable, records, examples, prompts, center=c.ppo.center_reward == "state")
    q_params = jnp.zeros(())
  else:
    reward_fn = ppo_lib.make_q_reward_fn(q_trainable, c.qfit.kind)
  state, last = solvers.train(solver, policy_tr, critic_tr, state, ref_params, reward_fn, q_params, prompts, cfg,
                              steps=steps, batch_size=c.ppo.batch_size, seed=seed_for(c, k, PHASE_IDS["ppo"]),
                              eos_id=run.renderer.end_id(run.tokenizer), pad_id=run.tokenizer.pad_id,
                              writer=run.writer, desc=f"{solver.name}/{k}", start_step=start, on_step=on_step)
  trained = solver.policy_state(state.model).params
  new_params = policy_tr.merged_params(trained)
  ckpt.close()
  # The same measurement for every solver: KL(pi_{k+1} || pi_k) on a fixed sample of D_k's states (the
  # distribution the inner objective's KL is taken over), not the last rollout's estimate during training.
  rows = np.random.default_rng(seed_for(c, k, PHASE_IDS["ppo"], 1)).choice(
      len(examples), size=min(c.ppo.batch_size, len(examples)), replace=False)
  kl = policy_kl(run, new_params, policy_params, {n: v[rows] for n, v in prompts.items()},
                 seed_for(c, k, PHASE_IDS["ppo"], 2))
  run.log(k, {"improve/kl_to_pi_k": kl}, phase="improve", iteration=k)
  return new_params, trained, {**last, "improve/kl_to_pi_k": kl}


def _solver_checkpoint(state: solvers.SolverState) -> dict:
  """The phase's checkpoint: the solver's state (its models and beta) under the keys runs have always used;
  with LoRA without the frozen bases (rebuilt from pi_k when the phase resumes)."""
  return {"state": ts.trainable_part(state.model), "kl_coef": state.kl_coef}


def _table_reward_fn(run: Run, table: q_table.TableQ, records, examples, prompts: dict, center: bool = False):
  """PPO's reward from the dialogue-state table: each sampled response is decoded on the host and scored at the
  transcript of the D_k state its prompt row came from (prompt rows are matched by their tokens).

  center (ppo.center_reward='state'): minus V_k(s), the mean of Q_k over pi_k's suggestions of D_k at the tracker
  state (the randomised turns left out where the state has other decisions): a shift per state, which leaves the
  step's exact solution as it is."""
  by_id = {r.id: r for r in records}
  states = {}  # prompt row -> (transcript, its state key), keyed once here rather than per sampled response
  for e, row in zip(examples, prompts["tokens"]):
    key = np.asarray(row).tobytes()
    if key not in states:
      turns = data_lib.turns_before(by_id[e.conversation_id], e)
      states[key] = turns, table.state_fn(turns)
  baseline = state_values(table, records, examples) if center else {}

  def score_fn(prompt_tokens, response, response_valid):
    out = []
    for row, ids, ok in zip(prompt_tokens, response, response_valid):
      found = states.get(np.ascontiguousarray(row, np.int32).tobytes())
      if found is None:
        raise KeyError("the dialogue-state reward got a prompt that is not one of D_k's states")
      turns, state = found
      text = run.renderer.parse(run.tokenizer.decode([int(t) for t in ids[ok]]))
      out.append(table.value(state, table.act_fn(turns, text)) - baseline.get(state, 0.0))
    return np.asarray(out, np.float32)

  return ppo_lib.make_host_reward_fn(score_fn)


def _logged_q(table: q_table.TableQ, records, examples) -> dict[tuple, tuple[list, list]]:
  """Q_k of D_k's logged suggestions per tracker state: (pi_k's own, the randomised turns')."""
  by_id = {r.id: r for r in records}
  logged = collections.defaultdict(lambda: ([], []))
  for e in examples:
    turns = data_lib.turns_before(by_id[e.conversation_id], e)
    state = table.state_fn(turns)
    logged[state][int(e.explored)].append(table.value(state, table.act_fn(turns, e.suggestion)))
  return logged


def state_values(table: q_table.TableQ, records, examples) -> dict[tuple, float]:
  """V_k(s) = E_{a~pi_k}[Q_k(s, a)] per tracker state of D_k: the mean of Q_k over pi_k's suggestions logged at s
  (over the randomised turns' only where s has no other decision), the baseline of ppo.center_reward='state'."""
  return {state: float(np.mean(own or explored)) for state, (own, explored) in
          _logged_q(table, records, examples).items()}


class Interrupted(errors.RunError, RuntimeError):
  """Raised on purpose to test resuming (loop.stop_after_* keys); entry points exit with 130 as for Ctrl-C."""
  exit_code = errors.EXIT_INTERRUPTED


def policy_kl(run: Run, params, ref_params, prompts: dict, seed: int) -> float:
  """KL(pi || pi_ref) per response, estimated with k1 on responses sampled from pi."""
  graphdef = run_policy_graphdef(run)
  out = sampling.sample(graphdef, params, prompts["tokens"], prompts["valid"], jax.random.key(seed),
                        max_new_tokens=run.encoding.max_action_len, eos_id=run.encoding.end_id,
                        pad_id=run.tokenizer.pad_id)
  lp = _logprob_fn(graphdef)(params, out.prompt_tokens, out.prompt_valid, out.tokens, out.valid)
  lp_ref = _logprob_fn(graphdef)(ref_params, out.prompt_tokens, out.prompt_valid, out.tokens, out.valid)
  return float(jnp.mean(jnp.sum(jnp.where(out.valid, lp - lp_ref, 0.0), axis=1)))


_LOGPROB_FNS: dict[Any, Any] = {}


def _logprob_fn(graphdef):
  if graphdef not in _LOGPROB_FNS:
    def fn(params, prompt_tokens, prompt_valid, response, response_valid):
      tokens, valid, positions = ppo_lib.sequence_layout(prompt_tokens, prompt_valid, response, response_valid)
      return ppo_lib.policy_response_logprobs(nnx.merge(graphdef, params), tokens, positions, valid,
                                              prompt_tokens.shape[1])[0]
    _LOGPROB_FNS[graphdef] = jax.jit(fn)
  return _LOGPROB_FNS[graphdef]


def evaluate_policy(run: Run, k: int, params, pi0_params, label: str, key: str | None = None) -> dict:
  """Plays the held-out evaluation conversations (same seed every iteration) with pi_k; kept as eval/<key>
  (default k) in the progress and data/eval_<key>.jsonl. Without pi0_params the KL to pi_0 is not measured."""
  c = run.config
  key = str(k) if key is None else key
  done = run.progress.get(f"eval/{key}")
  if done:
    return done
  policy = run.lm_policy(label, run_policy_graphdef(run), params, seed_for(c, k, PHASE_IDS["eval"]))
  records = run.play(policy, *held_out_customers(run), f"eval_{key}")
  summary = env_base.summarize(records)
  label_error = label_noise.classifier_error(records)  # the outcome classifier against the simulator's truth
  summary.update({f"classifier_{n}": label_error[n]
                  for n in ("false_positive_rate", "false_negative_rate", "error_rate")})
  states = [run.encoding.state(r.turns[:i]) for r in records[:32] for i in r.agent_steps()[:2]]
  prompts = run.encoding.prompts(states)
  if pi0_params is not None:
    summary["kl_to_pi0"] = policy_kl(run, params, pi0_params, prompts, seed_for(c, k, PHASE_IDS["eval"], 1))
  summary["off_topic_share"] = run.domain.off_topic_share(records)
  prefix = "eval" if key == str(k) else f"eval_{key}"
  run.log(k, {f"{prefix}/{n}": v for n, v in summary.items()}, phase="eval", iteration=k)
  run.progress.mark(f"eval/{key}", summary)
  return summary


def held_out_customers(run: Run) -> tuple[int, int]:
  """(loop.eval_conversations, seed): the held-out customers every pi_k and the reference lines are evaluated
  on, the same in every iteration."""
  return run.config.loop.eval_conversations, seed_for(run.config, 10_000, PHASE_IDS["eval"])


def reference_lines(run: Run) -> dict:
  """Conversion of the scripted behaviour staff and the oracle on the same evaluation seed."""
  done = run.progress.get("reference")
  if done:
    return done
  out = {}
  n, seed = held_out_customers(run)
  for name in ("behavior", "oracle"):
    policy = run.domain.policy(name)
    records = run.env.play(policy, n, seed=seed)
    out[name] = env_base.summarize(records)
  run.progress.mark("reference", out)
  return out


# ---- the whole run ----

@contextlib.contextmanager
def timed(run_: Run, phase: str, iteration: int):
  """Logs the wall time of a phase as time/<phase> (seconds)."""
  start = time.perf_counter()
  yield
  run_.log(iteration, {f"time/{phase}": time.perf_counter() - start}, phase="time", iteration=iteration)


def run(config, workdir: str) -> dict:
  """Runs (or resumes) Iterative PPO; returns the per-iteration summary written to workdir/summary.json.

  Every phase runs under the run's mesh and logical-axis rules (config.mesh, config.mesh_rules), so the
  models' activation constraints and the parameters' placement follow the config. `config` is the run's
  ConfigDict; setup checks it and makes the typed settings the phases read (settings.load).
  """
  start_time = time.perf_counter()
  # One run per workdir; a killed run's lock is taken over. setup checks the settings and reads a user's logs
  # before it writes; a run that fails before its first phase completes leaves the workdir as it found it.
  # In a multi-process run process 0 holds the lock for all, and none writes before every one has looked.
  lock = io_utils.workdir_lock(workdir) if distributed.is_writer() else contextlib.nullcontext()
  with lock:
    before = _fresh_entries(workdir) if distributed.is_writer() else None  # process 0 made the workdir
    distributed.barrier("start")
    try:
      run_, logs = setup(config, workdir)
      with sharding.use_mesh(run_.mesh, run_.rules):
        return _run_phases(run_, logs, start_time)
    except Exception as e:  # pylint: disable=broad-except
      stopped = _stopped(e, workdir, before)
      if stopped is e:
        raise
      raise stopped from e


def _fresh_entries(workdir: str) -> set[str] | None:
  """What a workdir that holds no run yet contains (None for one that holds a run: nothing is ever removed)."""
  if os.path.exists(os.path.join(workdir, "config.json")):
    return None
  return set(os.listdir(workdir))


def _stopped(e: Exception, workdir: str, before: set[str] | None) -> Exception:
  """The error a failed run ends with, after tidying the workdir.

  A fresh run that failed before completing a phase has what it wrote removed (so the corrected command starts
  cleanly, not refused as a changed setting); otherwise half-written checkpoints are removed and storage and
  divergence errors say which checkpoint is the last good one and that rerunning the same command resumes.
  """
  try:
    kept = before is None or bool(workdir_lib.Progress(workdir).done)
  except (OSError, ValueError):
    kept = True  # unreadable progress: remove nothing
  try:
    if not distributed.is_writer():  # process 0 tidies for all
      state = "process 0 reports the last good checkpoint"
    elif not kept:
      for name in set(os.listdir(workdir)) - before - {io_utils.LOCK_NAME}:
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path, ignore_errors=True)
        else:
          with contextlib.suppress(OSError):
            os.remove(path)
      state = f"no phase had completed, so nothing was kept in {workdir}"
    else:
      ckpt_lib.remove_partial(os.path.join(workdir, "checkpoints"))
      last = ckpt_lib.latest_complete(os.path.join(workdir, "checkpoints"))
      state = f"the last good checkpoint is {last}" if last else "no checkpoint had been completed"
  except OSError:  # a read-only or vanished workdir: report the error as it is
    state = f"the workdir {workdir} could not be tidied"
  if errors.storage_errno(e) is not None:
    return errors.StorageError(
        f"{errors.describe_storage(e, workdir)}; {state}. Free space (or make the path writable) and rerun the "
        "same command" + (": it resumes from the last completed phase." if kept else "."))
  if isinstance(e, FloatingPointError):
    family = (re.findall(r"(\w+)/\w+=", str(e)) or ["ppo"])[0]
    return errors.DivergedError(
        f"training diverged: {e}; {state}. The same settings diverge again: lower {family}.learning_rate"
        + (" (or raise ppo.kl_coef)" if family == "ppo" else "") + " and rerun"
        + (" with a new --workdir." if kept else "."))
  return e


def _run_phases(run_: Run, logs, start_time: float) -> dict:
  config, workdir = run_.config, run_.workdir
  pretrained = None
  if config.loop.eval_pretrained:
    with timed(run_, "eval_pretrained", 0):
      pretrained = evaluate_pretrained(run_)
  with timed(run_, "sft", 0):
    trainable, pi0 = train_pi0(run_, logs)
  if config.loop.stop_after_phase == "sft":
    raise Interrupted("stopped after sft (loop.stop_after_phase)")
  if run_.env is None:  # loop.logs: the user's logs, no simulator
    return offline_iteration(run_, logs, pi0)
  refs = reference_lines(run_)
  history = [evaluate_policy(run_, 0, pi0, pi0, "pi_0")]
  params = pi0
  for k in range(config.loop.iterations):
    if run_.progress.get(f"policy/{k + 1}"):
      params = load_policy(run_, k + 1, params)
      history.append(evaluate_policy(run_, k + 1, params, pi0, f"pi_{k + 1}"))
      continue
    with timed(run_, "collect", k):
      if run_.log_name(k) == "behavior":
        records = logs  # D_0: the behaviour logs pi_0 was cloned from stand in for pi_0's own
      elif run_.log_name(k) == "explore":
        # D_0: logs of the exploratory behaviour policy; Q^{pi_0} from them needs qfit.method=fqe (off-policy)
        staff = run_.domain.policy("explore")
        records = run_.play(staff, config.loop.conversations, seed_for(config, k, PHASE_IDS["collect"], 2),
                            "explore")
      else:
        policy = run_.lm_policy(f"pi_{k}", run_policy_graphdef(run_), params,
                                seed_for(config, k, PHASE_IDS["collect"]))
        if config.loop.explore_turns:  # loop.explore_count randomised turns per conversation (explore.py)
          policy = explore.RandomisedTurn(policy, run_.domain.candidates(), run_.env.max_turns,
                                          seed=seed_for(config, k, PHASE_IDS["collect"], 3),
                                          count=config.loop.explore_count)
        records = run_.play(policy, config.loop.conversations, seed_for(config, k, PHASE_IDS["collect"], 1),
                            f"iter_{k}")
        if not run_.progress.get(f"collect/{k}"):  # what deploying pi_k with randomised turns cost (vs eval/)
          deployed = {n: v for n, v in env_base.summarize(records).items()
                      if n in ("conversion", "conversion_lo", "conversion_hi")}
          run_.log(k, {f"collect/{n}": v for n, v in deployed.items()}, phase="collect", iteration=k)
          run_.progress.mark(f"collect/{k}", deployed)
    if config.loop.stop_after_phase == f"collect/{k}":
      raise Interrupted(f"stopped after collect/{k}")
    with timed(run_, "qfit", k):
      q_tr, q_params, _ = fit_q(run_, k, records, params)
    if config.loop.stop_after_phase == f"qfit/{k}":
      raise Interrupted(f"stopped after qfit/{k}")
    with timed(run_, "ppo", k):
      new_params, trained, _ = improve_policy(run_, k, records, params, q_tr, q_params, pi0)
    save_trained(run_, "policy", k + 1, trained, {"phase": "ppo", "iteration": k + 1})
    run_.progress.mark(f"policy/{k + 1}")
    params = new_params
    with timed(run_, "eval", k + 1):
      history.append(evaluate_policy(run_, k + 1, params, pi0, f"pi_{k + 1}"))
  ranking = []
  for k in range(config.loop.iterations):
    q_metrics = run_.progress.get(f"qfit/{k}") or {}
    deployed = run_.progress.get(f"collect/{k}") or {}
    ranking.append({**{n: v for n, v in q_metrics.items() if n.startswith(("rank_", "logged_"))},
                    "deployed_conversion": deployed.get("conversion", float("nan"))})
  summary = {"iterations": history, "reference": refs, "q_ranking": ranking,
             "seconds": time.perf_counter() - start_time, "phase_seconds": workdir_lib.phase_seconds(workdir)}
  if pretrained is not None:
    summary["pretrained"] = pretrained
  export_dir = export_policy(run_, params)
  if export_dir:
    summary["export_dir"] = export_dir
  from iterppo_jax.studies import report  # on use: matplotlib only when a plot is made; the studies import loop
  plot = os.path.join(workdir, "conversion.png")
  if distributed.is_writer():
    io_utils.atomic_write_json(os.path.join(workdir, "summary.json"), summary)
    plot = report.plot_conversion(summary, plot)
  summary["plot"] = plot
  summary["table"] = report.table(summary)
  run_.writer.close()
  return summary


def export_policy(run_: Run, params) -> str:
  """Writes the final policy as a Hugging Face model directory when `export_dir` is configured."""
  out = run_.config.export_dir
  if not out:
    return ""
  if distributed.process_count() > 1:  # every process gathers; process 0 writes
    params = distributed.to_host(params)
    if not distributed.is_writer():
      return out
  return hf_lib.export(run_.model_cfg, params, out, tokenizer_dir=os.path.join(run_.workdir, "tokenizer"))


def offline_iteration(run_: Run, logs, pi0) -> dict:
  """One iteration on a user's logs: Q-fit on them, PPO on their states; writes policy step 1."""
  q_tr, q_params, q_metrics = fit_q(run_, 0, logs, pi0)
  new_params, trained, ppo_metrics = improve_policy(run_, 0, logs, pi0, q_tr, q_params, pi0)
  save_trained(run_, "policy", 1, trained, {"phase": "ppo", "iteration": 1, "offline": True})
  run_.progress.mark("policy/1")
  summary = {"offline": True, "logs": run_.config.loop.logs, "conversations": len(logs), "qfit": q_metrics,
             "ppo": ppo_metrics, "policy_checkpoint": os.path.join(run_.workdir, "checkpoints", "policy", "1"),
             "export_dir": export_policy(run_, new_params)}
  if distributed.is_writer():
    io_utils.atomic_write_json(os.path.join(run_.workdir, "summary.json"), summary)
  run_.writer.close()
  return summary
