"""The e-commerce suggested-response simulator: the paper's motivating case (a purchase, 0/1).

A customer with a hidden profile (need, budget, price sensitivity, patience, trust, a question they will
ask) talks to a store. Business messages are read by a deterministic parser into dialogue acts; the
customer answers in templated but varied language, reveals the need and budget only when asked, objects to
prices above budget, asks a question once they like a product, and leaves when annoyed. Credit assignment
matters: asking the need and budget early is what makes a later recommendation fit, and closing before the
customer is ready annoys them (DESIGN.md, "The sales simulator, at minimum").

The customer's state moves deterministically with the parsed acts; randomness only picks surface text and
whether a ready customer buys when asked. So the hidden state at any turn of a log is a replay of the sent
messages from the profile in the record's metadata (`restore`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

from iterppo_jax import conversation as conv_lib
from iterppo_jax.envs import base, policies

CATEGORIES = ("laptop", "phone", "smartwatch", "camera", "tablet")
TIERS = ("budget", "mid-range", "premium")
# (name, price) per category and tier; a product's tier is its index.
CATALOG = {
    "laptop": (("Nimbus 13", 499), ("Nimbus Pro", 899), ("Nimbus Ultra", 1499)),
    "phone": (("Pixo Lite", 249), ("Pixo 8", 599), ("Pixo Max", 999)),
    "smartwatch": (("Echo Band", 79), ("Echo Watch", 199), ("Echo Titan", 449)),
    "camera": (("Lumo Snap", 299), ("Lumo Z5", 799), ("Lumo Cine", 1899)),
    "tablet": (("Slate Go", 199), ("Slate Air", 499), ("Slate Pro", 899)),
}
PRODUCTS = {name.lower(): (cat, tier, name, price)
            for cat, items in CATALOG.items() for tier, (name, price) in enumerate(items)}
TOPICS = ("warranty", "shipping", "returns")
BUDGET_LIMITS = {cat: tuple(int(price * 1.1) for _, price in items) for cat, items in CATALOG.items()}


# ---- the business-message parser (dialogue acts) ----

@dataclasses.dataclass(frozen=True)
class Act:
  kind: str  # greet ask_need ask_budget recommend discount answer close ask_contact off_topic
  product: str | None = None  # lower-case product name for `recommend`
  topic: str | None = None  # for `answer`


_PATTERNS = (
    ("discount", re.compile(r"\b(discount|coupon|% off|deal)\b")),
    ("answer", re.compile(r"\b(warranty|shipping|ships|return it|returns)\b")),
    ("close", re.compile(r"\b(place the order|buy it|order it|check ?out|purchase it)\b")),
    ("ask_budget", re.compile(r"\b(budget|price range|how much .*spend)\b")),
    ("ask_need", re.compile(r"\b(looking for|help you find|what kind of|what do you need)\b")),
    ("ask_contact", re.compile(r"\b(email|phone number|contact details)\b")),
    ("greet", re.compile(r"^(hi|hello|hey|welcome)\b")),
)
_TOPIC_WORDS = {"warranty": ("warranty",), "shipping": ("shipping", "ships"), "returns": ("return",)}


def parse_business(text: str) -> Act:
  """Reads a business message into one dialogue act (first matching rule wins; products first)."""
  low = text.lower().strip()
  if not low:
    return Act("off_topic")
  for name in PRODUCTS:
    if name in low and not re.search(r"\b(discount|coupon|% off)\b", low):
      return Act("recommend", product=name)
  for kind, pat in _PATTERNS:
    if pat.search(low):
      if kind == "answer":
        topic = next(t for t, words in _TOPIC_WORDS.items() if any(w in low for w in words))
        return Act(kind, topic=topic)
      return Act(kind)
  return Act("off_topic")


# ---- the hidden state ----

@dataclasses.dataclass
class SalesState:
  # profile, drawn at reset and logged in metadata
  need: str
  budget: int  # tier index the customer is willing to pay for
  price_sensitivity: float
  patience: float  # annoyance level at which the customer leaves
  trust: float
  question: str  # the topic they ask about once they like a product
  opens_with_need: bool
  skill: float  # the business user's own skill (its persona) ...
  assist_trust: float  # ... and how readily it accepts suggestions
  # dynamic state
  need_known: bool = False
  budget_known: bool = False
  annoyance: float = 0.0
  product: str | None = None  # last recommended product (lower-case name)
  fit: float = 0.0  # how well that product fits: 1 exact, 0.6 cheaper, 0 wrong
  objection: str | None = None  # 'price' | 'deal' | 'question' pending
  question_done: bool = False
  last_business: str = ""
  turn: int = 0


def profile_of(state: SalesState) -> dict[str, Any]:
  fields = ("need", "budget", "price_sensitivity", "patience", "trust", "question", "opens_with_need",
            "skill", "assist_trust")
  return {f: getattr(state, f) for f in fields}


# ---- customer language ----

_OPEN_VAGUE = ("Hi, I'm just browsing.", "Hello, can you help me?", "Hi there.", "Hey, I have a question.")
_OPEN_NEED = ("Hi, I'm looking for a new {need}.", "Hello, I need a {need}.", "Hi, I want to buy a {need}.")
_SAY_NEED = ("I'm looking for a {need}.", "I need a new {need}.", "A {need}, please.")
_SAY_BUDGET = ("I'd like to stay under ${limit}.", "My budget is about ${limit}.", "Up to ${limit} or so.")
_NO_BUDGET_YET = ("Depends on what you have.", "Not sure yet, what do you suggest?")
_REPEAT = ("I already told you that.", "As I said before.")
_WRONG = ("That's not what I'm after, I want a {need}.", "I'm not interested in that, I need a {need}.")
_TOO_PRICEY = ("That's more than I want to spend.", "Hmm, that's too expensive for me.")
_WAY_TOO_PRICEY = ("That's way over my budget.", "No way, far too expensive.")
_CHEAPER = ("Okay, but is there anything better?", "That looks a bit basic.")
_LIKE = ("That looks nice.", "Sounds good.", "I like that one.")
_DEAL = ("Is there any deal on it?", "Can you do a better price?")
_ASK = {"warranty": ("Does it come with a warranty?", "What about the warranty?"),
        "shipping": ("How long does shipping take?", "Do you ship quickly?"),
        "returns": ("Can I return it if I don't like it?", "What is your return policy?")}
_THANKS = ("Great, thanks.", "Good to know.", "Perfect, thank you.")
_DISCOUNT_OK = ("With the discount that works for me.", "Okay, that price is fine.")
_DISCOUNT_MEH = ("Nice, but I haven't decided on anything yet.", "Okay.")
_NOT_READY = ("I'm not ready to buy.", "Slow down, I haven't decided.", "No, not yet.")
_THINK = ("Let me think about it.", "Maybe, I'm not sure yet.")
_BUY = ("Great, I'll take it! Placing the order now.", "Yes, I'll buy it. Ordering now.",
        "Deal, I'm buying it now.")
_CONFUSED = ("Sorry, what do you mean?", "I don't follow.", "Okay...?")
_NO_CONTACT = ("I'd rather not share that.", "Why do you need that?")

_BUY_PATTERN = re.compile(r"\b(i'll take it|i'll buy it|i'm buying it|placing the order|ordering now)\b")


def _pick(rng: np.random.Generator, options, **fmt) -> str:
  return options[int(rng.integers(len(options)))].format(**fmt)


# ---- the business staff's language (used by scripted policies and the simulated business user) ----

BUSINESS_TEMPLATES = {
    "greet": ("Hi there! Welcome to our store.", "Hello and welcome!"),
    "ask_need": ("Hi! What are you looking for today?", "What can I help you find?",
                 "What kind of product do you need?"),
    "ask_budget": ("What budget do you have in mind?", "What price range works for you?"),
    "recommend": ("I recommend the {name} for ${price}.", "The {name} at ${price} would suit you well.",
                  "You might like the {name}, it is ${price}."),
    "discount": ("I can offer you a 10% discount on it.", "Good news: there is a 10% discount today."),
    "answer/warranty": ("It comes with a two-year warranty.", "The warranty covers two years."),
    "answer/shipping": ("Shipping is free and takes two days.", "It ships free within two days."),
    "answer/returns": ("You can return it within 30 days.", "Free returns for 30 days."),
    "close": ("Shall I place the order for you?", "Would you like to buy it now?",
              "Ready to check out?"),
    "ask_contact": ("Could you share your email address?", "Can I have your phone number?"),
    "off_topic": ("How is your day going?", "Nice weather today, isn't it?", "Have you seen our blog?"),
}


def business_text(act: Act, rng: np.random.Generator) -> str:
  """A templated business message expressing `act`."""
  if act.kind == "recommend":
    _, _, name, price = PRODUCTS[act.product]
    return _pick(rng, BUSINESS_TEMPLATES["recommend"], name=name, price=price)
  key = f"answer/{act.topic}" if act.kind == "answer" else act.kind
  return _pick(rng, BUSINESS_TEMPLATES[key])


def product_for(category: str, tier: int) -> str:
  return CATALOG[category][tier][0].lower()


# ---- what a reader of the transcript can know (used by scripted policies and the business user) ----

@dataclasses.dataclass
class Visible:
  need: str | None = None
  budget: int | None = None  # tier index implied by the stated limit
  product: str | None = None  # last product the business sent
  objection: str | None = None  # the customer's pending objection: price | way_price | deal | question
  topic: str | None = None
  liked: bool = False
  discounted: bool = False
  last_business_act: str | None = None
  n_business: int = 0


def visible_facts(turns: list[conv_lib.Turn]) -> Visible:
  """Reads need, budget, pending objections from the transcript text alone."""
  v = Visible()
  for t in turns:
    low = t.text.lower()
    if t.role == "business":
      act = parse_business(t.text)
      v.last_business_act, v.n_business = act.kind, v.n_business + 1
      if act.kind == "recommend":
        v.product, v.liked, v.discounted, v.objection = act.product, False, False, None
      elif act.kind == "discount":
        v.discounted = True
      elif act.kind == "answer" and v.objection == "question" and act.topic == v.topic:
        v.objection = None
    elif t.role == "customer":
      for cat in CATEGORIES:
        if re.search(rf"\b{cat}s?\b", low):
          v.need = cat
      m = re.search(r"\$(\d+)", low)
      if m and v.need is not None:
        limit = int(m.group(1))
        v.budget = max([i for i, lim in enumerate(BUDGET_LIMITS[v.need]) if lim <= limit] or [0])
      if any(s.lower() in low for s in _WAY_TOO_PRICEY):
        v.objection = "way_price"
      elif any(s.lower() in low for s in _TOO_PRICEY):
        v.objection = "price"
      elif any(s.lower() in low for s in _DEAL):
        v.objection = "deal"
      elif any(s.lower() in low for opts in _ASK.values() for s in opts):
        v.objection = "question"
        v.topic = next(tp for tp, opts in _ASK.items() if any(s.lower() in low for s in opts))
      elif any(s.lower() in low for s in _DISCOUNT_OK + _THANKS):
        v.objection = None
      if any(s.lower() in low for s in _LIKE + _DISCOUNT_OK + _THANKS):
        v.liked = True
  return v


def oracle_act(v: Visible) -> Act:
  """The best next act given what the transcript shows (the oracle's strategy)."""
  if v.need is None:
    return Act("ask_need")
  if v.budget is None:
    return Act("ask_budget")
  best = product_for(v.need, v.budget)
  if v.product != best and v.objection != "price":
    return Act("recommend", product=best)
  if v.objection == "question":
    return Act("answer", topic=v.topic)
  if v.objection in ("price", "deal") and not v.discounted:
    return Act("discount")
  return Act("close")


# ---- a dialogue-state tracker: what a Q-model with few free parameters reads (qfit.view=dialogue_state) ----

def dialogue_state(turns) -> tuple:
  """The transcript's state as a small key: need stated, budget stated, pending objection, liked, a product shown.

  Read from the transcript text alone (visible_facts), as a production state tracker reads its logs.
  """
  v = visible_facts(turns)
  return (v.need is not None, v.budget is not None, v.objection, v.liked, v.product is not None)


def act_key(turns, text: str) -> tuple:
  """A suggestion's act and, for a recommendation, its fit to what is known (the customer reacts to that); for an
  answer, whether it answers the pending question. `text` '' (or conversation.ABSTAIN_TEXT) is abstaining."""
  act = parse_business("" if text == conv_lib.ABSTAIN_TEXT else text)
  v = visible_facts(turns)
  if act.kind == "recommend":
    category, tier, _, _ = PRODUCTS[act.product]
    fit = ("guess" if v.need is None else "other category" if category != v.need
           else "tier unknown" if v.budget is None else tier - v.budget)
    return act.kind, fit
  if act.kind == "answer":
    return act.kind, v.objection == "question" and act.topic == v.topic
  return (act.kind,)


# ---- the environment ----

class SalesEnv(base.StaffEnv):
  """Sales suggested-response simulator (see module docstring). Batched via base.TextEnv."""

  domain = "sales"
  skill_mean = 0.35
  read_business = staticmethod(parse_business)  # the business user's writing: base.StaffEnv
  edit_prefixes = ("Sure! ", "Of course. ", "Great question. ", "")
  edit_suffixes = ("", " :)", " Let me know.")

  def new_hidden(self, rng):
    return SalesState(
        need=CATEGORIES[int(rng.integers(len(CATEGORIES)))],
        budget=int(rng.choice(3, p=[0.35, 0.4, 0.25])),
        price_sensitivity=float(rng.uniform()),
        patience=float(rng.uniform(2.5, 5.0)),
        trust=float(rng.uniform(0.2, 0.7)),
        question=TOPICS[int(rng.integers(len(TOPICS)))],
        opens_with_need=bool(rng.random() < 0.3),
        skill=base.staff_skill(rng, self.skill_mean),
        assist_trust=float(rng.uniform(0.6, 1.2)))

  def metadata(self, hidden):
    return {"profile": profile_of(hidden)}

  def opening(self, s: SalesState, rng):
    if s.opens_with_need:
      s.need_known = True
      return _pick(rng, _OPEN_NEED, need=s.need)
    return _pick(rng, _OPEN_VAGUE)

  def classify_outcome(self, customer_text: str) -> int:
    return int(bool(_BUY_PATTERN.search(customer_text.lower())))

  # -- the customer --
  def transition(self, s: SalesState, text: str) -> str:
    """Deterministic state update for a sent message; returns the kind of reply (a template key)."""
    act = parse_business(text)
    base.tick_patience(s, text, per_turn=0.25, repeated_penalty=1.0)  # every turn costs a little patience
    kind = act.kind
    if kind == "greet":
      if s.turn == 1:
        s.trust += 0.05
        return "vague" if not s.need_known else "say_need"
      s.annoyance += 0.5
      return "confused"
    if kind == "ask_need":
      if s.need_known:
        s.annoyance += 0.75
        return "repeat_need"
      s.need_known, s.trust = True, s.trust + 0.15  # feeling listened to is what builds trust
      return "say_need"
    if kind == "ask_budget":
      if not s.need_known:
        s.annoyance += 0.3
        return "no_budget"
      if s.budget_known:
        s.annoyance += 0.75
        return "repeat_budget"
      s.budget_known, s.trust = True, s.trust + 0.05
      return "say_budget"
    if kind == "recommend":
      cat, tier, _, _ = PRODUCTS[act.product]
      s.product, s.objection = act.product, None
      if cat != s.need:
        s.fit, s.annoyance, s.trust = 0.0, s.annoyance + 0.75, s.trust - 0.1
        s.need_known = True
        return "wrong"
      if tier > s.budget + 1:
        s.fit, s.objection = 0.0, "way_price"
        s.annoyance, s.trust = s.annoyance + 0.5, s.trust - 0.15
        return "way_too_pricey"
      if tier == s.budget + 1:
        s.fit, s.objection, s.trust = 0.8, "price", s.trust - 0.05
        return "too_pricey"
      if tier < s.budget:
        s.fit = 0.5
        return "cheaper"
      s.fit, s.trust = 1.0, s.trust + 0.05
      if s.price_sensitivity > 0.7:
        s.objection = "deal"
        return "deal"
      if not s.question_done:
        s.objection = "question"
        return "ask"
      return "like"
    if kind == "discount":
      if s.objection in ("price", "deal"):
        s.objection, s.fit, s.trust = None, 1.0 if s.objection == "deal" else 0.9, s.trust + 0.1
        if not s.question_done and s.fit >= 0.9:
          s.objection = "question"
          return "discount_ok_ask"
        return "discount_ok"
      s.annoyance += 0.25
      return "discount_meh"
    if kind == "answer":
      if s.objection == "question" and act.topic == s.question:
        s.objection, s.question_done, s.trust = None, True, s.trust + 0.15
        return "thanks"
      s.annoyance += 0.5
      return "confused"
    if kind == "close":
      if s.product is not None and s.fit >= 0.5 and s.objection is None:
        return "ready"
      s.annoyance, s.trust = s.annoyance + 1.25, s.trust - 0.1
      return "not_ready"
    if kind == "ask_contact":
      s.annoyance += 0.5
      return "no_contact"
    s.annoyance += 1.0
    return "confused"

  def buy_probability(self, s: SalesState) -> float:
    p = 0.15 + 0.85 * s.trust - 0.1 * s.annoyance
    return float(np.clip(p * (1.0 if s.fit >= 0.9 else 0.5), 0.02, 0.97))

  def customer_reply(self, s: SalesState, business_text: str, rng):
    kind = self.transition(s, business_text)
    if kind == "ready":
      if rng.random() < self.buy_probability(s):
        return _pick(rng, _BUY), 1
      s.annoyance += 0.5
      kind = "think"
    if s.annoyance >= s.patience:
      return None, 0  # the customer stops answering
    need = s.need
    limit = BUDGET_LIMITS[need][s.budget]
    texts = {
        "vague": _OPEN_VAGUE[1:2] + _NO_BUDGET_YET[1:], "say_need": _SAY_NEED, "repeat_need": _REPEAT,
        "no_budget": _NO_BUDGET_YET, "repeat_budget": _REPEAT, "say_budget": _SAY_BUDGET,
        "wrong": _WRONG, "way_too_pricey": _WAY_TOO_PRICEY, "too_pricey": _TOO_PRICEY,
        "cheaper": _CHEAPER, "deal": _DEAL, "ask": _ASK[s.question], "like": _LIKE,
        "discount_ok": _DISCOUNT_OK, "discount_meh": _DISCOUNT_MEH, "thanks": _THANKS,
        "not_ready": _NOT_READY, "think": _THINK, "no_contact": _NO_CONTACT, "confused": _CONFUSED,
    }
    if kind == "discount_ok_ask":
      return _pick(rng, _DISCOUNT_OK) + " " + _pick(rng, _ASK[s.question]), 0
    return _pick(rng, texts[kind], need=need, limit=limit), 0

  def restore(self, record: conv_lib.Conversation, n_turns: int) -> base.Episode:
    """Rebuilds the live episode at turn `n_turns` of a logged sales conversation (for true Q).

    The hidden state is a replay of the sent business messages from the logged profile; the episode's
    random stream is re-seeded from the record, so a restored state supports Monte Carlo rollouts.
    """
    self.logged_profile(record)  # this domain's record, with a profile
    prof = record.metadata.get("profile")
    if prof is None:
      raise ValueError(f"record {record.id} has no metadata.profile; it was not logged by SalesEnv")
    s = SalesState(**prof)
    turns = record.turns[:n_turns]
    if s.opens_with_need:
      s.need_known = True
    for t in turns:
      if t.role == "business":
        kind = self.transition(s, t.text)
        if kind == "ready":
          s.annoyance += 0.5  # the logged conversation went on, so the customer did not buy then
    return self.restored_episode(record, n_turns, s)

  # -- the business user --
  def judge(self, s: SalesState, record, suggestion: str) -> str:
    act = parse_business(suggestion)
    if act.kind == "off_topic" or suggestion.strip().lower() == s.last_business.strip().lower():
      return "bad"
    best = oracle_act(visible_facts(record.turns))
    if act == best or (act.kind == best.kind and act.kind != "recommend"):
      return "good"
    if act.kind == "close" and best.kind != "close":
      return "bad"
    return "ok"


def staff_act(v: Visible, skill: float, rng: np.random.Generator) -> Act:
  """A business staff member's own act: the oracle's with probability `skill`, else a common mistake."""
  if rng.random() < skill:
    return oracle_act(v)
  mistakes = ["recommend_guess", "close", "off_topic", "discount", "ask_contact", "recommend_popular"]
  m = mistakes[int(rng.choice(len(mistakes), p=[0.3, 0.25, 0.15, 0.1, 0.05, 0.15]))]
  if m == "recommend_guess":  # recommend without asking: a guessed category or a guessed tier
    cat = v.need or CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    return Act("recommend", product=product_for(cat, int(rng.integers(3))))
  if m == "recommend_popular":
    cat = v.need or CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    return Act("recommend", product=product_for(cat, 2))  # pushes the premium model
  if m == "discount":
    return Act("discount")
  return Act(m)


CANDIDATE_KINDS = ("ask_need", "ask_budget", "recommend", "answer", "discount", "close", "ask_contact", "off_topic")


def candidate_acts(v: Visible) -> list[Act]:
  """The acts worth trying at a state, one per kind of CANDIDATE_KINDS, the oracle's among them.

  A recommendation is of the product fitting the stated need and budget (guesses: a laptop, the mid-range tier,
  for what is not stated yet), an answer is on the pending topic (else warranty). Every parser kind but a greeting,
  which is never better than asking the need: asking for contact details and chit-chat stay as poor acts a
  ranking must put low.
  """
  best = oracle_act(v)
  out = []
  for kind in CANDIDATE_KINDS:
    if kind == best.kind:
      out.append(best)
    elif kind == "recommend":
      out.append(Act("recommend", product=product_for(v.need or "laptop", 1 if v.budget is None else v.budget)))
    elif kind == "answer":
      out.append(Act("answer", topic=v.topic or "warranty"))
    else:
      out.append(Act(kind))
  return out


def make_env(env_config) -> SalesEnv:
  """The sales simulator from the `env` config section (envs/registry.py)."""
  return SalesEnv.from_config(env_config, skill_mean=env_config.skill_mean)


# ---- the shipped policies, built from policies.py's kit ----

SCRIPT = policies.Script(visible_facts, oracle_act, staff_act, business_text, candidate_acts)
SalesEnv.script = SCRIPT  # the simulated business user writes with the staff's script


# Exploration: varied personas and acts, so logs cover many (state, action) pairs (off-policy Q).

TONES = ("formal", "casual", "enthusiastic")
# Styling is added around the templated message, never inside it. No opener or closer holds a word the sales
# parser reacts to (parse_business), so the styled text parses to the same act; the greeting rule is
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


def random_act(v: Visible, rng: np.random.Generator) -> Act:
  """A uniformly random dialogue act; a recommendation is of the stated need (a random category before it)."""
  kind = ACT_KINDS[int(rng.integers(len(ACT_KINDS)))]
  if kind == "recommend":
    category = v.need or CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    return Act("recommend", product=product_for(category, int(rng.integers(len(TIERS)))))
  if kind == "answer":
    return Act("answer", topic=TOPICS[int(rng.integers(len(TOPICS)))])
  return Act(kind)


class ExploratoryPolicy:
  """An exploratory behaviour policy: staff of mixed skill with varied personas, trying random acts.

  Each conversation gets a persona (tone formal | casual | enthusiastic, emoji or not, short or long phrasing)
  and a staff skill ~ Beta(mean * 6, (1 - mean) * 6), both drawn from its id. Each turn it plays a uniformly
  random act (`random_act`) with probability `eps`, else the staff member's act (`staff_act`), and writes
  it in the persona's style. The logs then hold many (state, action) pairs, which is what an off-policy
  evaluation of another policy (qfit 'fqe') needs.
  """

  def __init__(self, eps: float = 0.3, skill_mean: float = 0.35, name: str = "explore"):
    if not 0.0 <= eps <= 1.0:
      raise ValueError(f"eps must be a probability in [0, 1], got {eps}")
    self._staff = policies.StaffPolicy(SCRIPT, skill_mean, salt=29)  # its skills (and the check of skill_mean)
    self.eps, self.skill_mean, self.name = eps, skill_mean, name

  def persona(self, uid: str) -> Persona:
    rng = policies.conversation_rng(uid, 23)
    return Persona(tone=TONES[int(rng.integers(len(TONES)))], emoji=bool(rng.random() < 0.5),
                   long=bool(rng.random() < 0.5))

  def skill(self, uid: str) -> float:
    return self._staff.skill(uid)

  def __call__(self, observations: Sequence[base.Observation]) -> list[str]:
    out = []
    for obs in observations:
      v = visible_facts(obs.conversation.turns)
      if obs.rng.random() < self.eps:
        act = random_act(v, obs.rng)
      else:
        act = staff_act(v, self.skill(obs.uid), obs.rng)
      out.append(style_text(business_text(act, obs.rng), act.kind, self.persona(obs.uid), obs.rng))
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
      v = visible_facts(obs.conversation.turns)
      act = random_act(v, obs.rng) if obs.rng.random() < self.eps else oracle_act(v)
      out.append(business_text(act, obs.rng))
    return out


def make_sales_policy(name: str, skill_mean: float = 0.35):
  """Looks a shipped sales policy up by name: behavior | oracle | random | explore | noisy_oracle.

  'behavior' is the historical staff (mistakes: guessing a product, closing early, chit-chat, ...); 'oracle' asks
  the need, then the budget, recommends the fitting product, handles objections, then closes; 'explore' is the
  staff population (same skill_mean) with personas and random acts (ExploratoryPolicy); 'noisy_oracle' the oracle
  with 20% random acts.
  """
  return policies.lookup("sales", name, {
      **policies.shipped(SCRIPT, skill_mean), "explore": lambda: ExploratoryPolicy(skill_mean=skill_mean),
      "noisy_oracle": NoisyOraclePolicy})


def make_policy(name: str, env_config):
  """The registry's entry point (envs/registry.py): a sales policy for the `env` config section."""
  return make_sales_policy(name, skill_mean=env_config.skill_mean)
