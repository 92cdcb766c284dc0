"""The appointment-booking suggested-response simulator: the outcome is a booking the customer confirms (0/1).

A customer wants an appointment at a salon (Studio Nova). Their hidden profile holds the service (haircut,
massage, manicure, facial or hair colouring, each with its own length), the days that work, the time of day
(morning, afternoon, evening), sometimes a preferred staff member, how forthcoming they are, their patience
and their trust. The constraints come out only when asked (or, from a forthcoming customer, when an offer
breaks one). The salon's weekly calendar is a fixed template (which staff work which days and hours, who does
which service; the staff know it, so a policy reading only the transcript can use it) minus the slots already
taken this week, which are a deterministic function of a per-conversation `calendar_seed` in the hidden state;
a customer whose constraints leave no free slot is never drawn, but some combinations leave only one or two.

Business messages are read by a deterministic parser into dialogue acts (greet, ask service, ask day, ask time
of day, ask staff, offer a slot, offer alternatives, book, ask contact, off-topic). Offering a slot that breaks
a constraint gets a rejection and costs patience and trust; offering before asking usually misses; booking
before the customer agreed annoys them. The outcome is the customer's confirmation ("Yes, please book it. See
you then!"), read by a regex outcome classifier. Credit assignment matters: asking the service, days, time of
day and staff early is what makes the later offer fit.

As in sales.py the customer's state moves deterministically with the parsed acts; randomness only picks the
surface text and whether a customer who agreed to a slot confirms when asked. So the hidden state at any turn
of a log is a replay of the sent messages from the profile in the record's metadata (`restore`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Sequence

import numpy as np

from iterppo_jax import conversation as conv_lib
from iterppo_jax.envs import base, policies

# ---- the salon and its weekly calendar ----

DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday")
PERIODS = {"morning": (9, 10, 11), "afternoon": (13, 14, 15, 16), "evening": (17, 18)}
HOURS = tuple(h for hours in PERIODS.values() for h in hours)
# service -> hours it needs (the calendar has one-hour cells; a 30- or 45-minute service takes one cell)
SERVICES = {"haircut": 1, "massage": 1, "manicure": 1, "facial": 1, "colouring": 2}
SERVICE_PHRASES = {"haircut": "a haircut", "massage": "a massage", "manicure": "a manicure",
                   "facial": "a facial", "colouring": "hair colouring"}
# staff -> (services they do, days they work)
STAFF = {
    "anna": (("haircut", "colouring"), ("monday", "tuesday", "wednesday", "thursday")),
    "ben": (("haircut", "massage"), ("wednesday", "thursday", "friday", "saturday")),
    "carla": (("massage", "facial", "manicure"), ("monday", "tuesday", "friday", "saturday")),
    "dana": (("manicure", "facial", "colouring"), ("tuesday", "wednesday", "thursday", "saturday")),
}
LATE_DAYS = ("tuesday", "thursday")  # late opening: the only evenings with slots
TAKEN_PROB = 0.2  # share of the template's cells already booked in a given week


def open_hours(staff: str, day: str) -> tuple[int, ...]:
  """Hours a staff member works on a day by the fixed template (Saturday closes at noon)."""
  if day not in STAFF[staff][1]:
    return ()
  if day == "saturday":
    return PERIODS["morning"]
  if day in LATE_DAYS:
    return HOURS
  return PERIODS["morning"] + PERIODS["afternoon"]


@functools.lru_cache(maxsize=None)
def template_slots(service: str) -> tuple[tuple[str, int, str], ...]:
  """(day, hour, staff) where the service fits the template (staff does it, enough consecutive hours)."""
  out = []
  for day in DAYS:
    for hour in HOURS:
      for staff, (services, _) in STAFF.items():
        hours = open_hours(staff, day)
        if service in services and all(hour + k in hours for k in range(SERVICES[service])):
          out.append((day, hour, staff))
  return tuple(out)


@functools.lru_cache(maxsize=4096)
def taken_cells(calendar_seed: int) -> frozenset[tuple[str, int, str]]:
  """The (day, hour, staff) cells already booked this week: a pure function of the calendar seed."""
  rng = np.random.default_rng([int(calendar_seed), 91])
  cells = [(d, h, st) for d in DAYS for st in STAFF for h in open_hours(st, d)]
  draws = rng.random(len(cells))
  return frozenset(c for c, u in zip(cells, draws) if u < TAKEN_PROB)


def slot_free(service: str, slot: tuple[str, int, str], calendar_seed: int) -> bool:
  """Whether `slot` can take the service this week (template and nothing already booked)."""
  day, hour, staff = slot
  services, _ = STAFF[staff]
  hours = open_hours(staff, day)
  taken = taken_cells(calendar_seed)
  return service in services and all(
      hour + k in hours and (day, hour + k, staff) not in taken for k in range(SERVICES[service]))


def hour_text(hour: int) -> str:
  return f"{hour}am" if hour < 12 else f"{hour - 12 if hour > 12 else 12}pm"


def slot_text(slot: tuple[str, int, str | None], with_staff: bool = True) -> str:
  day, hour, staff = slot
  out = f"{day.capitalize()} at {hour_text(hour)}"
  return f"{out} with {staff.capitalize()}" if with_staff and staff else out


def days_text(days: Sequence[str]) -> str:
  names = [d.capitalize() for d in days]
  return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


# ---- the business-message parser (dialogue acts) ----

@dataclasses.dataclass(frozen=True)
class Act:
  kind: str  # greet ask_service ask_day ask_time ask_staff offer alternatives book ask_contact off_topic
  slots: tuple[tuple[str, int, str | None], ...] = ()  # offered (day, hour, staff or None)
  service: str | None = None  # the service an offer names, if any


_DAY_RE = "(" + "|".join(DAYS) + ")"
_SLOT_RE = re.compile(rf"\b{_DAY_RE} at (\d{{1,2}}) ?(am|pm)\b(?: with ({'|'.join(STAFF)})\b)?")
_SERVICE_RE = re.compile(r"\b(" + "|".join(SERVICES) + r")s?\b")
_PATTERNS = (
    ("book", re.compile(r"\b(book|booking)\b")),
    ("ask_contact", re.compile(r"\b(phone number|your name|reach you)\b")),
    ("ask_service", re.compile(r"\b(what service|which service|which treatment|what can we do for you)\b")),
    ("ask_day", re.compile(r"\b(which days?|what days?|when are you free)\b")),
    ("ask_time", re.compile(r"\b(time of day|morning, afternoon or evening|mornings, afternoons or)\b")),
    ("ask_staff", re.compile(r"\b(preferred stylist|anyone in particular|particular staff member)\b")),
    ("greet", re.compile(r"\b(welcome|hi there|hello)\b")),
)


def _hour_24(number: str, half: str) -> int:
  h = int(number) % 12
  return h + 12 if half == "pm" else h


def parse_business(text: str) -> Act:
  """Reads a business message into one dialogue act (first matching rule wins; booking, then slots)."""
  low = text.lower().strip()
  if not low:
    return Act("off_topic")
  service = next(iter(_SERVICE_RE.findall(low)), None)
  if _PATTERNS[0][1].search(low):
    return Act("book")
  slots = tuple((m.group(1), _hour_24(m.group(2), m.group(3)), m.group(4) or None)
                for m in _SLOT_RE.finditer(low))
  if slots:
    return Act("offer" if len(slots) == 1 else "alternatives", slots=slots[:2], service=service)
  for kind, pat in _PATTERNS[1:]:
    if pat.search(low):
      return Act(kind)
  return Act("off_topic")


# ---- the business staff's language (scripted policies and the simulated business user) ----

BUSINESS_TEMPLATES = {
    "greet": ("Hi there! Welcome to Studio Nova.", "Hello and welcome to Studio Nova!"),
    "ask_service": ("What service would you like today?", "Which treatment are you interested in?",
                    "What can we do for you today?"),
    "ask_day": ("Which days work for you this week?", "What day suits you best?", "When are you free this week?"),
    "ask_time": ("Do you prefer morning, afternoon or evening?", "What time of day suits you?",
                 "Mornings, afternoons or evenings?"),
    "ask_staff": ("Do you have a preferred stylist?", "Anyone in particular you'd like to see?",
                  "Would you like a particular staff member?"),
    "offer": ("I can do {slot}{tail}.", "How about {slot}{tail}?", "{slot} is free{tail}."),
    "alternatives": ("I have {slot} or {slot2}{tail}.", "Would {slot} or {slot2} suit you{tail}?"),
    "book": ("Shall I book that for you?", "Great, shall I book you in?", "Shall I confirm the booking?"),
    "ask_contact": ("Could I get your name and phone number?", "What number can we reach you on?"),
    "off_topic": ("How is your day going?", "Lovely weather today, isn't it?",
                  "Have you tried our new loyalty card?"),
}


def _pick(rng: np.random.Generator, options, **fmt) -> str:
  return options[int(rng.integers(len(options)))].format(**fmt)


def business_text(act: Act, rng: np.random.Generator) -> str:
  """A templated business message expressing `act`."""
  if act.kind in ("offer", "alternatives"):
    tail = f" for {SERVICE_PHRASES[act.service]}" if act.service else ""
    slots = [slot_text(s) for s in act.slots]
    return _pick(rng, BUSINESS_TEMPLATES[act.kind], slot=slots[0], slot2=slots[-1], tail=tail)
  return _pick(rng, BUSINESS_TEMPLATES[act.kind])


# ---- customer language ----

_OPEN_SERVICE = ("Hi, I'd like to book {phrase}.", "Hello, can I get {phrase} this week?",
                 "Hi, do you have time for {phrase}?")
_OPEN_VAGUE = ("Hi, I'd like to book an appointment.", "Hello, do you have any availability this week?",
               "Hi, can I make an appointment?")
_SAY_SERVICE = ("I'd like {phrase}, please.", "I need {phrase}.", "Just {phrase}, please.")
_SAY_DAYS = ("I'm free on {days}.", "I can only make it on {days}.", "{days} would be best.")
_SAY_PERIOD = ("{Period}s are best for me.", "I prefer the {period}.", "Something in the {period}, please.")
_SAY_STAFF = ("I'd like to see {staff}, please.", "{staff} if possible, please.")
_NO_PREF = ("No preference, anyone is fine.", "Anyone is fine.")
_REPEAT = ("I already told you that.", "As I said before.")
_WRONG_SERVICE = ("I wanted {phrase}, not that.", "Sorry, I'm here for {phrase}.")
_BAD_DAY = ("{day} doesn't work for me.", "I can't do {day}.")
_BAD_TIME = ("That time doesn't suit me.", "{hour} is no good for me.")
_BAD_STAFF = ("I'd rather see {staff}.", "I'd prefer {staff}, if possible.")
_UNAVAILABLE = ("Your website shows {slot} as unavailable.", "The online calendar says {slot} is taken.")
_AGREE = ("Yes, {slot} works for me.", "Great, {slot} is perfect.", "{slot} suits me well.")
_BOOK = ("Yes, please book it. See you then!", "Perfect, book me in. See you then!",
         "Lovely, please book it.")
_NOT_SURE = ("Let me check my calendar first.", "Hmm, give me a moment to think.")
_NOT_AGREED = ("Wait, I haven't agreed to a time yet.", "Hold on, we haven't picked a slot.")
_CONTACT = ("Sure, it's Sam on 07700 900123.", "Of course: Alex, 07700 900456.")
_NO_CONTACT = ("Can we sort out the time first?", "Why do you need that already?")
_CONFUSED = ("Sorry, what do you mean?", "Okay...?", "I just want an appointment.")

_BOOK_PATTERN = re.compile(r"\b(please book it|book me in|see you then)\b")


# ---- what a reader of the transcript can know (scripted policies and the business user) ----

@dataclasses.dataclass
class Visible:
  service: str | None = None
  days: tuple[str, ...] | None = None  # days the customer said work
  bad_days: set = dataclasses.field(default_factory=set)  # days the customer said do not work
  period: str | None = None
  staff: str | None = None  # preferred staff member, 'any', or None (not known)
  asked_staff: bool = False
  last_offer: tuple = ()  # slots of the latest offer
  tried: set = dataclasses.field(default_factory=set)  # every (day, hour, staff) offered so far
  unavailable: set = dataclasses.field(default_factory=set)  # (day, hour) the customer saw taken
  agreed: tuple | None = None  # the (day, hour, staff) the customer agreed to
  contact_given: bool = False
  last_business_act: str | None = None
  n_business: int = 0


_SAID_SLOT_RE = re.compile(rf"\b{_DAY_RE} at (\d{{1,2}})(am|pm)")  # customers name a slot without staff
_STAFF_RE = re.compile(r"\b(" + "|".join(STAFF) + r")\b")


def _sentences(text: str) -> list[str]:
  return [s for s in re.split(r"(?<=[.!?])\s+", text.lower().strip()) if s]


def _read_customer(v: Visible, text: str) -> None:
  for sent in _sentences(text):
    service = _SERVICE_RE.search(sent)
    if service:
      v.service = service.group(1)
    slot = _SAID_SLOT_RE.search(sent)
    days = re.findall(_DAY_RE, sent)
    if slot and re.search(r"works for me|is perfect|suits me", sent):
      day, hour = slot.group(1), _hour_24(slot.group(2), slot.group(3))
      v.agreed = next((s for s in v.last_offer if s[:2] == (day, hour)), (day, hour, None))
    elif slot and re.search(r"unavailable|is taken", sent):
      v.unavailable.add((slot.group(1), _hour_24(slot.group(2), slot.group(3))))
    elif days and re.search(r"doesn't work for me|can't do", sent):
      v.bad_days.update(days)
    elif days and re.search(r"free on|only make it on|would be best", sent):
      v.days = tuple(d for d in DAYS if d in days)
    for period in PERIODS:
      if period in sent:
        v.period = period
    staff = _STAFF_RE.search(sent)
    if staff and re.search(r"\bsee\b|if possible|rather|prefer", sent):
      v.staff = staff.group(1)
    if "anyone is fine" in sent:
      v.staff = "any"
    if "07700" in sent:  # the phone numbers customers give
      v.contact_given = True


def visible_facts(turns: Sequence[conv_lib.Turn]) -> Visible:
  """Reads service, days, time of day, staff, offers and agreement from the transcript text alone."""
  v = Visible()
  for t in turns:
    if t.role == "business":
      act = parse_business(t.text)
      v.last_business_act, v.n_business = act.kind, v.n_business + 1
      if act.kind == "ask_staff":
        v.asked_staff = True
      if act.kind in ("offer", "alternatives"):
        v.last_offer, v.agreed = act.slots, None
        v.tried.update(act.slots)
    elif t.role == "customer":
      _read_customer(v, t.text)
  return v


def fits_known(v: Visible, slot: tuple[str, int, str | None], service: str | None) -> str:
  """How an offered slot looks against what the transcript shows: 'fits' | 'unknown' | 'breaks'."""
  day, hour, staff = slot
  if service and v.service and service != v.service:
    return "breaks"
  if day in v.bad_days or (v.days is not None and day not in v.days):
    return "breaks"
  if v.period is not None and hour not in PERIODS[v.period]:
    return "breaks"
  if staff and v.staff not in (None, "any") and staff != v.staff:
    return "breaks"
  if (day, hour) in v.unavailable:
    return "breaks"
  if v.service is None or v.days is None or v.period is None or (v.staff is None and not v.asked_staff):
    return "unknown"
  if staff is not None and (day, hour, staff) not in template_slots(v.service):
    return "breaks"
  return "fits"


def candidate_slots(v: Visible, service: str) -> list[tuple[str, int, str]]:
  """Template slots for `service` that break nothing the transcript shows and were not offered yet."""
  return [s for s in template_slots(service)
          if s not in v.tried and fits_known(v, s, service) != "breaks"]


def oracle_act(v: Visible) -> Act:
  """The best next act given what the transcript shows (the oracle's strategy)."""
  if v.service is None:
    return Act("ask_service")
  if v.days is None:
    return Act("ask_day")
  if v.period is None:
    return Act("ask_time")
  if v.staff is None and not v.asked_staff:
    return Act("ask_staff")
  if v.agreed is not None:
    return Act("book")
  slots = candidate_slots(v, v.service)
  if not slots:  # everything that fits was taken: start over on the days
    return Act("ask_day")
  return Act("offer", slots=(slots[0],), service=v.service)


def staff_act(v: Visible, skill: float, rng: np.random.Generator) -> Act:
  """A business staff member's own act: the oracle's with probability `skill`, else a common mistake."""
  if rng.random() < skill:
    return oracle_act(v)
  mistakes = ("offer_first", "offer_now", "offer_bad_day", "alternatives", "book", "off_topic",
              "ask_contact", "ask_day")
  m = mistakes[int(rng.choice(len(mistakes), p=[0.22, 0.2, 0.12, 0.1, 0.14, 0.1, 0.06, 0.06]))]
  service = v.service or (list(SERVICES)[int(rng.integers(len(SERVICES)))] if rng.random() < 0.5 else None)
  pool = template_slots(service or "haircut")
  if m == "offer_first":  # the first free-looking slot of the week, constraints unasked or ignored
    fresh = [s for s in pool if s not in v.tried] or pool
    return Act("offer", slots=(fresh[int(rng.integers(min(3, len(fresh))))],), service=service)
  if m == "offer_now":  # skips the remaining questions and offers what fits the little it knows
    fresh = candidate_slots(v, service or "haircut") or pool
    return Act("offer", slots=(fresh[int(rng.integers(min(2, len(fresh))))],), service=service)
  if m == "offer_bad_day":  # a slot on a day the customer said does not work (or any day, unknown)
    bad = [s for s in pool if s[0] in v.bad_days or (v.days is not None and s[0] not in v.days)] or pool
    return Act("offer", slots=(bad[int(rng.integers(len(bad)))],), service=service)
  if m == "alternatives":
    pick = rng.choice(len(pool), size=2, replace=False)
    return Act("alternatives", slots=tuple(pool[int(i)] for i in sorted(pick)), service=service)
  return Act(m)


CANDIDATE_KINDS = ("ask_service", "ask_day", "ask_time", "ask_staff", "offer", "alternatives", "book",
                   "ask_contact", "off_topic")


def candidate_acts(v: Visible) -> list[Act]:
  """The acts worth trying at a state, one per kind of CANDIDATE_KINDS, the oracle's among them.

  Offers pick slots as the oracle does: the template's slots for the stated service (a haircut's before it is
  known) that break nothing the transcript shows and were not offered yet, in calendar order; then untried
  ones that break something, then tried ones. An offer names the first, alternatives the first two. Every
  parser kind but a greeting, which only helps on the first turn and less than asking the service; chit-chat
  stays as a poor act a ranking must put low.
  """
  best = oracle_act(v)
  service = v.service or "haircut"
  ranked = sorted(template_slots(service), key=lambda s: (s in v.tried, fits_known(v, s, service) == "breaks"))
  out = []
  for kind in CANDIDATE_KINDS:
    if kind == best.kind:
      out.append(best)
    elif kind == "offer":
      out.append(Act("offer", slots=(ranked[0],), service=v.service))
    elif kind == "alternatives":
      out.append(Act("alternatives", slots=tuple(ranked[:2]), service=v.service))
    else:
      out.append(Act(kind))
  return out


# ---- a dialogue-state tracker: what a Q-model with few free parameters reads (qfit.view=dialogue_state) ----

def dialogue_state(turns) -> tuple:
  """The transcript's state as a small key, from its text alone (visible_facts): service, days, time of day and
  staff preference known (or asked), a slot agreed, an offer pending, taken slots seen (0, 1, 2+)."""
  v = visible_facts(turns)
  return (v.service is not None, v.days is not None, v.period is not None, v.staff is not None or v.asked_staff,
          v.agreed is not None, bool(v.last_offer), min(len(v.unavailable), 2))


def act_key(turns, text: str) -> tuple:
  """A suggestion's act; for an offer or alternatives, how its slots look against what the transcript shows
  (the worst of fits_known over them: 'fits' | 'unknown' | 'breaks') and whether one was offered before.
  '' (or conversation.ABSTAIN_TEXT) is abstaining."""
  act = parse_business("" if text == conv_lib.ABSTAIN_TEXT else text)
  if act.kind not in ("offer", "alternatives") or not act.slots:
    return (act.kind,)
  v = visible_facts(turns)
  looks = [fits_known(v, slot, act.service) for slot in act.slots]
  worst = "breaks" if "breaks" in looks else "unknown" if "unknown" in looks else "fits"
  repeated = any(slot in v.tried or (slot[0], slot[1]) in {(d, h) for d, h, _ in v.tried} for slot in act.slots)
  return act.kind, worst, repeated


# ---- the hidden state ----

@dataclasses.dataclass
class BookingState:
  # profile, drawn at reset and logged in metadata
  service: str
  days: tuple[str, ...]
  period: str
  staff_pref: str | None
  calendar_seed: int  # which cells are already booked this week (taken_cells)
  forthcoming: bool  # says what works when an offer breaks a constraint they had not told yet
  patience: float  # annoyance level at which the customer leaves
  trust: float
  opens_with_service: bool
  skill: float  # the business user's own skill (its persona) ...
  assist_trust: float  # ... and how readily it accepts suggestions
  # dynamic state
  service_known: bool = False
  days_known: bool = False
  period_known: bool = False
  staff_known: bool = False
  annoyance: float = 0.0
  agreed: tuple | None = None  # (day, hour, staff) the customer agreed to
  contact_given: bool = False
  last_business: str = ""
  turn: int = 0


_PROFILE = ("service", "days", "period", "staff_pref", "calendar_seed", "forthcoming", "patience", "trust",
            "opens_with_service", "skill", "assist_trust")


def profile_of(state: BookingState) -> dict[str, Any]:
  out = {f: getattr(state, f) for f in _PROFILE}
  out["days"] = list(state.days)
  return out


def fitting_free_slots(s: BookingState) -> list[tuple[str, int, str]]:
  """Slots this week that meet every constraint of the customer (never empty for a drawn customer)."""
  return [slot for slot in template_slots(s.service)
          if slot[0] in s.days and slot[1] in PERIODS[s.period]
          and (s.staff_pref is None or slot[2] == s.staff_pref) and slot_free(s.service, slot, s.calendar_seed)]


def _resolve_staff(s: BookingState, slot: tuple[str, int, str | None]) -> tuple[str, int, str]:
  """An offer without a name goes to the preferred staff member if free, else the first one free."""
  day, hour, staff = slot
  if staff is not None:
    return slot
  doers = [st for st, (services, _) in STAFF.items() if s.service in services]
  if s.staff_pref in doers:
    doers.remove(s.staff_pref)
    doers.insert(0, s.staff_pref)
  free = [st for st in doers if slot_free(s.service, (day, hour, st), s.calendar_seed)]
  return (day, hour, (free or doers)[0])


def offer_verdict(s: BookingState, slot: tuple[str, int, str | None], service: str | None) -> str:
  """What the customer makes of one offered slot: the first constraint it breaks, or 'fit'."""
  day, hour, staff = _resolve_staff(s, slot)
  if service is not None and service != s.service:
    return "wrong_service"
  if day not in s.days:
    return "bad_day"
  if hour not in PERIODS[s.period]:
    return "bad_time"
  if s.staff_pref is not None and staff != s.staff_pref:
    return "bad_staff"
  if not slot_free(s.service, (day, hour, staff), s.calendar_seed):
    return "unavailable"
  return "fit"


# ---- the environment ----

class BookingEnv(base.StaffEnv):
  """Appointment-booking suggested-response simulator (see module docstring). Batched via base.TextEnv."""

  domain = "booking"
  skill_mean = 0.38
  read_business = staticmethod(parse_business)  # the business user's writing: base.StaffEnv
  edit_prefixes = ("Sure! ", "Of course. ", "Lovely. ", "")
  edit_suffixes = ("", " :)", " Let me know.")

  def new_hidden(self, rng):
    while True:  # a customer the salon cannot serve this week would not be in the logs
      service = list(SERVICES)[int(rng.integers(len(SERVICES)))]
      n_days = int(rng.choice(3, p=[0.3, 0.45, 0.25])) + 1
      days = tuple(sorted(rng.choice(len(DAYS), size=n_days, replace=False)))
      doers = [st for st, (services, _) in STAFF.items() if service in services]
      s = BookingState(
          service=service, days=tuple(DAYS[int(i)] for i in days),
          period=list(PERIODS)[int(rng.choice(3, p=[0.4, 0.35, 0.25]))],
          staff_pref=doers[int(rng.integers(len(doers)))] if rng.random() < 0.35 else None,
          calendar_seed=int(rng.integers(2**31)), forthcoming=bool(rng.random() < 0.5),
          patience=float(rng.uniform(2.5, 5.0)), trust=float(rng.uniform(0.2, 0.7)),
          opens_with_service=bool(rng.random() < 0.35),
          skill=base.staff_skill(rng, self.skill_mean),
          assist_trust=float(rng.uniform(0.6, 1.2)))
      if fitting_free_slots(s):
        return s

  def metadata(self, hidden):
    return {"profile": profile_of(hidden)}

  def opening(self, s: BookingState, rng):
    if s.opens_with_service:
      s.service_known = True
      return _pick(rng, _OPEN_SERVICE, phrase=SERVICE_PHRASES[s.service])
    return _pick(rng, _OPEN_VAGUE)

  def classify_outcome(self, customer_text: str) -> int:
    return int(bool(_BOOK_PATTERN.search(customer_text.lower())))

  # -- the customer --
  def _offer(self, s: BookingState, act: Act) -> list[tuple[str, Any]]:
    """State update for an offer of one or more slots; returns reply parts (template key, slot)."""
    s.agreed = None
    resolved = [_resolve_staff(s, slot) for slot in act.slots]
    verdicts = [offer_verdict(s, slot, act.service) for slot in resolved]
    if "fit" in verdicts:
      s.agreed, s.trust = resolved[verdicts.index("fit")], s.trust + 0.05
      return [("agree", s.agreed)]
    verdict, slot = verdicts[0], resolved[0]
    parts = [(verdict, slot)]
    if verdict == "wrong_service":
      s.annoyance, s.trust, s.service_known = s.annoyance + 0.75, s.trust - 0.1, True
    elif verdict == "bad_day":
      s.annoyance, s.trust = s.annoyance + 0.75, s.trust - 0.05
      if s.forthcoming and not s.days_known:
        s.days_known = True
        parts.append(("say_days", slot))
    elif verdict == "bad_time":
      s.annoyance, s.trust = s.annoyance + 0.5, s.trust - 0.05
      if s.forthcoming and not s.period_known:
        s.period_known = True
        parts.append(("say_period", slot))
    elif verdict == "bad_staff":
      s.annoyance, s.staff_known = s.annoyance + 0.5, True
    else:  # unavailable
      s.annoyance, s.trust = s.annoyance + 0.5, s.trust - 0.05
    return parts

  def _ask(self, s: BookingState, known: str, trust_gain: float, reply: str) -> list[tuple[str, Any]]:
    if getattr(s, known):
      s.annoyance += 0.75
      return [("repeat", None)]
    setattr(s, known, True)
    s.trust += trust_gain
    return [(reply, None)]

  def transition(self, s: BookingState, text: str) -> list[tuple[str, Any]]:
    """Deterministic state update for a sent message; returns the reply's parts (template key, slot)."""
    act = parse_business(text)
    base.tick_patience(s, text, per_turn=0.25, repeated_penalty=1.0)  # every turn costs a little patience
    kind = act.kind
    if kind == "greet":
      if s.turn == 1:
        s.trust += 0.05
        return [("vague", None)]
      s.annoyance += 0.5
      return [("confused", None)]
    if kind == "ask_service":
      return self._ask(s, "service_known", 0.15, "say_service")  # being listened to builds trust
    if kind == "ask_day":
      return self._ask(s, "days_known", 0.05, "say_days")
    if kind == "ask_time":
      return self._ask(s, "period_known", 0.05, "say_period")
    if kind == "ask_staff":
      return self._ask(s, "staff_known", 0.05, "say_staff" if s.staff_pref else "no_pref")
    if kind in ("offer", "alternatives"):
      return self._offer(s, act)
    if kind == "book":
      if s.agreed is not None:
        return [("ready", None)]
      s.annoyance, s.trust = s.annoyance + 1.25, s.trust - 0.1
      return [("not_agreed", None)]
    if kind == "ask_contact":
      if s.agreed is None:
        s.annoyance += 0.5
        return [("no_contact", None)]
      if s.contact_given:
        s.annoyance += 0.75
        return [("repeat", None)]
      s.contact_given, s.trust = True, s.trust + 0.05
      return [("contact", None)]
    s.annoyance += 1.0
    return [("confused", None)]

  def book_probability(self, s: BookingState) -> float:
    return float(np.clip(0.25 + 0.8 * s.trust - 0.1 * s.annoyance, 0.02, 0.97))

  def _text(self, s: BookingState, key: str, slot, rng) -> str:
    texts = {
        "vague": _OPEN_VAGUE, "say_service": _SAY_SERVICE, "say_days": _SAY_DAYS, "say_period": _SAY_PERIOD,
        "say_staff": _SAY_STAFF, "no_pref": _NO_PREF, "repeat": _REPEAT, "wrong_service": _WRONG_SERVICE,
        "bad_day": _BAD_DAY, "bad_time": _BAD_TIME, "bad_staff": _BAD_STAFF, "unavailable": _UNAVAILABLE,
        "agree": _AGREE, "not_sure": _NOT_SURE, "not_agreed": _NOT_AGREED, "contact": _CONTACT,
        "no_contact": _NO_CONTACT, "confused": _CONFUSED,
    }
    fmt = {"phrase": SERVICE_PHRASES[s.service], "days": days_text(s.days), "period": s.period,
           "Period": s.period.capitalize(), "staff": (s.staff_pref or "anyone").capitalize()}
    if slot is not None:
      fmt.update(day=slot[0].capitalize(), hour=hour_text(slot[1]).capitalize(),
                 slot=slot_text(slot, with_staff=False))
    out = _pick(rng, texts[key], **fmt)
    return out[0].upper() + out[1:]

  def customer_reply(self, s: BookingState, business_text: str, rng):
    parts = self.transition(s, business_text)
    if parts[0][0] == "ready":
      if rng.random() < self.book_probability(s):
        return _pick(rng, _BOOK), 1
      s.annoyance += 0.5
      parts = [("not_sure", None)]
    if s.annoyance >= s.patience:
      return None, 0  # the customer stops answering
    return " ".join(self._text(s, key, slot, rng) for key, slot in parts), 0

  def restore(self, record: conv_lib.Conversation, n_turns: int) -> base.Episode:
    """Rebuilds the live episode at turn `n_turns` of a logged booking conversation (for true Q).

    The hidden state is a replay of the sent business messages from the logged profile; the episode's
    random stream is re-seeded from the record, so a restored state supports Monte Carlo rollouts.
    """
    self.logged_profile(record)  # this domain's record, with a profile
    prof = record.metadata.get("profile")
    if prof is None or set(prof) != set(_PROFILE):
      raise ValueError(f"record {record.id} has no booking metadata.profile with keys {_PROFILE}; "
                       "it was not logged by BookingEnv")
    s = BookingState(**{**prof, "days": tuple(prof["days"])})
    s.service_known = s.opens_with_service
    turns = record.turns[:n_turns]
    for t in turns:
      if t.role == "business" and self.transition(s, t.text)[0][0] == "ready":
        s.annoyance += 0.5  # the logged conversation went on, so the customer did not confirm then
    return self.restored_episode(record, n_turns, s)

  # -- the business user --
  def judge(self, s: BookingState, record, suggestion: str) -> str:
    act = parse_business(suggestion)
    if act.kind == "off_topic" or suggestion.strip().lower() == s.last_business.strip().lower():
      return "bad"
    v = visible_facts(record.turns)
    best = oracle_act(v)
    if act.kind == "book":
      return "good" if v.agreed is not None else "bad"
    if act.kind in ("offer", "alternatives"):
      looks = [fits_known(v, slot, act.service) for slot in act.slots]
      if "fits" in looks and best.kind == "offer":
        return "good"
      return "bad" if all(x == "breaks" for x in looks) else "ok"
    return "good" if act.kind == best.kind else "ok"


# ---- the shipped policies (they read only the transcript) ----

SCRIPT = policies.Script(visible_facts, oracle_act, staff_act, business_text, candidate_acts)
BookingEnv.script = SCRIPT  # the simulated business user writes with the staff's script


def make_booking_policy(name: str, skill_mean: float = 0.38):
  """Looks a shipped booking policy up by name (policies.shipped): behavior | oracle | random | explore.

  'behavior' is the historical front-desk staff (mistakes: `staff_act`); 'oracle' asks the service, days, time of
  day and staff, offers the first fitting slot, then books; 'explore' the front-desk population (same skill_mean)
  trying candidate acts.
  """
  return policies.lookup("booking", name, policies.shipped(SCRIPT, skill_mean))


def make_policy(name: str, env_config):
  """The registry's entry point (envs/registry.py): a booking policy for the `env` config section."""
  return make_booking_policy(name, skill_mean=env_config.skill_mean)


def make_env(env_config) -> BookingEnv:
  """The booking simulator from the `env` config section (envs/registry.py)."""
  return BookingEnv.from_config(env_config, skill_mean=env_config.skill_mean)
