"""Every setting of a run checked before any work: each choice against its allowed values, each size and count
against its range, and the rules between keys. A bad value stops the run at once with the key, the value and
what was expected, before a workdir is made (a typo in `loop.first_data` used to deploy pi_k silently; a
negative size failed deep inside JAX minutes later).

  settings.check(config)   # loop.setup and baselines.run_all call it first

The allowed values of a choice live with the code that reads it (qfit.METHODS, ppo.KL_ESTIMATORS, ...) or
here, for the loop's own choices. A key a config does not have is not checked (sub-configs such as
configs/benchmark.py hold only what they use).
"""

from __future__ import annotations

import math
import os

from iterppo_jax import errors
from iterppo_jax import group_pg
from iterppo_jax import ppo
from iterppo_jax import qfit
from iterppo_jax import sharding
from iterppo_jax import solvers
from iterppo_jax import tokenizer as tok_lib
from iterppo_jax.models import lora as lora_lib

INNER_SOLVERS = tuple(solvers.SOLVERS)  # the single-turn solvers (a row of solvers.SOLVERS each)
QFIT_TARGETS = ("unbiased", "all", "explored")  # which turns' Monte Carlo returns the Q-fit uses
QFIT_VIEWS = ("tokens", "dialogue_state")  # what the Q-model reads: the rendered prompt | the state tracker
FIRST_DATA = ("behavior", "policy", "explore")  # D_0

CHOICES = {
    "inner": INNER_SOLVERS,
    "env.business_user": ("sr", "direct"),
    "model.style": ("llama", "gpt2"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "qfit.method": qfit.METHODS,
    "qfit.kind": ("bce", "mse"),
    "qfit.init": ("previous", "policy", "scratch"),
    "qfit.target_update": ("polyak", "periodic"),
    "qfit.head": ("q", "dueling"),
    "qfit.targets": QFIT_TARGETS,
    "qfit.view": QFIT_VIEWS,
    "qfit.next_act": ("pi_k", "logged"),
    "ppo.kl_estimator": ppo.KL_ESTIMATORS,
    "ppo.reference": ("pi_k", "sft"),
    "group.kl_in": group_pg.KL_PLACEMENTS,
    "loop.first_data": FIRST_DATA,
}

# key -> the lowest allowed integer
COUNTS = {
    "seed": 0, "env.max_turns": 1, "env.max_render_turns": 0,
    "tokenizer.vocab_size": 256 + len(tok_lib.SPECIAL_TOKENS),
    "data.max_prompt_len": 8, "data.max_action_len": 2, "data.prompt_bucket": 0,
    "model.num_layers": 1, "model.embed_dim": 1, "model.mlp_dim": 1, "model.num_heads": 1,
    "model.num_kv_heads": 1, "model.head_dim": 1,
    "sft.behavior_conversations": 1, "sft.steps": 0, "sft.batch_size": 1, "sft.eval_examples": 0,
    "qfit.steps": 1, "qfit.batch_size": 1, "qfit.refresh_every": 1, "qfit.fqe_samples": 1,
    "qfit.select_every": 0, "qfit.pool": -1,  # pool -1: every earlier iteration
    "qfit.model.num_layers": 0, "qfit.model.embed_dim": 0, "qfit.model.mlp_dim": 0, "qfit.model.num_heads": 0,
    "qfit.model.num_kv_heads": 0, "qfit.model.head_dim": 0,  # 0: the policy's size
    "ppo.steps": 0, "ppo.batch_size": 1, "ppo.minibatch_size": 1, "ppo.epochs": 1, "ppo.checkpoint_every": 1,
    "ppo.kl_horizon": 1, "group.size": 2,
    "loop.iterations": 0, "loop.conversations": 1, "loop.eval_conversations": 1, "loop.play_batch": 1,
    "loop.rank_states": 0, "loop.true_q_states": 0, "loop.stop_after_ppo_step": 0, "lora.rank": 0,
    "num_conversations": 1, "batch_size": 1,
}
# counts that matter only when another key turns their feature on: key -> (the switch, its lowest value)
COUNTS_WHEN = {
    "loop.rank_rollouts": ("loop.rank_states", 1), "loop.rank_policy_samples": ("loop.rank_states", 1),
    "loop.true_q_rollouts": ("loop.true_q_states", 2),  # a standard error needs two rollouts
}

# key -> (low, high, low inclusive, high inclusive)
REALS = {
    "gamma": (0.0, 1.0, True, True),  # 0: the myopic baseline
    "env.skill_mean": (0.0, 1.0, False, False),
    "qfit.lam": (0.0, 1.0, True, True), "qfit.tau": (0.0, 1.0, False, True),
    "qfit.label_flip": (0.0, 1.0, True, True), "qfit.data_fraction": (0.0, 1.0, False, True),
    "ppo.kl_coef": (0.0, math.inf, True, False), "ppo.kl_target": (0.0, math.inf, True, False),
    "ppo.gamma": (0.0, 1.0, True, True), "ppo.lam": (0.0, 1.0, True, True),
    "ppo.clip_eps": (0.0, math.inf, False, False), "ppo.value_clip_eps": (0.0, math.inf, False, False),
    "ppo.entropy_coef": (0.0, math.inf, True, False), "ppo.temperature": (0.0, math.inf, False, False),
    "group.std_eps": (0.0, math.inf, False, False),
    "loop.deploy_temperature": (0.0, math.inf, False, False),
    "lora.alpha": (0.0, math.inf, False, False),
}
LORA_MODELS = ("policy", "critic", "qmodel")  # the loop's models config.lora.models may name
OPTIMIZERS = ("sft", "qfit", "ppo", "ppo.critic")  # sections made by configs/sales.py's _optimizer_section


_ABSENT = object()


def _get(config, key: str, default=_ABSENT):
  """config's value at a dotted key, or `default` when the config has no such key."""
  node = config
  for part in key.split("."):
    if part not in node:
      return default
    node = node[part]
  return node


def _bad(key: str, expected: str, value) -> errors.SettingsError:
  return errors.SettingsError(f"config.{key} must be {expected}, got {value!r}")


def _check_int(key: str, value, low: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    raise _bad(key, f"an integer >= {low}", value)


def _check_real(key: str, value, low: float, high: float, low_in: bool, high_in: bool) -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
  if ok:
    ok = (value >= low if low_in else value > low) and (value <= high if high_in else value < high)
  if not ok:
    interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
    raise _bad(key, f"a number in {interval}", value)


def check(config) -> None:
  """Raises errors.SettingsError (a ValueError: key, value, what is allowed) for the first bad setting; returns None when all are good."""
  for key, allowed in CHOICES.items():
    value = _get(config, key)
    if value is not _ABSENT and value not in allowed:
      raise _bad(key, f"one of {', '.join(allowed)}", value)
  for key, low in COUNTS.items():
    value = _get(config, key)
    if value is not _ABSENT:
      _check_int(key, value, low)
  for key, (switch, low) in COUNTS_WHEN.items():
    value = _get(config, key)
    if value is not _ABSENT and _get(config, switch, 0) > 0:
      _check_int(key, value, low)
  for key, bounds in REALS.items():
    value = _get(config, key)
    if value is not _ABSENT:
      _check_real(key, value, *bounds)
  for section in OPTIMIZERS:
    if _get(config, f"{section}.learning_rate") is not _ABSENT:
      _check_real(f"{section}.learning_rate", _get(config, f"{section}.learning_rate"), 0.0, math.inf, False, False)
      _check_int(f"{section}.warmup_steps", _get(config, f"{section}.warmup_steps"), 0)
      _check_int(f"{section}.grad_accum", _get(config, f"{section}.grad_accum"), 1)
      _check_real(f"{section}.clip_norm", _get(config, f"{section}.clip_norm"), 0.0, math.inf, False, False)
  _check_rules(config)


def _check_rules(config) -> None:
  """The rules between keys."""
  def get(key, default=None):
    return _get(config, key, default)

  if get("model.num_heads") and get("model.num_kv_heads") and get("model.num_heads") % get("model.num_kv_heads"):
    raise errors.SettingsError(f"config.model.num_kv_heads ({get('model.num_kv_heads')}) must divide model.num_heads "
                     f"({get('model.num_heads')})")
  if get("ppo.batch_size") and get("ppo.minibatch_size") and get("ppo.batch_size") % get("ppo.minibatch_size"):
    raise errors.SettingsError(f"config.ppo.minibatch_size ({get('ppo.minibatch_size')}) must divide ppo.batch_size "
                     f"({get('ppo.batch_size')})")
  if get("inner") in ("grpo", "rloo") and get("ppo.batch_size") % get("group.size"):
    raise errors.SettingsError(f"config.group.size ({get('group.size')}) must divide ppo.batch_size "
                     f"({get('ppo.batch_size')}) with inner={get('inner')}: ppo.batch_size counts sampled responses")
  if get("group.kl_in") == "loss" and get("inner") == "rloo":
    raise errors.SettingsError("config.group.kl_in='loss' is GRPO's placement; RLOO puts the KL in the reward (kl_in=reward)")
  # loop.q_model_config: a non-zero qfit.model.* size other than the policy's makes a Q-model of its own size.
  # With model_dir the policy's sizes come from the checkpoint, and loop.fit_q checks this when it knows them.
  own_q_size = not get("model_dir") and any(
      get(f"qfit.model.{n}", 0) not in (0, get(f"model.{n}"))
      for n in ("num_layers", "embed_dim", "mlp_dim", "num_heads", "num_kv_heads", "head_dim"))
  if own_q_size and get("qfit.init") == "policy" and get("qfit.view") == "tokens":
    raise errors.SettingsError("config.qfit.init='policy' needs the policy's size; with qfit.model.* use 'scratch' or "
                     "'previous'")
  if get("qfit.pool") and get("qfit.view") != "dialogue_state":
    raise errors.SettingsError("config.qfit.pool pools earlier logs for the dialogue-state Q-model only: set "
                     "qfit.view=dialogue_state or qfit.pool=0")
  model_dir = get("model_dir")
  if get("loop.eval_pretrained") and not model_dir:
    raise errors.SettingsError("config.loop.eval_pretrained evaluates the pretrained model of config.model_dir "
                               "before SFT: set model_dir, or loop.eval_pretrained=False")
  if model_dir and not os.path.exists(model_dir):
    raise _bad("model_dir", "a Llama-family .gguf file or a local Hugging Face model directory", model_dir)
  if get("lora.rank"):
    for key, allowed in (("lora.targets", lora_lib.ALL_TARGETS), ("lora.models", LORA_MODELS)):
      value = get(key)
      if isinstance(value, str) or not value or any(v not in allowed for v in value):
        raise _bad(key, f"a non-empty tuple of {', '.join(allowed)}", value)
    if not get("model_dir") and get("model.style") == "gpt2" and "gate" in get("lora.targets"):
      raise errors.SettingsError("config.lora.targets: a gpt2-style MLP has no 'gate' (it has up and down)")
  if get("mesh_rules") is not None:
    sharding.rules_from_config(get("mesh_rules"))  # logical names the models use, mesh axes that exist
  if not get("loop.logs") and get("env.domain") is not None:
    from iterppo_jax.envs import registry  # the domain's module: a built-in name or an import path
    registry.module(get("env.domain"))
    if get("qfit.view") == "dialogue_state":
      registry.tracker(get("env.domain"))  # the domain must have a dialogue-state tracker
