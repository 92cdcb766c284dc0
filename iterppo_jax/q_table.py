r"""A Q-model over a dialogue-state tracker's keys (qfit.view=dialogue_state): few free parameters, fitted from logs.

A token Q-model reads the whole transcript through a transformer; fitted on one iteration's logs (~5,000 noisy
decisions) it learns a score per act type, not which act is right in a state (docs/results.md, finding 5: the
logs hold the ranking, but the transformer's view has too many free directions for that much data). This Q-model
reads the conversation through a *state tracker* instead, as task-oriented dialogue systems do: a domain
function maps the transcript to a small key (what is known and what is pending, e.g. sales.dialogue_state) and
a suggestion to its act and its fit to that state (e.g. sales.act_key). Both read the logged text only, never
the simulator's hidden state. Q is a table over (state key, act key):

  SARSA of pi_k (qfit.method td | fqe):  Q(x, a) = mean over D_k's transitions from (x, a) of
      r + gamma Q(x', a'),  a' pi_k's own next action (data.Example.own_action where a randomised turn replaced
      it), iterated to its fixed point; a pair never logged takes its act's mean Q;
  TD(lambda) of pi_k (qfit.method td_lambda, qfit.lam):  the same with lambda-returns, the trace cut where the
      logged next act is not pi_k's own (a randomised turn); lambda = 1 is Monte Carlo where the logs are pi_k's;
  Monte Carlo (qfit.method mc):  Q(x, a) = mean discounted return of D_k's decisions (x, a) whose return
      samples Q^{pi_k} (data.Example.target_valid), all decisions with qfit.targets=all.

A pair that was never logged scores its act's mean Q (then the mean of all), minus 1e-3 so a seen pair wins
ties. With `shrink` = m > 0 a cell seen n times is the posterior mean of a pseudo-count model,
(n mean + m prior) / (n + m), the prior pooled over the same targets: its act's mean ('act') or its state's mean
plus its act's offset from the mean of all ('additive'), or the two-way fit mean + state effect + act effect
weighted by the cells' counts ('twoway': an act's effect measured within the states it was played in, where
'additive' credits an act, e.g. a close played mostly where deals are near, with its states' values). A cell
logged once or twice then no longer tops a state on one lucky outcome. The table is JSON
(workdir/checkpoints/qtable/<k>.json), so a resumed run reads back the same Q.

Pessimism (`pessimism` = z > 0, qfit.pessimism): Q_k is read as a lower confidence bound,

    Q(x, a) - z sigma / sqrt(n + m),

n the cell's count, m the shrinkage pseudo-count (the prior is worth m targets) and sigma the pooled spread of
the decisions' discounted returns around their cell means (the noise of one sample of Q^{pi_k}; SARSA's one-step
targets would hide what the next states' values add). A pair never logged is a cell with n = 0: its prior (the
one the cells shrink toward, at its state and act) less z sigma / sqrt(max(m, 1)). The improvement step takes
the maximum over a state's acts, and the acts logged least have the noisiest means, so the plain means' maximum
favours rare cells (docs/results.md, finding 41). The bound is read, not fitted: SARSA's bootstrap still
evaluates pi_k with the plain cells. z = 0 (the default) is the table as before, to the bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable, Sequence

import numpy as np

from iterppo_jax import conversation as conv_lib
from iterppo_jax import data as data_lib
from iterppo_jax import io_utils

UNSEEN_PENALTY = 1e-3


@dataclasses.dataclass
class Decision:
  """One logged decision as the table sees it."""
  state: tuple
  act: tuple  # the suggestion that was made (and scored by the outcome)
  own_act: tuple  # pi_k's own act there (= act, except at a randomised turn; its first sample on other logs)
  reward: float
  next_index: int  # into the same list, -1 at the conversation's end
  target: float  # discounted Monte Carlo return
  target_valid: bool  # the return samples Q^{pi_k} (data.Example.target_valid)
  conversation_id: str
  # pi_k's sampled acts there, on logs pi_k did not make (SARSA then averages Q over them: expected SARSA);
  # empty: the one own_act
  own_acts: tuple = ()

  def successors(self) -> tuple:
    """pi_k's acts that Q(x', .) is averaged over when this decision is a successor."""
    return self.own_acts or (self.own_act,)


def decisions(records: Sequence[conv_lib.Conversation], examples: Sequence[data_lib.Example],
              state_fn: Callable, act_fn: Callable, own_texts: Sequence[str] | None = None) -> list[Decision]:
  """Every decision of `examples` (data.examples_from_conversations of `records`, which sets the discount of the
  returns) keyed by the tracker, in their order.

  `own_texts[i]`, when given, is the evaluated policy's own suggestion at decision i, or a list of M >= 1
  sampled suggestions (logs of another policy: SARSA then bootstraps from their mean Q, which is fitted Q
  evaluation); by default the logged one, or data.Example.own_action where a randomised turn replaced it.
  """
  by_id = {r.id: r for r in records}
  out = []
  if own_texts is not None and len(own_texts) != len(examples):
    raise ValueError(f"{len(examples)} decisions but {len(own_texts)} own suggestions")
  for i, e in enumerate(examples):
    turns = data_lib.turns_before(by_id[e.conversation_id], e)
    act = act_fn(turns, e.suggestion)
    own_acts = ()
    if own_texts is not None:
      texts = [own_texts[i]] if isinstance(own_texts[i], str) else list(own_texts[i])
      if not texts:
        raise ValueError(f"decision {i} has no own suggestion")
      own_acts = tuple(act_fn(turns, t) for t in texts)
      own = own_acts[0]
    else:
      own = act if e.own_action is None else act_fn(turns, e.own_action)
    out.append(Decision(state_fn(turns), act, own, e.reward, e.next_index, e.target, e.target_valid,
                        e.conversation_id, own_acts if len(own_acts) > 1 else ()))
  return out


def _act_means(keys: list[tuple], q: np.ndarray, counts: np.ndarray) -> tuple[dict, float]:
  sums, ns = {}, {}
  for (_, act), v, n in zip(keys, q, counts):
    sums[act] = sums.get(act, 0.0) + v * n
    ns[act] = ns.get(act, 0) + n
  means = {a: sums[a] / ns[a] for a in sums}
  total = float(np.sum(q * counts) / max(np.sum(counts), 1))
  return means, total


@dataclasses.dataclass
class TableQ:
  """Q over (state key, act key). `cells[(state, act)] = (q, count)`; `acts[act]` the fallback."""
  cells: dict
  acts: dict
  default: float
  state_fn: Callable | None = None
  act_fn: Callable | None = None
  # pessimism (module doc): the bound's z, the targets' spread sigma, the pseudo-count m, and the prior
  # (mean, {state: effect}, {act: effect}) that scores a pair never logged; z = 0 reads the plain table
  pessimism: float = 0.0
  noise: float = 0.0
  shrink: float = 0.0
  prior: tuple | None = None

  def value(self, state: tuple, act: tuple) -> float:
    cell = self.cells.get((state, act))
    if not self.pessimism:
      return cell[0] if cell is not None else self.acts.get(act, self.default) - UNSEEN_PENALTY
    if cell is not None:
      q, n = cell
    elif self.prior is not None and state in self.prior[1] and act in self.prior[2]:
      q, n = self.prior[0] + self.prior[1][state] + self.prior[2][act], 0
    else:
      q, n = self.acts.get(act, self.default) - UNSEEN_PENALTY, 0
    return q - self.pessimism * self.noise / math.sqrt(max(n + self.shrink, 1.0))

  def score(self, turns, text: str) -> float:
    """Q of suggesting `text` ('' abstains) after the transcript `turns`."""
    return self.value(self.state_fn(turns), self.act_fn(turns, text))

  def score_many(self, pairs: Sequence[tuple[list, str]]) -> np.ndarray:
    return np.asarray([self.score(t, a) for t, a in pairs], np.float32)

  # ---- persistence: JSON with tuple keys written as lists ----
  def to_json(self) -> dict:
    out = {"cells": [[list(s), list(a), q, n] for (s, a), (q, n) in sorted(self.cells.items(), key=repr)],
           "acts": [[list(a), q] for a, q in sorted(self.acts.items(), key=repr)], "default": self.default}
    if self.pessimism:
      mean, states, acts = self.prior
      out["pessimism"] = {"z": self.pessimism, "noise": self.noise, "shrink": self.shrink, "prior_mean": mean,
                          "state_effects": [[list(x), v] for x, v in sorted(states.items(), key=repr)],
                          "act_effects": [[list(a), v] for a, v in sorted(acts.items(), key=repr)]}
    return out

  def save(self, path: str) -> None:
    io_utils.atomic_write_json(path, self.to_json())

  @classmethod
  def load(cls, path: str, state_fn: Callable, act_fn: Callable) -> "TableQ":
    with open(path) as f:
      d = json.load(f)
    table = cls({(_tuple(s), _tuple(a)): (float(q), int(n)) for s, a, q, n in d["cells"]},
                {_tuple(a): float(q) for a, q in d["acts"]}, float(d["default"]), state_fn, act_fn)
    p = d.get("pessimism")  # tables saved before it existed, or with z = 0, read the plain cells
    if p:
      table.pessimism, table.noise, table.shrink = float(p["z"]), float(p["noise"]), float(p["shrink"])
      table.prior = (float(p["prior_mean"]), {_tuple(x): float(v) for x, v in p["state_effects"]},
                     {_tuple(a): float(v) for a, v in p["act_effects"]})
    return table


def _tuple(x):
  return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


def _table(keys: list[tuple], q: np.ndarray, counts: np.ndarray, state_fn, act_fn) -> TableQ:
  acts, default = _act_means(keys, q, counts)
  return TableQ({key: (float(v), int(n)) for key, v, n in zip(keys, q, counts)}, acts, default, state_fn, act_fn)


def _cells(ds: Sequence[Decision]) -> tuple[list[tuple], dict, np.ndarray, np.ndarray]:
  """(the distinct (state, act) keys in a fixed order, key -> index, each decision's index, decisions per key)."""
  if not ds:
    raise ValueError("no logged decision to fit the dialogue-state Q on")
  keys = sorted({(d.state, d.act) for d in ds}, key=repr)
  index = {key: i for i, key in enumerate(keys)}
  cell = np.asarray([index[(d.state, d.act)] for d in ds])
  return keys, index, cell, np.bincount(cell, minlength=len(keys))


SHRINK_PRIORS = ("act", "additive", "twoway")
_TWOWAY_SWEEPS = 50  # backfitting sweeps of the two-way fit (it moves < 1e-6 after ~20 on the domains' tables)


class _Shrinkage:
  """Pseudo-count shrinkage of cell means toward a prior pooled from the same targets (see the module doc)."""

  def __init__(self, keys: list[tuple], counts: np.ndarray, m: float, prior: str = "act"):
    if m < 0:
      raise ValueError(f"shrink must be >= 0, got {m}")
    if prior not in SHRINK_PRIORS:
      raise ValueError(f"shrink prior must be one of {SHRINK_PRIORS}, got {prior!r}")
    self.m, self.prior, self.counts = float(m), prior, counts
    acts = sorted({a for _, a in keys}, key=repr)
    states = sorted({s for s, _ in keys}, key=repr)
    a_index, s_index = {a: i for i, a in enumerate(acts)}, {s: i for i, s in enumerate(states)}
    self.cell_act = np.asarray([a_index[a] for _, a in keys], np.int64)
    self.cell_state = np.asarray([s_index[s] for s, _ in keys], np.int64)
    self.states, self.acts = states, acts

  def _pooled(self, group: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Each cell's group's mean target over all its decisions."""
    return (np.bincount(group, weights=sums) / np.bincount(group, weights=self.counts))[group]

  def apply(self, sums: np.ndarray) -> np.ndarray:
    """(sum of a cell's n targets + m prior) / (n + m); the plain mean when m = 0."""
    if self.m == 0:
      return sums / self.counts
    if self.prior == "twoway":
      prior = self._twoway(sums)
    else:
      prior = self._pooled(self.cell_act, sums)
      if self.prior == "additive":
        prior = prior + self._pooled(self.cell_state, sums) - float(np.sum(sums) / np.sum(self.counts))
    return (sums + self.m * prior) / (self.counts + self.m)

  def _twoway(self, sums: np.ndarray) -> np.ndarray:
    """mean + state effect + act effect, the least-squares fit to the cell means weighted by their counts."""
    mu, state_fx, act_fx = self._twoway_effects(sums)
    return mu + state_fx[self.cell_state] + act_fx[self.cell_act]

  def _twoway_effects(self, sums: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(mean, per-state effects, per-act effects) of the two-way fit (backfitting: each effect is the weighted
    mean of what the other leaves)."""
    w, y = self.counts.astype(np.float64), sums / self.counts
    mu = float(np.sum(sums) / np.sum(w))
    n_s, n_a = np.bincount(self.cell_state, weights=w), np.bincount(self.cell_act, weights=w)
    act_fx = np.zeros(len(n_a))
    for _ in range(_TWOWAY_SWEEPS):
      state_fx = np.bincount(self.cell_state, weights=w * (y - mu - act_fx[self.cell_act])) / n_s
      act_fx = np.bincount(self.cell_act, weights=w * (y - mu - state_fx[self.cell_state])) / n_a
    return mu, state_fx, act_fx

  def effects(self, sums: np.ndarray) -> tuple[float, dict, dict]:
    """The prior as (mean, {state: effect}, {act: effect}), its value at (x, a) mean + effect(x) + effect(a),
    so that it also scores a pair never logged: 'act' has no state effects, 'additive' the states' and acts'
    mean offsets, 'twoway' the two-way fit's effects."""
    if self.prior == "twoway":
      mu, state_fx, act_fx = self._twoway_effects(sums)
    else:
      w = self.counts.astype(np.float64)
      mu = float(np.sum(sums) / np.sum(w))
      act_fx = np.bincount(self.cell_act, weights=sums) / np.bincount(self.cell_act, weights=w) - mu
      state_fx = (np.bincount(self.cell_state, weights=sums) / np.bincount(self.cell_state, weights=w) - mu
                  if self.prior == "additive" else np.zeros(len(self.states)))
    return (mu, {x: float(v) for x, v in zip(self.states, state_fx)},
            {a: float(v) for a, v in zip(self.acts, act_fx)})


def fit_mc(ds: Sequence[Decision], state_fn=None, act_fn=None, all_turns: bool = False, shrink: float = 0.0,
           shrink_to: str = "act", pessimism: float = 0.0) -> TableQ:
  """Mean discounted return per (state, act) over decisions whose return samples Q^{pi_k} (every decision with
  `all_turns`); with `shrink` > 0, shrunk toward its prior; with `pessimism` > 0, read as a lower bound (module
  doc)."""
  rows = [d for d in ds if all_turns or d.target_valid]
  keys, _, cell, counts = _cells(rows)
  targets = np.asarray([d.target for d in rows], np.float64)
  sums = np.bincount(cell, weights=targets, minlength=len(keys))
  shrinker = _Shrinkage(keys, counts, shrink, shrink_to)
  table = _table(keys, shrinker.apply(sums), counts, state_fn, act_fn)
  return _pessimistic(table, pessimism, shrinker, targets, targets, cell)


def _pessimistic(table: TableQ, z: float, shrinker: _Shrinkage, targets: np.ndarray, returns: np.ndarray,
                 cell: np.ndarray) -> TableQ:
  """`table` read as the lower bound Q - z sigma / sqrt(n + m) (module doc): the unseen pairs' prior pooled from
  the fitted `targets` (the cells' last sweep), sigma the pooled spread of the decisions' `returns` around their
  cells' plain means. z = 0 returns the table unchanged."""
  if z < 0:
    raise ValueError(f"pessimism must be >= 0, got {z}")
  if not z:
    return table
  counts = shrinker.counts
  spread = returns - (np.bincount(cell, weights=returns, minlength=len(counts)) / counts)[cell]
  table.pessimism, table.shrink = float(z), shrinker.m
  table.noise = math.sqrt(float(np.sum(spread ** 2)) / max(len(returns) - len(counts), 1))
  sums = np.bincount(cell, weights=targets, minlength=len(counts))
  table.prior = shrinker.effects(sums)
  return table


def _depths(ds: Sequence[Decision]) -> np.ndarray:
  """Each decision's number of logged successors in its conversation (0 at the last decision)."""
  depth = np.zeros(len(ds), np.int64)
  for i in range(len(ds) - 1, -1, -1):
    j = ds[i].next_index
    if j >= 0:
      if j <= i:
        raise ValueError(f"decision {i}'s successor {j} must come after it")
      depth[i] = depth[j] + 1
  return depth


def fit_sarsa(ds: Sequence[Decision], gamma: float, state_fn=None, act_fn=None, lam: float = 0.0,
              shrink: float = 0.0, shrink_to: str = "act", pessimism: float = 0.0, tol: float = 1e-7,
              max_sweeps: int = 1000) -> TableQ:
  """The fixed point of Q(x, a) = mean over logged decisions from (x, a) of their lambda-return of pi_k
  (synchronous sweeps until no cell moves more than `tol`):

    G_i = r_i + gamma [(1 - lam_i) Q(x', a'_pi) + lam_i G_{i+1}],   lam_i = lam if the logged next act is pi_k's
                                                                    own (else 0: the trace is cut),
    G_i = r_i at a conversation's last decision.

  lam = 0 is SARSA of pi_k; lam = 1 on logs without randomised turns is the Monte Carlo mean per cell. A next pair
  (x', a'_pi) that was never logged takes a'_pi's mean Q. Where a decision carries several sampled acts of pi_k
  (Decision.own_acts, logs of another policy), Q(x', a'_pi) is their mean (expected SARSA), and the trace is
  cut. With `shrink` = m > 0 each sweep's cell means are shrunk toward their prior (module doc), which keeps the
  sweep a contraction. With `pessimism` > 0 the fixed point is read as a lower bound (module doc), sigma the
  spread of the decisions' discounted returns within their cells."""
  if not 0.0 <= lam <= 1.0:
    raise ValueError(f"lam must be in [0, 1], got {lam}")
  keys, index, cell, counts = _cells(ds)
  shrinker = _Shrinkage(keys, counts, shrink, shrink_to)
  rewards = np.asarray([d.reward for d in ds])
  # Successor pairs (decision, (x', a'_pi), weight 1/M): a logged cell, or an unseen pair (its act's mean);
  # none at a conversation's end.
  pair_row, pair_succ, pair_act, pair_w = [], [], [], []
  for i, d in enumerate(ds):
    if d.next_index < 0:
      continue
    nd = ds[d.next_index]
    acts_next = nd.successors()
    for a in acts_next:
      pair_row.append(i)
      pair_succ.append(index.get((nd.state, a), -2))
      pair_act.append(a)
      pair_w.append(1.0 / len(acts_next))
  pair_row, pair_succ, pair_w = np.asarray(pair_row, np.int64), np.asarray(pair_succ, np.int64), np.asarray(pair_w)
  act_of_cell = [a for _, a in keys]
  acts = sorted(set(act_of_cell) | set(pair_act), key=repr)
  act_index = {a: i for i, a in enumerate(acts)}
  cell_act = np.asarray([act_index[a] for a in act_of_cell])
  pair_act = np.asarray([act_index[a] for a in pair_act], np.int64)
  if lam > 0:
    next_index = np.asarray([d.next_index for d in ds])
    # The trace continues through a next decision whose logged act is pi_k's own (not a randomised turn's).
    trace = np.asarray([lam if d.next_index >= 0 and ds[d.next_index].successors() == (ds[d.next_index].act,)
                        else 0.0 for d in ds])
    depth = _depths(ds)
    levels = [np.flatnonzero(depth == h) for h in range(int(depth.max()) + 1)]  # from the conversations' ends
  q = np.zeros(len(keys))
  for _ in range(max_sweeps):
    act_sum = np.bincount(cell_act, weights=q * counts, minlength=len(acts))
    act_n = np.bincount(cell_act, weights=counts, minlength=len(acts))
    overall = float(np.sum(q * counts) / np.sum(counts))
    act_mean = np.where(act_n > 0, act_sum / np.maximum(act_n, 1), overall)
    pair_v = np.where(pair_succ >= 0, q[np.maximum(pair_succ, 0)], act_mean[pair_act]) if len(pair_row) else pair_w
    v_next = np.bincount(pair_row, weights=pair_v * pair_w, minlength=len(ds)) if len(pair_row) else np.zeros(len(ds))
    if lam > 0:  # lambda-returns, from each conversation's end backwards, all conversations at once
      ret = np.zeros(len(ds))
      for idx in levels:
        later = np.where(next_index[idx] >= 0, ret[np.maximum(next_index[idx], 0)], 0.0)
        ret[idx] = rewards[idx] + gamma * ((1.0 - trace[idx]) * v_next[idx] + trace[idx] * later)
    else:
      ret = rewards + gamma * v_next
    new = shrinker.apply(np.bincount(cell, weights=ret, minlength=len(keys)))
    moved = float(np.max(np.abs(new - q)))
    q = new
    if moved < tol:
      break
  returns = np.asarray([d.target for d in ds], np.float64)
  return _pessimistic(_table(keys, q, counts, state_fn, act_fn), pessimism, shrinker, ret, returns, cell)
