"""Conversation records: JSONL round trip, file:line errors for each malformed input, lenient reads,
atomic writes that leave the old file on failure, and rendering/parsing of actions (abstain included)."""

import json
import os

import pytest

from iterppo_jax import conversation as conv_lib
from iterppo_jax import io_utils
from iterppo_jax import rendering
from iterppo_jax.envs import sales


def _good_record(cid="c-0"):
  return conv_lib.Conversation(
      id=cid, domain="sales", policy="hand", outcome=1.0, end_reason="outcome",
      metadata={"seed": 0, "profile": {"need": "laptop", "budget": 900.5}},
      turns=[conv_lib.Turn("customer", "Hi, I'm browsing. Café ☕", flag=0),
             conv_lib.Turn("suggestion", "", abstain=True),
             conv_lib.Turn("business", "Welcome! What are you looking for?", feedback="none"),
             conv_lib.Turn("customer", "A laptop.", flag=0),
             conv_lib.Turn("suggestion", "The Nimbus Pro is $899."),
             conv_lib.Turn("business", "The Nimbus Pro is $899!", feedback="edit"),
             conv_lib.Turn("customer", "I'll buy it.", flag=1)])


def _good_line(cid="c-0"):
  return conv_lib.dumps(_good_record(cid))


# (name, bad line as bytes, expected fragment of the reason)
def _line(outcome, *turns):
  obj = {"id": "x", "turns": [{"role": role, "text": text} for role, text in turns]}
  if outcome is not None:
    obj["outcome"] = outcome
  return json.dumps(obj).encode()


# (name, bad line as bytes, expected fragment of the reason)
_BAD_LINES = [
    ("malformed_json", b'{"id": "x", "outcome": 1, "turns": [', "malformed JSON"),
    ("missing_outcome", _line(None, ("customer", "hi"), ("suggestion", "hello")), "missing outcome"),
    ("unknown_role", _line(0, ("customer", "hi"), ("robot", "beep")), "unknown role 'robot'"),
    ("empty_text", _line(0, ("customer", "hi"), ("business", "  ")), "empty text in a business turn"),
    ("non_utf8", b'{"id": "x", "outcome": 0, "turns": [{"role": "customer", "text": "caf\xe9"}]}',
     "not valid UTF-8"),
    ("no_agent_turn", _line(0, ("customer", "hi"), ("customer", "anyone?")), "no agent turn"),
    ("deep_nesting", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),  # was a RecursionError traceback
    ("bad_end_reason", json.dumps({"outcome": 0, "end_reason": "No Deal!", "turns": [
        {"role": "customer", "text": "hi"}, {"role": "business", "text": "hello"}]}).encode(),
     "end_reason must be one of outcome, business_silent, customer_left, max_turns or a domain's own"),
    ("long_message", _line(0, ("customer", "x" * 20_001), ("business", "hello")),
     "a customer message of 20,001 characters; the limit is 20,000"),
]


def test_jsonl_round_trip(tmp_path):
  records = sales.SalesEnv().play(sales.make_sales_policy("behavior"), 50, seed=3) + [_good_record()]
  path = str(tmp_path / "logs.jsonl")
  assert conv_lib.write_jsonl(path, records) == len(records)
  assert conv_lib.read_jsonl(path) == records
  assert conv_lib.read_glob(str(tmp_path / "*.jsonl")) == records


@pytest.mark.parametrize("name,line,reason", _BAD_LINES, ids=[b[0] for b in _BAD_LINES])
def test_malformed_line_names_file_and_line(tmp_path, name, line, reason):
  path = tmp_path / f"{name}.jsonl"
  # A blank line in between: line numbers count physical lines, blanks included.
  path.write_bytes(_good_line().encode() + b"\n\n" + line + b"\n")
  with pytest.raises(conv_lib.ConversationFormatError) as info:
    conv_lib.read_jsonl(str(path))
  message = str(info.value)
  assert f"{path}:3" in message
  assert reason in message


def _file(name, data):
  def make(tmp_path):
    (tmp_path / name).write_bytes(data)
    return tmp_path / name
  return make


def _symlink_loop(tmp_path):
  path = tmp_path / "loop.jsonl"
  os.symlink(path, path)
  return path


@pytest.mark.parametrize("make, reason", [
    (_file("empty.jsonl", b""), r"empty \(no conversation"),
    (_file("blank.jsonl", b"\n  \n\t\n"), r"empty \(no conversation"),
    (lambda p: (p / "dir.jsonl").mkdir() or p / "dir.jsonl", "cannot read this log file"),
    (_symlink_loop, "cannot read this log file"),
], ids=["empty", "whitespace", "directory", "symlink_loop"])
def test_a_file_that_is_no_log_is_named(tmp_path, make, reason):
  path = make(tmp_path)
  with pytest.raises(conv_lib.ConversationFormatError, match=reason) as info:
    conv_lib.read_jsonl(str(path))
  assert str(path) in str(info.value)


def test_skip_invalid_counts_and_keeps_good_ones(tmp_path):
  path = tmp_path / "mixed.jsonl"
  lines = [_good_line("a").encode()] + [b[1] for b in _BAD_LINES] + [_good_line("b").encode()]
  path.write_bytes(b"\n".join(lines) + b"\n")
  report = conv_lib.ReadReport()
  records = conv_lib.read_jsonl(str(path), skip_invalid=True, report=report)
  assert [r.id for r in records] == ["a", "b"]
  assert records[0] == _good_record("a")
  assert (report.read, report.skipped) == (2, len(_BAD_LINES))
  assert len(report.errors) == len(_BAD_LINES)
  assert all(f"{path}:{i + 2}" in err for i, err in enumerate(report.errors))


class _Unserialisable(conv_lib.Conversation):
  def to_json(self):
    raise RuntimeError("cannot serialise this record")


def test_failed_write_keeps_old_file_and_no_temp_files(tmp_path, monkeypatch):
  path = str(tmp_path / "logs.jsonl")
  conv_lib.write_jsonl(path, [_good_record("old")])
  before = open(path, "rb").read()
  bad = _Unserialisable(**{f: getattr(_good_record("new"), f) for f in
                           ("id", "domain", "policy", "turns", "outcome", "end_reason", "metadata")})
  with pytest.raises(RuntimeError, match="cannot serialise"):
    conv_lib.write_jsonl(path, [_good_record("new"), bad])
  assert open(path, "rb").read() == before
  assert os.listdir(tmp_path) == ["logs.jsonl"]

  # A failure after the temp file is written (the rename itself) also leaves the old file and no temp file.
  def failing_replace(src, dst):
    raise OSError("disk went away")
  monkeypatch.setattr(io_utils.os, "replace", failing_replace)
  with pytest.raises(OSError, match="disk went away"):
    conv_lib.write_jsonl(path, [_good_record("new")])
  monkeypatch.undo()
  assert open(path, "rb").read() == before
  assert os.listdir(tmp_path) == ["logs.jsonl"]
  assert conv_lib.read_jsonl(path)[0].id == "old"


def test_render_state_and_parse_action():
  turns = _good_record().turns
  state = conv_lib.render_state(turns[:4])
  assert state == ("<customer> Hi, I'm browsing. Café ☕ <eot> <suggestion> <no suggestion> <eot> <business> "
                   "Welcome! What are you looking for? <eot> <customer> A laptop. <eot> <suggestion>")
  # max_turns keeps the last rounds in full (a round starts at a customer message) and the customer's messages
  # of older rounds: what the customer said decides the action however long ago it was said.
  assert conv_lib.render_state(turns[:4], max_turns=1) == (
      "<customer> Hi, I'm browsing. Café ☕ <eot> <customer> A laptop. <eot> <suggestion>")
  assert conv_lib.render_state(turns[:4], max_turns=0) == (
      "<customer> Hi, I'm browsing. Café ☕ <eot> <customer> A laptop. <eot> <suggestion>")
  assert conv_lib.render_state([]) == "<suggestion>"
  # Abstaining round-trips through the rendered action: '' -> ABSTAIN_TEXT -> ''.
  assert conv_lib.render_turn(turns[1]) == "<suggestion> <no suggestion> <eot>"
  assert rendering.TAGS.parse(conv_lib.render_action(conv_lib.ABSTAIN_TEXT)) == ""
  assert rendering.TAGS.parse(conv_lib.render_action("Try the Nimbus Pro.")) == "Try the Nimbus Pro."
  # Generation past the end of turn is ignored.
  assert rendering.TAGS.parse(" Hello there <eot> <business> junk") == "Hello there"
  assert rendering.TAGS.parse(" no end marker") == "no end marker"


@pytest.mark.parametrize("record, reason", [
    ({"outcome": 1, "turns": [{"role": "suggestion", "text": "", "abstain": "false"}]}, "abstain must be true or false"),
    ({"outcome": 1, "turns": [{"role": "suggestion", "text": "hi", "abstain": True}]}, "abstaining suggestion"),
    ({"outcome": 1, "turns": [{"role": "customer", "text": "hi", "flag": True},
                              {"role": "business", "text": "hello"}]}, "flag must be 0 or 1"),
    ({"outcome": float("nan"), "turns": [{"role": "business", "text": "hello"}]}, "finite number"),
])
def test_strict_field_types(tmp_path, record, reason):
  path = tmp_path / "strict.jsonl"
  path.write_text(json.dumps(record) + "\n")
  with pytest.raises(conv_lib.ConversationFormatError, match=reason) as e:
    conv_lib.read_jsonl(str(path))
  assert "strict.jsonl:1" in str(e.value)


def test_an_unreadable_log_is_named(tmp_path, monkeypatch):
  """No permission to read: a real chmod 000 where file modes bind (not as root, who reads anyway), else the
  PermissionError that open() raises there, patched in."""
  path = tmp_path / "secret.jsonl"
  path.write_text(conv_lib.dumps(_good_record()) + "\n")
  path.chmod(0)
  if os.geteuid() == 0:
    real_open = open

    def no_permission(file, *args, **kwargs):
      if str(file) == str(path):
        raise PermissionError(13, "Permission denied", str(path))
      return real_open(file, *args, **kwargs)
    monkeypatch.setattr("builtins.open", no_permission)
  with pytest.raises(conv_lib.ConversationFormatError, match=r"cannot read this log file \(Permission denied\)"):
    conv_lib.read_jsonl(str(path))
