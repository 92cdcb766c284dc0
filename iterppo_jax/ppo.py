"""Token-level PPO for the single-turn problem of Iterative PPO (Algorithm 1, step 3).

Given prompts (states s from the logs), the policy pi_theta samples a response; the fitted Q-model Q_k scores
(s, response) once at the end, and every token pays a KL penalty to the previous policy pi_k (the paper's
"reference"). Maximising E_{a~pi}[Q_k(s, a)] - beta KL(pi || pi_k) per state has the exact maximiser
pi'(a|s) ∝ pi_k(a|s) exp(Q_k(s, a) / beta) (PAPER.md, "Why it works"), which is the property the toy test checks.

This file holds:
  * the PPO maths (pure, jittable jnp functions with the equations in the docstrings): KL estimators, token
    rewards, GAE (Schulman et al. 2016), whitening, clipped policy/value losses (Schulman et al. 2017), entropy,
    and the adaptive KL coefficient of Ziegler et al. (2019);
  * the rollout and the jitted PPO step (appended below the maths).

Conventions: token-level arrays are [B, T]; ``mask[B, T]`` (bool or float) marks real response tokens. Masked
positions never influence a result, even when they hold NaN or inf (values are selected with ``jnp.where`` before
any arithmetic rather than multiplied by the mask).
"""

import dataclasses
from typing import Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from iterppo_jax import qfit
from iterppo_jax import sharding
from iterppo_jax import train_state as ts

# ---- PPO maths ----

KL_ESTIMATORS = ("k1", "k2", "k3")


def _as_bool(mask: jax.Array) -> jax.Array:
  return jnp.asarray(mask).astype(bool)


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """sum_{masked} x; masked-out entries are dropped even if non-finite."""
  return jnp.sum(jnp.where(_as_bool(mask), x, 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """Mean of ``x`` over entries where ``mask`` is true.

  mean = sum_i m_i x_i / max(sum_i m_i, 1), so an all-masked input gives 0 rather than NaN.

  Args:
    x: any shape.
    mask: same shape as ``x`` (bool or 0/1 float).
    axis: axes to reduce; None reduces everything.

  Returns:
    The masked mean, with ``axis`` reduced.
  """
  mask = _as_bool(mask)
  count = jnp.sum(mask, axis=axis)
  return masked_sum(x, mask, axis=axis) / jnp.maximum(count, 1)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Population variance over the masked entries: mean_m((x - mean_m(x))^2)."""
  mean = masked_mean(x, mask)
  return masked_mean(jnp.square(x - mean), mask)


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k1") -> jax.Array:
  """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman, "Approximating KL", 2020).

  With log r = log pi_ref(x) - log pi(x) and x ~ pi:
    k1 = -log r = log pi(x) - log pi_ref(x)         unbiased, can be negative per sample
    k2 = 0.5 (log r)^2                              biased, low variance, non-negative
    k3 = (r - 1) - log r                            unbiased, non-negative per sample

  Args:
    logprobs: [...] log pi(x) of the sampled tokens.
    ref_logprobs: [...] log pi_ref(x) of the same tokens.
    estimator: one of 'k1', 'k2', 'k3'.

  Returns:
    [...] per-token KL estimates.

  Raises:
    ValueError: for an unknown estimator name.
  """
  log_ratio = ref_logprobs - logprobs  # log r = log(pi_ref / pi)
  if estimator == "k1":
    return -log_ratio
  if estimator == "k2":
    return 0.5 * jnp.square(log_ratio)
  if estimator == "k3":
    # expm1 keeps r - 1 accurate when pi and pi_ref are close (the usual case).
    return jnp.expm1(log_ratio) - log_ratio
  raise ValueError(f"Unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}.")


def last_valid_index(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Index of the last true entry of each row of ``mask[B, T]``, and whether the row has one.

  Returns:
    (index[B] int32, has_any[B] bool); index is 0 for an all-masked row.
  """
  mask = _as_bool(mask)
  num_tokens = mask.shape[-1]
  # argmax returns the first maximum, so search the reversed row for the last true entry.
  last = num_tokens - 1 - jnp.argmax(mask[..., ::-1], axis=-1)
  has_any = jnp.any(mask, axis=-1)
  return jnp.where(has_any, last, 0).astype(jnp.int32), has_any


def token_rewards(
    score: jax.Array,
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    mask: jax.Array,
    kl_coef: float | jax.Array,
    estimator: str = "k1",
) -> tuple[jax.Array, jax.Array]:
  """Per-token PPO rewards: a KL penalty at every token plus the sequence score at the end.

    r_t = -beta * kl_t + 1[t = last valid token] * score,   kl_t = kl_penalty(logp_t, logq_t)

  The score (here Q_k(s, a) for the whole response a) is placed on the last valid token so that with
  gamma = lam = 1 every token's return is score - beta * (KL still to come), the token-level form of the
  per-state objective E[Q] - beta KL(pi || pi_k). A row with no valid token gets no reward at all.

  Args:
    score: [B] sequence-level score.
    logprobs: [B, T] log pi of the sampled tokens (the rollout policy).
    ref_logprobs: [B, T] log pi_ref of the same tokens (pi_k in Iterative PPO).
    mask: [B, T] real response tokens.
    kl_coef: beta, scalar.
    estimator: KL estimator name, see ``kl_penalty``.

  Returns:
    (rewards[B, T], kl_sum[B]): rewards are 0 at masked positions; kl_sum is the per-row sum of the (unscaled)
    KL estimates over valid tokens, for logging and the adaptive controller.
  """
  mask = _as_bool(mask)
  kl = jnp.where(mask, kl_penalty(logprobs, ref_logprobs, estimator), 0.0)
  last, has_any = last_valid_index(mask)
  at_end = jax.nn.one_hot(last, mask.shape[-1], dtype=kl.dtype) * has_any[:, None]
  rewards = -kl_coef * kl + at_end * score[:, None].astype(kl.dtype)
  return jnp.where(mask, rewards, 0.0), jnp.sum(kl, axis=-1)


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    gamma: float | jax.Array,
    lam: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation (Schulman et al. 2016) over tokens, by a reverse scan.

    delta_t = r_t + gamma * V_{n(t)} - V_t
    A_t     = delta_t + gamma * lam * A_{n(t)}
    R_t     = A_t + V_t                       (the critic's regression target)

  where n(t) is the next *valid* token after t. Conventions:
    * the episode ends at the response end: after the last valid token V = 0 and A = 0 (no bootstrap);
    * a masked token is skipped entirely: it gets A = R = 0, and the valid token before it sees the valid token
      after it as its successor (one discount step, as if the masked token were absent). Right-padded responses
      (mask a prefix) are the common case; this makes interior gaps harmless too.

  Args:
    rewards: [B, T] per-token rewards (``token_rewards``).
    values: [B, T] critic values V(s_t) at rollout time.
    mask: [B, T] real response tokens.
    gamma: discount.
    lam: GAE lambda.

  Returns:
    (advantages[B, T], returns[B, T]), both 0 at masked positions. Treat as constants (no gradient flows).
  """
  mask = _as_bool(mask)
  # At least float32: the scan carry needs one float dtype, and bf16 loses precision over long sums.
  dtype = jnp.promote_types(jnp.result_type(rewards, values), jnp.float32)
  rewards = jnp.where(mask, rewards, 0.0).astype(dtype)
  values = jnp.where(mask, values, 0.0).astype(dtype)

  def step(carry, xs):
    next_value, next_advantage = carry  # of the next valid token; (0, 0) past the end of the response
    reward, value, valid = xs
    delta = reward + gamma * next_value - value
    advantage = delta + gamma * lam * next_advantage
    # A masked token passes its successor's (V, A) through unchanged to the token before it.
    carry = (jnp.where(valid, value, next_value), jnp.where(valid, advantage, next_advantage))
    return carry, jnp.where(valid, advantage, 0.0)

  zeros = jnp.zeros(rewards.shape[0], rewards.dtype)
  # Scan over time: transpose to [T, B] so every step handles the whole batch.
  _, advantages = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
  advantages = advantages.T
  returns = jnp.where(mask, advantages + values, 0.0)
  return jax.lax.stop_gradient(advantages), jax.lax.stop_gradient(returns)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
  """Masked whitening: (x - mean_m(x)) / sqrt(var_m(x) + eps), statistics over valid entries only.

  Args:
    x: [B, T] (or any shape matching ``mask``).
    mask: valid entries.
    shift_mean: if False the mean is added back (scale only), as done for rewards in some RLHF codebases.
    eps: variance floor.

  Returns:
    Whitened ``x``; 0 at masked positions.
  """
  mask = _as_bool(mask)
  mean = masked_mean(x, mask)
  var = masked_var(x, mask)
  whitened = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    whitened = whitened + mean
  return jnp.where(mask, whitened, 0.0)


def policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_eps: float | jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss averaged over valid tokens.

    rho_t = exp(log pi_theta(a_t) - log pi_old(a_t))
    L     = mean_m[ max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)) ]

  Args:
    logprobs: [B, T] log pi_theta of the sampled tokens (differentiable).
    old_logprobs: [B, T] log pi_old at rollout time.
    advantages: [B, T] (usually whitened) advantages.
    mask: [B, T] valid tokens.
    clip_eps: epsilon.

  Returns:
    (loss, aux) with aux['clipfrac'] the fraction of valid tokens where the clipped term is active,
    aux['approx_kl'] = mean_m[(rho - 1) - log rho], an estimate of KL(pi_old || pi_theta) (k3), and
    aux['ratio_mean'].
  """
  mask = _as_bool(mask)
  # Zero the log-ratio at masked positions before exp so padding garbage cannot overflow or poison gradients.
  log_ratio = jnp.where(mask, logprobs - old_logprobs, 0.0)
  ratio = jnp.exp(log_ratio)
  advantages = jnp.where(mask, jax.lax.stop_gradient(advantages), 0.0)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
  aux = {
      "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
      "approx_kl": masked_mean(jax.lax.stop_gradient(jnp.expm1(log_ratio) - log_ratio), mask),
      "ratio_mean": masked_mean(jax.lax.stop_gradient(ratio), mask),
  }
  return loss, aux


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    clip_eps: float | jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped value loss (as in the PPO2 baselines and RLHF codebases).

    V_clip = V_old + clip(V - V_old, -eps, eps)
    L      = 0.5 * mean_m[ max((V - R)^2, (V_clip - R)^2) ]

  Args:
    values: [B, T] current critic values (differentiable).
    old_values: [B, T] critic values at rollout time.
    returns: [B, T] regression targets from ``gae``.
    mask: [B, T] valid tokens.
    clip_eps: value clip range (in value units).

  Returns:
    (loss, aux) with aux['vf_clipfrac'] the fraction of valid tokens where the clipped error is the larger one,
    and aux['value_error'] = mean_m[(V - R)^2].
  """
  mask = _as_bool(mask)
  returns = jax.lax.stop_gradient(returns)
  clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
  error = jnp.square(values - returns)
  error_clipped = jnp.square(clipped_values - returns)
  loss = 0.5 * masked_mean(jnp.maximum(error, error_clipped), mask)
  aux = {
      "vf_clipfrac": masked_mean((error_clipped > error).astype(jnp.float32), mask),
      "value_error": masked_mean(jax.lax.stop_gradient(error), mask),
  }
  return loss, aux


def entropy_from_logits(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked mean token entropy: mean_m[ -sum_v p_v log p_v ], p = softmax(logits).

  Args:
    logits: [B, T, V].
    mask: [B, T] valid tokens.

  Returns:
    Scalar mean entropy over valid tokens (nats). Vocabulary entries with logit -inf contribute 0.
  """
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  p = jnp.exp(log_p)
  entropy = -jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1)
  return masked_mean(entropy, mask)


def update_kl_coef(
    coef: float | jax.Array,
    observed_kl: float | jax.Array,
    target: Optional[float],
    horizon: float,
    n_steps: int | jax.Array,
) -> float | jax.Array:
  """Adaptive KL coefficient, the proportional controller of Ziegler et al. (2019), section 2.2.

    e    = clip(KL_observed / KL_target - 1, -0.2, 0.2)
    beta <- beta * (1 + e * n_steps / horizon)

  Args:
    coef: current beta.
    observed_kl: mean per-sequence KL(pi || pi_ref) of the last batch (``kl_sum`` averaged over rows).
    target: KL target; None means a fixed coefficient (beta is returned unchanged).
    horizon: controller horizon, in the same unit as ``n_steps`` (Ziegler et al. use 10k episodes).
    n_steps: how much experience the update covers (e.g. the batch size in episodes).

  Returns:
    The new beta.
  """
  if target is None:
    return coef
  error = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
  return coef * (1.0 + error * n_steps / horizon)


# ---- rollout, experience and the jitted PPO step ----
# A PPO sequence is [prompt (left-padded, P tokens)][response (N tokens, right-padded)]. The response token
# at slot P + j is predicted by the logits at slot P + j - 1, so the per-token policy, reference and critic
# quantities of the response are read from slots P-1 .. P+N-2. The reward model reads the last response token.



@dataclasses.dataclass(frozen=True)
class PPOConfig:
  kl_coef: float = 0.1  # beta: weight of the per-token KL(pi || pi_ref) penalty
  kl_estimator: str = "k1"  # k1 | k2 | k3 (kl_penalty)
  kl_target: Optional[float] = None  # adaptive beta (Ziegler et al.) when set, else fixed
  kl_horizon: int = 10_000
  gamma: float = 1.0  # token-level discount inside one response
  lam: float = 0.95  # GAE lambda
  clip_eps: float = 0.2
  value_clip_eps: float = 0.2
  entropy_coef: float = 0.0  # 0 keeps the exact closed-form optimum
  epochs: int = 2  # passes over each rollout batch
  minibatch_size: int = 32
  whiten_advantages: bool = True
  max_new_tokens: int = 24
  temperature: float = 1.0  # sampling temperature; PPO's ratio assumes 1
  top_p: float = 1.0


@flax.struct.dataclass
class PPOState:
  policy: ts.TrainState
  critic: ts.TrainState


def sequence_layout(prompt_tokens, prompt_valid, response, response_valid):
  """Concatenates prompt and response: tokens, valid, positions [B, P+N]."""
  tokens = jnp.concatenate([prompt_tokens, response], axis=1)
  valid = jnp.concatenate([prompt_valid, response_valid], axis=1)
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
  return tokens, valid, positions


def response_logprobs(logits, tokens, prompt_len):
  """log pi(response token j | prefix) [B, N] and the logits that produced them [B, N, V]."""
  step_logits = logits[:, prompt_len - 1:-1]
  logp = jax.nn.log_softmax(step_logits, axis=-1)
  resp = tokens[:, prompt_len:]
  return jnp.take_along_axis(logp, resp[..., None], axis=-1)[..., 0], step_logits


def response_slots(tokens, prompt_len) -> tuple[int, int]:
  """``out_slots`` of the slots whose outputs predict (or value) the response tokens: P-1 .. P+N-2."""
  return (prompt_len - 1, tokens.shape[1] - prompt_len)


def critic_values(critic_model, tokens, positions, valid, prompt_len):
  """V(s_t) [B, N] before each response token, from slots P-1 .. P+N-2 only (``response_slots``)."""
  return critic_model(tokens, positions, valid=valid, out_slots=response_slots(tokens, prompt_len))


def policy_response_logprobs(model, tokens, positions, valid, prompt_len):
  """``response_logprobs(model(tokens, positions, valid=valid)[0], tokens, prompt_len)``, cheaper.

  The LM head, and the trunk's last block, run only at the N slots whose logits predict a response
  token (``response_slots``): the other P slots' [V]-wide logits and last-block outputs would be
  computed (and, in a training step, differentiated) only to be sliced away. Same numbers.

  Args:
    model: a ``Transformer`` (``trunk`` and ``logits``).
    tokens, positions, valid: [B, P + N] (``sequence_layout``).
    prompt_len: P.

  Returns:
    (log pi of the response tokens [B, N], their logits [B, N, V]).
  """
  hidden, _ = model.trunk(tokens, positions, valid=valid, out_slots=response_slots(tokens, prompt_len))
  step_logits = model.logits(hidden)
  logp = jax.nn.log_softmax(step_logits, axis=-1)
  resp = tokens[:, prompt_len:]
  return jnp.take_along_axis(logp, resp[..., None], axis=-1)[..., 0], step_logits


def make_q_reward_fn(q_trainable: ts.Trainable, kind: str = "bce") -> Callable:
  """reward_fn(q_params, tokens, positions, valid, last_index, state_index) -> Q(s, a) [B] from a fitted Q-model.

  `state_index` [B] is the column of the prompt's last token (where a dueling Q-model reads V(s)).
  """

  def reward_fn(params, tokens, positions, valid, last_index, state_index):
    batch = {"tokens": tokens, "positions": positions, "valid": valid, "last_index": last_index,
             "state_index": state_index}
    return qfit.to_q(qfit.q_scalar(q_trainable.merge(params), batch), kind)

  return reward_fn


def make_host_reward_fn(score_fn: Callable) -> Callable:
  """reward_fn(params, tokens, positions, valid, last_index, state_index) -> [B] computed on the host.

  For a Q-model that is not a JAX model (q_table.py's dialogue-state table): `score_fn(prompt_tokens [B, P],
  response [B, N], response_valid [B, N])` gets numpy arrays and returns B floats; it runs through
  jax.pure_callback inside the jitted rollout and update steps. `params` is ignored (pass any array).
  """

  def host(tokens, valid, state_index):
    P = int(state_index[0]) + 1  # every row's prompt ends at column P - 1 (data.encode_prompts)
    tokens, valid = np.asarray(tokens), np.asarray(valid)
    return np.asarray(score_fn(tokens[:, :P], tokens[:, P:], valid[:, P:]), np.float32)

  def reward_fn(params, tokens, positions, valid, last_index, state_index):
    del params, positions, last_index
    return jax.pure_callback(host, jax.ShapeDtypeStruct(tokens.shape[:1], jnp.float32), tokens, valid,
                             state_index)

  return reward_fn


def _advantages(score, logprobs, ref_logprobs, values, mask, kl_coef, cfg: PPOConfig):
  """Token rewards (score at the end, KL penalty at every token), GAE and whitening, for one rollout batch.

  Returns (advantages [B, N], returns [B, N], logged) with logged the per-row 'score', 'kl' (sum of the KL
  estimates), 'exact_kl_k1' (sum of log pi - log pi_ref) and the float response 'mask'.
  """
  rewards, kl_sum = token_rewards(score, logprobs, ref_logprobs, mask, kl_coef, cfg.kl_estimator)
  advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
  if cfg.whiten_advantages:
    advantages = whiten(advantages, mask)
  logged = {"score": score, "kl": kl_sum, "mask": mask.astype(jnp.float32),
            "exact_kl_k1": jnp.sum(jnp.where(mask, logprobs - ref_logprobs, 0.), 1)}
  return advantages, returns, logged


def _policy_objective(logp, step_logits, old_logprobs, advantages, mask, cfg: PPOConfig):
  """(loss, aux): the clipped policy loss, minus the entropy bonus when cfg.entropy_coef is set.

  Without a bonus the entropy is a metric only: no gradient flows through the [B, N, V] softmax.
  """
  loss, aux = policy_loss(logp, old_logprobs, advantages, mask, cfg.clip_eps)
  if not cfg.entropy_coef:
    return loss, {**aux, "entropy": entropy_from_logits(jax.lax.stop_gradient(step_logits), mask),
                  "policy_loss": loss}
  entropy = entropy_from_logits(step_logits, mask)
  return loss - cfg.entropy_coef * entropy, {**aux, "entropy": entropy, "policy_loss": loss}


def make_experience_fn(policy: ts.Trainable, critic: ts.Trainable, reward_fn: Callable, cfg: PPOConfig):
  """Jitted scoring passes: old log-probs, reference log-probs, values, reward, then token rewards and GAE.

  Returns fn(policy_params, ref_params, critic_params, reward_params, prompt_tokens, prompt_valid,
  response, response_valid, kl_coef, old_logprobs=None) -> dict of [B, ...] arrays for the update step.

  ``old_logprobs`` [B, N]: the sampler's own ``SampleOutput.logprobs`` of this response under these
  ``policy_params`` (log pi at temperature 1, untruncated, whatever the sampling temperature). Given,
  the policy's forward pass is skipped: in float32 the numbers are the same up to rounding (the sampler
  computes them from its KV cache; tests/test_benchmark.py checks the two agree to 1e-4), see
  ``sampler_logprobs_reusable``. Left out, the policy pass computes them.
  """

  def experience(policy_params, ref_params, critic_params, reward_params, prompt_tokens, prompt_valid,
                 response, response_valid, kl_coef, old_logprobs=None):
    P = prompt_tokens.shape[1]
    tokens, valid, positions = sequence_layout(prompt_tokens, prompt_valid, response, response_valid)
    mask = response_valid
    if old_logprobs is None:
      logprobs, _ = policy_response_logprobs(policy.merge(policy_params), tokens, positions, valid, P)
    else:
      logprobs = old_logprobs.astype(jnp.float32)
    ref_logprobs, _ = policy_response_logprobs(policy.merge(ref_params), tokens, positions, valid, P)
    values = critic_values(critic.merge(critic_params), tokens, positions, valid, P)
    last, _ = last_valid_index(mask)
    score = reward_fn(reward_params, tokens, positions, valid, P + last, jnp.full_like(last, P - 1))
    advantages, returns, logged = _advantages(score, logprobs, ref_logprobs, values, mask, kl_coef, cfg)
    return {"tokens": tokens, "valid": valid, "positions": positions, "old_logprobs": logprobs,
            "old_values": values, "advantages": advantages, "returns": returns, **logged}

  return jax.jit(experience)


def apply_gradients(state: PPOState, policy: ts.Trainable, critic: ts.Trainable, p_grads, v_grads, metrics):
  """One optimizer step of the policy and of the critic; metrics gain both gradients' global norms."""
  new = []
  for s, g, tr in ((state.policy, p_grads, policy), (state.critic, v_grads, critic)):
    updates, opt_state = tr.tx.update(g, s.opt_state, s.params)
    new.append(s.replace(step=s.step + 1, params=optax.apply_updates(s.params, updates), opt_state=opt_state))
  metrics = {**metrics, "policy_grad_norm": optax.global_norm(p_grads), "value_grad_norm": optax.global_norm(v_grads)}
  return PPOState(policy=new[0], critic=new[1]), metrics


def make_update_step(policy: ts.Trainable, critic: ts.Trainable, cfg: PPOConfig, prompt_len: int):
  """`step(PPOState, minibatch) -> (PPOState, metrics)`: clipped policy loss and clipped value loss."""
  P = prompt_len

  def step(state: PPOState, batch):
    mask = batch["mask"]

    def policy_objective(params):
      logp, step_logits = policy_response_logprobs(policy.merge(params), batch["tokens"], batch["positions"],
                                                   batch["valid"], P)
      return _policy_objective(logp, step_logits, batch["old_logprobs"], batch["advantages"], mask, cfg)

    def value_objective(params):
      values = critic_values(critic.merge(params), batch["tokens"], batch["positions"], batch["valid"], P)
      return value_loss(values, batch["old_values"], batch["returns"], mask, cfg.value_clip_eps)

    (_, p_aux), p_grads = jax.value_and_grad(policy_objective, has_aux=True)(state.policy.params)
    (v_loss, v_aux), v_grads = jax.value_and_grad(value_objective, has_aux=True)(state.critic.params)
    return apply_gradients(state, policy, critic, p_grads, v_grads, {**p_aux, **v_aux, "value_loss": v_loss})

  shardings = PPOState(policy=policy.state_shardings, critic=critic.state_shardings)
  replicated = NamedSharding(policy.mesh, PartitionSpec())
  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(policy.mesh)),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))


def fuses(cfg: PPOConfig, batch_size: int) -> bool:
  """Whether an iteration is one update on the whole batch (one epoch, one minibatch): ``make_fused_step``."""
  return cfg.epochs == 1 and cfg.minibatch_size == batch_size


def make_fused_step(policy: ts.Trainable, critic: ts.Trainable, reward_fn: Callable, cfg: PPOConfig,
                    prompt_len: int):
  """Scoring and the update of an iteration with one epoch of one minibatch, as one jitted step.

  With a single update on the whole batch, the policy and critic at scoring time are the ones the update
  starts from, so the update's own forward passes give the old log-probs and old values: the policy pass and
  the critic pass of ``make_experience_fn`` are not run separately. Their outputs' vector-Jacobian products
  (``jax.vjp``) turn the losses' gradients into parameter gradients after the advantages are computed from
  the same outputs. Same numbers as ``make_experience_fn`` followed by ``make_update_step`` (tested); the
  ratio is exactly 1 and nothing clips, as in that first update.

  Returns step(PPOState, ref_params, reward_params, prompt_tokens, prompt_valid, response, response_valid,
  kl_coef, old_logprobs=None) -> (PPOState, metrics, summary), metrics as ``make_update_step``'s and summary
  the per-row 'score', 'kl', 'exact_kl_k1' and the response 'mask' (the experience keys solvers.train logs).
  ``old_logprobs``: the sampler's (``sampler_logprobs_reusable``); left out, the update's forward gives them.
  """
  P = prompt_len

  rows = sharding.batch_sharding(policy.mesh)

  def step(state: PPOState, ref_params, reward_params, prompt_tokens, prompt_valid, response,
           response_valid, kl_coef, old_logprobs=None):
    # The rollout's rows are split over (data, fsdp), as make_update_step's in_shardings place a minibatch.
    prompt_tokens, prompt_valid, response, response_valid = (
        jax.lax.with_sharding_constraint(x, rows) for x in (prompt_tokens, prompt_valid, response, response_valid))
    if old_logprobs is not None:
      old_logprobs = jax.lax.with_sharding_constraint(old_logprobs, rows)
    tokens, valid, positions = sequence_layout(prompt_tokens, prompt_valid, response, response_valid)
    mask = response_valid
    ref_logprobs, _ = policy_response_logprobs(policy.merge(ref_params), tokens, positions, valid, P)
    last, _ = last_valid_index(mask)
    score = reward_fn(reward_params, tokens, positions, valid, P + last, jnp.full_like(last, P - 1))

    def policy_forward(params):
      logp, step_logits = policy_response_logprobs(policy.merge(params), tokens, positions, valid, P)
      if cfg.entropy_coef:
        return (logp, step_logits), None
      return (logp,), step_logits  # the logits only feed the entropy metric: no cotangent for them
    outputs, policy_vjp, aux_logits = jax.vjp(policy_forward, state.policy.params, has_aux=True)
    logp, step_logits = outputs[0], outputs[1] if cfg.entropy_coef else aux_logits
    values, critic_vjp = jax.vjp(
        lambda params: critic_values(critic.merge(params), tokens, positions, valid, P), state.critic.params)

    old = jax.lax.stop_gradient(logp) if old_logprobs is None else old_logprobs.astype(jnp.float32)
    old_values = jax.lax.stop_gradient(values)
    advantages, returns, summary = _advantages(score, old, ref_logprobs, old_values, mask, kl_coef, cfg)
    maskf = summary["mask"]

    def policy_objective(outs):
      return _policy_objective(outs[0], outs[1] if cfg.entropy_coef else step_logits, old, advantages, maskf, cfg)

    (_, p_aux), d_outputs = jax.value_and_grad(policy_objective, has_aux=True)(outputs)
    (v_loss, v_aux), d_values = jax.value_and_grad(
        lambda v: value_loss(v, old_values, returns, maskf, cfg.value_clip_eps), has_aux=True)(values)
    (p_grads,), (v_grads,) = policy_vjp(d_outputs), critic_vjp(d_values)
    state, metrics = apply_gradients(state, policy, critic, p_grads, v_grads,
                                      {**p_aux, **v_aux, "value_loss": v_loss})
    return state, metrics, summary

  shardings = PPOState(policy=policy.state_shardings, critic=critic.state_shardings)
  replicated = NamedSharding(policy.mesh, PartitionSpec())
  return jax.jit(step, out_shardings=(shardings, replicated, replicated), donate_argnums=(0,))


UPDATE_KEYS = ("tokens", "valid", "positions", "mask", "old_logprobs", "old_values", "advantages", "returns")


def sampler_logprobs_reusable(policy: ts.Trainable, params) -> bool:
  """Whether the sampler's log-probs may stand in for the policy's scoring pass: float32 compute only.

  In float32 the KV-cache decode and the full forward round alike (ppo_tiny: at most 4e-6 apart). In bfloat16
  they differ by up to ~4e-2, which would show up as a spurious PPO ratio away from 1 at the first update.
  """
  if isinstance(params, ts.LoraParams):  # the sampler runs on the merge in the base's dtype, the loss in float32
    if any(x.dtype != jnp.float32 for x in jax.tree.leaves(params.frozen)):
      return False
    params = params.frozen
  return jnp.dtype(policy.merge(params).config.dtype) == jnp.float32
