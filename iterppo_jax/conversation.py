"""Conversation records of the suggested-response (SR) MDP, their JSONL form, and rendering to text.

Follows the SR MDP of Jiang et al. (2025, arXiv 2511.21638, section 2; our summary in shared/PAPER.md):
a conversation alternates customer messages c_i (each with an outcome flag o_i read by a classifier),
the agent's suggestion a_i (possibly an abstention) and the message m_i the business actually sent.
The state s_i keeps all three for every earlier turn, because they differ whenever the business user
edits or rejects a suggestion.

A record is one JSON object per line:

    {"id": "sales-0-000042", "domain": "sales", "policy": "behavior", "outcome": 1,
     "end_reason": "outcome", "metadata": {...},
     "turns": [{"role": "customer", "text": "Hi, I'm browsing.", "flag": 0},
               {"role": "suggestion", "text": "What are you looking for?"},
               {"role": "business", "text": "What are you looking for today?", "feedback": "edit"},
               ...]}

Roles: `customer` (with `flag` o_i), `suggestion` (the agent's a_i; `"abstain": true` and empty text when
the agent made no suggestion), `business` (the sent m_i with `feedback`, one of FEEDBACKS: how the business
user treated the suggestion).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Iterable, Iterator, Sequence

from iterppo_jax import errors
from iterppo_jax import io_utils

ROLES = ("customer", "suggestion", "business")
# The business user's four behaviours (PAPER.md), plus `none` when there was no suggestion to react to.
FEEDBACKS = ("accept", "edit", "influenced", "reject", "none")
# How the loop's environments end a conversation; a domain may log its own as well (a negotiation's "no_deal": a
# logged failure, not a customer who went silent), any lowercase name (END_REASON_PATTERN).
END_REASONS = ("outcome", "business_silent", "customer_left", "max_turns")
END_REASON_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")
# What a policy emits, and how the renderer shows it, when it abstains.
ABSTAIN_TEXT = "<no suggestion>"


# Size limits of one record: a longer message is not a chat turn (a pasted file, a broken exporter) and would stall
# the tokenizer's training; a longer line is refused before it is parsed. Over either, the record is an error
# (or, with skip_invalid, a counted skip).
MAX_MESSAGE_CHARS = 20_000
MAX_RECORD_BYTES = 4_000_000


class ConversationFormatError(errors.DataError):
  """A logged conversation that does not fit the record format; the message names file and line."""


@dataclasses.dataclass
class Turn:
  role: str  # one of ROLES
  text: str  # empty only for an abstaining suggestion
  flag: int | None = None  # customer turns: outcome flag o_i (0/1) from the outcome classifier
  feedback: str | None = None  # business turns: one of FEEDBACKS
  abstain: bool = False  # suggestion turns: the agent made no suggestion

  def to_json(self) -> dict[str, Any]:
    out: dict[str, Any] = {"role": self.role, "text": self.text}
    if self.flag is not None:
      out["flag"] = self.flag
    if self.feedback is not None:
      out["feedback"] = self.feedback
    if self.abstain:
      out["abstain"] = True
    return out


@dataclasses.dataclass
class Conversation:
  id: str
  domain: str
  policy: str
  turns: list[Turn]
  outcome: float  # the episode's outcome label (0/1 for purchase); what Q is regressed on
  end_reason: str = "max_turns"
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
  # What the agent knows privately about this conversation (a negotiator's price floor, the customer's account):
  # shown in every state, after the history and right before the agent's turn, so a prompt cut to its budget
  # (which drops the oldest tokens) always keeps it. '' for none; written to JSON only when set.
  context: str = ""

  def to_json(self) -> dict[str, Any]:
    out = {
        "id": self.id, "domain": self.domain, "policy": self.policy,
        "outcome": self.outcome, "end_reason": self.end_reason,
        "metadata": self.metadata, "turns": [t.to_json() for t in self.turns],
    }
    if self.context:
      out["context"] = self.context
    return out

  def agent_steps(self) -> list[int]:
    """Indices of the suggestion turns: the decision points a_i of the SR MDP."""
    return [i for i, t in enumerate(self.turns) if t.role == "suggestion"]

  def prefix(self, n_turns: int) -> "Conversation":
    """The conversation as it stood before turn `n_turns` (shares metadata; outcome unknown -> kept)."""
    return dataclasses.replace(self, turns=list(self.turns[:n_turns]))


# ---- validation and JSONL i/o ----

def _fail(where: str, msg: str):
  raise ConversationFormatError(f"{where}: {msg}")


def _turn_from_json(obj: Any, where: str) -> Turn:
  if not isinstance(obj, dict):
    _fail(where, f"a turn must be a JSON object, got {type(obj).__name__}")
  role = obj.get("role")
  if role not in ROLES:
    _fail(where, f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
  text = obj.get("text", "")
  if not isinstance(text, str):
    _fail(where, f"turn text must be a string, got {type(text).__name__}")
  abstain = obj.get("abstain", False)
  if not isinstance(abstain, bool):
    _fail(where, f"abstain must be true or false, got {abstain!r}")
  if abstain and text.strip():
    _fail(where, "an abstaining suggestion must have empty text")
  if role != "suggestion" and abstain:
    _fail(where, f"only suggestion turns may abstain, got abstain on a {role} turn")
  if not text.strip() and not abstain:
    _fail(where, f"empty text in a {role} turn (only an abstaining suggestion may be empty)")
  if len(text) > MAX_MESSAGE_CHARS:
    _fail(where, f"a {role} message of {len(text):,} characters; the limit is {MAX_MESSAGE_CHARS:,} "
                 "(conversation.MAX_MESSAGE_CHARS): shorten or drop it, or skip such lines (skip_invalid)")
  flag = obj.get("flag")
  if role == "customer":
    if flag is None:
      flag = 0
    if isinstance(flag, bool) or flag not in (0, 1) or not isinstance(flag, int):
      _fail(where, f"customer flag must be 0 or 1, got {flag!r}")
  elif flag is not None:
    _fail(where, f"only customer turns carry an outcome flag, got one on a {role} turn")
  feedback = obj.get("feedback")
  if role == "business":
    feedback = feedback or "none"
    if feedback not in FEEDBACKS:
      _fail(where, f"unknown feedback {feedback!r}; expected one of {', '.join(FEEDBACKS)}")
  elif feedback is not None:
    _fail(where, f"only business turns carry feedback, got one on a {role} turn")
  return Turn(role=role, text=text, flag=flag, feedback=feedback, abstain=abstain)


def conversation_from_json(obj: Any, where: str = "<record>") -> Conversation:
  """Validates one decoded record; `where` (e.g. 'logs.jsonl:12') prefixes every error."""
  if not isinstance(obj, dict):
    _fail(where, f"a record must be a JSON object, got {type(obj).__name__}")
  if "outcome" not in obj or obj["outcome"] is None:
    _fail(where, "missing outcome (expected a number, e.g. 0 or 1)")
  outcome = obj["outcome"]
  if isinstance(outcome, bool) or not isinstance(outcome, (int, float)) or outcome != outcome or abs(outcome) == float("inf"):
    _fail(where, f"outcome must be a finite number, got {outcome!r}")
  turns_obj = obj.get("turns")
  if not isinstance(turns_obj, list) or not turns_obj:
    _fail(where, "missing or empty 'turns' list")
  turns = [_turn_from_json(t, f"{where}: turn {i}") for i, t in enumerate(turns_obj)]
  if not any(t.role in ("suggestion", "business") for t in turns):
    _fail(where, "conversation has no agent turn (no suggestion or business message)")
  end_reason = obj.get("end_reason", "max_turns")
  if not isinstance(end_reason, str) or not END_REASON_PATTERN.fullmatch(end_reason):
    _fail(where, f"end_reason must be one of {', '.join(END_REASONS)} or a domain's own lowercase name "
                 f"(letters, digits, _), got {end_reason!r}")
  metadata = obj.get("metadata", {})
  if not isinstance(metadata, dict):
    _fail(where, "metadata must be a JSON object")
  context = obj.get("context", "")
  if not isinstance(context, str):
    _fail(where, f"context (the agent's private information) must be a string, got {type(context).__name__}")
  if len(context) > MAX_MESSAGE_CHARS:
    _fail(where, f"a context of {len(context):,} characters; the limit is {MAX_MESSAGE_CHARS:,} "
                 "(conversation.MAX_MESSAGE_CHARS)")
  return Conversation(
      id=str(obj.get("id", where)), domain=str(obj.get("domain", "unknown")),
      policy=str(obj.get("policy", "unknown")), turns=turns, outcome=float(outcome),
      end_reason=end_reason, metadata=metadata, context=context)


@dataclasses.dataclass
class ReadReport:
  """What a lenient read skipped: counts and the first few error messages."""
  read: int = 0
  skipped: int = 0
  errors: list[str] = dataclasses.field(default_factory=list)


def iter_jsonl(path: str, *, skip_invalid: bool = False,
               report: ReadReport | None = None) -> Iterator[Conversation]:
  """Yields validated conversations from a JSONL file.

  Args:
    path: the file; blank lines are ignored.
    skip_invalid: count and skip bad lines (into `report`) instead of raising.
    report: filled with counts when given.
  Raises:
    ConversationFormatError naming `path:line` for malformed or too deeply nested JSON, non-UTF-8 bytes, a
    missing outcome, an unknown role, empty text or a conversation with no agent turn (unless skip_invalid);
    naming `path` for a file that cannot be read (a directory, a symlink loop, no permission) or holds no line.
  """
  report = report if report is not None else ReadReport()
  try:
    f = open(path, "rb")
  except OSError as e:  # a directory, an unreadable file, a symlink loop, ...
    raise ConversationFormatError(f"{path}: cannot read this log file ({e.strerror or e}); expected a readable "
                                  "JSONL file, one conversation per line") from None
  seen_line = False
  with f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}:{lineno}"
      try:
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          _fail(where, f"line is not valid UTF-8 ({e.reason} at byte {e.start})")
        if not line.strip():
          continue
        seen_line = True
        if len(raw) > MAX_RECORD_BYTES:
          _fail(where, f"a line of {len(raw):,} bytes; the limit is {MAX_RECORD_BYTES:,} per conversation "
                       "(conversation.MAX_RECORD_BYTES)")
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          _fail(where, f"malformed JSON ({e.msg} at column {e.colno})")
        except RecursionError:
          _fail(where, "JSON nested too deeply to be a conversation record")
        conv = conversation_from_json(obj, where)
      except ConversationFormatError as e:
        if not skip_invalid:
          raise
        report.skipped += 1
        if len(report.errors) < 20:
          report.errors.append(str(e))
        continue
      report.read += 1
      yield conv
  if not seen_line:
    raise ConversationFormatError(f"{path}: empty (no conversation, only blank lines or nothing); expected a JSONL "
                                  "file, one conversation per line")


def read_jsonl(path: str, *, skip_invalid: bool = False,
               report: ReadReport | None = None) -> list[Conversation]:
  return list(iter_jsonl(path, skip_invalid=skip_invalid, report=report))


def read_glob(pattern: str, *, skip_invalid: bool = False,
              report: ReadReport | None = None) -> list[Conversation]:
  """Reads every file matching `pattern` (sorted, so the order is reproducible)."""
  import glob
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise ConversationFormatError(f"no log files match {pattern!r}; expected a glob of JSONL files")
  out: list[Conversation] = []
  for p in paths:
    out.extend(read_jsonl(p, skip_invalid=skip_invalid, report=report))
  return out


def dumps(conv: Conversation) -> str:
  return json.dumps(conv.to_json(), ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def write_jsonl(path: str, conversations: Iterable[Conversation]) -> int:
  """Writes records atomically (temp file, then rename): a crash leaves the old file or none."""
  lines = [dumps(c) + "\n" for c in conversations]
  io_utils.atomic_write_text(path, "".join(lines))
  return len(lines)


# ---- rendering ----

ROLE_TAGS = {"customer": "<customer>", "suggestion": "<suggestion>", "business": "<business>"}
END_OF_TURN = "<eot>"
CONTEXT_MARK = "[context]"  # plain text (no new special token: vocabularies stay as they are)


def render_turn(turn: Turn) -> str:
  text = ABSTAIN_TEXT if turn.abstain else turn.text
  return f"{ROLE_TAGS[turn.role]} {text} {END_OF_TURN}"


def render_state(turns: Sequence[Turn], max_turns: int | None = None, context: str = "") -> str:
  """The state s_i as text: every earlier customer message, suggestion and sent message.

  The prompt ends with the suggestion tag so that a language model continues with a_i; the conversation's
  `context` (the agent's private information), when set, comes right before it as `[context] ...`, where
  cutting a prompt to its token budget from the left never reaches it.
  `max_turns` keeps the last rounds (a round = customer, suggestion, business) in full and, of the older rounds,
  the customer's messages only: what the customer said (their need, budget, constraints) decides the right action
  however long ago it was said, while old suggestions and sent messages matter less and take most of the tokens.
  """
  turns = compact_turns(turns, max_turns)
  body = " ".join(render_turn(t) for t in turns)
  if context:
    body = f"{body} {CONTEXT_MARK} {context}"
  return f"{body} {ROLE_TAGS['suggestion']}".strip()


def compact_turns(turns: Sequence[Turn], max_turns: int | None) -> list[Turn]:
  """The turns a state shows: the last `max_turns` rounds in full, the customer's messages of older ones."""
  turns = list(turns)
  if max_turns is None:
    return turns
  rounds = [i for i, t in enumerate(turns) if t.role == "customer"]
  if len(rounds) <= max_turns:
    return turns
  cut = rounds[-max_turns] if max_turns > 0 else len(turns)
  return [t for t in turns[:cut] if t.role == "customer"] + turns[cut:]


def render_action(text: str) -> str:
  """The action a_i as the model emits it after the state prompt (ends with end-of-turn)."""
  return f" {text} {END_OF_TURN}"

