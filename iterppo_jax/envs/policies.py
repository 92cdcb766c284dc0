"""The scripted-policy kit every domain builds its shipped policies from: a domain's `Script` (five functions of
its module), the historical staff and the oracle built from it, an exploratory staff trying the domain's
candidate acts (whose logs serve off-policy evaluation), random text, and a name lookup. Domain-specific
policies live in the domain's module (sales.py: personas and random acts); this module imports no domain.

Each maps a batch of observations (base.Observation) to suggestion texts, like a language model would.
They read only the transcript (never the hidden customer state), so they are policies of the SR MDP.
"""

from __future__ import annotations

import zlib
from typing import Callable, NamedTuple, Sequence

import numpy as np

from iterppo_jax import errors
from iterppo_jax.envs import base

_RANDOM_WORDS = (
    "the a you we it is are this that price great new best today now order item store please thanks "
    "really maybe very good nice model color size free fast help want like look find here there what "
    "when how why which can will would should our your their and or but with for from into about").split()


def conversation_rng(uid: str, salt: int) -> np.random.Generator:
  # Keyed on the conversation id without the '/q<r>' of estimate_q's rollout clones: a persona (or skill)
  # belongs to the conversation and stays the same in every rollout from its states.
  return np.random.default_rng([zlib.crc32(uid.split("/")[0].encode()), salt])


class Script(NamedTuple):
  """A domain's scripted staff, as five functions of its module (sales.py, support.py, ...):

  visible_facts(turns) -> what the transcript reveals; oracle_act(visible) -> the best act;
  staff_act(visible, skill, rng) -> the oracle's act with probability `skill`, else a common mistake;
  business_text(act, rng) -> the act as a templated business message;
  candidate_acts(visible) -> the distinct acts worth trying there, one per act kind and the oracle's among them
  (what a Q-model ranks, and what an exploratory policy tries);
  say (optional) say(act, turns, rng) -> the act worded for the state the transcript `turns` shows (naming what
  the customer said, say); without it, business_text(act, rng).

  The scripts are the agent's side: they see the transcript, never the simulator's hidden state (the simulated
  business user, which may read it, is TextEnv.staff_message / rewrite).
  """
  visible_facts: Callable
  oracle_act: Callable
  staff_act: Callable
  business_text: Callable
  candidate_acts: Callable
  say: Callable | None = None

  def message(self, act, turns: Sequence, rng: np.random.Generator) -> str:
    """The business message for `act` at the state `turns` shows (`say`, else `business_text`)."""
    return self.say(act, turns, rng) if self.say is not None else self.business_text(act, rng)


def candidate_texts(script: Script, turns: Sequence, rng: np.random.Generator) -> list[str]:
  """One business message per candidate act (`script.candidate_acts`) at the state the transcript `turns` shows.

  The texts a Q-model scores to rank actions at a logged state, in the order of `candidate_acts`.
  """
  return [script.message(act, turns, rng) for act in script.candidate_acts(script.visible_facts(turns))]


class StaffPolicy:
  """A population of historical staff: each conversation gets a staff member of some skill.

  Skills follow base.staff_skill (Beta(mean * 6, (1 - mean) * 6)), drawn from the conversation's id and `salt` (so
  a conversation keeps its staff member in every Monte Carlo rollout from its states); each turn the staff member
  plays `script.staff_act`.
  """

  def __init__(self, script: Script, skill_mean: float, salt: int = 17, name: str = "behavior"):
    base.check_skill_mean(skill_mean)
    self.script, self.skill_mean, self.salt, self.name = script, skill_mean, salt, name

  def skill(self, uid: str) -> float:
    return base.staff_skill(conversation_rng(uid, self.salt), self.skill_mean)

  def __call__(self, observations: Sequence[base.Observation]) -> list[str]:
    s = self.script
    return [s.message(s.staff_act(s.visible_facts(o.conversation.turns), self.skill(o.uid), o.rng),
                      o.conversation.turns, o.rng) for o in observations]


class PerTurnStaffPolicy:
  """The staff population mixed at every turn: each turn the oracle's act with probability `skill_mean`, else one
  of the staff's common mistakes (`script.staff_act`), with no staff member kept across a conversation.

  What a perfect behaviour clone of the staff's logs would play: a clone sees which act the staff played at a
  state, not which staff member played it, so it learns this per-turn mixture, not any one staff member. Where
  a deal needs many right turns in a row, this converts less than the staff themselves (their skill is kept
  through a conversation), and it bounds what cloning alone can give pi_0 (docs/results.md, finding 22).
  """

  name = "staff_per_turn"

  def __init__(self, script: Script, skill_mean: float):
    base.check_skill_mean(skill_mean)
    self.script, self.skill_mean = script, skill_mean

  def __call__(self, observations: Sequence[base.Observation]) -> list[str]:
    s = self.script
    return [s.message(s.staff_act(s.visible_facts(o.conversation.turns), self.skill_mean, o.rng),
                      o.conversation.turns, o.rng) for o in observations]


class OraclePolicy:
  """The domain's best scripted act at every turn (`script.oracle_act`), read from the transcript alone."""

  name = "oracle"

  def __init__(self, script: Script):
    self.script = script

  def __call__(self, observations: Sequence[base.Observation]) -> list[str]:
    s = self.script
    return [s.message(s.oracle_act(s.visible_facts(o.conversation.turns)), o.conversation.turns, o.rng)
            for o in observations]


def shipped(script: Script, skill_mean: float, salt: int = 17) -> dict[str, Callable[[], base.Policy]]:
  """The policies every domain ships, built from its Script, by name (for `lookup`): 'behavior' (the historical
  staff, StaffPolicy), 'oracle', 'random' (random words), 'explore' (the staff trying candidate acts) and
  'staff_per_turn' (the staff mixed at every turn: what a perfect clone of their logs plays)."""
  return {"behavior": lambda: StaffPolicy(script, skill_mean, salt=salt), "oracle": lambda: OraclePolicy(script),
          "random": RandomTextPolicy, "explore": lambda: ScriptExplorePolicy(script, skill_mean=skill_mean),
          "staff_per_turn": lambda: PerTurnStaffPolicy(script, skill_mean)}


def lookup(domain: str, name: str, table: dict[str, Callable[[], base.Policy]]) -> base.Policy:
  """table[name]() with an error that lists the domain's policies."""
  if name not in table:
    raise errors.SettingsError(f"unknown {domain} policy {name!r}; expected one of {', '.join(table)}")
  return table[name]()


class RandomTextPolicy:
  """Random words: a floor that knows nothing of the domain."""

  name = "random"

  def __call__(self, observations: Sequence[base.Observation]) -> list[str]:
    out = []
    for obs in observations:
      n = int(obs.rng.integers(3, 12))
      out.append(" ".join(obs.rng.choice(_RANDOM_WORDS, size=n)).capitalize() + ".")
    return out


class ScriptExplorePolicy:
  """A domain's exploratory behaviour policy: its historical staff, trying the domain's candidate acts.

  Each conversation gets a staff skill ~ Beta(mean * 6, (1 - mean) * 6), drawn from its id (as StaffPolicy).
  Each turn it plays a uniformly random act of `script.candidate_acts` with probability `eps`, else the staff
  member's act (`script.staff_act`), in plain templates. The logs then hold many (state, action) pairs, which
  an off-policy evaluation (qfit 'fqe') of another policy needs, in any domain. (sales.py has its own
  ExploratoryPolicy, with personas.)
  """

  def __init__(self, script: Script, eps: float = 0.3, skill_mean: float = 0.35, salt: int = 29,
               name: str = "explore"):
    if not 0.0 <= eps <= 1.0:
      raise ValueError(f"eps must be a probability in [0, 1], got {eps}")
    self._staff = StaffPolicy(script, skill_mean, salt=salt)  # its skills (and the check of skill_mean)
    self.script, self.eps, self.skill_mean, self.name = script, eps, skill_mean, name

  def skill(self, uid: str) -> float:
    return self._staff.skill(uid)

  def __call__(self, observations: Sequence[base.Observation]) -> list[str]:
    s, out = self.script, []
    for obs in observations:
      v = s.visible_facts(obs.conversation.turns)
      if obs.rng.random() < self.eps:
        acts = s.candidate_acts(v)
        act = acts[int(obs.rng.integers(len(acts)))]
      else:
        act = s.staff_act(v, self.skill(obs.uid), obs.rng)
      out.append(s.message(act, obs.conversation.turns, obs.rng))
    return out


class FunctionPolicy:
  """Wraps a per-observation function as a policy (handy for tests and scripted variants)."""

  def __init__(self, fn, name: str = "function"):
    self.fn, self.name = fn, name

  def __call__(self, observations: Sequence[base.Observation]) -> list[str]:
    return [self.fn(o) for o in observations]
