"""Fuzzing both log readers (the offline loop's and build_dataset's) with mutated logs: every file either reads
or fails with a ConversationFormatError naming it (never another exception, which an entry point would report
as an internal error), within a stated time per file, and a failed file leaves no workdir or dataset behind.

Mutations (seeded): byte flips, deleted and inserted bytes, truncated lines, non-UTF-8 bytes, and JSON-level
edits: a key dropped or given a wrong type, a role or feedback misspelt, NaN or huge outcomes, deep nesting, an
over-long message, many turns.
"""

import json
import signal

import numpy as np
import pytest

from configs import sales as sales_config
from iterppo_jax import conversation as conv_lib
from iterppo_jax import loop
from iterppo_jax import tfds_conversations
from iterppo_jax.envs import sales

FILES = 120
SECONDS_PER_FILE = 20  # the stated bound on reading (and refusing) one mutated file


class _Hang(Exception):
  pass


def _alarm(signum, frame):
  raise _Hang(f"reading one file took more than {SECONDS_PER_FILE} s")


def _json_mutation(rng, record: dict) -> dict:
  r = json.loads(json.dumps(record))
  turn = r["turns"][int(rng.integers(len(r["turns"])))]
  kind = int(rng.integers(12))
  if kind == 0:
    del r[["outcome", "turns", "id"][int(rng.integers(3))]]
  elif kind == 1:
    r["outcome"] = [float("nan"), 1e309, "1", None, True, [1]][int(rng.integers(6))]
  elif kind == 2:
    turn["role"] = ["Customer", "agent", "", 3][int(rng.integers(4))]
  elif kind == 3:
    turn["text"] = [None, 5, ["hi"], "", " \n"][int(rng.integers(5))]
  elif kind == 4:
    turn["feedback"] = ["acept", 1, "none"][int(rng.integers(3))]
  elif kind == 5:
    turn["flag"] = [2, -1, "1", 0.5, None][int(rng.integers(5))]
  elif kind == 6:
    turn["text"] = "w" * int(rng.integers(conv_lib.MAX_MESSAGE_CHARS - 10, 3 * conv_lib.MAX_MESSAGE_CHARS))
  elif kind == 7:
    depth = int(rng.integers(10, 100_000))
    r["metadata"] = json.loads("[" * min(depth, 500) + "]" * min(depth, 500)) if depth < 500 else "DEEP"
  elif kind == 8:
    r["turns"] = r["turns"] * int(rng.integers(2, 60))
  elif kind == 9:
    r["end_reason"] = ["no_deal", None, 7][int(rng.integers(3))]
  elif kind == 10:
    turn["abstain"] = ["yes", True, 1][int(rng.integers(3))]
  else:
    r["metadata"] = ["x", 3, None][int(rng.integers(3))]
  return r


def _byte_mutation(rng, line: bytes) -> bytes:
  b = bytearray(line)
  kind = int(rng.integers(5))
  i = int(rng.integers(len(b)))
  if kind == 0:
    b[i] = int(rng.integers(256))
  elif kind == 1:
    del b[i:i + int(rng.integers(1, 40))]
  elif kind == 2:
    b[i:i] = bytes(rng.integers(0, 256, int(rng.integers(1, 20)), dtype=np.uint8))
  elif kind == 3:
    b = b[:i]
  else:
    b[i:i] = b"\xff\xfe"
  return bytes(b)


def _mutated_files(tmp_path):
  records = [c.to_json() for c in sales.SalesEnv().play(sales.make_sales_policy("behavior"), 3, seed=0)]
  rng = np.random.default_rng(0)
  for n in range(FILES):
    lines = [json.dumps(r).encode() for r in records]
    j = int(rng.integers(len(lines)))
    if rng.random() < 0.5:
      mutated = _json_mutation(rng, records[j])
      if mutated.get("metadata") == "DEEP":
        lines[j] = lines[j][:-1] + b', "deep": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
      else:
        lines[j] = json.dumps(mutated).encode()
    else:
      lines[j] = _byte_mutation(rng, lines[j])
    path = tmp_path / f"m{n:03d}.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    yield path


def test_mutated_logs_read_or_fail_cleanly_in_both_readers(tmp_path):
  old = signal.signal(signal.SIGALRM, _alarm)
  outcomes = {"read": 0, "refused": 0}
  valid_built = 0
  try:
    for path in _mutated_files(tmp_path):
      signal.alarm(SECONDS_PER_FILE)
      try:
        try:
          tfds_conversations.validate([str(path)])
          conv_lib.read_glob(str(path))
          outcomes["read"] += 1
          valid = True
        except conv_lib.ConversationFormatError as e:
          assert str(path) in str(e)
          outcomes["refused"] += 1
          valid = False
        ddir = tmp_path / f"ds_{path.stem}"
        if not valid:  # both entry points refuse it before writing anything
          with pytest.raises(conv_lib.ConversationFormatError):
            tfds_conversations.build([str(path)], str(ddir))
          assert not ddir.exists()
          c = sales_config.get_config("tiny")
          c.loop.logs = str(path)
          wd = tmp_path / f"w_{path.stem}"
          with pytest.raises(conv_lib.ConversationFormatError):
            loop.run(c, str(wd))
          assert not wd.exists()
        elif valid_built < 2:  # a readable mutant builds a dataset like any log
          assert tfds_conversations.build([str(path)], str(ddir)).report.read == 3
          valid_built += 1
      finally:
        signal.alarm(0)
  finally:
    signal.signal(signal.SIGALRM, old)
  # The mutations exercise both outcomes (a fuzzer that only produced garbage, or nothing, would prove little).
  assert outcomes["refused"] >= FILES // 2 and outcomes["read"] >= 5, outcomes
