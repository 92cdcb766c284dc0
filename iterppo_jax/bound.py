"""The paper's improvement bound, checked: exact on a tabular MDP, and as bookkeeping on a run's logs (issue #10).

The argument (PAPER.md, "Why it works"). Let Q-hat be within eps of Q^pi at every (s, a), and let pi' maximise
E_{a~pi'}[Q-hat(s, a)] - beta KL(pi'(.|s) || pi(.|s)) in every state; the maximiser is
pi'(a|s) ∝ pi(a|s) exp(Q-hat(s, a) / beta). Since pi itself scores E_pi[Q-hat] (its KL is 0),

  E_{pi'}[Q-hat(s, .)] - E_pi[Q-hat(s, .)] >= beta KL(s)                       (pi' is the maximiser)
  A(s) := E_{pi'}[Q^pi(s, .)] - V^pi(s) >= beta KL(s) - 2 eps                 (swap Q-hat for Q^pi twice)

and the performance-difference identity turns per-state advantages into the value change from the start state,

  V^{pi'}(s_0) - V^pi(s_0) = sum_s d'(s) A(s),   d'(s) = sum_t gamma^t P(s_t = s | s_0, pi')

(d' is pi''s discounted occupancy, not normalised), so the improvement is at least sum_s d'(s) (beta KL(s) - 2
eps) = H (beta KL-bar - 2 eps), with H = sum_s d'(s) the expected discounted number of decisions under pi' and
KL-bar the d'-weighted mean KL. The tabular half of this file computes every term exactly; the logged half
estimates them from a run: V(pi_k) from the evaluation logs (discounted return of the start state, mean and
standard error), KL(pi_{k+1} || pi_k) as the loop measures it on D_k's states, eps_Q as |Q_k - Q^{pi_k}| on
sampled states against the simulator's Monte Carlo Q, and H from pi_{k+1}'s evaluation logs.

What the logged check can and cannot say: PPO only approximates the maximiser (the first inequality can fail by
an optimisation slack); the KL is averaged over pi_k's states, not weighted by pi_{k+1}'s occupancy; the
theorem's eps is a sup over all (s, a), estimated by the max over a few sampled logged pairs, whose Monte Carlo
Q has its own noise. A row reports the numbers side by side; `holds` is the point comparison and `refuted` asks
whether the improvement's 95% upper end falls below the value-level bound.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from iterppo_jax import conversation as conv_lib
from iterppo_jax.envs import base as env_base

Z95 = 1.959964  # two-sided 95% normal quantile


# ---- the exact form on a tabular MDP ----

def _check_policy(pi: np.ndarray, n_states: int, n_actions: int, name: str) -> np.ndarray:
  pi = np.asarray(pi, dtype=np.float64)
  if pi.shape != (n_states, n_actions):
    raise ValueError(f"{name} must have shape [S, A] = {(n_states, n_actions)}, got {pi.shape}")
  if (pi < 0).any() or not np.allclose(pi.sum(1), 1.0, atol=1e-9):
    raise ValueError(f"{name} must hold a probability distribution over actions in every state (rows >= 0 "
                     f"summing to 1), got row sums {pi.sum(1)}")
  return pi


def _check_mdp(transitions: np.ndarray, rewards: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray]:
  p = np.asarray(transitions, dtype=np.float64)
  r = np.asarray(rewards, dtype=np.float64)
  if p.ndim != 3 or p.shape[0] != p.shape[2] or r.shape != p.shape[:2]:
    raise ValueError(f"expected transitions [S, A, S] and rewards [S, A], got {p.shape} and {r.shape}")
  if (p < 0).any() or (p.sum(2) > 1.0 + 1e-9).any():
    raise ValueError("transitions[s, a] must be non-negative with sum <= 1 (the missing mass ends the episode)")
  if not 0.0 <= gamma < 1.0:
    raise ValueError(f"gamma must lie in [0, 1), got {gamma}")
  return p, r


def policy_evaluation(transitions, rewards, pi, gamma: float) -> tuple[np.ndarray, np.ndarray]:
  """Exact V^pi and Q^pi of a tabular MDP: V = (I - gamma P_pi)^{-1} r_pi, Q = R + gamma P V.

  Args:
    transitions: [S, A, S] P(s' | s, a); a row summing to less than 1 ends the episode with the remaining mass.
    rewards: [S, A] expected reward of taking a in s.
    pi: [S, A] policy.
    gamma: discount in [0, 1).

  Returns:
    (V [S], Q [S, A]).
  """
  p, r = _check_mdp(transitions, rewards, gamma)
  pi = _check_policy(pi, *r.shape, "pi")
  p_pi = np.einsum("sa,sat->st", pi, p)
  v = np.linalg.solve(np.eye(len(r)) - gamma * p_pi, np.sum(pi * r, 1))
  return v, r + gamma * p @ v


def soft_improvement(pi, q_hat, beta: float) -> np.ndarray:
  """The exact maximiser of E_{a~pi'}[Q-hat(s, a)] - beta KL(pi' || pi) per state: pi' ∝ pi exp(Q-hat / beta)."""
  if beta <= 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  pi, q_hat = np.asarray(pi, np.float64), np.asarray(q_hat, np.float64)
  if pi.shape != q_hat.shape:
    raise ValueError(f"pi and q_hat must have the same [S, A] shape, got {pi.shape} and {q_hat.shape}")
  logits = np.log(np.where(pi > 0, pi, 1.0)) + q_hat / beta
  logits = np.where(pi > 0, logits, -np.inf)
  logits -= logits.max(1, keepdims=True)  # stable softmax
  w = np.exp(logits)
  return w / w.sum(1, keepdims=True)


def kl_per_state(p, q) -> np.ndarray:
  """KL(p(.|s) || q(.|s)) = sum_a p log(p / q) for every state ([S, A] -> [S]), with 0 log 0 = 0."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  if ((p > 0) & (q <= 0)).any():
    raise ValueError("KL(p || q) is infinite: p puts mass where q has none")
  terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(np.where(q > 0, q, 1.0))), 0.0)
  return terms.sum(1)


def discounted_occupancy(transitions, pi, start: int, gamma: float) -> np.ndarray:
  """d(s) = sum_t gamma^t P(s_t = s | s_0 = start, pi) (not normalised; its sum is the discounted horizon)."""
  p = np.asarray(transitions, np.float64)
  pi = _check_policy(pi, p.shape[0], p.shape[1], "pi")
  p_pi = np.einsum("sa,sat->st", pi, p)
  e = np.zeros(len(p_pi))
  e[start] = 1.0
  return np.linalg.solve((np.eye(len(p_pi)) - gamma * p_pi).T, e)  # d^T = e^T (I - gamma P_pi)^{-1}


def tabular_bound_check(transitions, rewards, pi, q_hat, beta: float, gamma: float, start: int = 0) -> dict:
  """Every term of the improvement bound for pi' = soft_improvement(pi, q_hat, beta), exactly.

  Returns a dict of per-state arrays (pi_new, q_true, v_old, kl, surrogate_gain = E_{pi'}[Q-hat] - E_pi[Q-hat],
  advantage A(s), state_bound = beta KL(s) - 2 eps, occupancy d'(s)) and scalars (eps = max |Q-hat - Q^pi|,
  v_old / v_new at `start`, improvement, pdl_sum = sum_s d'(s) A(s), horizon H, value_bound = sum_s d'(s)
  (beta KL(s) - 2 eps), per_state_holds, holds) plus `row`, the same numbers as `bound_row` lays out a logged
  iteration (KL as the d'-weighted mean), so the bookkeeping is checked against the exact computation.
  """
  v_old, q_true = policy_evaluation(transitions, rewards, pi, gamma)
  q_hat = np.asarray(q_hat, np.float64)
  if q_hat.shape != q_true.shape:
    raise ValueError(f"q_hat must have shape [S, A] = {q_true.shape}, got {q_hat.shape}")
  pi = np.asarray(pi, np.float64)
  pi_new = soft_improvement(pi, q_hat, beta)
  v_new, _ = policy_evaluation(transitions, rewards, pi_new, gamma)
  eps = float(np.max(np.abs(q_hat - q_true)))
  kl = kl_per_state(pi_new, pi)
  advantage = np.sum(pi_new * q_true, 1) - v_old
  state_bound = beta * kl - 2 * eps
  d_new = discounted_occupancy(transitions, pi_new, start, gamma)
  horizon = float(d_new.sum())
  improvement = float(v_new[start] - v_old[start])
  value_bound = float(d_new @ state_bound)
  out = {
      "pi_new": pi_new, "q_true": q_true, "v_old": v_old, "v_new": v_new, "kl": kl,
      "surrogate_gain": np.sum((pi_new - pi) * q_hat, 1), "advantage": advantage, "state_bound": state_bound,
      "occupancy": d_new, "eps": eps, "improvement": improvement, "pdl_sum": float(d_new @ advantage),
      "horizon": horizon, "value_bound": value_bound,
      "per_state_holds": bool(np.all(advantage >= state_bound - 1e-12)),
      "holds": improvement >= value_bound - 1e-12,
  }
  out["row"] = bound_row(0, improvement=improvement, improvement_se=0.0, kl=float(d_new @ kl) / horizon,
                         beta=beta, eps_q_mean=float(np.mean(np.abs(q_hat - q_true))), eps_q_max=eps,
                         horizon=horizon)
  return out


# ---- the same numbers from a run's logs ----

def start_returns(records: Sequence[conv_lib.Conversation], gamma: float) -> np.ndarray:
  """Discounted return from the start state of each conversation: sum_j gamma^(j-1) o_j over the customer
  messages after the first decision (env_base.discounted_targets of decision 0), one value per record."""
  out = []
  for r in records:
    targets = env_base.discounted_targets(r, gamma)
    if not targets:
      raise ValueError(f"record {r.id} has no decision (suggestion turn); its start value is undefined")
    out.append(targets[0])
  return np.asarray(out, np.float64)


def discounted_horizon(records: Sequence[conv_lib.Conversation], gamma: float) -> float:
  """H = E[sum_t gamma^t] over each conversation's decisions t = 0, 1, ...: the total discounted occupancy that
  turns a per-state advantage bound into a bound on the value of the start state."""
  if not records:
    raise ValueError("discounted_horizon needs at least one conversation")
  return float(np.mean([sum(gamma ** t for t in range(len(r.agent_steps()))) for r in records]))


def value_estimate(records: Sequence[conv_lib.Conversation], gamma: float) -> dict[str, float]:
  """V(pi) at the start state from pi's logged conversations: mean, standard error, 95% interval, n."""
  g = start_returns(records, gamma)
  if len(g) < 2:
    raise ValueError(f"a value estimate with a standard error needs >= 2 conversations, got {len(g)}")
  mean, se = float(g.mean()), float(g.std(ddof=1) / np.sqrt(len(g)))
  return {"value": mean, "value_se": se, "value_lo": mean - Z95 * se, "value_hi": mean + Z95 * se, "n": len(g)}


def improvement_estimate(old: Sequence[conv_lib.Conversation], new: Sequence[conv_lib.Conversation],
                         gamma: float) -> dict[str, float]:
  """V(pi_new) - V(pi_old) with its standard error.

  The loop evaluates every pi_k on the same simulated customers (same seed, so the same conversation ids):
  then the difference is paired per customer, which removes the customers' own variance; otherwise the two
  samples are treated as independent.
  """
  g_old, g_new = start_returns(old, gamma), start_returns(new, gamma)
  paired = len(old) == len(new) and [r.id for r in old] == [r.id for r in new]
  if paired:
    d = g_new - g_old
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
  else:
    se = float(np.sqrt(g_old.var(ddof=1) / len(g_old) + g_new.var(ddof=1) / len(g_new)))
  return {"improvement": float(g_new.mean() - g_old.mean()), "improvement_se": se, "paired": paired,
          "value_old": float(g_old.mean()), "value_new": float(g_new.mean())}


def bound_row(k: int, *, improvement: float, improvement_se: float, kl: float, beta: float, eps_q_mean: float,
              eps_q_max: float | None = None, horizon: float = 1.0) -> dict:
  """One iteration's check: the realised V(pi_{k+1}) - V(pi_k) next to beta KL - 2 eps_Q.

  Args:
    k: the iteration (Q_k, pi_k -> pi_{k+1}).
    improvement, improvement_se: V(pi_{k+1}) - V(pi_k) and its standard error (0 when exact).
    kl: KL(pi_{k+1} || pi_k), a per-state mean.
    beta: the KL weight of the inner problem.
    eps_q_mean, eps_q_max: mean and max of |Q_k - Q^{pi_k}| over sampled (s, a); the bound uses the max (the
      theorem's eps is a sup) and falls back to the mean when no max was logged (`eps_q_stat` says which).
    horizon: H, the expected discounted number of decisions under pi_{k+1} (1 compares per state).

  Returns:
    {k, improvement, improvement_se, improvement_lo, improvement_hi, beta, kl, beta_kl, eps_q_mean, eps_q_max,
     eps_q, eps_q_stat, bound = beta KL - 2 eps_Q (per state), horizon, bound_value = H * bound, holds =
     improvement >= bound_value, refuted = improvement_hi < bound_value}.
  """
  if beta <= 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  if horizon <= 0:
    raise ValueError(f"horizon must be > 0, got {horizon}")
  beta, kl, eps_q_mean = float(beta), float(kl), float(eps_q_mean)
  eps_q_max = None if eps_q_max is None else float(eps_q_max)
  eps, stat = (eps_q_max, "max") if eps_q_max is not None else (eps_q_mean, "mean")
  bound = beta * kl - 2.0 * eps
  half = Z95 * improvement_se
  return {"k": int(k), "improvement": improvement, "improvement_se": improvement_se,
          "improvement_lo": improvement - half, "improvement_hi": improvement + half, "beta": beta, "kl": kl,
          "beta_kl": beta * kl, "eps_q_mean": eps_q_mean, "eps_q_max": eps_q_max, "eps_q": eps, "eps_q_stat": stat,
          "bound": bound, "horizon": horizon, "bound_value": horizon * bound,
          "holds": bool(improvement >= horizon * bound), "refuted": bool(improvement + half < horizon * bound)}


def logged_bound_row(k: int, old_eval: Sequence[conv_lib.Conversation], new_eval: Sequence[conv_lib.Conversation],
                     *, gamma: float, beta: float, kl: float, eps_q_mean: float,
                     eps_q_max: float | None = None) -> dict:
  """`bound_row` from a run's logs: pi_k's and pi_{k+1}'s evaluation conversations, the measured KL and eps_Q."""
  imp = improvement_estimate(old_eval, new_eval, gamma)
  row = bound_row(k, improvement=imp["improvement"], improvement_se=imp["improvement_se"], kl=kl, beta=beta,
                  eps_q_mean=eps_q_mean, eps_q_max=eps_q_max, horizon=discounted_horizon(new_eval, gamma))
  return {**row, "value_old": imp["value_old"], "value_new": imp["value_new"], "paired": imp["paired"]}


def table(rows: Sequence[dict]) -> str:
  """Markdown table of bound rows (an optional 'variant' column first)."""
  with_variant = any("variant" in r for r in rows)
  head = ("| variant " if with_variant else "") + ("| k | V(pi_k) | V(pi_k+1) | improvement (95% CI) | beta KL | "
                                                   "eps_Q (stat) | beta KL - 2 eps | H | H x bound | holds |")
  out = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    start = f"| {r['variant']} " if with_variant else ""
    v_old = f"{r['value_old']:.4f}" if "value_old" in r else "-"
    v_new = f"{r['value_new']:.4f}" if "value_new" in r else "-"
    out.append(f"{start}| {r['k']} | {v_old} | {v_new} | {r['improvement']:+.4f} ({r['improvement_lo']:+.4f} to "
               f"{r['improvement_hi']:+.4f}) | {r['beta_kl']:.4f} | {r['eps_q']:.4f} ({r['eps_q_stat']}) | "
               f"{r['bound']:+.4f} | {r['horizon']:.2f} | {r['bound_value']:+.4f} | "
               f"{'yes' if r['holds'] else ('REFUTED' if r['refuted'] else 'no (within CI)')} |")
  return "\n".join(out)
