"""How well a Q-model ranks the *actions* at a state: the first-class measure of Q (issue #16).

The improvement step pi_{k+1} ∝ pi_k exp(Q_k / beta) only uses Q_k's differences between actions at one state,
so a Q-model with a fine outcome AUC can still be useless to it ("an answer scores high wherever it appears").
Two measures:

* against the simulator (`build_action_set` + `ranking_metrics`): at N states drawn from pi_k's own
  conversations, M candidate suggestions (pi_k's samples and the domain's scripted acts) are scored by Q_k and by
  the true Q^{pi_k} (restore the state, send the candidate, continue with pi_k; Monte Carlo). Reported: top-1
  agreement with the true best, within-state Spearman, pairwise order accuracy, and the true value of Q_k's pick
  minus the candidates' mean (what a greedy step on Q_k would gain), next to the best possible gain.
* from logs alone (`logged_ranking_metrics`): at randomised turns (explore.py), where the suggestion was drawn
  uniformly from C logged candidates, Q_k scores every candidate; corr(A_k(s, a), G) with A_k = Q_k(s, a) minus
  the candidates' mean, and an unbiased inverse-propensity estimate of Q^{pi_k}(s, pick) - mean(G). A user with
  real logs and no simulator can watch these.

And how far the step can climb Q_k at all (`step_reach`): Q_k's spread over pi_k's acts within a state, the
spread of the state's value that a baseline must remove, and the raise of E[Q_k] that the step's exact solution
gives at beta.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Sequence

import numpy as np

from iterppo_jax import conversation as conv_lib
from iterppo_jax import io_utils
from iterppo_jax import stats


def ranking_metrics(pred: np.ndarray, true: np.ndarray, mask: np.ndarray | None = None,
                    own: np.ndarray | None = None, se: np.ndarray | None = None,
                    diff_se: np.ndarray | None = None) -> dict[str, float]:
  """Within-state agreement of predicted and true action values.

  Args:
    pred: [N, M] Q_k of M candidates at N states (any monotone scale).
    true: [N, M] the true Q of the same candidates.
    mask: [N, M] bool, the candidates present (states may have fewer than M); default all.
    own: [N, M] bool, the candidates that are pi_k's own samples; with it, two more measures (below).
    se: [N, M] standard errors of `true` (Monte Carlo); with them, two measures of what the noise allows (below).
    diff_se: [N, M, M] standard errors of the differences true[i, a] - true[i, b] (ActionSet.diff_se: paired
      rollouts share noise that cancels in a difference); without it hypot(se_a, se_b). Needs `se`.
  Returns:
    top1: share of states where Q_k's pick has the true best value (ties with the best count as agreement);
    top1_chance: the same for a uniformly random pick;
    spearman: mean within-state Spearman correlation over states where neither side is constant;
    pairwise: share of candidate pairs with different true values that Q_k orders correctly (ties: 1/2);
    pick_gain: mean over states of true[pick] - mean(true) (what a greedy step on Q_k gains);
    best_gain: mean of max(true) - mean(true) (the most any pick can gain);
    pick_gain_own, best_gain_own (with `own`): the same against the mean true Q of pi_k's own samples instead of
      all candidates' mean: what replacing pi_k's action by Q_k's pick gains (the candidates' mean includes
      scripted acts no one would choose, which makes beating it easy);
    states: the states counted: those with at least two candidates of different true value.
    clear_miss (with `se`): share of those states where Q_k's pick is below the best by more than 2 standard
      errors of the difference: a miss the truth can tell from a tie;
    clear_best (with `se`): share of those states whose best candidate is ahead of the second by more than 2
      standard errors: where top-1 measures anything beyond noise.
  """
  pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
  if pred.shape != true.shape or pred.ndim != 2:
    raise ValueError(f"pred and true must both be [N, M], got {pred.shape} and {true.shape}")
  mask = np.ones(pred.shape, bool) if mask is None else np.asarray(mask, bool)
  own_mask = np.zeros(pred.shape, bool) if own is None else np.asarray(own, bool)
  se_all = np.zeros(pred.shape) if se is None else np.asarray(se, np.float64)
  if diff_se is None:
    diff_se = np.hypot(se_all[:, :, None], se_all[:, None, :])
  diff_se = np.asarray(diff_se, np.float64)
  clear_miss, clear_best = [], []
  top1, chance, spear, pick_gain, best_gain, pick_own, best_own = [], [], [], [], [], [], []
  agree = pairs = 0.0
  for p, t, m, o, e in zip(pred, true, mask, own_mask, diff_se):
    p, t, o, e = p[m], t[m], o[m], e[np.ix_(m, m)]
    if len(t) < 2 or np.ptp(t) == 0:  # every candidate equally good: nothing to rank (e.g. no rollout sold)
      continue
    best, picked = t.max(), t[int(np.argmax(p))]
    if se is not None:
      first, second = np.argsort(-t, kind="stable")[:2]
      clear_miss.append(float(best - picked > 2 * e[first, int(np.argmax(p))]))
      clear_best.append(float(t[first] - t[second] > 2 * e[first, second]))
    top1.append(float(picked >= best))
    chance.append(float(np.mean(t >= best)))
    pick_gain.append(float(picked - t.mean()))
    best_gain.append(float(best - t.mean()))
    if o.any():
      pick_own.append(float(picked - t[o].mean()))
      best_own.append(float(best - t[o].mean()))
    if np.ptp(p) > 0:  # t varies (checked above); a constant prediction has no rank correlation
      spear.append(stats.spearman(p, t))
    dt = np.sign(t[:, None] - t[None, :])
    dp = np.sign(p[:, None] - p[None, :])
    upper = np.triu(np.ones_like(dt, bool), 1) & (dt != 0)
    pairs += upper.sum()
    agree += np.sum((dp == dt)[upper]) + 0.5 * np.sum((dp == 0)[upper])
  mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
  return {"top1": mean(top1), "top1_chance": mean(chance), "spearman": mean(spear),
          "pairwise": float(agree / pairs) if pairs else float("nan"), "pick_gain": mean(pick_gain),
          "best_gain": mean(best_gain), "states": len(top1),
          **({"pick_gain_own": mean(pick_own), "best_gain_own": mean(best_own)} if own is not None else {}),
          **({"clear_miss": mean(clear_miss), "clear_best": mean(clear_best)} if se is not None else {})}


@dataclasses.dataclass
class ActionSet:
  """N states of logged conversations, M candidate suggestions each, with their true Q (NaN-free where masked).

  `where[i]` = (conversation id, turn index into its turns) of state i; `source[i][j]` says where candidate j came
  from ('policy' sample or 'script' act). Saved as JSON so a resumed run and the report reuse one measurement.

  `returns` [N, M, R] keeps every rollout's return (None in sets saved before it existed). The candidates of a
  state share their r-th rollout's random numbers (TextEnv.rollout_returns), so the noise of a *difference* of
  two candidates' estimates is smaller than their standard errors say; with `returns` the measures below read
  the noise from the paired returns themselves, without them they assume independent noise.
  """
  where: list[tuple[str, int]]
  prompts: list[str]
  candidates: list[list[str]]
  source: list[list[str]]
  true_q: np.ndarray  # [N, M], 0 where masked
  true_se: np.ndarray  # [N, M] Monte Carlo standard errors
  rollouts: int
  returns: np.ndarray | None = None  # [N, M, R] the rollouts' returns, 0 where masked

  @property
  def mask(self) -> np.ndarray:
    m = np.zeros(self.true_q.shape, bool)
    for i, c in enumerate(self.candidates):
      m[i, :len(c)] = True
    return m

  @property
  def own(self) -> np.ndarray:
    """[N, M] bool: the candidates that are pi_k's own samples (source 'policy')."""
    m = np.zeros(self.true_q.shape, bool)
    for i, src in enumerate(self.source):
      m[i, :len(src)] = [s == "policy" for s in src]
    return m

  @property
  def paired(self) -> bool:
    """Whether the rollouts' returns are kept, so that noise is read from them (common random numbers)."""
    return self.returns is not None

  def reliability(self, paired: bool | None = None) -> float:
    """Share of the within-state variance of the measured true Q that is not Monte Carlo noise.

    1 - mean(noise) / mean(within-state variance), where a state's noise is the expected within-state variance
    of its candidates' estimation errors. Unpaired (`paired=False`, or no `returns`): mean(se^2), as if every
    candidate's rollouts were independent. Paired (the default with `returns`): sum_j Var(e_j - mean_l e_l) / (M
    - 1), the variance of each error's deviation from the state's mean error read from the paired returns, so
    the noise the candidates share (common random numbers) is not counted. Near 0 the 'true' ranking is mostly
    noise and no Q-model can agree with it; near 1 it is the real ranking. Ranking metrics mean little below
    ~0.5.
    """
    paired = self.paired if paired is None else paired
    if paired and not self.paired:
      raise ValueError("this action set keeps no rollout returns: its noise can only be read unpaired")
    variances, noise = [], []
    for i, (q, se, m) in enumerate(zip(self.true_q, self.true_se, self.mask)):
      n = int(m.sum())
      if n < 2:
        continue
      variances.append(np.var(q[m], ddof=1))
      if paired:
        r = self.returns[i][m]  # [n, R]
        dev = r - r.mean(0, keepdims=True)
        noise.append(float(np.sum(dev.var(1, ddof=1) / r.shape[1]) / (n - 1)))
      else:
        noise.append(np.mean(np.square(se[m])))
    if not variances or np.mean(variances) == 0:
      return float("nan")
    return float(1.0 - np.mean(noise) / np.mean(variances))

  def diff_se(self) -> np.ndarray | None:
    """[N, M, M] the standard error of true_q[i, a] - true_q[i, b] read from the paired returns; None without
    them (ranking_metrics then assumes independent noise, hypot(se_a, se_b))."""
    if not self.paired:
      return None
    d = self.returns[:, :, None, :] - self.returns[:, None, :, :]
    return d.std(-1, ddof=1) / np.sqrt(self.returns.shape[-1])

  def _truth_draws(self, i: int, m: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """[draws, n] values the real Q of state i's present candidates could have, given the measurement: with the
    returns, the means of rollouts resampled with replacement, one resample for all candidates (a paired
    bootstrap); without them, the measured values plus independent normal errors of their standard errors."""
    if self.paired:
      r = self.returns[i][m]  # [n, R]
      idx = rng.integers(r.shape[1], size=(draws, r.shape[1]))
      return r[:, idx].mean(-1).T
    return self.true_q[i][m] + rng.standard_normal((draws, int(m.sum()))) * self.true_se[i][m]

  def top1_ceiling(self, draws: int = 2000, seed: int = 0) -> float:
    """The top-1 agreement a Q-model equal to the real Q^{pi_k} could expect against this measured truth.

    Per state, real values are drawn as the measurement allows (_truth_draws: a paired bootstrap of the rollouts
    where they are kept, else real ~ N(true_q, true_se^2)), and the share of draws whose best candidate is the
    measured best is averaged over the states with two or more candidates. Against a noisy truth even the
    exact Q misses the measured best where the top candidates are within noise of each other: top-1 is read
    against this, not against 1. Deterministic in `seed`.
    """
    rng = np.random.default_rng(seed)
    shares = []
    for i, (q, m) in enumerate(zip(self.true_q, self.mask)):
      if m.sum() < 2:
        continue
      real = self._truth_draws(i, m, draws, rng)
      shares.append(float(np.mean(real.argmax(axis=1) == np.argmax(q[m]))))
    return float(np.mean(shares)) if shares else float("nan")

  def spearman_ceiling(self, draws: int = 500, seed: int = 0) -> float:
    """The within-state Spearman a Q-model equal to the real Q^{pi_k} could expect against this measured truth:
    real values drawn as in top1_ceiling, correlated with the measured ones, averaged over the draws and the
    states ranking_metrics counts (two or more candidates of different measured value). Deterministic in `seed`.
    """
    rng = np.random.default_rng(seed)
    means = []
    for i, (q, m) in enumerate(zip(self.true_q, self.mask)):
      t = q[m]
      if len(t) < 2 or np.ptp(t) == 0:
        continue
      real = self._truth_draws(i, m, draws, rng)
      means.append(float(np.nanmean([stats.spearman(r, t) for r in real])))
    return float(np.mean(means)) if means else float("nan")

  def pairs(self) -> tuple[list[str], list[str]]:
    """(prompts, actions) of every present candidate, row-major: what a Q-model scores."""
    prompts = [p for p, cs in zip(self.prompts, self.candidates) for _ in cs]
    return prompts, [a for cs in self.candidates for a in cs]

  def unflatten(self, flat: np.ndarray) -> np.ndarray:
    """[sum M_i] scores in `pairs` order -> [N, M] (0 where masked)."""
    out = np.zeros(self.true_q.shape)
    out[self.mask] = np.asarray(flat, np.float64)
    return out

  def to_json(self) -> dict:
    return {"where": [list(w) for w in self.where], "prompts": self.prompts, "candidates": self.candidates,
            "source": self.source, "true_q": self.true_q.tolist(), "true_se": self.true_se.tolist(),
            "rollouts": self.rollouts, **({"returns": self.returns.tolist()} if self.paired else {})}

  @classmethod
  def from_json(cls, obj: dict) -> "ActionSet":
    returns = np.asarray(obj["returns"], np.float64) if "returns" in obj else None
    return cls([tuple(w) for w in obj["where"]], obj["prompts"], obj["candidates"], obj["source"],
               np.asarray(obj["true_q"], np.float64), np.asarray(obj["true_se"], np.float64), int(obj["rollouts"]),
               returns)

  def save(self, path: str) -> None:
    io_utils.atomic_write_json(path, self.to_json())

  @classmethod
  def load(cls, path: str) -> "ActionSet":
    with open(path) as f:
      return cls.from_json(json.load(f))


def build_action_set(env, records: Sequence[conv_lib.Conversation], policy,
                     candidate_fn: Callable[[list[conv_lib.Turn], np.random.Generator], list[str]], *,
                     n_states: int, policy_samples: int, rollouts: int, gamma: float, seed: int,
                     render_fn: Callable[[list[conv_lib.Turn], str], str]) -> ActionSet:
  """Draws states from `records`, collects candidates and estimates their true Q^policy in the simulator.

  Args:
    env: the domain's TextEnv (restore + estimate_q).
    records: conversations of the policy being evaluated (its own state distribution).
    policy: the policy whose Q is the truth (continues every rollout) and whose samples are candidates.
    candidate_fn: (transcript, rng) -> the domain's scripted candidate suggestions at that state.
    n_states: N, drawn uniformly without replacement from all decision points of `records`.
    policy_samples: suggestions sampled from `policy` at each state (duplicates removed).
    rollouts: Monte Carlo rollouts per (state, candidate); the standard error is saved with each estimate.
    gamma: discount of the returns.
    seed: draws the states, the scripted candidates' wording and the rollouts.
    render_fn: (transcript, the conversation's context) -> the prompt the Q-model reads.
  """
  rng = np.random.default_rng(seed)
  points = [(r, i) for r in records for i in r.agent_steps()]
  if not points:
    raise ValueError("no decision points in the records to rank actions at")
  pick = rng.choice(len(points), size=min(n_states, len(points)), replace=False)
  chosen = [points[j] for j in sorted(pick)]
  episodes = [env.restore(r, i) for r, i in chosen]
  samples: list[list[str]] = [[] for _ in chosen]
  if policy_samples > 0:
    # Each sample its own key: a model policy draws per observation key (lm_policy), and equal keys would give
    # equal samples.
    observations = [dataclasses.replace(o, key=o.key + (s,)) for ep in episodes for s in range(policy_samples)
                    for o in [ep.observation(env.max_render_turns)]]
    texts = list(policy(observations))
    for j, text in enumerate(texts):
      samples[j // policy_samples].append(text)
  candidates, source = [], []
  for (record, i), own in zip(chosen, samples):
    cs, src = [], []
    for text, where in [(t, "policy") for t in own] + [(t, "script") for t in candidate_fn(record.turns[:i], rng)]:
      if text not in cs:
        cs.append(text)
        src.append(where)
    candidates.append(cs)
    source.append(src)
  width = max(len(c) for c in candidates)
  flat_eps = [ep for ep, cs in zip(episodes, candidates) for _ in cs]
  flat_texts = [t for cs in candidates for t in cs]
  values = env.rollout_returns(flat_eps, flat_texts, policy, gamma, n_rollouts=rollouts, seed=seed)
  returns = np.zeros((len(chosen), width, rollouts))
  pos = 0
  for n, cs in enumerate(candidates):
    returns[n, :len(cs)] = values[pos:pos + len(cs)]
    pos += len(cs)
  true_se = returns.std(-1, ddof=1) / np.sqrt(rollouts)
  return ActionSet(where=[(r.id, i) for r, i in chosen], prompts=[render_fn(r.turns[:i], r.context) for r, i in chosen],
                   candidates=candidates, source=source, true_q=returns.mean(-1), true_se=true_se, rollouts=rollouts,
                   returns=returns)


def step_reach(q_by_state: Sequence[np.ndarray], beta: float) -> dict[str, float]:
  """How far the improvement step can climb Q_k, and what its baseline must resolve (means over decisions).

  q_by_state holds, per state, Q_k of each of pi_k's decisions there; their empirical distribution stands for
  pi_k(.|s) (coarse where the state is a tracker's, which is what a dialogue-state Q_k reads). Returns
    q_sd_in_state: the s.d. of Q_k over pi_k's acts within a state (what the step can choose between);
    q_sd_of_state_value: the s.d. over decisions of V_k(s) = E_pi_k[Q_k(s, .)]. A baseline (PPO's critic) that
      misses V_k by more than q_sd_in_state hands the step the state's value as if it were the act's: the acts
      played in promising states gain (finding 29);
    step_raise: E_tilt[Q_k] - E_pi_k[Q_k] >= 0, the raise of E[Q_k] by the step's exact solution
      pi_k(a) exp(Q_k(a) / beta) / Z (about Var_pi_k(Q_k) / beta for small spreads).
  """
  total = sd = raise_ = 0.0
  values, weights = [], []
  for q in q_by_state:
    q = np.asarray(q, np.float64)
    w = np.exp((q - q.max()) / beta)  # stable: the largest weight is 1
    total += len(q)
    sd += len(q) * float(q.std())
    raise_ += len(q) * (float((w * q).sum() / w.sum()) - float(q.mean()))
    values.append(float(q.mean()))
    weights.append(len(q))
  if not total:
    return {"q_sd_in_state": float("nan"), "q_sd_of_state_value": float("nan"), "step_raise": float("nan")}
  values, weights = np.asarray(values), np.asarray(weights, np.float64)
  mean_v = float((weights * values).sum() / total)
  return {"q_sd_in_state": sd / total, "step_raise": raise_ / total,
          "q_sd_of_state_value": float(np.sqrt((weights * (values - mean_v) ** 2).sum() / total))}


def logged_ranking_metrics(q_candidates: Sequence[np.ndarray], taken: Sequence[int],
                           returns: np.ndarray) -> dict[str, float]:
  """Ranking measures from logs alone, at randomised turns (no simulator).

  At each such turn the logged suggestion was drawn uniformly from C logged candidates, so
  C * 1[taken == pick] * G is an unbiased estimate of Q^{pi}(s, pick) (inverse propensity), and G is one of
  the mean candidate value. Q_k's greedy pick at each state is the argmax of its candidate scores.

  Args:
    q_candidates: T arrays of Q_k over each turn's logged candidates.
    taken: T indices of the logged suggestion among its candidates.
    returns: [T] Monte Carlo returns G from the randomised turn.
  Returns:
    adv_corr: Pearson corr(Q_k(s, a) - mean_c Q_k(s, c), G) over the turns;
    ips_pick_gain: mean(C 1[a == pick] G) - mean(G), an unbiased estimate of the greedy pick's gain;
    ips_pick_gain_se: its standard error; turns: T.
  """
  returns = np.asarray(returns, np.float64)
  if len(returns) == 0:
    return {"adv_corr": float("nan"), "ips_pick_gain": float("nan"), "ips_pick_gain_se": float("nan"),
            "turns": 0}
  adv = np.asarray([c[a] - np.mean(c) for c, a in zip(q_candidates, taken)])
  hit = np.asarray([len(c) * float(int(np.argmax(c)) == a) for c, a in zip(q_candidates, taken)])
  gain = hit * returns - returns
  return {"adv_corr": stats.pearson(adv, returns), "ips_pick_gain": float(gain.mean()),
          "ips_pick_gain_se": float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else float("nan"),
          "turns": int(len(returns))}
