"""The protocol every text environment meets, the simulated business user, and the batched runner.

One environment step is one round of the suggested-response MDP (shared/PAPER.md): the agent sees the
state s_i (rendered text of every earlier customer message, suggestion and sent message), suggests a_i
(text, or '' to abstain), the simulated business user sends m_i (verbatim, edited, rewritten under the
suggestion's influence, or an unrelated message of its own), and the simulated customer answers with c_{i+1}
and an outcome flag o_{i+1} read by the domain's outcome classifier. Episodes end when o = 1, when the
business sends nothing, when the customer stops answering, or after `max_turns` rounds.

A domain (sales.py, ...) subclasses `TextEnv` (the shipped ones `StaffEnv`: a business user drawn from the
historical staff) and supplies the customer, the parser of business messages, the outcome classifier and the
business staff's own writing. This file owns what is common: lock-step batched play of many conversations, the
business user's four behaviours, exact per-conversation seeding (so the logs do not depend on batch size), and
Monte Carlo estimates of the true Q^pi(s, a).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from iterppo_jax import conversation as conv_lib
from iterppo_jax import stats

FEEDBACK_ORDER = ("accept", "edit", "influenced", "reject")
QUALITIES = ("good", "ok", "bad")


@dataclasses.dataclass(frozen=True)
class BusinessUserConfig:
  """How the simulated business user treats a suggestion (the paper's four behaviours).

  mode 'sr': the suggested-response setting; 'direct': the suggestion is sent verbatim (an automated agent,
  the SR MDP's special case), which is how a policy's own quality is measured.
  rates[q] = probabilities of (accept verbatim, accept and edit, reject but rewrite under the suggestion's
  influence, reject and write an unrelated message) for a suggestion of quality q; a persona's
  `assist_trust` scales the two accepting behaviours.
  """
  mode: str = "sr"
  rates: tuple[tuple[float, float, float, float], ...] = (
      (0.70, 0.15, 0.10, 0.05),  # good
      (0.40, 0.20, 0.15, 0.25),  # ok
      (0.04, 0.04, 0.12, 0.80),  # bad
  )
  silent_prob: float = 0.01  # chance, per own message, that the business sends nothing (ends the episode)


@dataclasses.dataclass
class Observation:
  """What a policy sees at a decision point: the state s_i as a record and as text."""
  uid: str
  turn: int  # index of this decision within the conversation (0, 1, ...)
  conversation: conv_lib.Conversation
  text: str
  rng: np.random.Generator  # for scripted policies; deterministic per (seed, conversation, turn)
  # (seed, conversation index, ..., turn): a model policy draws this decision's sample from it, so a
  # conversation plays the same in any batch, on any number of processes (distributed.py)
  key: tuple[int, ...] = ()


class Policy(Protocol):
  """Maps a batch of observations to suggestions (text; '' abstains). A language model fits this."""
  name: str

  def __call__(self, observations: Sequence[Observation]) -> list[str]:
    ...


@dataclasses.dataclass
class Episode:
  """One live conversation: the public record, the hidden world state, and its random streams."""
  uid: str
  record: conv_lib.Conversation
  hidden: Any  # the domain's hidden customer/business state
  rng: np.random.Generator
  seed_key: tuple[int, ...]
  done: bool = False
  true_outcome: int = 0  # what really happened (the classifier's flag may disagree)
  turns_played: int = 0

  def observation(self, max_render_turns: int | None = None) -> Observation:
    key = self.seed_key + (self.turns_played, 7)
    return Observation(uid=self.uid, turn=self.turns_played, conversation=self.record,
                       text=conv_lib.render_state(self.record.turns, max_render_turns, self.record.context),
                       rng=np.random.default_rng(key), key=self.seed_key + (self.turns_played,))


def discounted_targets(record: conv_lib.Conversation, gamma: float) -> list[float]:
  """Monte Carlo Q targets for each decision: sum_{j>i} gamma^{j-i-1} o_j over later customer flags."""
  flags, decisions = [], []
  for t in record.turns:
    if t.role == "customer":
      flags.append(t.flag or 0)
    elif t.role == "suggestion":
      decisions.append(len(flags))  # customer messages seen before this decision
  targets = []
  for seen in decisions:
    g = 0.0
    for j, o in enumerate(flags[seen:]):
      g += (gamma ** j) * o
    targets.append(g)
  return targets


class TextEnv:
  """Base class of the batched text environments. Subclasses implement the `_domain` hooks."""

  domain = "base"

  def __init__(self, business_user: BusinessUserConfig = BusinessUserConfig(), max_turns: int = 10,
               max_render_turns: int | None = None):
    if business_user.mode not in ("sr", "direct"):
      raise ValueError(f"business_user.mode must be 'sr' or 'direct', got {business_user.mode!r}")
    self.business_user = business_user
    self.max_turns = max_turns
    self.max_render_turns = max_render_turns

  @classmethod
  def from_config(cls, env_config, **kwargs) -> "TextEnv":
    """The environment from the `env` config section's common keys (business_user, max_turns, max_render_turns)
    and the domain's own keyword arguments."""
    return cls(business_user=BusinessUserConfig(mode=env_config.business_user), max_turns=env_config.max_turns,
               max_render_turns=env_config.max_render_turns, **kwargs)

  # ---- domain hooks ----
  def new_hidden(self, rng: np.random.Generator) -> Any:
    """Draws the hidden state at reset (customer profile, business persona)."""
    raise NotImplementedError

  def opening(self, hidden: Any, rng: np.random.Generator) -> str:
    raise NotImplementedError

  def customer_reply(self, hidden: Any, business_text: str, rng: np.random.Generator
                     ) -> tuple[str | None, int]:
    """Updates `hidden` after a sent message; returns (customer text or None if they stop, true o)."""
    raise NotImplementedError

  def classify_outcome(self, customer_text: str) -> int:
    """The outcome classifier over customer text (as in production): o_i in {0, 1}."""
    raise NotImplementedError

  def agent_context(self, hidden: Any) -> str:
    """What the agent knows privately about this conversation (Conversation.context): '' by default; a domain
    whose agent has its own information (a price floor, the customer's account) returns it here. Every state
    shows it, right before the agent's turn, and no truncation drops it."""
    del hidden
    return ""

  # Every end_reason this domain logs (conversation.END_REASONS plus its own, e.g. a negotiation's "no_deal");
  # summaries report the share of each as end/<reason>.
  end_reasons: tuple[str, ...] = conv_lib.END_REASONS

  def end_reason(self, hidden: Any) -> str:
    """Why the conversation ended when customer_reply returned no text: "customer_left" unless the domain says
    otherwise (one of its end_reasons, e.g. "no_deal" for a declined offer)."""
    del hidden
    return "customer_left"

  def judge(self, hidden: Any, record: conv_lib.Conversation, suggestion: str) -> str:
    """The business user's view of a suggestion's quality: 'good' | 'ok' | 'bad'."""
    raise NotImplementedError

  def staff_message(self, hidden: Any, record: conv_lib.Conversation, rng: np.random.Generator) -> str:
    """The business user's own message (its persona's skill), unrelated to any suggestion."""
    raise NotImplementedError

  def edit(self, suggestion: str, rng: np.random.Generator) -> str:
    """A light edit that keeps the suggestion's meaning."""
    raise NotImplementedError

  def rewrite(self, hidden: Any, suggestion: str, rng: np.random.Generator) -> str:
    """The business user's own words for what the suggestion proposed (rejected but influenced)."""
    raise NotImplementedError

  def metadata(self, hidden: Any) -> dict[str, Any]:
    """JSON-serialisable ground truth to keep in the log (profile, persona)."""
    return {}

  def restore(self, record: conv_lib.Conversation, n_turns: int) -> Episode:
    """Rebuilds the live episode at turn `n_turns` of a logged conversation of this domain (for true Q)."""
    raise NotImplementedError

  # ---- helpers for the domains ----
  def logged_profile(self, record: conv_lib.Conversation) -> dict:
    """The `metadata.profile` a record of this domain carries (what `restore` rebuilds `hidden` from).

    Raises ValueError for another domain's record or one without a profile (a production log).
    """
    name = type(self).__name__
    if record.domain != self.domain:
      raise ValueError(f"record {record.id} is a {record.domain!r} conversation; it was not logged by {name}")
    prof = record.metadata.get("profile")
    if not isinstance(prof, dict):
      raise ValueError(f"record {record.id} has no metadata.profile; it was not logged by {name}")
    return prof

  def restored_episode(self, record: conv_lib.Conversation, n_turns: int, hidden: Any) -> Episode:
    """The live episode at turn `n_turns` of `record`, whose hidden state the domain has replayed to `hidden`.

    The record is cut to its first `n_turns` turns (outcome unknown yet); the random stream is re-seeded from
    the record's (seed, index) and `n_turns`, so a restored state supports Monte Carlo rollouts.
    """
    if not 0 <= n_turns <= len(record.turns):
      raise ValueError(f"n_turns must be in [0, {len(record.turns)}] for record {record.id}, got {n_turns}")
    turns = record.turns[:n_turns]
    key = (int(record.metadata.get("seed", 0)), int(record.metadata.get("index", 0)))
    rec = dataclasses.replace(record, turns=list(turns), outcome=0.0, end_reason="max_turns",
                              metadata=dict(record.metadata))
    return Episode(uid=record.id, record=rec, hidden=hidden, rng=np.random.default_rng(key + (n_turns,)),
                   seed_key=key, turns_played=sum(1 for t in turns if t.role == "suggestion"))

  # ---- common machinery ----
  def reset(self, n: int, seed: int, start: int = 0, policy_name: str = "unknown") -> list[Episode]:
    """Starts conversations start..start+n-1 of stream `seed`; each is seeded on its own index."""
    episodes = []
    for idx in range(start, start + n):
      key = (int(seed), int(idx))
      rng = np.random.default_rng(key)
      hidden = self.new_hidden(rng)
      text = self.opening(hidden, rng)
      flag = self.classify_outcome(text)
      record = conv_lib.Conversation(
          id=f"{self.domain}-{seed}-{idx:06d}", domain=self.domain, policy=policy_name,
          turns=[conv_lib.Turn("customer", text, flag=flag)], outcome=0.0,
          metadata={"seed": int(seed), "index": int(idx), **self.metadata(hidden)},
          context=self.agent_context(hidden))
      episodes.append(Episode(uid=record.id, record=record, hidden=hidden, rng=rng, seed_key=key))
    return episodes

  def _business_response(self, ep: Episode, suggestion: str) -> tuple[str | None, str]:
    """The business user's message and feedback for one suggestion ('' = abstain)."""
    bu, rng = self.business_user, ep.rng
    if self.business_user.mode == "direct":
      return (suggestion or None), ("accept" if suggestion else "none")
    if suggestion:
      quality = self.judge(ep.hidden, ep.record, suggestion)
      rates = np.asarray(bu.rates[QUALITIES.index(quality)], dtype=np.float64)
      trust = float(getattr(ep.hidden, "assist_trust", 1.0))
      rates[:2] *= trust
      rates /= rates.sum()
      feedback = FEEDBACK_ORDER[int(rng.choice(4, p=rates))]
      if feedback == "accept":
        return suggestion, feedback
      if feedback == "edit":
        return self.edit(suggestion, rng), feedback
      if feedback == "influenced":
        return self.rewrite(ep.hidden, suggestion, rng), feedback
    else:
      feedback = "none"
    if rng.random() < bu.silent_prob:
      return None, feedback
    return self.staff_message(ep.hidden, ep.record, rng), feedback

  def step(self, episodes: Sequence[Episode], suggestions: Sequence[str]) -> None:
    """Advances each (not done) episode by one round with its suggestion."""
    if len(episodes) != len(suggestions):
      raise ValueError(f"{len(episodes)} episodes but {len(suggestions)} suggestions")
    for ep, suggestion in zip(episodes, suggestions):
      if ep.done:
        continue
      suggestion = (suggestion or "").strip()
      if suggestion == conv_lib.ABSTAIN_TEXT:
        suggestion = ""
      turns = ep.record.turns
      turns.append(conv_lib.Turn("suggestion", suggestion, abstain=not suggestion))
      sent, feedback = self._business_response(ep, suggestion)
      ep.turns_played += 1
      if sent is None:
        ep.done, ep.record.end_reason = True, "business_silent"
        continue
      turns.append(conv_lib.Turn("business", sent, feedback=feedback))
      reply, truth = self.customer_reply(ep.hidden, sent, ep.rng)
      ep.true_outcome = max(ep.true_outcome, truth)
      if reply is None:
        ep.done, ep.record.end_reason = True, self.end_reason(ep.hidden)
        continue
      flag = self.classify_outcome(reply)
      turns.append(conv_lib.Turn("customer", reply, flag=flag))
      if flag:
        ep.done, ep.record.end_reason, ep.record.outcome = True, "outcome", 1.0
      elif truth:  # the classifier missed a real purchase: the customer has what they wanted and goes
        ep.done, ep.record.end_reason = True, "customer_left"
      elif ep.turns_played >= self.max_turns:
        ep.done, ep.record.end_reason = True, "max_turns"
    for ep in episodes:
      if ep.done:
        ep.record.metadata["true_outcome"] = ep.true_outcome

  def run(self, episodes: list[Episode], policy: Policy | Callable[[Sequence[Observation]], list[str]],
          first_suggestions: Sequence[str] | None = None) -> list[Episode]:
    """Plays every episode to its end in lock-step, asking `policy` for all live ones at once.

    `first_suggestions[i]`, when given, is sent as episodes[i]'s next suggestion instead of asking `policy`.
    """
    if first_suggestions is not None and len(first_suggestions) != len(episodes):
      raise ValueError(f"{len(episodes)} episodes but {len(first_suggestions)} first suggestions")
    first = True
    while True:
      live = [ep for ep in episodes if not ep.done]
      if not live:
        return episodes
      if first and first_suggestions is not None:
        # By position, not by uid: states of one conversation share its uid (estimate_q's clones do too).
        suggestions = [s for ep, s in zip(episodes, first_suggestions) if not ep.done]
      else:
        suggestions = list(policy([ep.observation(self.max_render_turns) for ep in live]))
      first = False
      self.step(live, suggestions)

  def play(self, policy, n: int, seed: int, start: int = 0, batch_size: int = 1024,
           progress: Callable | None = None) -> list[conv_lib.Conversation]:
    """Plays n conversations in batches and returns their records (same seed -> same records)."""
    name = getattr(policy, "name", "unknown")
    out = []
    starts = range(start, start + n, batch_size)
    for s in (progress(starts) if progress else starts):
      eps = self.reset(min(batch_size, start + n - s), seed, start=s, policy_name=name)
      out.extend(ep.record for ep in self.run(eps, policy))
    return out

  def estimate_q(self, episodes: Sequence[Episode], suggestions: Sequence[str], policy, gamma: float,
                 n_rollouts: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Monte Carlo Q^pi(s, a): from each live episode's current state, send `a`, then follow `policy`.

    Returns (mean, standard error) of the discounted return sum_{j>=1} gamma^{j-1} o_{i+j}, where the
    outcome is the classifier's flag as logged (what the Q-model is trained on). Episodes are not changed.
    """
    values = self.rollout_returns(episodes, suggestions, policy, gamma, n_rollouts, seed)
    return values.mean(1), values.std(1, ddof=1) / np.sqrt(n_rollouts)

  def rollout_returns(self, episodes: Sequence[Episode], suggestions: Sequence[str], policy, gamma: float,
                      n_rollouts: int = 32, seed: int = 0) -> np.ndarray:
    """[N, n_rollouts] the discounted returns of estimate_q's rollouts, one row per (episode, suggestion).

    Rollout r of a state is seeded by the state and r alone, never by the suggestion: two suggestions at one state
    share their r-th random stream (the customer's, the business user's and a model policy's, whose keys fold the
    episode's seed_key), so the difference of their Q estimates is free of the noise they share (common random
    numbers; q_ranking.ActionSet reads the truth's precision from these paired returns).
    """
    clones, owners = [], []
    for i, ep in enumerate(episodes):
      if ep.done:
        raise ValueError(f"episode {ep.uid} has ended; Q is defined at live states only")
      for r in range(n_rollouts):
        c = copy.deepcopy(ep)
        c.uid = f"{ep.uid}/q{r}"
        c.seed_key = ep.seed_key + (10_000 + ep.turns_played, int(seed), r)
        c.rng = np.random.default_rng(c.seed_key)
        clones.append(c)
        owners.append(i)
    n_decisions = [len(c.record.agent_steps()) for c in clones]
    self.run(clones, policy, first_suggestions=[s for s in suggestions for _ in range(n_rollouts)])
    values = np.zeros((len(episodes), n_rollouts))
    for k, (c, i) in enumerate(zip(clones, owners)):
      values[i, k % n_rollouts] = discounted_targets(c.record, gamma)[n_decisions[k]]
    return values



def check_skill_mean(skill_mean: float) -> None:
  """Refuses a mean staff skill outside (0, 1), where staff_skill's Beta is undefined."""
  if not 0.0 < skill_mean < 1.0:
    raise ValueError(f"skill_mean must lie strictly between 0 and 1 (a Beta mean), got {skill_mean}")


def tick_patience(state: Any, text: str, per_turn: float, repeated_penalty: float) -> None:
  """The customer's patience clock, shared by the domains' `transition`s: one more turn, a little annoyance for
  every message and more for a message that repeats the last one (case and surrounding space ignored).

  `state` has `turn`, `annoyance` and `last_business` (the previous business message).
  """
  state.turn += 1
  state.annoyance += per_turn
  if text.strip().lower() == state.last_business.strip().lower():
    state.annoyance += repeated_penalty
  state.last_business = text


def staff_skill(rng: np.random.Generator, skill_mean: float) -> float:
  """One historical staff member's skill: Beta(mean * 6, (1 - mean) * 6) around `skill_mean`, one draw of `rng`.

  The population of every shipped domain: the business user's persona (drawn in a StaffEnv's new_hidden) and
  the staff policy (policies.StaffPolicy).
  """
  k = 6.0
  return float(rng.beta(skill_mean * k, (1 - skill_mean) * k))


class StaffEnv(TextEnv):
  """A TextEnv whose business user is one of the historical staff, of skill staff_skill(rng, skill_mean) drawn
  with the hidden state; a domain sets its own default `skill_mean` (its config's env.skill_mean) on its class.

  The business user writes with the domain's script, so a domain gets its three writing hooks from here by
  setting, on its class: `script` (its policies.Script: visible_facts, staff_act, business_text),
  `read_business` (business text -> act: the domain's parser) and the words of a light edit (`edit_prefixes`,
  `edit_suffixes`). The hidden state must carry `skill` (the staff member's; new_hidden draws it).
  """

  skill_mean: float
  script: Any = None  # the domain's policies.Script
  read_business: Callable[[str], Any]  # a staticmethod of the domain's parse_business
  edit_prefixes: tuple[str, ...] = ("Sure! ", "Of course. ", "")
  edit_suffixes: tuple[str, ...] = ("", " Let me know.")

  def __init__(self, *args, skill_mean: float | None = None, **kwargs):
    super().__init__(*args, **kwargs)
    if skill_mean is not None:
      self.skill_mean = skill_mean
    check_skill_mean(self.skill_mean)

  def staff_message(self, hidden: Any, record: conv_lib.Conversation, rng: np.random.Generator) -> str:
    """The staff member's own act at this state (script.staff_act at hidden.skill), in the domain's words."""
    s = self.script
    return s.business_text(s.staff_act(s.visible_facts(record.turns), hidden.skill, rng), rng)

  def edit(self, suggestion: str, rng: np.random.Generator) -> str:
    """The suggestion with one of the edit prefixes before it and one of the suffixes after it."""
    prefix = self.edit_prefixes[int(rng.integers(len(self.edit_prefixes)))]
    suffix = self.edit_suffixes[int(rng.integers(len(self.edit_suffixes)))]
    return f"{prefix}{suggestion}{suffix}".strip()

  def rewrite(self, hidden: Any, suggestion: str, rng: np.random.Generator) -> str:
    """The act the suggestion proposed (read_business, then rewrite_act), in the staff member's templates."""
    return self.script.business_text(self.rewrite_act(hidden, self.read_business(suggestion)), rng)

  def rewrite_act(self, hidden: Any, act: Any) -> Any:
    """What the staff member makes of a rejected suggestion's act before writing it: the act itself, unless the
    domain says otherwise."""
    del hidden
    return act


def summarize(records: Sequence[conv_lib.Conversation]) -> dict[str, float]:
  """Conversion with a 95% Wilson interval, mean turns, and the business user's behaviour rates."""
  n = len(records)
  wins = sum(1 for r in records if r.outcome >= 1)
  lo, hi = stats.wilson_interval(wins, n)
  feedback = [t.feedback for r in records for t in r.turns if t.role == "business"]
  suggestions = [t for r in records for t in r.turns if t.role == "suggestion"]
  out = {"conversations": n, "conversion": wins / max(n, 1), "conversion_lo": lo, "conversion_hi": hi,
         "true_conversion": sum(r.metadata.get("true_outcome", 0) for r in records) / max(n, 1),
         "mean_turns": float(np.mean([len(r.agent_steps()) for r in records])) if n else 0.0,
         "abstain_rate": (sum(t.abstain for t in suggestions) / len(suggestions)) if suggestions else 0.0}
  shown = [f for f in feedback if f != "none"]
  for f in FEEDBACK_ORDER:
    out[f"{f}_rate"] = shown.count(f) / len(shown) if shown else 0.0
  domain_reasons = sorted({r.end_reason for r in records} - set(conv_lib.END_REASONS))  # e.g. no_deal
  for reason in conv_lib.END_REASONS + tuple(domain_reasons):
    out[f"end/{reason}"] = sum(r.end_reason == reason for r in records) / max(n, 1)
  return out
