"""Deployment that makes actions identifiable: randomised turns in each conversation (issue #16).

Logs of a deployed policy pi_k hold, at each state, mostly the action pi_k likes there, so a Q-model fitted on
them learns which act *types* go with good outcomes, not which act is right in this state. `RandomisedTurn`
deploys pi_k unchanged except at one turn t* per conversation, drawn uniformly from [0, max_turns) before the
conversation starts (independent of everything that happens in it). At t* the suggestion is drawn uniformly from C
candidates: pi_k's own sample and the domain's scripted acts at that state. The record keeps, in
`metadata["explore"]`, t*, the candidates, the index taken and its propensity 1/C.

What this buys (data.examples_from_conversations reads it):
* at t* the action is randomised given the state, and pi_k is followed afterwards, so the Monte Carlo return is
  an unbiased sample of Q^{pi_k}(s, a) for *every* candidate a, not only pi_k's favourite;
* at turns after t* the logs are on-policy again (pi_k from there on): their returns are unbiased too;
* at turns before t* the return includes the randomised turn, so it is not a sample of Q^{pi_k}; these turns are
  left out of Monte Carlo fits (their states are still used by PPO). t* is drawn independently of the
  conversation, so dropping them selects nothing.

With `count` = n > 1 (loop.explore_count) a conversation has n randomised turns t_1 < ... < t_n, drawn without
replacement from [0, max_turns) before it starts; the record keeps {"turns": [t_1, ...], "draws": [...]}, one draw
(candidates, taken, propensity; {} where the conversation ended before it) per turn. Each t_i is a state with a
randomised act, which a TD fit uses (q_table.fit_sarsa cuts its trace there and bootstraps from pi_k's own act),
but only from the last, t_n, on do Monte Carlo returns follow pi_k: t* above is t_n for them. More randomised turns
give a table more (state, act) pairs pi_k would rarely play, at a larger cost on the deployed conversations.
"""

from __future__ import annotations

import zlib
from typing import Callable, Sequence

import numpy as np

from iterppo_jax import conversation as conv_lib
from iterppo_jax.envs import base

METADATA_KEY = "explore"


def explore_turns(uid: str, seed: int, max_turns: int, count: int) -> list[int]:
  """A conversation's `count` randomised turns, increasing, drawn without replacement from [0, max_turns) from its
  id and the deployment's seed alone (count = 1: t*, uniform on [0, max_turns))."""
  rng = np.random.default_rng([zlib.crc32(uid.split("/")[0].encode()), int(seed), 31])
  if count == 1:  # the draw of every run before loop.explore_count
    return [int(rng.integers(max_turns))]
  return sorted(int(t) for t in rng.choice(max_turns, size=count, replace=False))


class RandomisedTurn:
  """pi_k with `count` uniformly randomised suggestions per conversation (a base.Policy).

  Args:
    policy: pi_k (any base.Policy; its suggestion at a randomised turn is one of the candidates).
    candidate_fn: (transcript, rng) -> the domain's scripted suggestions at that state.
    max_turns: the environment's max_turns (the randomised turns are drawn from [0, max_turns)).
    seed: the deployment's seed (the turns and the draws at them depend on it and the conversation id only).
    count: randomised turns per conversation, 1 <= count <= max_turns.
  """

  def __init__(self, policy: base.Policy, candidate_fn: Callable, max_turns: int, seed: int, count: int = 1):
    if max_turns < 1:
      raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    if not 1 <= count <= max_turns:
      raise ValueError(f"count must be in [1, max_turns = {max_turns}], got {count}")
    self.policy, self.candidate_fn, self.max_turns, self.seed = policy, candidate_fn, max_turns, seed
    self.count = count
    self.name = getattr(policy, "name", "policy")

  def __call__(self, observations: Sequence[base.Observation]) -> list[str]:
    suggestions = list(self.policy(observations))
    for j, obs in enumerate(observations):
      meta = obs.conversation.metadata
      if METADATA_KEY not in meta:  # the conversation's first decision: draw its randomised turns once
        turns = explore_turns(obs.uid, self.seed, self.max_turns, self.count)
        meta[METADATA_KEY] = ({"turn": turns[0]} if self.count == 1
                              else {"turns": turns, "draws": [{} for _ in turns]})
      draw = _slot(meta[METADATA_KEY], obs.turn)
      if draw is None:
        continue
      rng = np.random.default_rng([zlib.crc32(obs.uid.encode()), int(self.seed), obs.turn, 37])
      candidates = [suggestions[j]]
      for text in self.candidate_fn(list(obs.conversation.turns), rng):
        if text not in candidates:
          candidates.append(text)
      taken = int(rng.integers(len(candidates)))
      draw.update({"candidates": candidates, "taken": taken, "propensity": 1.0 / len(candidates)})
      suggestions[j] = candidates[taken]
    return suggestions


def explored(record: conv_lib.Conversation) -> dict | None:
  """The record's randomised-turn information, or None for logs deployed without randomised turns: {'turn': t*,
  and if t* was reached 'candidates', 'taken', 'propensity'}; with several randomised turns {'turns': [...],
  'draws': [...]}, a draw per turn ({} where the conversation ended before it)."""
  info = record.metadata.get(METADATA_KEY)
  if info is None:
    return None
  turns, draws = (info.get("turns"), info.get("draws")) if isinstance(info, dict) else (None, None)
  several = (isinstance(turns, list) and turns and all(isinstance(t, int) for t in turns)
             and turns == sorted(set(turns)) and isinstance(draws, list) and len(draws) == len(turns)
             and all(isinstance(d, dict) for d in draws))
  if not isinstance(info, dict) or not (isinstance(info.get("turn"), int) or several):
    raise conv_lib.ConversationFormatError(
        f"{record.id}: metadata.{METADATA_KEY} must be an object with an integer 'turn', or with increasing integer "
        f"'turns' and one 'draws' object per turn, got {info!r}")
  return info


def planned_turns(info: dict) -> list[int]:
  """The randomised turns a conversation was deployed with (reached or not), increasing."""
  return [info["turn"]] if "turn" in info else list(info["turns"])


def last_turn(info: dict | None) -> int:
  """t*, the last randomised turn: Monte Carlo returns of earlier decisions include a randomised draw (0 for
  None, logs without randomised turns)."""
  return planned_turns(info)[-1] if info is not None else 0


def _slot(info: dict, k: int) -> dict | None:
  """The object that holds (or will hold) the draw at decision k, where k is a planned randomised turn, else None:
  the record's info itself with one turn, its entry of 'draws' with several."""
  if "turn" in info:
    return info if k == info["turn"] else None
  return info["draws"][info["turns"].index(k)] if k in info["turns"] else None


def draw_at(info: dict | None, k: int) -> dict | None:
  """The draw at decision k ({'candidates', 'taken', 'propensity'}) where k is a randomised turn the conversation
  reached, else None."""
  draw = None if info is None else _slot(info, k)
  return draw if draw is not None and "taken" in draw else None
