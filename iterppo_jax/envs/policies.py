"""Scripted policies that ship with the simulators: the historical staff, an oracle, random text, and
exploratory behaviour policies (sales: personas and random acts; any domain: the staff trying the domain's
candidate acts) whose logs serve off-policy evaluation.

Each maps a batch of observations (base.Observation) to suggestion texts, like a language model would.
They read only the transcript (never the hidden customer state), so they are policies of the SR MDP.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, NamedTuple, Sequence

import numpy as np

from iterppo_jax.envs import base, sales

_RANDOM_WORDS = (
    "the a you we it is are this that price great new best today now order item store please thanks "
    "really maybe very good nice model color size free fast help want like look find here there what "
    "when how why which can will would should our your their and or but with for from into about").split()


def _conversation_rng(uid: str, salt: int) -> np.random.Generator:
  # Keyed on the conversation id without the '/q<r>' of estimate_q's rollout clones: a persona (or skill)
  # belongs to the conversation and stays the same in every rollout from its states.
  return np.random.default_rng([zlib.crc32(uid.split("/")[0].encode()), salt])


class Script(NamedTuple):
  """A domain's scripted staff, as five functions of its module (sales.py, support.py, ...):

  visible_facts(turns) -> what the transcript reveals; oracle_act(visible) -> the best act;
  staff_act(visible, skill, rng) -> the oracle's act with probability `skill`, else a common mistake;
  business_text(act, rng) -> the act as a templated business message;
  candidate_acts(visible) -> the distinct acts worth trying there, one per act kind and the oracle's among them
  (what a Q-model ranks, and what an exploratory policy tries).
  """
  visible_facts: Callable
  oracle_act: Callable
  staff_act: Callable
  business_text: Callable
  candidate_acts: Callable


def candidate_texts(script: Script, turns: Sequence, rng: np.random.Generator) -> list[str]:
  """One business message per candidate act (`script.candidate_acts`) at the state the transcript `turns` shows.

  The texts a Q-model scores to rank actions at a logged state, in the order of `candidate_acts`.
  """
  return [script.business_text(act, rng) for act in script.candidate_acts(script.visible_facts(turns))]


class StaffPolicy:
  """A population of historical staff: each conversation gets a staff member of some skill.

  Skills follow Beta(mean * 6, (1 - mean) * 6), drawn from the conversation's id and `salt` (so a conversation
  keeps its staff member in every Monte Carlo rollout from its states); each turn the staff member plays
  `script.staff_act`.
  """

  def __init__(self, script: Script, skill_mean: float, salt: int = 17, name: str = "behavior"):
    if not 0.0 < skill_mean < 1.0:
      raise ValueError(f"skill_mean must be in (0, 1) (a Beta mean), got {skill_mean}")
    self.script, self.skill_mean, self.salt, self.name = script, skill_mean, salt, name

  def skill(self, uid: str) -> float:
    k = 6.0
    return float(_conversation_rng(uid, self.salt).beta(self.skill_mean * k, (1 - self.skill_mean) * k))

  def __call__(self, observations: Sequence[base.Observation]) -> list[str]:
    s = self.script
    return [s.business_text(s.staff_act(s.visible_facts(o.conversation.turns), self.skill(o.uid), o.rng), o.rng)
            for o in observations]


class OraclePolicy:
  """The domain's best scripted act at every turn (`script.oracle_act`), read from the transcript alone."""

  name = "oracle"

  def __init__(self, script: Script):
    self.script = script

  def __call__(self, observations: Sequence[base.Observation]) -> list[str]:
    s = self.script
    return [s.business_text(s.oracle_act(s.visible_facts(o.conversation.turns)), o.rng) for o in observations]


def lookup(domain: str, name: str, table: dict[str, Callable[[], base.Policy]]) -> base.Policy:
  """table[name]() with an error that lists the domain's policies."""
  if name not in table:
    raise ValueError(f"unknown {domain} policy {name!r}; expected one of {', '.join(table)}")
  return table[name]()


SALES = Script(sales.visible_facts, sales.oracle_act, sales.staff_act, sales.business_text, sales.candidate_acts)


class SalesBehaviorPolicy(StaffPolicy):
  """The historical business staff of the sales simulator (mistakes: guessing a product, closing early,
  chit-chat, ...)."""

  def __init__(self, skill_mean: float = 0.35, name: str = "behavior"):
    super().__init__(SALES, skill_mean, salt=17, name=name)


class SalesOraclePolicy(OraclePolicy):
  """Asks the need, then the budget, recommends the fitting product, handles objections, then closes."""

  def __init__(self):
    super().__init__(SALES)


class RandomTextPolicy:
  """Random words: a floor that knows nothing of the domain."""

  name = "random"

  def __call__(self, observations: Sequence[base.Observation]) -> list[str]:
    out = []
    for obs in observations:
      n = int(obs.rng.integers(3, 12))
      out.append(" ".join(obs.rng.choice(_RANDOM_WORDS, size=n)).capitalize() + ".")
    return out


# ---- exploration: varied personas and acts, so logs cover many (state, action) pairs (off-policy Q) ----

TONES = ("formal", "casual", "enthusiastic")
# Styling is added around the templated message, never inside it. No opener or closer holds a word the sales
# parser reacts to (sales.parse_business), so the styled text parses to the same act; the greeting rule is
# anchored at the start of a message, so a greeting gets no opener.
_OPENERS = {
    "formal": ("", "Certainly. ", "Thank you for your message. ", "Of course. "),
    "casual": ("", "Sure thing! ", "Okay! ", "Cool. "),
    "enthusiastic": ("", "Absolutely! ", "Oh, fantastic! ", "Great question! "),
}
_CLOSERS = {
    "formal": (" Please let me know if I can assist further.", " I remain at your disposal."),
    "casual": (" Just say the word.", " No pressure at all."),
    "enthusiastic": (" You are going to love it here!", " This is going to be great!"),
}
EMOJIS = ("\U0001F60A", "\U0001F44D", "\U0001F389", "\u2728")  # smiling face, thumbs up, party popper, sparkles
# The dialogue acts of the sales parser; an exploratory act is one of these, uniformly.
ACT_KINDS = ("greet", "ask_need", "ask_budget", "recommend", "discount", "answer", "close", "ask_contact",
             "off_topic")


@dataclasses.dataclass(frozen=True)
class Persona:
  """How one exploratory staff member writes: tone, emoji use, short or long phrasing."""
  tone: str
  emoji: bool
  long: bool


def style_text(text: str, act_kind: str, persona: Persona, rng: np.random.Generator) -> str:
  """`text` (a templated business message for an act of kind `act_kind`) written in `persona`'s style.

  An opener of the tone (none for a greeting), a closing sentence for long phrasing, an emoji at the end.
  """
  opener = "" if act_kind == "greet" else _OPENERS[persona.tone][int(rng.integers(len(_OPENERS[persona.tone])))]
  closer = _CLOSERS[persona.tone][int(rng.integers(len(_CLOSERS[persona.tone])))] if persona.long else ""
  emoji = " " + EMOJIS[int(rng.integers(len(EMOJIS)))] if persona.emoji else ""
  return f"{opener}{text}{closer}{emoji}"


def random_act(v: sales.Visible, rng: np.random.Generator) -> sales.Act:
  """A uniformly random dialogue act; a recommendation is of the stated need (a random category before it)."""
  kind = ACT_KINDS[int(rng.integers(len(ACT_KINDS)))]
  if kind == "recommend":
    category = v.need or sales.CATEGORIES[int(rng.integers(len(sales.CATEGORIES)))]
    return sales.Act("recommend", product=sales.product_for(category, int(rng.integers(len(sales.TIERS)))))
  if kind == "answer":
    return sales.Act("answer", topic=sales.TOPICS[int(rng.integers(len(sales.TOPICS)))])
  return sales.Act(kind)


class ExploratoryPolicy:
  """An exploratory behaviour policy: staff of mixed skill with varied personas, trying random acts.

  Each conversation gets a persona (tone formal | casual | enthusiastic, emoji or not, short or long phrasing)
  and a staff skill ~ Beta(mean * 6, (1 - mean) * 6), both drawn from its id. Each turn it plays a uniformly
  random act (`random_act`) with probability `eps`, else the staff member's act (`sales.staff_act`), and writes
  it in the persona's style. The logs then hold many (state, action) pairs, which is what an off-policy
  evaluation of another policy (qfit 'fqe') needs.
  """

  def __init__(self, eps: float = 0.3, skill_mean: float = 0.35, name: str = "explore"):
    if not 0.0 <= eps <= 1.0:
      raise ValueError(f"eps must be a probability in [0, 1], got {eps}")
    self._staff = StaffPolicy(SALES, skill_mean, salt=29)  # its skills (and the check of skill_mean)
    self.eps, self.skill_mean, self.name = eps, skill_mean, name

  def persona(self, uid: str) -> Persona:
    rng = _conversation_rng(uid, 23)
    return Persona(tone=TONES[int(rng.integers(len(TONES)))], emoji=bool(rng.random() < 0.5),
                   long=bool(rng.random() < 0.5))

  def skill(self, uid: str) -> float:
    return self._staff.skill(uid)

  def __call__(self, observations: Sequence[base.Observation]) -> list[str]:
    out = []
    for obs in observations:
      v = sales.visible_facts(obs.conversation.turns)
      if obs.rng.random() < self.eps:
        act = random_act(v, obs.rng)
      else:
        act = sales.staff_act(v, self.skill(obs.uid), obs.rng)
      out.append(style_text(sales.business_text(act, obs.rng), act.kind, self.persona(obs.uid), obs.rng))
    return out


class ScriptExplorePolicy:
  """A domain's exploratory behaviour policy: its historical staff, trying the domain's candidate acts.

  Each conversation gets a staff skill ~ Beta(mean * 6, (1 - mean) * 6), drawn from its id (as StaffPolicy).
  Each turn it plays a uniformly random act of `script.candidate_acts` with probability `eps`, else the staff
  member's act (`script.staff_act`), in plain templates. The logs then hold many (state, action) pairs, which
  an off-policy evaluation (qfit 'fqe') of another policy needs, in any domain. (Sales keeps its own
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
      out.append(s.business_text(act, obs.rng))
    return out


class NoisyOraclePolicy:
  """The oracle's act with probability 1 - eps, else a uniformly random act (`random_act`); plain templates.

  A fixed, stochastic, transcript-driven (tabular-like) target policy: its Q is what an off-policy evaluation
  on another policy's logs should recover.
  """

  def __init__(self, eps: float = 0.2, name: str = "noisy_oracle"):
    if not 0.0 <= eps <= 1.0:
      raise ValueError(f"eps must be a probability in [0, 1], got {eps}")
    self.eps, self.name = eps, name

  def __call__(self, observations: Sequence[base.Observation]) -> list[str]:
    out = []
    for obs in observations:
      v = sales.visible_facts(obs.conversation.turns)
      act = random_act(v, obs.rng) if obs.rng.random() < self.eps else sales.oracle_act(v)
      out.append(sales.business_text(act, obs.rng))
    return out


class FunctionPolicy:
  """Wraps a per-observation function as a policy (handy for tests and scripted variants)."""

  def __init__(self, fn, name: str = "function"):
    self.fn, self.name = fn, name

  def __call__(self, observations: Sequence[base.Observation]) -> list[str]:
    return [self.fn(o) for o in observations]


def make_sales_policy(name: str, skill_mean: float = 0.35):
  """Looks a shipped sales policy up by name: behavior | oracle | random | explore | noisy_oracle.

  'explore' is the historical staff population (same skill_mean) with personas and random acts
  (ExploratoryPolicy); 'noisy_oracle' the oracle with 20% random acts.
  """
  return lookup("sales", name, {
      "behavior": lambda: SalesBehaviorPolicy(skill_mean), "oracle": SalesOraclePolicy, "random": RandomTextPolicy,
      "explore": lambda: ExploratoryPolicy(skill_mean=skill_mean), "noisy_oracle": NoisyOraclePolicy})


def make_policy(name: str, env_config):
  """The registry's entry point (envs/registry.py): a sales policy for the `env` config section."""
  return make_sales_policy(name, skill_mean=env_config.skill_mean)
