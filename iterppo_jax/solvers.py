"""The single-turn solvers of the improvement step behind one interface, and the one host driver they run on.

Iterative PPO's step 3 solves, per state s of D_k (PAPER.md, "Why it works"),

  max_pi  E_{a~pi}[Q_k(s, a)] - beta KL(pi || pi_k),   exact maximiser  pi*(a|s) ∝ pi_k(a|s) exp(Q_k(s, a) / beta),

by sampling responses, scoring them and updating. Every solver does that with the same host loop (``train``):
per iteration, pick the prompts (deterministic in (seed, step)), sample with the current policy, score the
samples on the device (``Programs.experience``: reward, reference, old log-probs, advantages), then run
``epochs`` shuffled passes of minibatch updates cut on the device (``run_epochs``), and move the metrics to the
host once. What differs between solvers is a row of ``SOLVERS``:

  ppo    token-level PPO with a critic and GAE (ppo.py); one update on the whole batch runs fused
  grpo   G responses per state, group-normalised advantages, no critic (group_pg.py)
  rloo   G responses per state, leave-one-out baseline, no critic (group_pg.py)

A new solver is one module with its jitted scoring and update steps, and one row here. Online PPO (online_ppo.py,
whole conversations instead of single turns) and the benchmark (studies/benchmark.py) run the same pieces:
``run_epochs`` and ``mean_metrics``, and the benchmark times ``sample``, ``Programs.experience`` and ``run_epochs``
as ``train`` calls them.

The solver's state (``SolverState``) is one pytree: the models' train states and beta, so a checkpoint of it is
the whole of what an interrupted phase needs to replay exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from iterppo_jax import distributed
from iterppo_jax import errors
from iterppo_jax import group_pg
from iterppo_jax import metrics as metrics_lib
from iterppo_jax import ppo
from iterppo_jax import sampling
from iterppo_jax import sharding
from iterppo_jax import train_state as ts


@flax.struct.dataclass
class SolverState:
  """What a solver carries from one iteration to the next."""
  model: Any  # ppo.PPOState (policy and critic) or ts.TrainState (the policy alone)
  kl_coef: jax.Array  # beta, float32 []: fixed, or moved by ppo.update_kl_coef when cfg.kl_target is set


@dataclasses.dataclass(frozen=True)
class Programs:
  """A solver's jitted pieces for one run (one prompt length and batch size)."""
  # (model, ref_params, reward_params, SampleOutput, kl_coef) -> dict of [B, ...] device arrays
  experience: Callable
  # (model, minibatch) -> (model, metrics); the model is donated
  update: Callable
  update_keys: tuple[str, ...]  # the experience keys a minibatch carries
  # Optional (model, ref_params, reward_params, SampleOutput, kl_coef) -> (model, metrics, summary): scoring and
  # the one update of an iteration with one epoch of one minibatch, as one program.
  fused: Optional[Callable] = None


@dataclasses.dataclass(frozen=True)
class Solver:
  """One row of SOLVERS: everything the driver and the loop need to know about a solver."""
  name: str  # config.inner, the metric prefix and the checkpoint directory
  critic: bool  # whether the loop builds a critic (a scalar head on the policy's trunk)
  config: Callable[[Any], Any]  # the run's settings.Settings -> the solver's frozen config (epochs, minibatch, ...)
  group_size: Callable[[Any], int]  # responses per prompt (1: one each)
  programs: Callable[..., Programs]  # (policy, critic, reward_fn, cfg, prompt_len, batch_size, reuse_logprobs)
  policy_state: Callable[[Any], ts.TrainState]  # the model state -> the policy's TrainState
  summary_keys: tuple[str, ...]  # experience keys copied to the host for the iteration's metrics
  summary: Callable[[dict], dict]  # host copies of summary_keys -> metrics (unprefixed)
  finite: tuple[str, ...] = ()  # metrics (unprefixed) that must stay finite: a NaN stops the run


# ---- the rows ----

def _ppo_config(config) -> ppo.PPOConfig:
  """PPO's settings from the run's typed settings (settings.Settings: config.ppo and data.max_action_len)."""
  p = config.ppo
  return ppo.PPOConfig(
      kl_coef=p.kl_coef, kl_estimator=p.kl_estimator, kl_target=p.kl_target or None,
      kl_horizon=p.kl_horizon, gamma=p.gamma, lam=p.lam, clip_eps=p.clip_eps, value_clip_eps=p.value_clip_eps,
      entropy_coef=p.entropy_coef, epochs=p.epochs, minibatch_size=p.minibatch_size,
      whiten_advantages=p.whiten_advantages, max_new_tokens=config.data.max_action_len,
      temperature=p.temperature, top_p=1.0)


def _group_config(config, algorithm: str) -> group_pg.GroupConfig:
  """GRPO / RLOO settings (settings.Settings): the group keys of config.group, everything shared with PPO from
  config.ppo; `algorithm` is the row's name (the loop picks the row by config.inner)."""
  p, g = config.ppo, config.group
  return group_pg.GroupConfig(
      algorithm=algorithm, group_size=g.size, kl_coef=p.kl_coef, kl_in=g.kl_in, kl_estimator=p.kl_estimator,
      kl_target=p.kl_target or None, kl_horizon=p.kl_horizon, std_eps=g.std_eps, clip_eps=p.clip_eps,
      entropy_coef=p.entropy_coef, epochs=p.epochs, minibatch_size=p.minibatch_size,
      max_new_tokens=config.data.max_action_len, temperature=p.temperature, top_p=1.0)


def _ppo_programs(policy, critic, reward_fn, cfg: ppo.PPOConfig, prompt_len: int, batch_size: int,
                  reuse_logprobs: bool) -> Programs:
  experience_fn = ppo.make_experience_fn(policy, critic, reward_fn, cfg)

  def old(out):  # the sampler's log-probs stand in for the policy's scoring pass in float32
    return out.logprobs if reuse_logprobs else None

  def experience(model, ref_params, reward_params, out, kl_coef):
    return experience_fn(model.policy.params, ref_params, model.critic.params, reward_params, out.prompt_tokens,
                         out.prompt_valid, out.tokens, out.valid, kl_coef, old_logprobs=old(out))

  def fused(model, ref_params, reward_params, out, kl_coef, fused_fn=ppo.make_fused_step(
      policy, critic, reward_fn, cfg, prompt_len)):
    return fused_fn(model, ref_params, reward_params, out.prompt_tokens, out.prompt_valid, out.tokens, out.valid,
                    kl_coef, old_logprobs=old(out))
  return Programs(experience, ppo.make_update_step(policy, critic, cfg, prompt_len), ppo.UPDATE_KEYS,
                  fused if ppo.fuses(cfg, batch_size) else None)


def _group_programs(policy, critic, reward_fn, cfg: group_pg.GroupConfig, prompt_len: int, batch_size: int,
                    reuse_logprobs: bool) -> Programs:
  del critic, batch_size, reuse_logprobs  # no critic; the policy pass scores (the KL in the reward needs it)
  experience_fn = group_pg.make_experience_fn(policy, reward_fn, cfg)

  def experience(model, ref_params, reward_params, out, kl_coef):
    return experience_fn(model.params, ref_params, reward_params, out.prompt_tokens, out.prompt_valid,
                         out.tokens, out.valid, kl_coef)
  return Programs(experience, group_pg.make_update_step(policy, cfg, prompt_len), group_pg.UPDATE_KEYS)


def _response_len(e):
  return float(np.mean(np.sum(e["mask"], 1)))


def _ppo_summary(e: dict) -> dict:
  return {"score": float(np.mean(e["score"])), "kl": float(np.mean(e["kl"])),
          "kl_k1": float(np.mean(e["exact_kl_k1"])), "response_len": _response_len(e)}


def _group_summary(e: dict) -> dict:
  return {"score": float(np.mean(e["score"])), "reward": float(np.mean(e["reward"])),
          "kl": float(np.mean(e["kl"])), "kl_k1": float(np.mean(e["exact_kl_k1"])),
          "group_std": float(np.mean(e["group_std"])),
          # Groups whose rewards are all equal teach nothing (GRPO and RLOO advantages are 0 there).
          "zero_std_frac": float(np.mean(e["group_std"] < 1e-6)), "response_len": _response_len(e)}


_PPO = Solver(name="ppo", critic=True, config=_ppo_config, group_size=lambda cfg: 1, programs=_ppo_programs,
              policy_state=lambda model: model.policy, summary_keys=("score", "kl", "exact_kl_k1", "mask"),
              summary=_ppo_summary)
_GROUP = dict(critic=False, group_size=lambda cfg: cfg.group_size, programs=_group_programs,
              policy_state=lambda model: model,
              summary_keys=("score", "reward", "kl", "exact_kl_k1", "group_std", "mask"), summary=_group_summary,
              finite=("loss", "policy_loss"))
SOLVERS: dict[str, Solver] = {
    "ppo": _PPO,
    "grpo": Solver(name="grpo", config=functools.partial(_group_config, algorithm="grpo"), **_GROUP),
    "rloo": Solver(name="rloo", config=functools.partial(_group_config, algorithm="rloo"), **_GROUP)}


# ---- the pieces every driver shares ----

def make_take_rows(mesh, keys: tuple[str, ...]) -> Callable:
  """Jitted `take(experience, idx) -> minibatch`: rows `idx` of `keys`, cut on the device and placed as a batch
  (sharding.batch_sharding), so an iteration never copies its experience to the host and back."""
  return jax.jit(lambda exp, idx: {k: exp[k][idx] for k in keys}, out_shardings=sharding.batch_sharding(mesh))


def prompt_rows(seed: int, step: int, n_prompts: int, batch_size: int, group_size: int) -> np.ndarray:
  """The prompt rows of iteration `step`: batch_size / G prompts drawn (deterministic in (seed, step)), each
  repeated G times so a group's responses are contiguous."""
  n = batch_size // group_size
  rng = np.random.default_rng([seed, step])
  return np.repeat(rng.choice(n_prompts, size=n, replace=n_prompts < n), group_size)


def sample(policy: ts.Trainable, params, prompts: dict, rows: np.ndarray, key, cfg, *, eos_id: int,
           pad_id: int, ignore_eos: bool = False) -> sampling.SampleOutput:
  """Responses of the policy `params` to prompts[rows], with the solver's sampling settings (LoRA params are
  merged first: the KV-cache decode runs on plain weights)."""
  return sampling.sample(policy.graphdef, policy.merged_params(params), jnp.asarray(prompts["tokens"][rows]),
                         jnp.asarray(prompts["valid"][rows]), key, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, top_p=cfg.top_p, eos_id=eos_id, pad_id=pad_id,
                         ignore_eos=ignore_eos)


def run_epochs(update: Callable, take: Callable, model, batch, n_rows: int, minibatch_size: int, epochs: int,
               order: Callable[[int], np.ndarray]):
  """`epochs` passes of minibatch updates over the rows of `batch`: epoch e visits rows in `order(e)`.

  Returns (model, per-update metrics, still on the device: one transfer for all of them).
  """
  metrics = []
  for epoch in range(epochs):
    perm = order(epoch)
    for start in range(0, n_rows, minibatch_size):
      model, m = update(model, take(batch, perm[start:start + minibatch_size]))
      metrics.append(m)
  return model, metrics


def mean_metrics(step_metrics: list[dict], prefix: str) -> dict[str, float]:
  """The mean over updates of each metric (host values, summed in update order), named prefix/key."""
  sums: dict[str, float] = {}
  for m in step_metrics:
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return {f"{prefix}/{k}": v / len(step_metrics) for k, v in sums.items()}


def init_state(model, kl_coef: float) -> SolverState:
  return SolverState(model=model, kl_coef=jnp.float32(kl_coef))


def check_batch(solver: Solver, cfg, batch_size: int) -> None:
  group = solver.group_size(cfg)
  if batch_size % group:
    raise errors.SettingsError(f"{solver.name} batch_size {batch_size} (responses) must be a multiple of group "
                               f"size {group}")
  if batch_size % cfg.minibatch_size:
    raise errors.SettingsError(f"{solver.name} batch_size {batch_size} must be a multiple of minibatch_size "
                               f"{cfg.minibatch_size}")


# ---- the host driver ----

def train(solver: Solver, policy: ts.Trainable, critic: Optional[ts.Trainable], state: SolverState,
          ref_params: Any, reward_fn: Callable, reward_params: Any, prompts: dict, cfg, *, steps: int,
          batch_size: int, seed: int, eos_id: int, pad_id: int, writer=None, desc: Optional[str] = None,
          start_step: int = 0, on_step: Callable | None = None) -> tuple[SolverState, dict[str, float]]:
  """Runs iterations start_step .. steps-1 of `solver` on the single-turn problem over `prompts`.

  Args:
    solver: a row of SOLVERS; cfg its config (solver.config of the run's settings.Settings, or built directly).
    policy, critic: the Trainables (critic None for critic-free solvers); state: their SolverState.
    ref_params: the frozen reference (pi_k), a params tree of the policy's graph.
    reward_fn / reward_params: reward_fn(reward_params, tokens, positions, valid, last_index, state_index) -> [B].
    prompts: {'tokens': [M, P] int32 left-padded, 'valid': [M, P] bool} from data.encode_prompts.
    batch_size: sampled responses per iteration (a multiple of the group size and of cfg.minibatch_size).
    writer: metrics.MetricWriter; each iteration's metrics are written at step i + 1 under phase `desc`.
    on_step: on_step(i + 1, state) after each iteration (checkpointing: a resumed run replays exactly).
  Returns:
    (state, metrics of the last iteration), named '<solver.name>/...'.
  """
  check_batch(solver, cfg, batch_size)
  prefix, desc = solver.name, desc or solver.name
  n_prompts, prompt_len = prompts["tokens"].shape
  reuse = ppo.sampler_logprobs_reusable(policy, solver.policy_state(state.model).params)
  programs = solver.programs(policy, critic, reward_fn, cfg, prompt_len, batch_size, reuse)
  take = make_take_rows(policy.mesh, programs.update_keys)
  group = solver.group_size(cfg)
  base_key = jax.random.key(seed)
  last: dict[str, float] = {}
  for i in metrics_lib.progress(range(start_step, steps), total=steps - start_step, desc=desc):
    rows = prompt_rows(seed, i, n_prompts, batch_size, group)
    out = sample(policy, solver.policy_state(state.model).params, prompts, rows,
                 jax.random.fold_in(jax.random.fold_in(base_key, i), 0), cfg, eos_id=eos_id, pad_id=pad_id)
    model = state.model
    if programs.fused is not None:
      model, m, exp = programs.fused(model, ref_params, reward_params, out, state.kl_coef)
      step_metrics = [m]
    else:
      exp = programs.experience(model, ref_params, reward_params, out, state.kl_coef)
      model, step_metrics = run_epochs(
          programs.update, take, model, exp, batch_size, cfg.minibatch_size, cfg.epochs,
          lambda epoch: np.random.default_rng([seed, i, epoch + 1]).permutation(batch_size))
    # One host transfer per iteration, after every step is queued.
    step_metrics, summary = distributed.to_host((step_metrics, {k: exp[k] for k in solver.summary_keys}))
    kl_coef = float(state.kl_coef)
    last = mean_metrics(step_metrics, prefix)
    last.update({f"{prefix}/{k}": v for k, v in solver.summary(summary).items()})
    last[f"{prefix}/kl_coef"] = float(str(np.float32(kl_coef)))  # 0.1, not float32's 0.10000000149
    metrics_lib.check_finite(last, i + 1, tuple(f"{prefix}/{k}" for k in solver.finite))
    if cfg.kl_target is not None:
      kl_coef = float(ppo.update_kl_coef(kl_coef, last[f"{prefix}/kl"], cfg.kl_target, cfg.kl_horizon,
                                         batch_size))
    state = SolverState(model=model, kl_coef=jnp.float32(kl_coef))
    if writer is not None:
      writer.write(i + 1, last, phase=desc)
    if on_step is not None:
      on_step(i + 1, state)
  return state, last
