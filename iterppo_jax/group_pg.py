"""Critic-free inner solvers for Iterative PPO's single-turn step: GRPO and RLOO.

The inner problem is the same as for PPO (ppo.py; PAPER.md, "Why it works"): per state s ~ D_k,

  max_pi  E_{a~pi}[Q_k(s, a)] - beta KL(pi || pi_k),   exact maximiser  pi*(a|s) ∝ pi_k(a|s) exp(Q_k(s, a) / beta).

Both solvers sample a *group* of G responses per state and use the group itself as the baseline instead of a
learned critic (no value network, no GAE):

  * GRPO (Shao et al. 2024, "DeepSeekMath", section 4.1): group-normalised advantages
      A_i = (r_i - mean_g(r)) / (std_g(r) + eps);
  * RLOO (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019): the leave-one-out baseline
      A_i = r_i - 1/(G-1) sum_{j != i} r_j   (unnormalised);

and both update with PPO's clipped ratio (ppo.policy_loss), every token of response i carrying A_i.

Where the KL to pi_k goes (``GroupConfig.kl_in``):
  * 'reward' (the default, for both): the sequence reward is r_i = Q_k(s, a_i) - beta sum_t kl_t with the k1
    estimator kl_t = log pi(a_t) - log pi_k(a_t), as in the RLOO paper. sum_t kl_t = log pi(a)/pi_k(a) exactly, so
    r_i is the per-sample regularised objective, and the policy gradient of E[Q] - beta KL(pi || pi_k) is
    E[grad log pi(a) (r(a) - b)] for any baseline b that does not depend on a itself (the leave-one-out mean) or,
    for GRPO, a per-state rescaling of it. At pi* every r_i equals beta log Z(s), so both the leave-one-out and the
    group-normalised advantages vanish *exactly in every group*: pi* is a fixed point of each batch update.
  * 'loss' (GRPO as DeepSeekMath writes it): r_i = Q_k only, and the loss adds beta * mean_t k3_t with
    k3 = pi_k/pi - log(pi_k/pi) - 1. Its gradient at pi = pi_old is that of the *reverse* KL(pi_k || pi), and the
    normalisation rescales Q by 1/std_g(Q) but not the KL, so the fixed point is not pi_k exp(Q/beta);
    tests/test_group_pg.py shows the tabular policy landing away from it. Kept for comparison with GRPO papers.

Token aggregation: the clipped loss is averaged over all valid tokens of the minibatch (ppo.policy_loss), a
constant factor times sum_i A_i grad log pi(a_i); GRPO's per-response 1/|o_i| would weight short responses more
(the length bias of Dr. GRPO, Liu et al. 2025) and change the fixed point.

A GRPO/RLOO batch is [n_prompts * G] rows, the G responses of one state contiguous: row i belongs to group
i // G. The rollout, reward and scoring reuse ppo.py (sequence_layout, response_logprobs, kl_penalty, ...).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from iterppo_jax import ppo
from iterppo_jax import train_state as ts

ALGORITHMS = ("grpo", "rloo")
KL_PLACEMENTS = ("reward", "loss")

# ---- group maths ----


def _groups(scores: jax.Array, group_size: int) -> jax.Array:
  """[B] -> [B // G, G], refusing a batch that is not whole groups or a group without a baseline."""
  if group_size < 2:
    raise ValueError(f"group_size must be >= 2 (a group needs other responses as its baseline), got {group_size}")
  if scores.ndim != 1 or scores.shape[0] % group_size:
    raise ValueError(f"scores must be [n_prompts * group_size] = [B] with B a multiple of {group_size}, "
                     f"got shape {scores.shape}")
  return scores.reshape(-1, group_size)


@functools.partial(jax.jit, static_argnames=("group_size",))
def grpo_advantages(scores: jax.Array, group_size: int, eps: float | jax.Array = 1e-6) -> jax.Array:
  """GRPO's group-normalised advantages (Shao et al. 2024, eq. for outcome supervision in section 4.1.2).

    A_i = (r_i - mean_g(r)) / (std_g(r) + eps),   std_g with Bessel's correction (divides by G - 1), as TRL's
                                                   GRPOTrainer (torch.std); a group of equal rewards gets A = 0.

  Args:
    scores: [B] sequence rewards r, B = n_prompts * G with the G responses of one prompt contiguous.
    group_size: G >= 2.
    eps: floor added to the std.

  Returns:
    [B] advantages (no gradient flows).
  """
  groups = _groups(scores, group_size).astype(jnp.promote_types(scores.dtype, jnp.float32))
  mean = jnp.mean(groups, axis=1, keepdims=True)
  std = jnp.std(groups, axis=1, keepdims=True, ddof=1)
  return jax.lax.stop_gradient(((groups - mean) / (std + eps)).reshape(-1))


@functools.partial(jax.jit, static_argnames=("group_size",))
def rloo_advantages(scores: jax.Array, group_size: int) -> jax.Array:
  """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024, eq. 6).

    A_i = r_i - 1/(G-1) sum_{j != i} r_j = G/(G-1) (r_i - mean_g(r))     (unnormalised)

  Args:
    scores: [B] sequence rewards r, B = n_prompts * G with the G responses of one prompt contiguous.
    group_size: G >= 2.

  Returns:
    [B] advantages (no gradient flows).
  """
  groups = _groups(scores, group_size).astype(jnp.promote_types(scores.dtype, jnp.float32))
  others = (jnp.sum(groups, axis=1, keepdims=True) - groups) / (group_size - 1)
  return jax.lax.stop_gradient((groups - others).reshape(-1))


def sequence_rewards(score: jax.Array, logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array,
                     kl_coef: float | jax.Array, estimator: str = "k1") -> tuple[jax.Array, jax.Array]:
  """The KL-regularised sequence reward of the RLOO paper.

    r = score - beta * sum_t kl_t,   kl_t = ppo.kl_penalty(logp_t, logq_t, estimator) over valid tokens

  With k1, sum_t kl_t = log pi(a) / pi_ref(a), so r is the per-sample value of E[Q] - beta KL(pi || pi_ref);
  it equals the gamma = 1 return of ppo.token_rewards.

  Args:
    score: [B] sequence score Q_k(s, a).
    logprobs: [B, T] log pi of the sampled tokens (the rollout policy).
    ref_logprobs: [B, T] log pi_ref of the same tokens (pi_k).
    mask: [B, T] real response tokens.
    kl_coef: beta.
    estimator: 'k1' | 'k2' | 'k3'; only k1 keeps the fixed point at pi_ref exp(score / beta).

  Returns:
    (rewards[B], kl_sum[B]) with kl_sum the unscaled per-row KL estimate.
  """
  kl_sum = ppo.masked_sum(ppo.kl_penalty(logprobs, ref_logprobs, estimator), mask, axis=-1)
  return score.astype(kl_sum.dtype) - kl_coef * kl_sum, kl_sum


def group_policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, ref_logprobs: jax.Array,
                      advantages: jax.Array, mask: jax.Array, clip_eps: float | jax.Array,
                      loss_kl_coef: float | jax.Array = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped surrogate with one advantage per response, plus DeepSeekMath's optional in-loss KL.

    L = mean_m[ max(-A_i rho_t, -A_i clip(rho_t, 1 - eps, 1 + eps)) ] + c * mean_m[ k3(pi_theta, pi_ref)_t ]

  where rho_t = pi_theta(a_t) / pi_old(a_t), A_i is broadcast to every token of response i and c is
  ``loss_kl_coef`` (0 when the KL is in the reward, see the module docstring).

  Args:
    logprobs: [B, T] log pi_theta of the sampled tokens (differentiable).
    old_logprobs: [B, T] log pi_old at rollout time.
    ref_logprobs: [B, T] log pi_ref (pi_k) of the same tokens.
    advantages: [B] per-response advantages.
    mask: [B, T] valid tokens.
    clip_eps: epsilon of the ratio clip.
    loss_kl_coef: c, the weight of the in-loss k3 KL.

  Returns:
    (loss, aux): aux has ppo.policy_loss's clipfrac, approx_kl and ratio_mean, 'policy_loss' (the clipped
    term alone) and 'loss_kl' (the mean k3 to pi_ref of the current policy).
  """
  token_advantages = jnp.broadcast_to(advantages[:, None], logprobs.shape)
  loss, aux = ppo.policy_loss(logprobs, old_logprobs, token_advantages, mask, clip_eps)
  loss_kl = ppo.masked_mean(ppo.kl_penalty(logprobs, ref_logprobs, "k3"), mask)
  return loss + loss_kl_coef * loss_kl, {**aux, "policy_loss": loss, "loss_kl": loss_kl}


# ---- rollout scoring and the jitted update ----


@dataclasses.dataclass(frozen=True)
class GroupConfig:
  algorithm: str = "grpo"  # grpo (group mean/std) | rloo (leave-one-out, unnormalised)
  group_size: int = 4  # G responses sampled per state
  kl_coef: float = 0.1  # beta
  kl_in: str = "reward"  # reward: r = Q - beta sum_t kl_t (fixed point pi_k exp(Q/beta)) | loss: DeepSeekMath k3
  kl_estimator: str = "k1"  # estimator of the reward-side KL (ppo.kl_penalty); k1 keeps the closed-form optimum
  kl_target: Optional[float] = None  # adaptive beta (ppo.update_kl_coef) when set, else fixed
  kl_horizon: int = 10_000
  std_eps: float = 1e-6  # GRPO: floor on the group std
  clip_eps: float = 0.2
  entropy_coef: float = 0.0  # 0 keeps the closed-form optimum
  epochs: int = 2  # passes over each rollout batch
  minibatch_size: int = 32  # responses per update
  max_new_tokens: int = 24
  temperature: float = 1.0  # the ratio and the KL assume sampling at temperature 1
  top_p: float = 1.0

  def __post_init__(self):
    if self.algorithm not in ALGORITHMS:
      raise ValueError(f"GroupConfig.algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
    if self.kl_in not in KL_PLACEMENTS:
      raise ValueError(f"GroupConfig.kl_in must be one of {KL_PLACEMENTS}, got {self.kl_in!r}")
    if self.kl_in == "loss" and self.algorithm != "grpo":
      raise ValueError("kl_in='loss' is GRPO's (DeepSeekMath) placement; RLOO puts the KL in the reward")
    if self.kl_estimator not in ppo.KL_ESTIMATORS:
      raise ValueError(f"GroupConfig.kl_estimator must be one of {ppo.KL_ESTIMATORS}, got {self.kl_estimator!r}")
    if self.group_size < 2:
      raise ValueError(f"GroupConfig.group_size must be >= 2, got {self.group_size}")


def advantages_for(cfg: GroupConfig, rewards: jax.Array) -> jax.Array:
  """The configured algorithm's advantages of [B] grouped rewards."""
  if cfg.algorithm == "grpo":
    return grpo_advantages(rewards, cfg.group_size, cfg.std_eps)
  return rloo_advantages(rewards, cfg.group_size)


def make_experience_fn(policy: ts.Trainable, reward_fn: Callable, cfg: GroupConfig):
  """Jitted scoring of a grouped rollout: old and reference log-probs, Q, regularised rewards, advantages.

  Returns fn(policy_params, ref_params, reward_params, prompt_tokens, prompt_valid, response, response_valid,
  kl_coef) -> dict of [B, ...] arrays for the update step (rows grouped G at a time).
  """

  def experience(policy_params, ref_params, reward_params, prompt_tokens, prompt_valid, response,
                 response_valid, kl_coef):
    P = prompt_tokens.shape[1]
    tokens, valid, positions = ppo.sequence_layout(prompt_tokens, prompt_valid, response, response_valid)
    mask = response_valid
    logprobs, _ = ppo.policy_response_logprobs(policy.merge(policy_params), tokens, positions, valid, P)
    ref_logprobs, _ = ppo.policy_response_logprobs(policy.merge(ref_params), tokens, positions, valid, P)
    last, _ = ppo.last_valid_index(mask)
    score = reward_fn(reward_params, tokens, positions, valid, P + last, jnp.full_like(last, P - 1))
    regularised, kl_sum = sequence_rewards(score, logprobs, ref_logprobs, mask, kl_coef, cfg.kl_estimator)
    rewards = regularised if cfg.kl_in == "reward" else score.astype(regularised.dtype)
    advantages = advantages_for(cfg, rewards)
    groups = rewards.reshape(-1, cfg.group_size)
    loss_kl_coef = kl_coef if cfg.kl_in == "loss" else 0.0
    return {"tokens": tokens, "valid": valid, "positions": positions, "mask": mask.astype(jnp.float32),
            "old_logprobs": logprobs, "ref_logprobs": ref_logprobs, "advantages": advantages,
            # The in-loss KL weight rides along per row: the batch is sharded on its leading axis.
            "loss_kl_coef": jnp.full(score.shape, loss_kl_coef, jnp.float32),
            "score": score, "reward": rewards, "kl": kl_sum,
            "exact_kl_k1": ppo.masked_sum(logprobs - ref_logprobs, mask, axis=1),
            "group_std": jnp.repeat(jnp.std(groups, axis=1), cfg.group_size)}

  return jax.jit(experience)


def make_update_step(policy: ts.Trainable, cfg: GroupConfig, prompt_len: int):
  """`step(TrainState, minibatch) -> (TrainState, metrics)`, jitted with shardings and the state donated."""

  def loss_fn(model, batch):
    logprobs, step_logits = ppo.policy_response_logprobs(model, batch["tokens"], batch["positions"],
                                                         batch["valid"], prompt_len)
    loss, aux = group_policy_loss(logprobs, batch["old_logprobs"], batch["ref_logprobs"], batch["advantages"],
                                  batch["mask"], cfg.clip_eps, jnp.mean(batch["loss_kl_coef"]))
    entropy = ppo.entropy_from_logits(step_logits, batch["mask"])
    return loss - cfg.entropy_coef * entropy, {**aux, "entropy": entropy}

  return ts.make_train_step(policy, loss_fn)


UPDATE_KEYS = ("tokens", "valid", "positions", "mask", "old_logprobs", "ref_logprobs", "advantages",
                "loss_kl_coef")
