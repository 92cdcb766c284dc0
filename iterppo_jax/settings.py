"""Every setting of a run checked before any work, and handed to the library as typed, frozen settings.

  settings.load(config) -> Settings     # loop.setup calls it first: the typed tree, then check on it
  settings.load_env(config.env) -> Env  # the simulator's section alone (experiments.simulate)
  settings.parse(config) -> Settings    # the typed tree without check (a study's own checks come first)
  settings.check(config)                # only the checks: choices, ranges, the rules between keys
  settings.build(cls, config)           # a dataclass tree of another config's schema (studies/benchmark.py)

`check` tests each choice against its allowed values, each size and count against its range, and the rules
between keys. A bad value stops the run at once with the key, the value and what was expected, before a workdir
is made (a typo in `loop.first_data` used to deploy pi_k silently; a negative size failed deep inside JAX
minutes later). The allowed values of a choice live with the code that reads it (qfit.METHODS,
ppo.KL_ESTIMATORS, ...) or here, for the loop's own choices. `load` checks the completed settings, so a key
the config leaves out is checked at its default against the keys it sets; `check` on a bare ConfigDict passes
over the keys it lacks.

`load` builds `Settings`: one frozen dataclass per config section, with the keys' names, so
`settings.qfit.method` reads what `config.qfit.method` held. A key the config does not set takes the
dataclass's default (configs/sales.py's value, or for keys only some configs have, such as model_dir or
data.chat_template, the value that leaves the feature off); a key the dataclasses do not know is a
SettingsError naming it. The `env` section alone may hold keys of its own for a domain defined outside the
package (envs/registry.py): plain values (numbers, strings, booleans, tuples) kept in `Env.extras` and read as
attributes, `env.my_key`, or `env.get("my_key", default)`, as from the config section.

The library reads the typed settings only (loop.Run.config); the ConfigDict is kept where it is the record of
the run: workdir/config.json and the resume check that compares a rerun's settings with it (workdir.check_resumable).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from typing import Any

from iterppo_jax import errors
from iterppo_jax import group_pg
from iterppo_jax import ppo
from iterppo_jax import q_table
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
    "qfit.shrink_to": q_table.SHRINK_PRIORS,
    "ppo.kl_estimator": ppo.KL_ESTIMATORS,
    "ppo.reference": ("pi_k", "sft"),
    "ppo.center_reward": ("none", "state"),
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
    "qfit.select_every": 0, "qfit.cross_fit": 0, "qfit.pool": -1,  # pool -1: every earlier iteration
    "qfit.model.num_layers": 0, "qfit.model.embed_dim": 0, "qfit.model.mlp_dim": 0, "qfit.model.num_heads": 0,
    "qfit.model.num_kv_heads": 0, "qfit.model.head_dim": 0,  # 0: the policy's size
    "ppo.steps": 0, "ppo.batch_size": 1, "ppo.minibatch_size": 1, "ppo.epochs": 1, "ppo.checkpoint_every": 1,
    "ppo.kl_horizon": 1, "group.size": 2,
    "loop.iterations": 0, "loop.conversations": 1, "loop.eval_conversations": 1, "loop.play_batch": 1,
    "loop.explore_count": 1,
    "loop.rank_states": 0, "loop.true_q_states": 0, "loop.stop_after_ppo_step": 0, "lora.rank": 0,
    "num_conversations": 1, "batch_size": 1,
    "cluster.num_processes": 0, "cluster.process_id": -1, "cluster.init_timeout_s": 1,
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
    "qfit.shrink": (0.0, math.inf, True, False),
    "qfit.pessimism": (0.0, math.inf, True, False),
    "qfit.label_flip": (0.0, 1.0, True, True), "qfit.data_fraction": (0.0, 1.0, False, True),
    "ppo.kl_coef": (0.0, math.inf, True, False), "ppo.kl_target": (0.0, math.inf, True, False),
    "ppo.gamma": (0.0, 1.0, True, True), "ppo.lam": (0.0, 1.0, True, True),
    "ppo.clip_eps": (0.0, math.inf, False, False), "ppo.value_clip_eps": (0.0, math.inf, False, False),
    "ppo.entropy_coef": (0.0, math.inf, True, False), "ppo.temperature": (0.0, math.inf, False, False),
    "group.std_eps": (0.0, math.inf, False, False),
    "loop.deploy_temperature": (0.0, math.inf, False, False),
    "lora.alpha": (0.0, math.inf, False, False),
    "cluster.connect_timeout_s": (0.0, math.inf, False, False),
}
LORA_MODELS = ("policy", "critic", "qmodel")  # the loop's models config.lora.models may name
OPTIMIZERS = ("sft", "qfit", "ppo", "ppo.critic")  # sections made by configs/sales.py's _optimizer_section


_ABSENT = object()


def _get(config, key: str, default=_ABSENT):
  """The value at a dotted key of a config or of typed settings, or `default` when there is no such key."""
  node = config
  for part in key.split("."):
    if dataclasses.is_dataclass(node):
      node = getattr(node, part, _ABSENT)  # Env's own keys too (Env.__getattr__)
    elif _is_section(node) and part in node:
      node = node[part]
    else:  # no such key, or a value where a section belongs (parse names it)
      return default
    if node is _ABSENT:
      return default
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


def check_keys(config, choices: dict, counts: dict, reals: dict) -> None:
  """The checks of single keys, each table as CHOICES (key -> allowed values), COUNTS (key -> lowest integer) and
  REALS (key -> interval) are; a key `config` does not have is passed over. For the run's settings (`check`)
  and for the studies' own configs (studies/benchmark.py, studies/report.py)."""
  for key, allowed in choices.items():
    value = _get(config, key)
    if value is not _ABSENT and value not in allowed:
      raise _bad(key, f"one of {', '.join(allowed)}", value)
  for key, low in counts.items():
    value = _get(config, key)
    if value is not _ABSENT:
      _check_int(key, value, low)
  for key, bounds in reals.items():
    value = _get(config, key)
    if value is not _ABSENT:
      _check_real(key, value, *bounds)


def check(config) -> None:
  """Raises errors.SettingsError (a ValueError: key, value, what is allowed) for the first bad setting; returns
  None when all are good. `config` is a ConfigDict (or dict), whose missing keys are passed over, or typed
  `Settings`, which have every key: `load` checks those, so a default the config leaves in place is checked too."""
  check_keys(config, CHOICES, COUNTS, REALS)
  for key, (switch, low) in COUNTS_WHEN.items():
    value = _get(config, key)
    if value is not _ABSENT and _get(config, switch, 0) > 0:
      _check_int(key, value, low)
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
  if get("inner") in ("grpo", "rloo") and get("group.size") and get("ppo.batch_size", 0) % get("group.size"):
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
  if (get("loop.explore_turns") and get("env.max_turns")
      and get("loop.explore_count", 1) > get("env.max_turns")):
    raise errors.SettingsError(f"config.loop.explore_count ({get('loop.explore_count')}) randomised turns per "
                               f"conversation cannot exceed env.max_turns ({get('env.max_turns')})")
  if get("ppo.center_reward", "none") != "none" and get("qfit.view") != "dialogue_state":
    raise errors.SettingsError("config.ppo.center_reward='state' subtracts the dialogue-state table's state value: set "
                               "qfit.view=dialogue_state or ppo.center_reward='none'")
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


# ---- the typed settings: one frozen dataclass per section, defaults = configs/sales.py ----

@dataclasses.dataclass(frozen=True)
class Env:
  """The simulated world (`env`): its common keys (envs/base.py), and a domain's own keys in `extras`."""
  domain: str = "sales"  # a built-in domain of iterppo_jax/envs or an import path (envs/registry.py)
  business_user: str = "sr"
  max_turns: int = 10
  skill_mean: float = 0.35
  max_render_turns: int = 3
  # (key, value) pairs of env keys the fields above do not name: settings of a domain defined outside the package
  extras: tuple[tuple[str, Any], ...] = ()

  def __getattr__(self, name: str):
    """A domain's own key (`extras`), as the config section would give it."""
    for key, value in self.__dict__.get("extras", ()):
      if key == name:
        return value
    raise AttributeError(f"config.env has no key {name!r}")

  def get(self, name: str, default=None):
    """The value of a key of the section, or `default` when it has none (ConfigDict.get)."""
    try:
      return getattr(self, name)
    except AttributeError:
      return default


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  path: str = ""  # a local Hugging Face tokenizer dir; empty: a BPE trained on the behaviour logs
  vocab_size: int = 1024


@dataclasses.dataclass(frozen=True)
class Data:
  max_prompt_len: int = 192
  max_action_len: int = 24
  prompt_bucket: int = 0  # 0 pads prompts to max_prompt_len; N pads a batch to its longest, in N's
  chat_template: bool = False  # render with the tokenizer's chat template (configs/sales_hf.py)
  system_prompt: str = ""  # opens every state rendered with a chat template


@dataclasses.dataclass(frozen=True)
class Model:
  style: str = "llama"
  num_layers: int = 2
  embed_dim: int = 128
  mlp_dim: int = 512
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 32
  tie_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False


@dataclasses.dataclass(frozen=True)
class Lora:
  rank: int = 0  # 0: every weight trains
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
  models: tuple[str, ...] = LORA_MODELS


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optimizer section (configs/sales.py's _optimizer_section): AdamW after a linear warmup."""
  learning_rate: float = 3e-4
  warmup_steps: int = 2
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class Critic(Optimizer):
  learning_rate: float = 2e-4


@dataclasses.dataclass(frozen=True)
class Sft(Optimizer):
  learning_rate: float = 1e-3
  warmup_steps: int = 20
  behavior_conversations: int = 2000
  steps: int = 300
  batch_size: int = 32
  eval_examples: int = 0  # 0: all held-out decisions


@dataclasses.dataclass(frozen=True)
class QModel:
  """The Q-model's own sizes (`qfit.model`); 0 keeps the policy's."""
  num_layers: int = 0
  embed_dim: int = 0
  mlp_dim: int = 0
  num_heads: int = 0
  num_kv_heads: int = 0
  head_dim: int = 0


@dataclasses.dataclass(frozen=True)
class QFit(Optimizer):
  learning_rate: float = 3e-4
  warmup_steps: int = 10
  method: str = "td"
  kind: str = "bce"
  init: str = "previous"
  steps: int = 200
  batch_size: int = 32
  lam: float = 0.9
  refresh_every: int = 50
  target_update: str = "polyak"
  tau: float = 0.05
  label_flip: float = 0.0
  data_fraction: float = 1.0
  model: QModel = QModel()
  view: str = "dialogue_state"
  pool: int = 1
  next_act: str = "logged"
  head: str = "q"
  select_every: int = 0
  cross_fit: int = 10  # folds of the logs-only measures on every randomised turn (0, 1: off)
  targets: str = "unbiased"
  fqe_samples: int = 4
  shrink: float = 5.0  # configs/sales.py (finding 14); the other domains set 0
  shrink_to: str = "additive"
  pessimism: float = 0.0  # z of the table's lower confidence bound (q_table.py; 0: the plain table)


@dataclasses.dataclass(frozen=True)
class Ppo(Optimizer):
  learning_rate: float = 3e-4
  warmup_steps: int = 2
  critic: Critic = Critic()
  kl_coef: float = 0.03
  kl_estimator: str = "k1"
  kl_target: float = 0.0  # > 0: the adaptive controller
  kl_horizon: int = 10000
  reference: str = "pi_k"
  center_reward: str = "none"
  steps: int = 20
  batch_size: int = 64
  minibatch_size: int = 32
  epochs: int = 2
  gamma: float = 1.0
  lam: float = 0.95
  clip_eps: float = 0.2
  value_clip_eps: float = 0.2
  entropy_coef: float = 0.0
  whiten_advantages: bool = True
  temperature: float = 1.0
  checkpoint_every: int = 5


@dataclasses.dataclass(frozen=True)
class Group:
  size: int = 4
  kl_in: str = "reward"
  std_eps: float = 1e-6


@dataclasses.dataclass(frozen=True)
class Loop:
  iterations: int = 2
  first_data: str = "policy"
  conversations: int = 768
  eval_conversations: int = 400
  play_batch: int = 256
  deploy_temperature: float = 1.0
  explore_turns: bool = True
  explore_count: int = 1
  rank_states: int = 16
  rank_policy_samples: int = 2
  rank_rollouts: int = 16
  true_q_states: int = 16
  true_q_rollouts: int = 8
  tensorboard: bool = True
  eval_pretrained: bool = False
  logs: str = ""
  skip_invalid: bool = False
  stop_after_phase: str = ""
  stop_after_ppo_step: int = 0


@dataclasses.dataclass(frozen=True)
class Baselines:
  budget: int = 1536
  seeds: tuple[int, ...] = (0, 1, 2)
  ks: tuple[int, ...] = (1, 2, 4, 8)
  iterations: int = 4
  online_batch: int = 32
  online_lam: float = 0.95
  online_eval_every: int = 384
  bc_steps: int = 50
  methods: tuple[str, ...] = ("behavior", "oracle", "pi0", "offline", "filtered_bc", "filtered_bc_own", "myopic",
                              "online_ppo", "iterative_ppo")


@dataclasses.dataclass(frozen=True)
class Cluster:
  coordinator: str = ""
  num_processes: int = 0
  process_id: int = -1
  connect_timeout_s: float = 60.0
  init_timeout_s: int = 300


@dataclasses.dataclass(frozen=True)
class Settings:
  """A run's settings (configs/sales.py and the configs built on it), typed and frozen: what the library reads."""
  seed: int = 0
  gamma: float = 0.95
  resume: bool = True
  env: Env = Env()
  policy: str = "behavior"  # experiments.simulate
  num_conversations: int = 5000
  batch_size: int = 1024
  tokenizer: Tokenizer = Tokenizer()
  data: Data = Data()
  model: Model = Model()
  lora: Lora = Lora()
  sft: Sft = Sft()
  qfit: QFit = QFit()
  inner: str = "rloo"
  ppo: Ppo = Ppo()
  group: Group = Group()
  loop: Loop = Loop()
  baselines: Baselines = Baselines()
  mesh: tuple[tuple[str, int], ...] = (("data", -1), ("fsdp", 1), ("tensor", 1))
  mesh_rules: tuple[tuple[str, Any], ...] = ()
  distributed: bool = False
  cluster: Cluster = Cluster()
  model_dir: str = ""  # a pretrained model (configs/sales_hf.py); '' trains from scratch
  export_dir: str = ""  # the final policy also written here as a Hugging Face model


def load(config) -> Settings:
  """The typed settings of a ConfigDict (or a plain dict of the same shape), checked once complete: a key the
  config leaves out is checked at its default, against the keys it sets (ppo.batch_size=48 with the default
  ppo.minibatch_size of 32 is refused here, not in the first PPO step).

  Raises:
    errors.SettingsError: for a key no section knows (`config.qfit.methd: unknown key; expected one of ...`), a
      value of the wrong type, or a bad setting (`check`).
  """
  typed = parse(config)
  check(typed)
  return typed


def parse(config) -> Settings:
  """The typed settings of `config` without `check`'s ranges and rules (a key no section knows and a value of the
  wrong type are still refused): for a study that reads a few keys to steer copies of the config, whose own
  checks come first, before loop.run loads each copy."""
  return build(Settings, config, "")


def load_env(section) -> Env:
  """The `env` section alone, checked and typed: what playing a simulator needs (experiments.simulate, the
  report's simulator table), without the loop's settings and their rules."""
  env = build(Env, section, "env.")
  check({"env": env})  # its defaults too; not the loop's rules (a tracker is needed only with qfit.view)
  return env


def build(cls, node, prefix: str = ""):
  """`cls` (a frozen dataclass of sections) from the mapping `node`, the config section at `prefix`, each value
  of its field's type: a key `cls` does not have, a value of the wrong type, or a key of a field without a
  default that `node` lacks is a SettingsError naming it. The run's settings (`parse`) and the studies' own
  configs (studies/benchmark.py, studies/report.py) are built with it."""
  hints = typing.get_type_hints(cls)
  fields = [f for f in dataclasses.fields(cls) if f.name != "extras"]
  names = [f.name for f in fields]
  missing = [f.name for f in fields if f.name not in node.keys() and f.default is dataclasses.MISSING
             and f.default_factory is dataclasses.MISSING]
  if missing:
    raise errors.SettingsError(f"config.{prefix}{missing[0]}: missing; the section needs {', '.join(names)}")
  values, extras = {}, []
  for key in node.keys():
    value, where = node[key], f"{prefix}{key}"
    if key not in names:
      if cls is not Env:
        raise errors.SettingsError(f"config.{where}: unknown key; expected one of {', '.join(names)}")
      if _is_section(value):
        raise errors.SettingsError(f"config.{where}: a domain's own env keys hold plain values (numbers, strings, "
                                   "booleans, tuples), not sections")
      extras.append((key, _tuples(value)))
      continue
    values[key] = _typed(hints[key], value, where)
  if extras:
    values["extras"] = tuple(extras)
  return cls(**values)


def _is_section(value) -> bool:
  return hasattr(value, "keys") and hasattr(value, "__getitem__")


def _tuples(value):
  """Lists (a config read back from JSON) as tuples, all the way down, so the settings stay frozen."""
  return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _typed(hint, value, where: str):
  """`value` as the field type `hint`: a section, or a value of that type (an int where a float is expected)."""
  if dataclasses.is_dataclass(hint):
    if not _is_section(value):
      raise _bad(where, "a section", value)
    return build(hint, value, where + ".")
  origin = typing.get_origin(hint) or hint
  if origin is tuple:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
      raise _bad(where, "a tuple", value)
    return _tuples(value)
  if hint is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise _bad(where, "a number", value)
    return float(value)
  if hint is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise _bad(where, "an integer", value)
    return value
  if hint in (bool, str) and not isinstance(value, hint):
    raise _bad(where, f"a {hint.__name__}", value)
  return value
