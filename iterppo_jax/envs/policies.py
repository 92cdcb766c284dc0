"""Scripted policies that ship with the simulators: the historical staff, an oracle, random text.

Each maps a batch of observations (base.Observation) to suggestion texts, like a language model would.
They read only the transcript (never the hidden customer state), so they are policies of the SR MDP.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

from iterppo_jax.envs import base, sales

_RANDOM_WORDS = (
    "the a you we it is are this that price great new best today now order item store please thanks "
    "really maybe very good nice model color size free fast help want like look find here there what "
    "when how why which can will would should our your their and or but with for from into about").split()


class SalesBehaviorPolicy:
  """The population of historical business staff: each conversation gets a staff member of some skill.

  Skills follow Beta(mean * 6, (1 - mean) * 6); a staff member plays the oracle's act with probability
  equal to its skill and otherwise a common mistake (guessing a product, closing early, chit-chat, ...).
  """

  def __init__(self, skill_mean: float = 0.35, name: str = "behavior"):
    self.skill_mean, self.name = skill_mean, name

  def skill(self, uid: str) -> float:
    rng = np.random.default_rng([zlib.crc32(uid.split("/")[0].encode()), 17])
    k = 6.0
    return float(rng.beta(self.skill_mean * k, (1 - self.skill_mean) * k))

  def __call__(self, observations: Sequence[base.Observation]) -> list[str]:
    out = []
    for obs in observations:
      v = sales.visible_facts(obs.conversation.turns)
      out.append(sales.business_text(sales.staff_act(v, self.skill(obs.uid), obs.rng), obs.rng))
    return out


class SalesOraclePolicy:
  """Asks the need, then the budget, recommends the fitting product, handles objections, then closes."""

  name = "oracle"

  def __call__(self, observations: Sequence[base.Observation]) -> list[str]:
    return [sales.business_text(sales.oracle_act(sales.visible_facts(o.conversation.turns)), o.rng)
            for o in observations]


class RandomTextPolicy:
  """Random words: a floor that knows nothing of the domain."""

  name = "random"

  def __call__(self, observations: Sequence[base.Observation]) -> list[str]:
    out = []
    for obs in observations:
      n = int(obs.rng.integers(3, 12))
      out.append(" ".join(obs.rng.choice(_RANDOM_WORDS, size=n)).capitalize() + ".")
    return out


class FunctionPolicy:
  """Wraps a per-observation function as a policy (handy for tests and scripted variants)."""

  def __init__(self, fn, name: str = "function"):
    self.fn, self.name = fn, name

  def __call__(self, observations: Sequence[base.Observation]) -> list[str]:
    return [self.fn(o) for o in observations]


def make_sales_policy(name: str, skill_mean: float = 0.35):
  """Looks a shipped sales policy up by name: behavior | oracle | random."""
  table = {"behavior": lambda: SalesBehaviorPolicy(skill_mean),
           "oracle": SalesOraclePolicy, "random": RandomTextPolicy}
  if name not in table:
    raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(table)}")
  return table[name]()


def make_policy(name: str, env_config):
  """The registry's entry point (envs/registry.py): a sales policy for the `env` config section."""
  return make_sales_policy(name, skill_mean=env_config.skill_mean)
