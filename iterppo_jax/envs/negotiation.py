"""The long-horizon domain: a B2B sales rep negotiates a software subscription with a buyer (outcome 0/1).

The seller (the business) sells a collaboration suite in four plans (Starter, Growth, Scale, Enterprise; each
with a per-seat price, a seat cap and a feature set). The buyer's hidden profile holds six requirements that
come out one at a time and only when asked (team size, must-have features, contract term, budget ceiling per
seat, whether IT runs a security review, who else must approve), two to four objections raised in a hidden
order once a fitting plan is on the table (price, a missing integration, a competitor's quote, legal terms),
its patience and trust. Each objection wants its own handling: a concession within the 20% limit for price, a
trial and a check-in afterwards for the missing integration, a matching answer for the competitor and the
legal terms; a security review wants the SOC 2 report and an approver wants a call, again with a check-in.

Credit assignment spans the whole conversation, which in good hands lasts 12-20 rounds:
- discovering seats and features first is what lets the seller pitch the one plan that fits; pitching blind
  costs trust, and requirements never asked surface as blockers when the seller tries to close;
- a concession made before the buyer objects on price anchors them: they then want 10 points more than what
  was given, and once that exceeds the 20% limit the price objection can only end grudgingly;
- never conceding leaves the price objection open, so the deal stalls; pushing to sign while anything is open
  costs trust.
The outcome is the buyer's "Deal. Send the contract over and we'll sign.", read from the text by a regex
classifier. As in sales.py the buyer's state moves deterministically with the parsed acts (randomness only
picks surface text and whether a ready buyer signs), so `restore` rebuilds any logged state by replay.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Sequence

import numpy as np

from iterppo_jax import conversation as conv_lib
from iterppo_jax.envs import base, policies

# ---- the product ----

FEATURES = ("API access", "analytics", "custom roles", "SSO", "audit logs", "24/7 support")
_FEATURE_WEIGHTS = (0.14, 0.2, 0.16, 0.22, 0.18, 0.10)


@dataclasses.dataclass(frozen=True)
class Plan:
  name: str
  price: int  # list price, $ per seat per month
  max_seats: int
  features: frozenset[str]


PLANS = {
    "starter": Plan("Starter", 10, 10, frozenset(FEATURES[:1])),
    "growth": Plan("Growth", 20, 50, frozenset(FEATURES[:3])),
    "scale": Plan("Scale", 32, 250, frozenset(FEATURES[:5])),
    "enterprise": Plan("Enterprise", 45, 100_000, frozenset(FEATURES)),
}
MAX_DISCOUNT = 20  # % the deal desk allows; an offer above it is read as this much
SEAT_CHOICES = (8, 15, 25, 40, 60, 90, 150, 300)
TERMS = ("one-year", "two-year", "month-to-month")
APPROVERS = ("CFO", "VP of Finance", "head of IT", "CEO")
INTEGRATIONS = ("a Salesforce integration", "offline mode", "EU data residency")
COMPETITORS = ("TaskHive", "Workly", "Boardwise")
OBJECTIONS = ("price", "feature", "competitor", "legal")
REQUIREMENTS = ("seats", "features", "term", "budget", "security", "approver")


def fitting_plan(seats: int, features: Sequence[str]) -> str:
  """The cheapest plan that covers `seats` and every feature in `features` (a plan key)."""
  for key, plan in PLANS.items():
    if seats <= plan.max_seats and set(features) <= plan.features:
      return key
  return "enterprise"


def needed_discount(price: int, budget: int) -> int:
  """The smallest multiple of 5% that brings `price` within `budget` (may exceed MAX_DISCOUNT)."""
  pct = 0
  while price * (100 - pct) > budget * 100:
    pct += 5
  return pct


# ---- the business-message parser (dialogue acts) ----

@dataclasses.dataclass(frozen=True)
class Act:
  kind: str  # see BUSINESS_TEMPLATES: greet, ask_*, propose, concede, offer_trial, follow_up, ...
  plan: str | None = None  # plan key for `propose`
  pct: int | None = None  # total discount (%) for `concede`


_PLAN_PATTERN = re.compile(r"\b(starter|growth|scale|enterprise) plan\b")
# First matching rule wins; the order separates look-alikes (a concession "got approval", a follow-up
# that mentions "the trial or the call", "contract term" versus "send over the contract").
_PATTERNS = (
    ("concede", re.compile(r"\d+\s*%|\bdiscount\b|% off")),
    ("follow_up", re.compile(r"checking in|any update|since we last spoke|any feedback")),
    ("send_security", re.compile(r"\bsoc ?2\b|security (documentation|questionnaire|docs)")),
    ("approver_call", re.compile(r"\bcall\b")),
    ("offer_trial", re.compile(r"\b(trial|pilot)\b")),
    ("answer_competitor", re.compile(r"\bunlike\b|\bcompared (with|to)\b")),
    ("answer_legal", re.compile(r"\b(legal|redlines?|liability)\b")),
    ("propose", _PLAN_PATTERN),
    ("ask_budget", re.compile(r"\b(budget|price range)\b")),
    ("ask_seats", re.compile(r"how many (people|users|seats)|size is the team|team size")),
    ("ask_features", re.compile(r"must-have|\bfeatures\b")),
    ("ask_term", re.compile(r"\bterm\b|how long a contract")),
    ("ask_security", re.compile(r"\b(security|compliance)\b")),
    ("ask_approver", re.compile(r"\bapprove\b|sign(ing)? off")),
    ("close", re.compile(r"\b(sign|signature|signed|contract)\b")),
    ("greet", re.compile(r"\b(hi|hello)\b|great to meet")),
)


@functools.lru_cache(maxsize=1 << 16)
def parse_business(text: str) -> Act:
  """Reads a business message into one dialogue act (first matching rule of _PATTERNS wins)."""
  low = text.lower().strip()
  for kind, pattern in _PATTERNS:
    if pattern.search(low):
      if kind == "concede":
        m = re.search(r"(\d+)\s*%", low)
        return Act(kind, pct=min(int(m.group(1)), MAX_DISCOUNT) if m else 10)
      if kind == "propose":
        return Act(kind, plan=pattern.search(low).group(1))
      return Act(kind)
  return Act("off_topic")


# ---- the business staff's language (scripted policies and the simulated business user) ----

BUSINESS_TEMPLATES = {
    "greet": ("Hi, thanks for making time today.", "Hello! Great to meet you."),
    "ask_seats": ("How many people would need seats?", "How many users are we talking about?",
                  "What size is the team that would use it?"),
    "ask_features": ("Which features are must-haves for you?", "What features does your team absolutely need?",
                     "Any other must-have features?"),
    "ask_term": ("What contract term are you thinking of?", "How long a contract would you like?"),
    "ask_budget": ("What budget do you have per seat?", "What price range per user works for you?"),
    "ask_security": ("Will your IT team need a security review?",
                     "Any security or compliance requirements on your side?"),
    "ask_approver": ("Who else needs to approve this purchase?", "Is anyone else involved in signing off?"),
    "propose": ("I'd suggest the {plan} plan at ${price} per seat per month.",
                "The {plan} plan fits you best, at ${price} per user.",
                "I recommend our {plan} plan, ${price} per seat monthly."),
    "concede": ("I can offer {pct}% off the list price.", "We can do {pct}% off for you.",
                "I got approval for a {pct}% discount."),
    "offer_trial": ("Let's set up a free 14-day trial so your team can test it.",
                    "How about a two-week pilot to try it out?"),
    "follow_up": ("Just checking in: any update from your side?", "How did things go since we last spoke?",
                  "Any feedback from the trial or the call?"),
    "answer_competitor": ("Unlike other vendors, onboarding and migration are included at no cost.",
                          "Compared with others, we include dedicated onboarding for free."),
    "answer_legal": ("Our legal team can work with your redlines on liability.",
                     "We're flexible on the liability clauses; send us your redlines."),
    "send_security": ("I'll send our SOC 2 report and security questionnaire today.",
                      "Here is our SOC 2 report for your IT team."),
    "approver_call": ("Happy to set up a call with your approver to walk through it.",
                      "Could we get your decision makers on a quick call?"),
    "close": ("Shall I send over the contract for signature?", "Are you ready to sign today?",
              "Can we get the agreement signed this week?"),
    "off_topic": ("How's the quarter going for you?", "Did you catch the game last night?",
                  "Let me tell you about our company history.", "Nice weather this week, isn't it?"),
}
ASK_OF = {"seats": "ask_seats", "features": "ask_features", "term": "ask_term", "budget": "ask_budget",
          "security": "ask_security", "approver": "ask_approver"}
HANDLER_OF = {"feature": "offer_trial", "competitor": "answer_competitor", "legal": "answer_legal"}


def _pick(rng: np.random.Generator, options, **fmt) -> str:
  return options[int(rng.integers(len(options)))].format(**fmt)


def business_text(act: Act, rng: np.random.Generator) -> str:
  """A templated business message expressing `act`."""
  if act.kind == "propose":
    plan = PLANS[act.plan]
    return _pick(rng, BUSINESS_TEMPLATES["propose"], plan=plan.name, price=plan.price)
  if act.kind == "concede":
    return _pick(rng, BUSINESS_TEMPLATES["concede"], pct=act.pct)
  return _pick(rng, BUSINESS_TEMPLATES[act.kind])


# ---- the buyer's language ----

_OPEN = ("Hi, we're evaluating collaboration software for our company.",
         "Hello, we're looking for a new project management tool.",
         "Hi, I'd like to hear about your plans for our organization.")
_OPEN_SEATS = ("Hi, we're {seats} people looking for a new collaboration tool.",
               "Hello, we have {seats} people who need a better project tool.")
_GREETED = ("Thanks, likewise. Where should we start?", "Nice to meet you too.")
_SAY_SEATS = ("We have about {seats} people who would need seats.", "Around {seats} users, give or take.",
              "We'd need {seats} seats to start.")
_SAY_FEATURE = ("{feature} is a must-have for us.", "We definitely need {feature}.", "We also need {feature}.")
_FEATURES_DONE = " That's all on must-haves."
_SAY_TERM = ("We'd want a {term} contract.", "A {term} term works best for us.")
_SAY_BUDGET = ("Our budget is about ${budget} per seat per month.",
               "We can spend up to ${budget} per user per month.")
_SECURITY_YES = ("Yes, our IT team must do a security review before we sign.",)
_SECURITY_NO = ("No formal security review is needed on our side.",)
_APPROVER_YES = ("Our {approver} has to approve a purchase this size.",
                 "Yes, our {approver} has to approve it too.")
_APPROVER_NO = ("No one else, I can approve this myself.",)
_REPEAT = ("I already told you that.", "As I mentioned earlier.")
_MISSING = ("That plan doesn't include {feature}, which we need.",)
_TOO_SMALL = ("That plan only covers {cap} seats, and we have {seats} people.",)
_WAY_OVER = ("That's far beyond our budget for this.", "No, that's way beyond what we can spend.")
_BLIND = ("You haven't even asked what we need.",)
_FIT = ("The {plan} plan looks like a good fit.",)
_NO_CONCERNS = ("No other concerns from us.",)
_ALL_COVERED = ("That covers our concerns.", "I think that covers our concerns.")
_ALREADY_PLAN = ("We already agreed the {plan} plan looks like a good fit.",)
_RAISE = {
    "price": ("But it's above our budget; can you do better on price?",
              "But the price is above our budget for this."),
    "anchored": ("You already offered {pct}% off, so we expect a better price than that.",),
    "feature": ("One concern: we'd also need {integration}, and I don't see it in the plan.",),
    "competitor": ("Honestly, {competitor} quoted us less for something similar.",),
    "legal": ("Our legal team has concerns about the liability clauses.",),
}
_TOPIC = {"price": "the price", "feature": "{integration}", "competitor": "the {competitor} quote",
          "legal": "the liability clauses"}
_STILL_OPEN = ("But I still need an answer on {topic}.",)
_PRICE_OK = ("Okay, that price works for our budget.",)
_PRICE_SHORT = ("That helps, but we're still above our budget.",)
_PRICE_GRUDGING = ("If that's your best price, we'll have to live with it.",)
_ROOM = ("Good to know there's room on price.",)
_NOTED = ("Thanks, noted.",)
_SAME_OFFER = ("You already offered that.",)
_TRIAL_ON = ("Okay, we'll test {integration} during the trial.",)
_TRIAL_OK = ("The trial went well; {integration} worked for us.",)
_COMPETITOR_OK = ("Fair point, that sets you apart from {competitor}.",)
_LEGAL_OK = ("Good, our lawyers will be fine with that.",)
_NOT_NOW = ("That's not a concern for us right now.",)
_SECURITY_OK = ("Thanks, our IT team reviewed it and signed off.",)
_SECURITY_UNNEEDED = ("Thanks, though we don't need a security review.",)
_CALL_ON = ("Good idea, I'll set up the call with our {approver}.",)
_CALL_OK = ("The call went well; our {approver} is on board.",)
_NO_APPROVER = ("There's no one else to involve; I approve this myself.",)
_NOTHING_NEW = ("Nothing new on our side.",)
_NO_PLAN = ("We haven't even agreed on a plan yet.",)
_NOT_YET = ("Not yet, we still need to sort out {topic}.",)
_WAITING = ("We're still waiting on {what}.",)
_SURFACE = {"security": "Before we sign, our IT team must do a security review.",
            "approver": "Before we sign, our {approver} has to approve this.",
            "term": "Before we sign, note that we need a {term} contract."}
_BLOCKED = {"security": "We can't sign before our security review.",
            "approver": "Not until our {approver} has approved it."}
_THINK = ("Let me run it by the team one more time.", "Let me sleep on it.")
_BUY = ("Deal. Send the contract over and we'll sign.", "Deal. Send the contract over and we'll sign this week.",
        "Great, deal. Send the contract over and we'll sign.")
_OFF_TOPIC = ("Let's stay focused on the deal, please.", "Sorry, can we get back to the proposal?")
_CONFUSED = ("Sorry, what do you mean?", "Hello again...?")

_BUY_PATTERN = re.compile(r"\bsend the contract over\b|\bwe'll sign\b")


# ---- what a reader of the transcript can know (scripted policies and the business user) ----

@dataclasses.dataclass
class Visible:
  seats: int | None = None
  features: tuple[str, ...] = ()  # must-haves heard so far
  features_done: bool = False  # the buyer said that was all
  term: str | None = None
  budget: int | None = None  # $ per seat per month
  security: bool | None = None  # IT runs a security review (None: not known yet)
  security_done: bool = False
  approver: str | None = None  # '' when nobody else approves; None: not known yet
  call: str = "none"  # none | scheduled | done
  trial: str = "none"  # none | running | done
  plan: str | None = None  # last plan the business proposed
  accepted_plan: str | None = None  # the plan the buyer called a good fit
  discount: int = 0  # highest discount offered so far
  objection: str | None = None  # the buyer's open objection
  objections_done: bool = False  # the buyer has no further concerns


_V_FEATURES = tuple((f, re.compile(rf"\b{re.escape(f.lower())}\b")) for f in FEATURES)
_V_SEATS = re.compile(r"(?<![$\d])(\d+) (people|users)\b|need (\d+) seats")
_V_TERM = re.compile(r"\b(one-year|two-year|month-to-month)\b")
_V_BUDGET = re.compile(r"\$(\d+) per (seat|user)")
_V_APPROVER = re.compile(r"\bour (cfo|vp of finance|head of it|ceo)\b")
_V_ACCEPTED = re.compile(r"\b(starter|growth|scale|enterprise) plan looks like a good fit\b")
_V_RESOLVED = (("price", ("price works for our budget", "have to live with it")),
               ("feature", ("the trial went well",)), ("competitor", ("sets you apart",)),
               ("legal", ("our lawyers will be fine",)))
_V_RAISED = (("price", ("above our budget", "better price")), ("feature", ("i don't see it in the plan",)),
             ("competitor", ("quoted us less",)), ("legal", ("concerns about the liability",)))


@functools.lru_cache(maxsize=1 << 16)
def _customer_facts(text: str) -> tuple[tuple[str, Any], ...]:
  """What one buyer message says, as (Visible field, value) updates in order (cached: texts repeat)."""
  low, out = text.lower(), []
  if (m := _V_SEATS.search(low)):
    out.append(("seats", int(m.group(1) or m.group(3))))
  out += [("+features", f) for f, pattern in _V_FEATURES if pattern.search(low)]
  if "all on must-haves" in low:
    out.append(("features_done", True))
  if (m := _V_TERM.search(low)):
    out.append(("term", m.group(1)))
  if (m := _V_BUDGET.search(low)):
    out.append(("budget", int(m.group(1))))
  if any(p in low for p in ("security review before", "must do a security review", "before our security")):
    out.append(("security", True))
  elif "no formal security review" in low or "don't need a security review" in low:
    out.append(("security", False))
  if "reviewed it and signed off" in low:
    out += [("security", True), ("security_done", True)]
  if (m := _V_APPROVER.search(low)):
    out.append(("approver", next(a for a in APPROVERS if a.lower() == m.group(1))))
  elif "approve this myself" in low:
    out.append(("approver", ""))
  if "set up the call with" in low:
    out.append(("call", "scheduled"))
  elif "the call went well" in low:
    out.append(("call", "done"))
  if "during the trial" in low:
    out.append(("trial", "running"))
  if (m := _V_ACCEPTED.search(low)):
    out.append(("accepted_plan", m.group(1)))
  for kind, phrases in _V_RESOLVED:  # an answered objection first, then the next one raised
    if any(p in low for p in phrases):
      out += [("objection", None)] + ([("trial", "done")] if kind == "feature" else [])
  for kind, phrases in _V_RAISED:
    if any(p in low for p in phrases):
      out += [("objection", kind), ("objections_done", False)]
  if "no other concerns" in low or "covers our concerns" in low:
    out += [("objection", None), ("objections_done", True)]
  return tuple(out)


def _read_customer(v: Visible, text: str) -> None:
  """Updates `v` with one buyer message."""
  for field, value in _customer_facts(text):
    if field == "+features":
      if value not in v.features:
        v.features += (value,)
    else:
      setattr(v, field, value)


def visible_facts(turns: Sequence[conv_lib.Turn]) -> Visible:
  """Reads the requirements, the plan, offers and open objections from the transcript text alone."""
  v = Visible()
  for t in turns:
    if t.role == "business":
      act = parse_business(t.text)
      if act.kind == "propose":
        v.plan = act.plan
      elif act.kind == "concede":
        v.discount = max(v.discount, act.pct)
    elif t.role == "customer":
      _read_customer(v, t.text)
  return v


def next_requirement(v: Visible) -> str | None:
  """The first requirement (in REQUIREMENTS order) the transcript does not show yet."""
  known = {"seats": v.seats is not None, "features": v.features_done, "term": v.term is not None,
           "budget": v.budget is not None, "security": v.security is not None,
           "approver": v.approver is not None}
  return next((r for r in REQUIREMENTS if not known[r]), None)


def oracle_act(v: Visible) -> Act:
  """The best next act given the transcript: handle what is open, discover, pitch, clear blockers, close."""
  if v.objection == "price":
    if v.budget is None:
      return Act("ask_budget")
    price = PLANS[v.accepted_plan].price  # the buyer objects on price only to a plan they called a fit
    return Act("concede", pct=min(max(needed_discount(price, v.budget), v.discount + 5), MAX_DISCOUNT))
  if v.objection == "feature":
    return Act("follow_up" if v.trial == "running" else "offer_trial")
  if v.objection in HANDLER_OF:
    return Act(HANDLER_OF[v.objection])
  missing = next_requirement(v)
  if missing is not None:
    return Act(ASK_OF[missing])
  right = fitting_plan(v.seats, v.features)
  if v.accepted_plan is None:
    return Act("propose", plan=right)
  if v.security and not v.security_done:
    return Act("send_security")
  if v.approver and v.call == "none":
    return Act("approver_call")
  if v.call == "scheduled":
    return Act("follow_up")
  return Act("close")


_MISTAKES = ("concede_early", "push_close", "ignore_objection", "small_talk", "wrong_plan", "repeat_question",
             "wrong_answer")
_MISTAKE_P = (0.18, 0.16, 0.14, 0.14, 0.16, 0.12, 0.10)


def staff_act(v: Visible, skill: float, rng: np.random.Generator) -> Act:
  """A sales rep's own act: the oracle's with probability `skill`, else one of the common mistakes."""
  if rng.random() < skill:
    return oracle_act(v)
  m = _MISTAKES[int(rng.choice(len(_MISTAKES), p=_MISTAKE_P))]
  if m == "concede_early":  # discounts up front to "build goodwill"
    return Act("concede", pct=int(rng.choice([10, 15, 20])))
  if m == "push_close":
    return Act("close")
  if m == "ignore_objection":  # moves on to the next topic whatever is open
    missing = next_requirement(v)
    return Act(ASK_OF[missing]) if missing else Act("follow_up")
  if m == "small_talk":
    return Act("off_topic")
  if m == "wrong_plan":  # pitches on a hunch: the premium plan or a random one
    plans = list(PLANS)
    return Act("propose", plan="enterprise" if rng.random() < 0.4 else plans[int(rng.integers(len(plans)))])
  if m == "repeat_question":
    return Act(ASK_OF[REQUIREMENTS[int(rng.integers(len(REQUIREMENTS)))]])
  handlers = ("answer_competitor", "answer_legal", "offer_trial", "send_security", "approver_call")
  return Act(handlers[int(rng.integers(len(handlers)))])


def _candidate_group(kind: str) -> str:
  """The six questions are one candidate ('ask_'), and so are the two answers ('answer_')."""
  return kind[:kind.index("_") + 1] if kind.startswith(("ask_", "answer_")) else kind


def candidate_acts(v: Visible) -> list[Act]:
  """The acts worth trying at a state: one question, one answer and one act of every other kind but a greeting.

  Ten acts, the oracle's among them: the question about the next requirement not shown yet (the budget again
  once all are known), the fitting plan for what is known (for a team of 40 before the size is), the
  concession the oracle would make on price (else 5 points above the last, at least 10%), the answer to the
  open competitor or legal objection (else the competitor's), a trial, a follow-up, the security report, an
  approver call, a push to sign and small talk (a poor act a ranking must put low). One question and one
  answer stand for their groups, so the list stays short; a greeting only helps on the first turn.
  """
  best = oracle_act(v)
  plan = fitting_plan(v.seats if v.seats is not None else 40, v.features)
  if v.accepted_plan is not None and v.budget is not None:
    pct = max(needed_discount(PLANS[v.accepted_plan].price, v.budget), v.discount + 5)
  else:
    pct = max(10, v.discount + 5)
  acts = [Act(ASK_OF[next_requirement(v) or "budget"]), Act("propose", plan=plan),
          Act("concede", pct=min(pct, MAX_DISCOUNT)), Act("offer_trial"), Act("follow_up"),
          Act("answer_legal" if v.objection == "legal" else "answer_competitor"),
          Act("send_security"), Act("approver_call"), Act("close"), Act("off_topic")]
  return [best if _candidate_group(a.kind) == _candidate_group(best.kind) else a for a in acts]


# ---- a dialogue-state tracker: what a Q-model with few free parameters reads (qfit.view=dialogue_state) ----

def dialogue_state(turns) -> tuple:
  """The transcript's state as a small key, from its text alone (visible_facts): the next requirement not shown
  yet, the open objection (a missing feature with its trial's phase: the oracle offers a trial while none runs
  and follows up on a running one), a plan accepted, and the next blocker once it is (security review, approver
  call, the call's follow-up)."""
  v = visible_facts(turns)
  blocker = ("security" if v.security and not v.security_done else "call" if v.approver and v.call == "none"
             else "follow_up" if v.call == "scheduled" else None)
  objection = f"feature/trial {v.trial}" if v.objection == "feature" else v.objection
  return next_requirement(v), objection, v.accepted_plan is not None, blocker


def act_key(turns, text: str) -> tuple:
  """A suggestion's act by its fit to the transcript: any question as the next requirement not shown yet, one
  already answered or a later one; a plan that fits the team shown (or a guess before it is); a concession
  against the discount the budget needs (when both are shown) and above the last one or not; an answer, a
  trial or a follow-up as addressing the open objection or not (a trial only while none runs, a follow-up only
  on a running one). '' (or conversation.ABSTAIN_TEXT) is abstaining."""
  act = parse_business("" if text == conv_lib.ABSTAIN_TEXT else text)
  v = visible_facts(turns)
  if act.kind.startswith("ask_"):
    missing = next_requirement(v)
    asked = next(r for r, kind in ASK_OF.items() if kind == act.kind)
    return "ask", "next" if asked == missing else "later" if missing is not None and (
        REQUIREMENTS.index(asked) > REQUIREMENTS.index(missing)) else "known"
  if act.kind == "propose":
    return act.kind, ("guess" if v.seats is None else "fits" if act.plan == fitting_plan(v.seats, v.features)
                      else "other")
  if act.kind == "concede":
    pct = act.pct or 0
    if v.accepted_plan is not None and v.budget is not None:
      need = needed_discount(PLANS[v.accepted_plan].price, v.budget)
      against = "enough" if need <= pct <= need + 5 else "short" if pct < need else "more"
    else:
      against = "no price known"
    return act.kind, against, pct > v.discount
  handles = {"answer_competitor": "competitor", "answer_legal": "legal", "offer_trial": "feature",
             "follow_up": "feature"}
  if act.kind in handles:
    # A missing feature is answered in two steps, as the oracle does: a trial while none runs, then the follow-up
    # on it. Without the trial's state one cell held both (finding 26): the follow-up's value after a trial made
    # it look better than the trial where none had begun, and the loop stopped offering trials.
    step = {"offer_trial": v.trial == "none", "follow_up": v.trial == "running"}.get(act.kind, True)
    return act.kind, v.objection == handles[act.kind] and step
  return (act.kind,)


# ---- the hidden state ----

@dataclasses.dataclass
class NegotiationState:
  # profile, drawn at reset and logged in metadata
  seats: int
  features: tuple[str, ...]  # must-haves, in the order the buyer reveals them
  term: str
  budget: int  # $ per seat per month
  needs_security: bool
  approver: str  # '' when the buyer decides alone
  objections: tuple[str, ...]  # raised in this order once a fitting plan is proposed
  integration: str  # what the `feature` objection asks for
  competitor: str
  patience: float  # annoyance level at which the buyer stops answering
  trust: float
  opens_with_seats: bool
  skill: float  # the business user's own skill (its persona) ...
  assist_trust: float  # ... and how readily it accepts suggestions
  # dynamic state
  seats_known: bool = False
  features_known: tuple[str, ...] = ()
  term_known: bool = False
  budget_known: bool = False
  security_known: bool = False
  approver_known: bool = False
  annoyance: float = 0.0
  plan: str | None = None  # the fitting plan once proposed
  discount: int = 0  # highest discount offered
  early_discount: int = 0  # highest discount offered before the price objection came up (the anchor)
  required: int = 0  # discount the price objection needs
  queue: tuple[str, ...] = ()  # objections still to raise
  pending: str | None = None  # the open objection
  resolved: tuple[str, ...] = ()
  grudging: bool = False  # price settled at the limit, short of what the buyer wanted
  trial: str = "none"  # none | running | done
  call: str = "none"  # none | scheduled | done
  security_done: bool = False
  hesitations: int = 0  # times the buyer was ready but did not sign
  last_business: str = ""
  turn: int = 0


_PROFILE_FIELDS = ("seats", "features", "term", "budget", "needs_security", "approver", "objections",
                   "integration", "competitor", "patience", "trust", "opens_with_seats", "skill", "assist_trust")


def profile_of(state: NegotiationState) -> dict[str, Any]:
  return {f: (list(v) if isinstance(v := getattr(state, f), tuple) else v) for f in _PROFILE_FIELDS}


def state_from_profile(profile: dict[str, Any]) -> NegotiationState:
  """The state at the start of a conversation (before the opening) from a logged profile."""
  missing = [f for f in _PROFILE_FIELDS if f not in profile]
  if missing:
    raise ValueError(f"negotiation profile lacks {missing}; expected the keys {list(_PROFILE_FIELDS)}")
  kw = {f: (tuple(profile[f]) if isinstance(profile[f], list) else profile[f]) for f in _PROFILE_FIELDS}
  return NegotiationState(**kw)


def draw_profile(rng: np.random.Generator, skill_mean: float) -> NegotiationState:
  """A random buyer (and the business user's persona)."""
  seats = int(rng.choice(SEAT_CHOICES, p=[0.06, 0.12, 0.16, 0.18, 0.16, 0.14, 0.11, 0.07]))
  n_features = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
  features = tuple(FEATURES[i] for i in rng.choice(len(FEATURES), size=n_features, replace=False,
                                                   p=_FEATURE_WEIGHTS))
  n_objections = int(rng.choice([2, 3, 4], p=[0.35, 0.4, 0.25]))
  objections = tuple(OBJECTIONS[i] for i in rng.permutation(len(OBJECTIONS))[:n_objections])
  price = PLANS[fitting_plan(seats, features)].price
  if "price" in objections:  # a ceiling 5-15% under list: a concession within the limit settles it
    budget = int(price * (100 - int(rng.choice([5, 10, 15]))) // 100)
  else:
    budget = price + int(rng.integers(0, 6))
  return NegotiationState(
      seats=seats, features=features, term=TERMS[int(rng.integers(len(TERMS)))], budget=budget,
      needs_security=bool(rng.random() < 0.6),
      approver=APPROVERS[int(rng.integers(len(APPROVERS)))] if rng.random() < 0.6 else "",
      objections=objections, integration=INTEGRATIONS[int(rng.integers(len(INTEGRATIONS)))],
      competitor=COMPETITORS[int(rng.integers(len(COMPETITORS)))],
      patience=float(rng.uniform(4.5, 7.5)), trust=float(rng.uniform(0.25, 0.55)),
      opens_with_seats=bool(rng.random() < 0.3),
      skill=base.staff_skill(rng, skill_mean), assist_trust=float(rng.uniform(0.6, 1.2)))


# ---- the buyer's dynamics: parsed act -> (state change, reply parts) ----

def _raise_next(s: NegotiationState) -> list[tuple]:
  """Opens the next objection in the queue (reply parts), or says nothing is left."""
  if not s.queue:
    return [("all_covered",)]
  s.pending, s.queue = s.queue[0], s.queue[1:]
  if s.pending == "price" and s.early_discount:
    return [("raise", "anchored")]
  return [("raise", s.pending)]


def _resolve(s: NegotiationState, kind: str, ack: str, trust: float) -> list[tuple]:
  s.pending, s.resolved, s.trust = None, s.resolved + (kind,), s.trust + trust
  return [(ack,)] + _raise_next(s)


def _ask(s: NegotiationState, requirement: str) -> list[tuple]:
  """A discovery question: reveals one requirement (features: the next must-have) or repeats."""
  if requirement == "features":
    unknown = [f for f in s.features if f not in s.features_known]
    if not unknown:
      s.annoyance += 0.6
      return [("repeat",)]
    s.features_known += (unknown[0],)
    s.trust += 0.02
    return [("say_feature", unknown[0], len(unknown) == 1)]
  flag = f"{requirement}_known"
  if getattr(s, flag):
    s.annoyance += 0.6
    return [("repeat",)]
  setattr(s, flag, True)
  s.trust += 0.03  # feeling listened to is what builds trust
  return [(f"say_{requirement}",)]


def _propose(s: NegotiationState, key: str) -> list[tuple]:
  plan = PLANS[key]
  if s.plan is not None:  # a fitting plan is already agreed
    s.annoyance += 0.6
    if key != s.plan:
      s.trust -= 0.05
    return [("already_plan",)]
  parts = []
  if not (s.seats_known or s.features_known):  # pitching before asking anything: the rep does not listen
    s.trust -= 0.15
    parts.append(("blind",))
  missing = [f for f in s.features if f not in plan.features]
  if missing:
    if missing[0] not in s.features_known:
      s.features_known += (missing[0],)
    s.trust, s.annoyance = s.trust - 0.1, s.annoyance + 0.5
    done = all(f in s.features_known for f in s.features)
    return parts + [("missing", missing[0], done)]
  if s.seats > plan.max_seats:
    s.seats_known = True
    s.trust, s.annoyance = s.trust - 0.1, s.annoyance + 0.5
    return parts + [("too_small", plan.max_seats)]
  if needed_discount(plan.price, s.budget) > MAX_DISCOUNT:
    s.trust, s.annoyance = s.trust - 0.1, s.annoyance + 0.5
    return parts + [("way_over",)]
  s.plan, s.trust = key, s.trust + 0.05
  s.required = needed_discount(plan.price, s.budget)
  s.queue = s.objections
  if s.early_discount:  # the buyer anchors on what was given away and asks for more
    s.required = max(s.required, s.early_discount + 10)
    if "price" not in s.queue:
      s.queue = ("price",) + s.queue
  parts.append(("fit",))
  if not s.queue:
    return parts + [("no_concerns",)]
  return parts + _raise_next(s)


def _concede(s: NegotiationState, pct: int) -> list[tuple]:
  if s.pending == "price" and pct >= MAX_DISCOUNT:  # the limit, even if offered before: the last word
    s.discount = pct
    if pct >= s.required:
      return _resolve(s, "price", "price_ok", 0.03)
    s.grudging, s.trust = True, s.trust - 0.1  # no room left: the buyer settles, but does not forget
    return _resolve(s, "price", "price_grudging", 0.0)
  if pct <= s.discount:
    s.annoyance += 0.4
    return [("same_offer",)]
  s.discount = pct
  if s.pending == "price":
    if pct >= s.required:
      return _resolve(s, "price", "price_ok", 0.03)
    return [("price_short",)]
  if "price" in s.resolved:
    return [("noted",)]
  s.early_discount = max(s.early_discount, pct)
  if s.plan is None:
    return [("room",)]
  s.required = max(s.required, pct + 10)
  if "price" not in s.queue:
    s.queue = ("price",) + s.queue
  if s.pending is None:
    return [("room",)] + _raise_next(s)
  return [("room",)]


def _close(s: NegotiationState) -> list[tuple]:
  if s.plan is None:
    s.trust, s.annoyance = s.trust - 0.12, s.annoyance + 0.8
    return [("no_plan",)]
  if s.pending is not None:
    s.trust, s.annoyance = s.trust - 0.12, s.annoyance + 0.8
    return [("not_yet",)]
  if s.trial == "running" or s.call == "scheduled":
    s.annoyance += 0.3
    return [("waiting",)]
  for requirement, needed in (("security", s.needs_security), ("approver", bool(s.approver)), ("term", True)):
    if needed and not getattr(s, f"{requirement}_known"):  # never asked: it surfaces now
      setattr(s, f"{requirement}_known", True)
      s.trust, s.annoyance = s.trust - 0.05, s.annoyance + 0.4
      return [("surface", requirement)]
  if s.needs_security and not s.security_done:
    s.trust, s.annoyance = s.trust - 0.08, s.annoyance + 0.6
    return [("blocked", "security")]
  if s.approver and s.call == "none":
    s.trust, s.annoyance = s.trust - 0.08, s.annoyance + 0.6
    return [("blocked", "approver")]
  return [("ready",)]


def _follow_up(s: NegotiationState) -> list[tuple]:
  parts = []
  if s.call == "scheduled":
    s.call, s.trust = "done", s.trust + 0.04
    parts.append(("call_ok",))
  if s.trial == "running":
    s.trial = "done"
    parts += _resolve(s, "feature", "trial_ok", 0.03)
  if not parts:
    s.annoyance += 0.4
    return [("nothing_new",)]
  return parts


def transition(s: NegotiationState, text: str) -> list[tuple]:
  """Deterministic state update for one sent message; returns the reply as a list of template keys."""
  act = parse_business(text)
  base.tick_patience(s, text, per_turn=0.1, repeated_penalty=0.6)  # every round costs a little patience
  pending = s.pending
  addressed = False  # did the act deal with the open objection?
  kind = act.kind
  if kind == "greet":
    if s.turn == 1:
      s.trust += 0.02
      parts = [("greeted",)]
    else:
      s.annoyance += 0.3
      parts = [("confused",)]
  elif kind.startswith("ask_"):
    addressed = kind == "ask_budget" and pending == "price"
    parts = _ask(s, kind[4:])
  elif kind == "propose":
    parts = _propose(s, act.plan)
  elif kind == "concede":
    addressed = pending == "price"
    parts = _concede(s, act.pct)
  elif kind == "offer_trial":
    if pending == "feature" and s.trial == "none":
      s.trial, addressed = "running", True
      parts = [("trial_on",)]
    else:
      s.annoyance += 0.4
      parts = [("not_now",)]
  elif kind == "follow_up":
    addressed = pending == "feature" and s.trial == "running"
    parts = _follow_up(s)
  elif kind in ("answer_competitor", "answer_legal"):
    topic = kind[len("answer_"):]
    if pending == topic:
      addressed = True
      parts = _resolve(s, topic, f"{topic}_ok", 0.03)
    else:
      s.annoyance += 0.4
      parts = [("not_now",)]
  elif kind == "send_security":
    if s.needs_security and not s.security_done:
      s.security_done, s.security_known, s.trust = True, True, s.trust + 0.04
      parts = [("security_ok",)]
    elif s.security_done:
      s.annoyance += 0.6
      parts = [("repeat",)]
    else:
      s.security_known, s.annoyance = True, s.annoyance + 0.3
      parts = [("security_unneeded",)]
  elif kind == "approver_call":
    s.approver_known = True
    if s.approver and s.call == "none":
      s.call = "scheduled"
      parts = [("call_on",)]
    elif s.approver:
      s.annoyance += 0.6
      parts = [("repeat",)]
    else:
      s.annoyance += 0.3
      parts = [("no_approver",)]
  elif kind == "close":
    return _close(s)  # closing over an open objection is penalised in _close itself
  else:
    s.annoyance += 0.6
    parts = [("off_topic",)]
  if pending is not None and not addressed and s.pending == pending:
    s.annoyance, s.trust = s.annoyance + 0.3, s.trust - 0.03  # ignoring the buyer's concern
    parts.append(("still_open",))
  return parts


def _not_bought(s: NegotiationState) -> None:
  """A ready buyer who did not sign when asked: they take time once, and walk away the second time."""
  s.annoyance, s.hesitations = s.annoyance + 0.5, s.hesitations + 1


def buy_probability(s: NegotiationState) -> float:
  p = 0.1 + 0.85 * s.trust - 0.05 * s.annoyance - (0.3 if s.grudging else 0.0)
  return float(np.clip(p, 0.03, 0.97))


def _render_part(s: NegotiationState, part: tuple, rng: np.random.Generator) -> str:
  key, args = part[0], part[1:]
  fmt = dict(seats=s.seats, term=s.term, budget=s.budget, approver=s.approver, integration=s.integration,
             competitor=s.competitor, plan=PLANS[s.plan].name if s.plan else "", pct=s.early_discount)
  if key == "say_feature":
    feature, last = args
    options = _SAY_FEATURE[2:] if len(s.features_known) > 1 else _SAY_FEATURE[:2]
    return _pick(rng, options, feature=feature) + (_FEATURES_DONE if last else "")
  if key == "missing":
    return _pick(rng, _MISSING, feature=args[0]) + (_FEATURES_DONE if args[1] else "")
  if key == "too_small":
    return _pick(rng, _TOO_SMALL, cap=args[0], seats=s.seats)
  if key == "raise":
    return _pick(rng, _RAISE[args[0]], **fmt)
  if key in ("still_open", "not_yet"):
    topic = _TOPIC[s.pending].format(**fmt)
    return _pick(rng, _STILL_OPEN if key == "still_open" else _NOT_YET, topic=topic)
  if key == "waiting":
    what = "the trial results" if s.trial == "running" else "the call with our {approver}".format(**fmt)
    return _pick(rng, _WAITING, what=what)
  if key == "surface":
    return _SURFACE[args[0]].format(**fmt)
  if key == "blocked":
    return _BLOCKED[args[0]].format(**fmt)
  table = {
      "greeted": _GREETED, "say_seats": _SAY_SEATS, "say_term": _SAY_TERM, "say_budget": _SAY_BUDGET,
      "say_security": _SECURITY_YES if s.needs_security else _SECURITY_NO,
      "say_approver": _APPROVER_YES if s.approver else _APPROVER_NO, "repeat": _REPEAT, "blind": _BLIND,
      "way_over": _WAY_OVER, "fit": _FIT, "no_concerns": _NO_CONCERNS, "all_covered": _ALL_COVERED,
      "already_plan": _ALREADY_PLAN, "price_ok": _PRICE_OK, "price_short": _PRICE_SHORT,
      "price_grudging": _PRICE_GRUDGING, "room": _ROOM, "noted": _NOTED, "same_offer": _SAME_OFFER,
      "trial_on": _TRIAL_ON, "trial_ok": _TRIAL_OK, "competitor_ok": _COMPETITOR_OK, "legal_ok": _LEGAL_OK,
      "not_now": _NOT_NOW, "security_ok": _SECURITY_OK, "security_unneeded": _SECURITY_UNNEEDED,
      "call_on": _CALL_ON, "call_ok": _CALL_OK, "no_approver": _NO_APPROVER, "nothing_new": _NOTHING_NEW,
      "no_plan": _NO_PLAN, "think": _THINK, "off_topic": _OFF_TOPIC, "confused": _CONFUSED,
  }
  return _pick(rng, table[key], **fmt)


# ---- the environment ----

class NegotiationEnv(base.StaffEnv):
  """B2B subscription negotiation simulator (see module docstring). Batched via base.TextEnv."""

  domain = "negotiation"
  skill_mean = 0.48
  read_business = staticmethod(parse_business)  # the business user's writing: base.StaffEnv
  edit_prefixes = ("Sure. ", "Of course. ", "Good point. ", "")
  edit_suffixes = ("", " Let me know.", " Thanks!")

  def new_hidden(self, rng):
    return draw_profile(rng, self.skill_mean)

  def metadata(self, hidden):
    return {"profile": profile_of(hidden)}

  def opening(self, s: NegotiationState, rng):
    if s.opens_with_seats:
      s.seats_known = True
      return _pick(rng, _OPEN_SEATS, seats=s.seats)
    return _pick(rng, _OPEN)

  def classify_outcome(self, customer_text: str) -> int:
    return int(bool(_BUY_PATTERN.search(customer_text.lower())))

  end_reasons = conv_lib.END_REASONS + ("no_deal",)

  def end_reason(self, s: NegotiationState) -> str:
    """A buyer who was ready and twice did not sign declined the deal ("no_deal", a logged failure); one who
    stopped answering left."""
    return "no_deal" if s.hesitations >= 2 else "customer_left"

  def customer_reply(self, s: NegotiationState, business_text_: str, rng):
    parts = transition(s, business_text_)
    if parts == [("ready",)]:
      if rng.random() < buy_probability(s):
        return _pick(rng, _BUY), 1
      _not_bought(s)
      if s.hesitations >= 2:
        return None, 0
      parts = [("think",)]
    if s.annoyance >= s.patience:
      return None, 0  # the buyer stops answering
    texts = [_render_part(s, p, rng) for p in parts]
    return " ".join(t[0].upper() + t[1:] for t in texts), 0  # "analytics is ..." starts a sentence

  def restore(self, record: conv_lib.Conversation, n_turns: int) -> base.Episode:
    """Rebuilds the live episode at turn `n_turns` of a logged negotiation (for true Q).

    The hidden state is a replay of the sent business messages from the logged profile; the random stream
    is re-seeded from the record, so a restored state supports Monte Carlo rollouts.
    """
    self.logged_profile(record)  # this domain's record, with a profile
    prof = record.metadata.get("profile")
    if prof is None:
      raise ValueError(f"record {record.id} has no metadata.profile; it was not logged by NegotiationEnv")
    if not 0 < n_turns <= len(record.turns):
      raise ValueError(f"n_turns must be in 1..{len(record.turns)} for record {record.id}, got {n_turns}")
    s = state_from_profile(prof)
    if s.opens_with_seats:
      s.seats_known = True
    turns = record.turns[:n_turns]
    for t in turns:
      if t.role == "business" and transition(s, t.text) == [("ready",)]:
        _not_bought(s)
    return self.restored_episode(record, n_turns, s)

  # -- the business user --
  def judge(self, s: NegotiationState, record, suggestion: str) -> str:
    act = parse_business(suggestion)
    if act.kind == "off_topic" or suggestion.strip().lower() == s.last_business.strip().lower():
      return "bad"
    best = oracle_act(visible_facts(record.turns))
    if act == best:
      return "good"
    if act.kind == best.kind:
      if act.kind == "concede":
        return "good" if act.pct >= best.pct else "ok"
      return "ok" if act.kind == "propose" else "good"
    if act.kind in ("close", "concede"):  # pushing to sign, or giving price away unasked
      return "bad"
    return "ok"


# ---- scripted policies (they read only the transcript) ----

SCRIPT = policies.Script(visible_facts, oracle_act, staff_act, business_text, candidate_acts)
NegotiationEnv.script = SCRIPT  # the simulated business user writes with the staff's script


def make_negotiation_policy(name: str, skill_mean: float = 0.48):
  """Looks a shipped negotiation policy up by name (policies.shipped): behavior | oracle | random | explore.

  'behavior' is the historical sales reps (mistakes: discounting up front, pushing to close, ignoring an objection,
  small talk, pitching the wrong plan, asking again, answering the wrong objection); 'oracle' discovers every
  requirement, pitches the fitting plan, handles each objection and blocker, closes; 'explore' the rep population
  (same skill_mean) trying candidate acts.
  """
  return policies.lookup("negotiation", name, policies.shipped(SCRIPT, skill_mean, salt=23))


def make_policy(name: str, env_config):
  """The registry's entry point (envs/registry.py): a negotiation policy for the `env` config section."""
  return make_negotiation_policy(name, skill_mean=env_config.skill_mean)


def make_env(env_config) -> NegotiationEnv:
  """The negotiation simulator from the `env` config section (envs/registry.py)."""
  return NegotiationEnv.from_config(env_config, skill_mean=env_config.skill_mean)
