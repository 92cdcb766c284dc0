"""Deployment that makes actions identifiable: one randomised turn per conversation (issue #16).

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
"""

from __future__ import annotations

import zlib
from typing import Callable, Sequence

import numpy as np

from iterppo_jax import conversation as conv_lib
from iterppo_jax.envs import base

METADATA_KEY = "explore"


def explore_turn(uid: str, seed: int, max_turns: int) -> int:
  """t* of a conversation: uniform on [0, max_turns), from its id and the deployment's seed alone."""
  rng = np.random.default_rng([zlib.crc32(uid.split("/")[0].encode()), int(seed), 31])
  return int(rng.integers(max_turns))


class RandomisedTurn:
  """pi_k with one uniformly randomised suggestion per conversation (a base.Policy).

  Args:
    policy: pi_k (any base.Policy; its suggestion at t* is one of the candidates).
    candidate_fn: (transcript, rng) -> the domain's scripted suggestions at that state.
    max_turns: the environment's max_turns (t* is uniform on [0, max_turns)).
    seed: the deployment's seed (t* and the draw at t* depend on it and the conversation id only).
  """

  def __init__(self, policy: base.Policy, candidate_fn: Callable, max_turns: int, seed: int):
    if max_turns < 1:
      raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    self.policy, self.candidate_fn, self.max_turns, self.seed = policy, candidate_fn, max_turns, seed
    self.name = getattr(policy, "name", "policy")

  def __call__(self, observations: Sequence[base.Observation]) -> list[str]:
    suggestions = list(self.policy(observations))
    for j, obs in enumerate(observations):
      meta = obs.conversation.metadata
      if METADATA_KEY not in meta:  # the conversation's first decision: draw t* once
        meta[METADATA_KEY] = {"turn": explore_turn(obs.uid, self.seed, self.max_turns)}
      info = meta[METADATA_KEY]
      if obs.turn != info["turn"]:
        continue
      rng = np.random.default_rng([zlib.crc32(obs.uid.encode()), int(self.seed), obs.turn, 37])
      candidates = [suggestions[j]]
      for text in self.candidate_fn(list(obs.conversation.turns), rng):
        if text not in candidates:
          candidates.append(text)
      taken = int(rng.integers(len(candidates)))
      info.update({"candidates": candidates, "taken": taken, "propensity": 1.0 / len(candidates)})
      suggestions[j] = candidates[taken]
    return suggestions


def explored(record: conv_lib.Conversation) -> dict | None:
  """The record's randomised-turn information ({'turn': t*, and if t* was reached: 'candidates', 'taken',
  'propensity'}), or None for logs deployed without randomised turns."""
  info = record.metadata.get(METADATA_KEY)
  if info is None:
    return None
  if not isinstance(info, dict) or not isinstance(info.get("turn"), int):
    raise conv_lib.ConversationFormatError(
        f"{record.id}: metadata.{METADATA_KEY} must be an object with an integer 'turn', got {info!r}")
  return info
