"""The customer-support suggested-response simulator: the outcome is a ticket the customer confirms resolved.

A customer opens with a vague complaint ("My app keeps acting up."). The hidden state draws the device the
app runs on (phone, tablet or laptop: the product area), a root cause, how deep the fix lies, the customer's
technical skill, patience and trust. Business messages are read by a deterministic parser into dialogue acts
(greet, ask for the error message, ask when it started, ask the device, propose a fix, plain or guided step by
step, escalate to a specialist, check it works, close the ticket, off-topic). The customer reveals symptoms
only when asked; two symptoms identify the cause (the error message splits the causes into four groups, the
start time into three, and only together do they name it).

Each cause that the customer can fix has a sequence of fixes, cheap and safe first (sign out, then reset the
password; restart, then update, then reinstall), and only one fix of the sequence (drawn at reset, earlier
ones likelier) solves it. Customers refuse a heavy fix before trying cheaper ones, a fix for the wrong cause
wastes patience, a fix proposed before any diagnostic question costs trust, and customers with little
technical skill need the steps for their device. A double billing charge and a data-loss bug can only be
resolved by ESCALATION to a specialist, who needs the symptom described first; escalating a simple issue
annoys. The outcome classifier reads a confirmation ("That fixed it, thanks! All resolved.") from the
customer's text. Early turns matter: diagnosing first is what makes later fixes right (DESIGN.md, and the
brief of the support domain).

As in sales.py, the customer's state moves deterministically with the parsed acts; randomness only picks the
surface text and whether a customer whose issue is fixed says so now. `restore` replays the sent messages.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

from iterppo_jax import conversation as conv_lib
from iterppo_jax.envs import base, policies

DEVICES = ("phone", "tablet", "laptop")
CAUSES = ("login", "sync", "billing", "crash", "slow", "data_loss")
CAUSE_PROBS = (0.2, 0.18, 0.12, 0.2, 0.18, 0.12)
ESCALATE_CAUSES = ("billing", "data_loss")  # the customer cannot fix these; a specialist can
# What the customer says when asked for the error message / when it started (two symptoms name the cause).
ERROR_SYMPTOM = {"login": "account", "sync": "account", "billing": "charge", "crash": "freeze",
                 "slow": "freeze", "data_loss": "missing"}
WHEN_SYMPTOM = {"login": "recent", "sync": "gradual", "billing": "recent", "crash": "update",
                "slow": "gradual", "data_loss": "update"}
FIXES = ("restart", "sign_out", "check_connection", "update", "clear_cache", "reset_password", "reinstall")
# How many fixes a customer must have tried before agreeing to this one (cheap and safe fixes first).
HEAVINESS = {"restart": 0, "sign_out": 0, "check_connection": 0, "update": 1, "clear_cache": 1,
             "reset_password": 1, "reinstall": 2}
HARD_FIXES = ("clear_cache", "reset_password", "reinstall")  # need device-specific steps for a novice
FIX_SEQUENCES = {
    "login": ("sign_out", "reset_password"),
    "sync": ("check_connection", "sign_out", "reinstall"),
    "crash": ("restart", "update", "reinstall"),
    "slow": ("check_connection", "clear_cache", "update"),
}
DEPTH_PROBS = {2: (0.35, 0.65), 3: (0.3, 0.35, 0.35)}  # which fix of the sequence solves it
LOW_SKILL = 0.35  # customers below this technical skill cannot do a hard fix without guided steps
QUESTIONS = ("ask_error", "ask_when", "ask_device")


# ---- the business-message parser (dialogue acts) ----

@dataclasses.dataclass(frozen=True)
class Act:
  kind: str  # greet ask_error ask_when ask_device fix escalate confirm close off_topic
  fix: str | None = None  # one of FIXES for `fix`
  guided: bool = False  # `fix` given as step-by-step instructions ...
  device: str | None = None  # ... for this device


_FIX_PATTERNS = (  # heaviest first: a message naming two fixes is read as its heavier one
    ("reinstall", re.compile(r"reinstall|uninstall|delet(e|ing) the app|installing it again")),
    ("reset_password", re.compile(r"reset(ting)? your password|forgot password|password reset")),
    ("clear_cache", re.compile(r"\bcache\b")),
    ("update", re.compile(r"\bupdate\b|latest version")),
    ("sign_out", re.compile(r"\b(sign(ing)?|log(ging)?) out\b")),
    ("check_connection", re.compile(r"wi-?fi|connection")),
    ("restart", re.compile(r"restart|reboot")),
)
_PATTERNS = (
    ("close", re.compile(r"\b(clos(e|ing)|mark(ing)?) (this|the|your) ticket")),
    ("escalate", re.compile(r"escalat|specialist")),
    ("confirm", re.compile(r"working (now|again)|\bconfirm\b|is it fixed")),
    ("fix", None),
    ("ask_error", re.compile(r"\berror\b")),
    ("ask_when", re.compile(r"when did|since when|how long")),
    ("ask_device", re.compile(r"which device|what device|phone, tablet or laptop")),
    ("greet", re.compile(r"\b(hi|hello|hey)\b|thanks for reaching out")),
)
_GUIDED = re.compile(r"here's how|step by step")


def parse_business(text: str) -> Act:
  """Reads a business message into one dialogue act (first matching rule wins)."""
  low = text.lower().strip()
  for kind, pat in _PATTERNS:
    if kind == "fix":
      fix = next((f for f, p in _FIX_PATTERNS if p.search(low)), None)
      if fix is not None:
        if _GUIDED.search(low):
          device = next((d for d in DEVICES if re.search(rf"\b{d}\b", low)), None)
          return Act("fix", fix=fix, guided=True, device=device)
        return Act("fix", fix=fix)
    elif pat.search(low):
      return Act(kind)
  return Act("off_topic")


# ---- the hidden state ----

@dataclasses.dataclass
class SupportState:
  # profile, drawn at reset and logged in metadata
  cause: str
  depth: int  # index in FIX_SEQUENCES[cause] of the fix that solves it (0 for escalation causes)
  device: str
  tech_skill: float
  patience: float  # annoyance level at which the customer stops answering
  trust: float
  opens_with_error: bool  # the opening already describes the error symptom
  opens_with_device: bool
  opens_with_hint: bool  # a novice says so in the opening
  skill: float  # the business user's own skill (its persona) ...
  assist_trust: float  # ... and how readily it accepts suggestions
  # dynamic state
  error_known: bool = False
  when_known: bool = False
  device_known: bool = False
  attempts: int = 0  # fixes the customer has carried out
  tried: list = dataclasses.field(default_factory=list)
  fixed: bool = False
  annoyance: float = 0.0
  last_business: str = ""
  turn: int = 0


def profile_of(state: SupportState) -> dict[str, Any]:
  fields = ("cause", "depth", "device", "tech_skill", "patience", "trust", "opens_with_error",
            "opens_with_device", "opens_with_hint", "skill", "assist_trust")
  return {f: getattr(state, f) for f in fields}


# ---- customer language ----

_OPEN = ("My app keeps acting up.", "Hi, the app isn't working properly.",
         "Hello, I'm having problems with the app.", "Something is wrong with my app.")
_OPEN_DEVICE = ("My app keeps acting up on my {device}.", "Hi, the app on my {device} isn't working properly.")
_HINT = ("I'm not great with technology.", "Sorry, I'm not very techy.")
REPLIES = {
    "vague": ("Like I said, the app keeps acting up.", "It's just not working right."),
    "error/account": ("It says 'unable to connect to your account'.",
                      "There's an error: 'unable to connect to your account'."),
    "error/freeze": ("No error message, it just freezes.", "No error, it freezes and I have to close it."),
    "error/charge": ("No error, but I was charged twice this month.", "No error, but my card was billed twice."),
    "error/missing": ("No error, but some of my notes are gone.", "No error, but my saved notes disappeared."),
    "when/recent": ("It started yesterday.", "Just since yesterday."),
    "when/update": ("Right after the latest update.", "Since I installed the last update."),
    "when/gradual": ("It's been going on for weeks.", "On and off for a few weeks now."),
    "device/skilled": ("My {device}, running the newest version.", "It's on my {device}, fully up to date."),
    "device/novice": ("My {device}, I think. Not sure which version.", "It's my {device}? Not sure what version."),
    "repeat": ("I already told you that.", "As I said before."),
    "already_working": ("It's working now, though.", "It works now, no need."),
    "already_tried": ("I already tried that.", "I did that already."),
    "refuse_heavy": ("Isn't there something simpler to try first?",
                     "That sounds drastic. Anything simpler first?"),
    "stuck": ("How do I do that?", "Sorry, I don't know how to do that."),
    "wrong_steps": ("Those steps don't match my {device}.", "I'm on a {device}, I don't see that."),
    "no_change": ("I tried that, still the same.", "Done, but no luck.", "Did that, nothing changed."),
    "seems_working": ("It seems to be working now, I think.", "Looks better for now, not sure yet."),
    "specialist_unsure": ("The specialist says it's sorted, I'll check later.",
                          "The specialist got back to me, I'll see if it holds."),
    "needs_details": ("The specialist asked me what the problem even is.",
                      "They sent me back, they need more details about the problem."),
    "escalate_simple": ("I don't want to wait days for a specialist.", "A specialist? Can't you just help me?"),
    "keep_eye": ("Let me keep an eye on it for now.", "I'll see if it holds up first."),
    "not_working": ("No, it's still not working.", "Not yet, it still has the problem."),
    "premature": ("Wait, it's not fixed yet!", "Hold on, my problem isn't resolved!"),
    "confused": ("Sorry, what do you mean?", "I don't follow.", "Okay...?"),
    # The customer confirms: the outcome (o = 1).
    "resolved": ("That fixed it, thanks! All resolved.", "It works now, thank you! All resolved.",
                 "Perfect, that solved it. Thanks!"),
    "specialist_resolved": ("The specialist sorted it out. All resolved, thanks!",
                            "Thanks, the specialist fixed it. All resolved."),
    "confirmed": ("Yes, it's all working. All resolved, thanks!", "Yes, that's all resolved. Thank you!"),
}
CONFIRM_KINDS = ("resolved", "specialist_resolved", "confirmed")
_WORKING_KINDS = ("already_working", "seems_working", "specialist_unsure", "keep_eye")
_NOVICE_KINDS = ("device/novice", "stuck")

_POSITIVE = re.compile(r"\b(all resolved|that (fixed|solved) it)\b")
_NEGATIVE = re.compile(
    r"\b(not|isn't|didn't|hasn't|never|still)\b[^.!?]{0,30}\b(resolved|fixed|solved|working)\b")


def classify_resolved(customer_text: str) -> int:
  """The outcome classifier: 1 when a sentence states the issue resolved and no negation undoes it.

  Questions ("That fixed it?") do not count; a negation within the sentence ("isn't resolved") cancels it.
  """
  for sentence in re.findall(r"[^.!?]+[.!?]*", customer_text.lower()):
    if sentence.endswith("?"):
      continue
    if _POSITIVE.search(sentence) and not _NEGATIVE.search(sentence):
      return 1
  return 0


def _pick(rng: np.random.Generator, options, **fmt) -> str:
  return options[int(rng.integers(len(options)))].format(**fmt)


def _template_regex(template: str) -> re.Pattern:
  return re.compile(re.escape(template.lower()).replace(r"\{device\}", "(" + "|".join(DEVICES) + ")"))


_REPLY_REGEXES = tuple((kind, _template_regex(t)) for kind, opts in REPLIES.items() for t in opts)
_HINT_REGEXES = tuple(_template_regex(t) for t in _HINT)


def reply_kinds(customer_text: str) -> list[str]:
  """Which customer reply templates a message contains (a reader of the transcript can tell them apart)."""
  low = customer_text.lower()
  return [kind for kind, pat in _REPLY_REGEXES if pat.search(low)]


# ---- the business staff's language (scripted policies and the simulated business user) ----

BUSINESS_TEMPLATES = {
    "greet": ("Hi, thanks for reaching out! How can I help?", "Hello! I'm here to help."),
    "ask_error": ("What error message do you see, if any?", "Does the app show any error message?",
                  "Could you tell me the exact error you see?"),
    "ask_when": ("When did the problem start?", "When did this start happening?",
                 "How long has this been going on?"),
    "ask_device": ("Which device are you using?", "What device is the app on?",
                   "Are you on a phone, tablet or laptop?"),
    "fix/restart": ("Please try restarting the app.", "Could you close the app and restart it?"),
    "fix/sign_out": ("Please sign out and sign back in.", "Try logging out of the app and back in."),
    "fix/check_connection": ("Please check your internet connection.", "Could you turn Wi-Fi off and on again?"),
    "fix/update": ("Please update the app to the latest version.", "Could you install the latest app update?"),
    "fix/clear_cache": ("Please try clearing the app's cache.", "Could you clear the app cache?"),
    "fix/reset_password": ("Please reset your password from the login screen.", "Try resetting your password."),
    "fix/reinstall": ("Please uninstall and reinstall the app.", "Try deleting the app and installing it again."),
    "guided": ("Here's how on your {device}: {steps}.", "Step by step on your {device}: {steps}."),
    "escalate": ("I'm escalating this to a specialist who can fix it.", "Let me pass this to our specialist team.",
                 "I'll escalate your ticket to a specialist now."),
    "confirm": ("Is everything working now?", "Can you confirm the issue is resolved?",
                "Is it all working again?"),
    "close": ("I'll close this ticket now. Have a great day!", "Glad I could help, closing the ticket now.",
              "I'm marking this ticket as solved."),
    "off_topic": ("How is your day going?", "Have you tried our new dark mode?",
                  "Did you see our latest newsletter?"),
}
GUIDED_STEPS = {
    "restart": "close the app fully, then restart it",
    "sign_out": "open the menu, tap Sign out, then sign back in",
    "check_connection": "turn Wi-Fi off and on, then open the app",
    "update": "open the app store and tap Update",
    "clear_cache": "open Settings, tap Apps, then Clear cache",
    "reset_password": "tap Forgot password on the login screen",
    "reinstall": "delete the app, then reinstall it from the store",
}


def business_text(act: Act, rng: np.random.Generator) -> str:
  """A templated business message expressing `act`."""
  if act.kind == "fix":
    if act.fix not in FIXES:
      raise ValueError(f"a fix act needs one of {FIXES}, got {act.fix!r}")
    if act.guided:
      if act.device not in DEVICES:
        raise ValueError(f"a guided fix needs a device in {DEVICES}, got {act.device!r}")
      return _pick(rng, BUSINESS_TEMPLATES["guided"], device=act.device, steps=GUIDED_STEPS[act.fix])
    return _pick(rng, BUSINESS_TEMPLATES[f"fix/{act.fix}"])
  if act.kind not in BUSINESS_TEMPLATES:
    raise ValueError(f"unknown act kind {act.kind!r}")
  return _pick(rng, BUSINESS_TEMPLATES[act.kind])


# ---- what a reader of the transcript can know (scripted policies and the business user) ----

@dataclasses.dataclass
class Visible:
  error: str | None = None  # the error symptom group the customer described
  when: str | None = None  # when it started
  device: str | None = None
  novice: bool = False  # the customer showed little technical skill
  tried: list = dataclasses.field(default_factory=list)  # fixes the customer carried out without success
  working: bool = False  # the customer says it works but has not confirmed
  last_business_act: Act | None = None
  n_business: int = 0


def visible_facts(turns: Sequence[conv_lib.Turn]) -> Visible:
  """Reads symptoms, device, skill hints and fix attempts from the transcript text alone."""
  v = Visible()
  for t in turns:
    if t.role == "business":
      act = parse_business(t.text)
      v.last_business_act, v.n_business = act, v.n_business + 1
      continue
    if t.role != "customer":
      continue
    low = t.text.lower()
    kinds = reply_kinds(low)
    for kind in kinds:
      group, _, value = kind.partition("/")
      if group == "error":
        v.error = value
      elif group == "when":
        v.when = value
    m = re.search(r"\b(" + "|".join(DEVICES) + r")\b", low)
    if m:
      v.device = m.group(1)
    if any(k in _NOVICE_KINDS for k in kinds) or any(p.search(low) for p in _HINT_REGEXES):
      v.novice = True
    last = v.last_business_act
    if last is not None and last.kind == "fix" and "no_change" in kinds and last.fix not in v.tried:
      v.tried.append(last.fix)
    if any(k in _WORKING_KINDS for k in kinds):
      v.working = True
    elif "not_working" in kinds or "premature" in kinds:
      v.working = False
  return v


def candidate_causes(v: Visible) -> list[str]:
  """The causes consistent with the symptoms the customer has described."""
  return [c for c in CAUSES if (v.error is None or ERROR_SYMPTOM[c] == v.error)
          and (v.when is None or WHEN_SYMPTOM[c] == v.when)]


def _fix_act(fix: str, v: Visible) -> Act:
  """Plain instructions, or the steps for the customer's device when they are a novice at a hard fix."""
  if fix in HARD_FIXES and v.novice:
    if v.device is None:
      return Act("ask_device")
    return Act("fix", fix=fix, guided=True, device=v.device)
  return Act("fix", fix=fix)


def oracle_act(v: Visible) -> Act:
  """The best next act given what the transcript shows (the oracle's strategy)."""
  if v.working:
    last = v.last_business_act
    return Act("close") if last is not None and last.kind == "confirm" else Act("confirm")
  if v.error is None:
    return Act("ask_error")
  causes = candidate_causes(v)
  if len(causes) > 1:
    return Act("ask_when")
  if not causes or causes[0] in ESCALATE_CAUSES:  # no known cause fits (hand-written logs): a specialist
    return Act("escalate")
  nxt = next((f for f in FIX_SEQUENCES[causes[0]] if f not in v.tried), None)
  if nxt is None:
    return Act("escalate")  # every fix failed: hand it over
  return _fix_act(nxt, v)


def staff_act(v: Visible, skill: float, rng: np.random.Generator) -> Act:
  """A support agent's own act: the oracle's with probability `skill`, else a common mistake."""
  if rng.random() < skill:
    return oracle_act(v)
  mistakes = ["guess_fix", "reinstall", "escalate", "close", "off_topic", "ask_device"]
  m = mistakes[int(rng.choice(len(mistakes), p=[0.35, 0.15, 0.15, 0.15, 0.12, 0.08]))]
  if m == "guess_fix":  # a fix without (finishing) the diagnosis: any fix, or one for a guessed cause
    causes = [c for c in candidate_causes(v) if c in FIX_SEQUENCES]
    if v.error is not None and causes and rng.random() < 0.5:
      cause = causes[int(rng.integers(len(causes)))]
      options = [f for f in FIX_SEQUENCES[cause] if f not in v.tried] or list(FIX_SEQUENCES[cause])
      return Act("fix", fix=options[0])
    return Act("fix", fix=FIXES[int(rng.integers(len(FIXES)))])
  if m == "reinstall":  # jumps to the heavy fix
    return Act("fix", fix="reinstall")
  return Act(m)  # escalating too early, closing prematurely, chit-chat, an idle question


CANDIDATE_KINDS = ("ask_error", "ask_when", "ask_device", "fix", "escalate", "confirm", "close", "off_topic")


def candidate_acts(v: Visible) -> list[Act]:
  """The acts worth trying at a state, one per kind of CANDIDATE_KINDS, the oracle's among them.

  The fix is the oracle's when it fixes, else the first untried fix for the likeliest cause the symptoms allow
  (any cause the customer can fix, before a diagnosis), with the steps for the device as the oracle gives them
  (plain when the device is unknown). Every parser kind but a greeting, which only helps on the first turn and
  less than asking the error; chit-chat stays as a poor act a ranking must put low.
  """
  best = oracle_act(v)
  causes = [c for c in candidate_causes(v) if c in FIX_SEQUENCES] or list(FIX_SEQUENCES)
  causes.sort(key=lambda c: -CAUSE_PROBS[CAUSES.index(c)])  # stable: CAUSES order among equally likely ones
  fix = next((f for c in causes for f in FIX_SEQUENCES[c] if f not in v.tried), "restart")
  guess = _fix_act(fix, v)
  out = []
  for kind in CANDIDATE_KINDS:
    if kind == best.kind:
      out.append(best)
    elif kind == "fix":
      out.append(guess if guess.kind == "fix" else Act("fix", fix=fix))
    else:
      out.append(Act(kind))
  return out


# ---- a dialogue-state tracker: what a Q-model with few free parameters reads (qfit.view=dialogue_state) ----

def dialogue_state(turns) -> tuple:
  """The transcript's state as a small key, from its text alone (visible_facts): error and onset known, how many
  causes the symptoms leave (0, 1, several), novice, device known, fixes tried (0, 1, 2+), it works again, and
  whether the last business act asked to confirm."""
  v = visible_facts(turns)
  causes = len(candidate_causes(v))
  last = v.last_business_act.kind if v.last_business_act is not None else None
  return (v.error is not None, v.when is not None, min(causes, 2), v.novice, v.device is not None,
          min(len(v.tried), 2), v.working, last == "confirm")


def act_key(turns, text: str) -> tuple:
  """A suggestion's act; for a fix, how it relates to the symptoms ('next': the first untried fix of a cause the
  symptoms allow, 'later', 'tried', 'unrelated'), whether it is a hard one and how it is given (steps for the
  customer's device, for another device, plain). '' (or conversation.ABSTAIN_TEXT) is abstaining."""
  act = parse_business("" if text == conv_lib.ABSTAIN_TEXT else text)
  if act.kind != "fix":
    return (act.kind,)
  v = visible_facts(turns)
  sequences = [FIX_SEQUENCES[c] for c in candidate_causes(v) if c in FIX_SEQUENCES]
  if act.fix in v.tried:
    relation = "tried"
  elif any(next((f for f in seq if f not in v.tried), None) == act.fix for seq in sequences):
    relation = "next"
  elif any(act.fix in seq for seq in sequences):
    relation = "later"
  else:
    relation = "unrelated"
  given = ("plain" if not act.guided else "steps" if act.device is not None and act.device == v.device
           else "steps, other device")
  return act.kind, relation, act.fix in HARD_FIXES, given


# ---- the environment ----

class SupportEnv(base.StaffEnv):
  """Customer-support suggested-response simulator (see module docstring). Batched via base.TextEnv."""

  domain = "support"
  skill_mean = 0.2
  read_business = staticmethod(parse_business)  # the business user's writing: base.StaffEnv
  edit_prefixes = ("Thanks. ", "Got it. ", "Okay! ", "")
  edit_suffixes = ("", " :)", " Let me know how it goes.")

  def new_hidden(self, rng):
    cause = CAUSES[int(rng.choice(len(CAUSES), p=CAUSE_PROBS))]
    seq = FIX_SEQUENCES.get(cause, ())
    depth = int(rng.choice(len(seq), p=DEPTH_PROBS[len(seq)])) if seq else 0
    tech_skill = float(rng.uniform())
    return SupportState(
        cause=cause, depth=depth, device=DEVICES[int(rng.integers(len(DEVICES)))], tech_skill=tech_skill,
        patience=float(rng.uniform(2.5, 5.0)), trust=float(rng.uniform(0.2, 0.7)),
        opens_with_error=bool(rng.random() < 0.25), opens_with_device=bool(rng.random() < 0.3),
        opens_with_hint=bool(tech_skill < LOW_SKILL and rng.random() < 0.5),
        skill=base.staff_skill(rng, self.skill_mean),
        assist_trust=float(rng.uniform(0.6, 1.2)))

  def metadata(self, hidden):
    return {"profile": profile_of(hidden)}

  def _apply_opening(self, s: SupportState) -> None:
    s.error_known = s.opens_with_error
    s.device_known = s.opens_with_device

  def opening(self, s: SupportState, rng):
    self._apply_opening(s)
    parts = [_pick(rng, _HINT)] if s.opens_with_hint else []
    parts.append(_pick(rng, _OPEN_DEVICE, device=s.device) if s.opens_with_device else _pick(rng, _OPEN))
    if s.opens_with_error:
      parts.append(_pick(rng, REPLIES[f"error/{ERROR_SYMPTOM[s.cause]}"]))
    return " ".join(parts)

  def classify_outcome(self, customer_text: str) -> int:
    return classify_resolved(customer_text)

  # -- the customer --
  def _try_fix(self, s: SupportState, act: Act) -> str:
    """A proposed fix: refused, not understood, or carried out (and maybe the one that solves it)."""
    if act.fix in s.tried:
      s.annoyance += 0.75
      return "already_tried"
    if HEAVINESS[act.fix] > s.attempts:
      s.annoyance, s.trust = s.annoyance + 1.0, s.trust - 0.1
      return "refuse_heavy"
    if act.fix in HARD_FIXES and s.tech_skill < LOW_SKILL and not (act.guided and act.device == s.device):
      if act.guided:
        s.device_known, s.annoyance = True, s.annoyance + 0.5
        return "wrong_steps"
      s.annoyance += 0.25
      return "stuck"
    if not (s.error_known or s.when_known):  # "you didn't even ask what's wrong"
      s.annoyance, s.trust = s.annoyance + 0.75, s.trust - 0.15
    s.attempts += 1
    s.tried.append(act.fix)
    seq = FIX_SEQUENCES.get(s.cause, ())
    if seq and act.fix == seq[s.depth]:
      s.fixed, s.trust = True, s.trust + 0.1
      return "resolved"
    if act.fix not in seq:  # a fix for another cause: wasted effort
      s.annoyance, s.trust = s.annoyance + 0.75, s.trust - 0.1
    return "no_change"

  def transition(self, s: SupportState, text: str) -> str:
    """Deterministic state update for a sent message; returns the kind of reply (a REPLIES key)."""
    act = parse_business(text)
    base.tick_patience(s, text, per_turn=0.25, repeated_penalty=1.0)  # every turn costs a little patience
    kind = act.kind
    if kind == "greet":
      if s.turn == 1:
        s.trust += 0.05
        return "vague"
      s.annoyance += 0.5
      return "confused"
    if s.fixed and kind in QUESTIONS + ("fix", "escalate"):
      s.annoyance += 0.25
      return "already_working"
    if kind in QUESTIONS:
      attr = {"ask_error": "error_known", "ask_when": "when_known", "ask_device": "device_known"}[kind]
      if getattr(s, attr):
        s.annoyance += 0.75
        return "repeat"
      setattr(s, attr, True)
      if kind == "ask_error":
        s.trust += 0.1  # being listened to builds trust
        return f"error/{ERROR_SYMPTOM[s.cause]}"
      if kind == "ask_when":
        s.trust += 0.1
        return f"when/{WHEN_SYMPTOM[s.cause]}"
      return "device/novice" if s.tech_skill < LOW_SKILL else "device/skilled"
    if kind == "fix":
      return self._try_fix(s, act)
    if kind == "escalate":
      if s.cause not in ESCALATE_CAUSES:
        s.annoyance, s.trust = s.annoyance + 1.5, s.trust - 0.15
        return "escalate_simple"
      if not s.error_known:
        s.annoyance += 1.0
        return "needs_details"
      s.fixed, s.trust = True, s.trust + 0.1
      return "specialist_resolved"
    if kind in ("confirm", "close"):
      if s.fixed:
        return "confirmed"
      if kind == "confirm":
        s.annoyance += 0.5
        return "not_working"
      s.annoyance, s.trust = s.annoyance + 1.5, s.trust - 0.2
      return "premature"
    s.annoyance += 1.0
    return "confused"

  def confirm_probability(self, s: SupportState, kind: str) -> float:
    """Chance that a customer whose issue is fixed confirms it now (asked directly, they say so more often)."""
    base_p = 0.6 if kind == "confirmed" else 0.3
    return float(np.clip(base_p + 0.6 * s.trust - 0.1 * s.annoyance, 0.05, 0.95))

  def _not_confirmed(self, s: SupportState, kind: str) -> str:
    """The state change and reply when a fixed customer does not confirm (replayed by `restore`)."""
    if kind == "confirmed":
      s.annoyance += 0.5
      return "keep_eye"
    return "seems_working" if kind == "resolved" else "specialist_unsure"

  def customer_reply(self, s: SupportState, business_text_: str, rng):
    kind = self.transition(s, business_text_)
    if kind in CONFIRM_KINDS:
      if rng.random() < self.confirm_probability(s, kind):
        return _pick(rng, REPLIES[kind]), 1
      kind = self._not_confirmed(s, kind)
    if s.annoyance >= s.patience:
      return None, 0  # the customer stops answering
    return _pick(rng, REPLIES[kind], device=s.device), 0

  def restore(self, record: conv_lib.Conversation, n_turns: int) -> base.Episode:
    """Rebuilds the live episode at turn `n_turns` of a logged support conversation (for true Q).

    The hidden state is a replay of the sent business messages from the logged profile (a logged conversation
    that went on after a fix had not been confirmed then); the random stream is re-seeded from the record.
    """
    self.logged_profile(record)  # this domain's record, with a profile
    prof = record.metadata.get("profile")
    if prof is None or "cause" not in prof:
      raise ValueError(f"record {record.id} has no metadata.profile with a cause; "
                       "it was not logged by SupportEnv")
    s = SupportState(**prof)
    self._apply_opening(s)
    turns = record.turns[:n_turns]
    for t in turns:
      if t.role == "business":
        kind = self.transition(s, t.text)
        if kind in CONFIRM_KINDS:
          self._not_confirmed(s, kind)
    return self.restored_episode(record, n_turns, s)

  # -- the business user --
  def rewrite_act(self, s: SupportState, act: Act) -> Act:
    # a guided fix with no device named is written as an unguided one (the staff do not guess the device)
    if act.kind == "fix" and act.guided and act.device is None:
      return dataclasses.replace(act, guided=False)
    return act

  def judge(self, s: SupportState, record, suggestion: str) -> str:
    act = parse_business(suggestion)
    if act.kind == "off_topic" or suggestion.strip().lower() == s.last_business.strip().lower():
      return "bad"
    best = oracle_act(visible_facts(record.turns))
    if act == best or (act.kind == best.kind and act.kind != "fix") or (
        act.kind in ("confirm", "close") and best.kind in ("confirm", "close")):
      return "good"
    if act.kind == "close" or (act.kind == "greet" and len(record.turns) > 1):
      return "bad"  # closing an open ticket; a greeting mid-conversation
    return "ok"  # a plausible step the business user cannot tell from the right one (a fix, escalating)


# ---- scripted policies (they read only the transcript) ----

SCRIPT = policies.Script(visible_facts, oracle_act, staff_act, business_text, candidate_acts)
SupportEnv.script = SCRIPT  # the simulated business user writes with the staff's script


def make_support_policy(name: str, skill_mean: float = 0.2):
  """Looks a shipped support policy up by name (policies.shipped): behavior | oracle | random | explore.

  'behavior' is the historical support agents (mistakes: guessing a fix, jumping to reinstall, escalating or closing
  early, ...); 'oracle' asks the error, then when it started if that is ambiguous; fixes in order or escalates; then
  confirms; 'explore' the agent population (same skill_mean) trying candidate acts.
  """
  return policies.lookup("support", name, policies.shipped(SCRIPT, skill_mean))


def make_policy(name: str, env_config):
  """The registry's entry point: a support policy for the `env` config section."""
  return make_support_policy(name, skill_mean=env_config.skill_mean)


def make_env(env_config) -> SupportEnv:
  """The support simulator from the `env` config section (envs/registry.py)."""
  return SupportEnv.from_config(env_config, skill_mean=env_config.skill_mean)
