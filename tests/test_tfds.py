"""The TFDS conversation dataset: JSONL -> array_record -> records equal to the originals, without TensorFlow;
malformed input fails with file:line before anything is written; the entry point end to end."""

import os
import subprocess
import sys

import pytest

from iterppo_jax import conversation as conv_lib
from iterppo_jax import tfds_conversations
from iterppo_jax.envs import sales

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hand_record():
  """Every field that needs care: abstain, None flag/feedback, unicode, nested metadata, a float outcome, the
  agent's context."""
  T = conv_lib.Turn
  return conv_lib.Conversation(
      id="hand-0", domain="sales", policy="hand", outcome=0.25, end_reason="customer_left",
      metadata={"profile": {"need": "camera", "budget": 812.5, "tags": ["a", "b"]}, "note": "Café ☕"},
      turns=[T("customer", "Bonjour, un appareil photo ? 📷", flag=0), T("suggestion", "", abstain=True),
             T("business", "Welcome!", feedback="none"), T("customer", "Merci.", flag=0),
             T("suggestion", "Lumo Z5 at $799."), T("business", "Lumo Z5, $799.", feedback="influenced")],
      context="Loyalty tier: gold (10% off).")


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
  records = sales.SalesEnv().play(sales.make_sales_policy("behavior"), 100, seed=0) + [_hand_record()]
  path = str(tmp_path_factory.mktemp("logs") / "conversations.jsonl")
  conv_lib.write_jsonl(path, records)
  return path, records


def test_round_trip_equal(logs, tmp_path):
  path, records = logs
  builder = tfds_conversations.build([path], str(tmp_path / "ds"))
  assert str(builder.version) == "1.1.0"
  assert builder.info.splits["train"].num_examples == len(records)
  assert (builder.report.read, builder.report.skipped) == (len(records), 0)
  loaded = tfds_conversations.load(str(tmp_path / "ds"))
  assert loaded == records  # dataclass equality: every field of every turn, in the original order
  assert os.listdir(tmp_path / "ds") == ["conversations"]  # no staging or download dirs left
  with pytest.raises(FileExistsError, match="overwrite"):
    tfds_conversations.build([path], str(tmp_path / "ds"))
  tfds_conversations.build([path, path], str(tmp_path / "ds"), overwrite=True)
  assert tfds_conversations.load(str(tmp_path / "ds")) == records + records


def test_heldout_split_is_a_stable_partition(logs, tmp_path):
  path, records = logs
  tfds_conversations.build([path], str(tmp_path / "a"), heldout_fraction=0.3)
  tfds_conversations.build([path], str(tmp_path / "b"), heldout_fraction=0.3)
  train = tfds_conversations.load(str(tmp_path / "a"))
  heldout = tfds_conversations.load(str(tmp_path / "a"), split="heldout")
  assert 0 < len(heldout) < len(records)
  assert sorted(r.id for r in train + heldout) == sorted(r.id for r in records)
  again = tfds_conversations.load(str(tmp_path / "b"), split="heldout")
  assert [r.id for r in again] == [r.id for r in heldout]


def test_malformed_line_fails_before_writing(logs, tmp_path):
  path, records = logs
  bad = tmp_path / "bad.jsonl"
  lines = open(path, "rb").read().splitlines()
  bad.write_bytes(b"\n".join(lines[:5] + [b'{"id": "x", "turns": [}'] + lines[5:]) + b"\n")
  data_dir = tmp_path / "ds"
  with pytest.raises(conv_lib.ConversationFormatError, match=f"{bad}:6: malformed JSON"):
    tfds_conversations.build([str(bad)], str(data_dir))
  assert not data_dir.exists()
  builder = tfds_conversations.build([str(bad)], str(data_dir), skip_invalid=True)
  assert (builder.report.read, builder.report.skipped) == (len(records), 1)
  assert f"{bad}:6" in builder.report.errors[0]
  assert tfds_conversations.load(str(data_dir)) == records
  with pytest.raises(FileNotFoundError, match="build it first"):
    tfds_conversations.load(str(tmp_path / "nothing"))


def test_build_dataset_entry_point_without_tensorflow(logs, tmp_path):
  path, records = logs
  env = dict(os.environ, PYTHONPATH=ROOT)
  no_tf = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, capture_output=True)
  assert no_tf.returncode != 0, "tensorflow must not be installed: the no-TF path is what is tested"
  workdir = tmp_path / "work"
  cmd = [sys.executable, "-m", "experiments.build_dataset", f"--logs={os.path.dirname(path)}/*.jsonl",
         f"--workdir={workdir}"]
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert f"dataset dir: {workdir}/conversations/1.1.0" in done.stdout
  assert "version: 1.1.0" in done.stdout and f"records: {len(records)}" in done.stdout
  assert tfds_conversations.load(str(workdir)) == records
  # A malformed file: non-zero exit naming file:line, nothing written.
  bad = tmp_path / "bad" / "logs.jsonl"
  bad.parent.mkdir()
  bad.write_bytes(open(path, "rb").read() + b'{"outcome": 1, "turns": [{"role": "robot", "text": "x"}]}\n')
  cmd = [sys.executable, "-m", "experiments.build_dataset", f"--logs={bad}", f"--workdir={tmp_path / 'w2'}"]
  failed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert failed.returncode != 0
  assert f"{bad}:{len(records) + 1}" in failed.stderr and "unknown role" in failed.stderr
  assert not (tmp_path / "w2").exists()
  done = subprocess.run(cmd + ["--skip_invalid"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr
  assert "skipped 1 invalid line(s)" in done.stdout
