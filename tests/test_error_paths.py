"""What a user sees when a run cannot go on: one `error:` line, a documented exit code (iterppo_jax/errors.py),
no traceback, and a workdir that holds nothing new (a run that failed before its first phase completed) or only
complete checkpoints, from which the same command resumes.

Covered here through the entry points: usage errors, bad logs for the offline loop, a workdir another run
holds, a full disk (a small tmpfs where the test may mount one, otherwise a file size limit: a real failing
write either way), a read-only workdir and a diverged loss. The readers' own messages are tested in
test_conversation.py, the settings' ranges in test_settings.py and the lock in test_workdir_lock.py.
"""

import errno
import json
import os
import resource
import signal
import socket
import subprocess
import sys

import pytest

from configs import sales as sales_config
from iterppo_jax import conversation as conv_lib
from iterppo_jax import errors
from iterppo_jax import loop
from iterppo_jax.envs import sales

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/sales.py:tiny"


def _cli(args, module="experiments.iterative_ppo", preexec_fn=None, timeout=300):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, preexec_fn=preexec_fn,
                        env={**os.environ, "PYTHONPATH": ROOT, "IPPO_NO_PROGRESS": "1"})


def _error_line(out) -> str:
  """The one `error:` line on stderr; fails on a traceback or on more than one error line."""
  assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr[-3000:]
  lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, out.stderr[-3000:]
  return lines[0]


def _tree(path) -> list[str]:
  out = []
  for d, _, files in os.walk(path):
    out += [os.path.relpath(os.path.join(d, f), path) for f in files]
  return sorted(out)


def _no_partial_checkpoints(workdir):
  partial = [p for p in _tree(workdir) if ".orbax-checkpoint-tmp" in p]
  assert not partial, partial[:3]


@pytest.mark.parametrize("args, code, words", [
    ([TINY, "--workdri=W"], errors.EXIT_USAGE, "Unknown command line flag 'workdri'"),
    (["--config=configs/sales.py:tinyy", "--workdir=W"], errors.EXIT_USAGE, "unknown config argument 'tinyy'"),
    (["--config=configs/nosuch.py", "--workdir=W"], errors.EXIT_USAGE, "config file 'configs/nosuch.py' not found"),
    ([TINY, "--config.loop.iterations=abc", "--workdir=W"], errors.EXIT_USAGE, "--config.loop.iterations=abc"),
])
def test_usage_errors_are_one_line_with_exit_code_2(args, code, words, tmp_path):
  out = _cli([a.replace("=W", f"={tmp_path}/w") for a in args])
  assert out.returncode == code
  assert words in _error_line(out)
  assert not os.path.exists(tmp_path / "w")


def test_bad_logs_end_with_exit_3_and_leave_no_workdir(tmp_path):
  log = tmp_path / "long.jsonl"
  turns = [{"role": "customer", "text": "x" * (conv_lib.MAX_MESSAGE_CHARS + 1)}, {"role": "business", "text": "Hi"}]
  log.write_text(json.dumps({"outcome": 1, "turns": turns}) + "\n")
  out = _cli([TINY, f"--config.loop.logs={log}", f"--workdir={tmp_path}/w"])
  assert out.returncode == errors.EXIT_DATA
  assert f"{log}:1: turn 0: a customer message of 20,001 characters; the limit is 20,000" in _error_line(out)
  assert not os.path.exists(tmp_path / "w")
  out = _cli([f"--logs={log}", f"--workdir={tmp_path}/ds"], module="experiments.build_dataset")
  assert out.returncode == errors.EXIT_DATA and f"{log}:1: turn 0" in _error_line(out)
  assert not os.path.exists(tmp_path / "ds")



def test_a_truth_draw_without_its_rollouts_is_one_line_before_the_run_is_read(tmp_path):
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "kept.txt").write_text("x")
  out = _cli([f"--workdir={wd}", "--truth_draw=1"], module="experiments.q_ranking_ablation")
  assert out.returncode == errors.EXIT_USAGE
  assert "--truth_draw: needs --truth_rollouts" in _error_line(out)
  assert sorted(os.listdir(wd)) == ["kept.txt"]

def _bad_logs(tmp_path):
  """Logs each reader must refuse with file[:line], before anything is written."""
  good = json.dumps(sales.SalesEnv().play(sales.make_sales_policy("behavior"), 1, seed=0)[0].to_json())
  cases = {
      "deep.jsonl": "[" * 200_000 + "]" * 200_000 + "\n",
      "empty.jsonl": "",
      "blank.jsonl": "  \n\n\t\n",
      "long.jsonl": good.replace('"text": "', '"text": "' + "y" * 30_000, 1) + "\n",
      "huge_line.jsonl": good[:-1] + ', "pad": "' + "z" * (conv_lib.MAX_RECORD_BYTES + 1) + '"}\n',
      "latin1.jsonl": good.replace("Hi", "H\xe9").encode("latin-1", "replace") + b"\n",
  }
  paths = {}
  for name, text in cases.items():
    p = tmp_path / name
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    paths[name] = p
  (tmp_path / "adir.jsonl").mkdir()
  paths["adir.jsonl"] = tmp_path / "adir.jsonl"
  os.symlink(tmp_path / "loop_b.jsonl", tmp_path / "loop_a.jsonl")
  os.symlink(tmp_path / "loop_a.jsonl", tmp_path / "loop_b.jsonl")
  paths["loop_a.jsonl"] = tmp_path / "loop_a.jsonl"
  return paths


def test_the_offline_loop_validates_every_log_before_writing(tmp_path):
  """In process (no jax start per case): each bad log is a ConversationFormatError naming the file, and the
  workdir the run would have made does not exist afterwards."""
  for name, path in _bad_logs(tmp_path).items():
    c = sales_config.get_config("tiny")
    c.loop.logs = str(path)
    wd = tmp_path / f"w_{name}"
    with pytest.raises(conv_lib.ConversationFormatError, match=str(path)):
      loop.run(c, str(wd))
    assert not wd.exists(), name


def test_a_workdir_under_a_file_is_one_line(tmp_path):
  (tmp_path / "afile").write_text("")
  out = _cli([TINY, f"--workdir={tmp_path}/afile/w"])
  assert out.returncode == errors.EXIT_STORAGE
  assert f"Not a directory ({tmp_path}/afile/w)" in _error_line(out)


def test_a_workdir_another_run_holds_is_exit_4_and_untouched(tmp_path):
  wd = tmp_path / "w"
  wd.mkdir()
  holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "earlier"}
  (wd / ".lock").write_text(json.dumps(holder))
  out = _cli([TINY, f"--workdir={wd}"])
  assert out.returncode == errors.EXIT_WORKDIR
  assert f"is in use by pid {os.getpid()}" in _error_line(out)
  assert _tree(wd) == [".lock"]


def _mount_tmpfs(path, size: str) -> bool:
  path.mkdir()
  try:
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


def _umount(path):
  subprocess.run(["umount", str(path)], capture_output=True, timeout=30)


def _file_size_limit(nbytes):
  def limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write over the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
  return limit


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_same_command_resumes(tmp_path):
  """The tiny run writes ~2.1 MB; on a 1.2 MB tmpfs (or with files capped at 200 kB where no tmpfs can be
  mounted: the run's checkpoint files are 150-470 kB) a write fails part way. Wherever it fails, the run ends
  with exit 5 and one line naming the cause and what was kept; no half-written checkpoint is left; with room
  again the same command finishes."""
  mnt = tmp_path / "disk"
  mounted = _mount_tmpfs(mnt, "1200k")
  args = [TINY, "--config.loop.iterations=1", f"--workdir={mnt}/w"]
  try:
    out = _cli(args, preexec_fn=None if mounted else _file_size_limit(200_000))
    assert out.returncode == errors.EXIT_STORAGE, out.stderr[-2000:]
    line = _error_line(out)
    assert ("no space left on device" if mounted else "file too large") in line
    assert "last good checkpoint is" in line or "nothing was kept" in line
    if "last good checkpoint is" in line:
      assert "rerun the same command: it resumes from the last completed phase" in line
      _no_partial_checkpoints(mnt / "w")
    else:
      assert not (mnt / "w").exists()
    if mounted:
      subprocess.run(["mount", "-o", "remount,size=20m", str(mnt)], check=True, timeout=30)
    out = _cli(args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (mnt / "w" / "summary.json").exists()
  finally:
    if mounted:
      _umount(mnt)


@pytest.mark.slow
def test_a_read_only_workdir_is_one_line(tmp_path):
  """A run stopped after SFT (exit 130, as Ctrl-C) is resumed on a workdir that became read-only: exit 5, one
  line, and the workdir is as it was. Needs a tmpfs to remount read-only (root ignores file modes)."""
  mnt = tmp_path / "disk"
  if not _mount_tmpfs(mnt, "20m"):
    pytest.skip("cannot mount a tmpfs here (needs root); the full-disk test covers failing writes")
  try:
    args = [TINY, "--config.loop.iterations=1", f"--workdir={mnt}/w"]
    out = _cli(args + ["--config.loop.stop_after_phase=sft"])
    assert out.returncode == errors.EXIT_INTERRUPTED and "stopped after sft" in _error_line(out)
    before = _tree(mnt / "w")
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, timeout=30)
    out = _cli(args)
    assert out.returncode == errors.EXIT_STORAGE
    assert "read-only file system" in _error_line(out)
    assert _tree(mnt / "w") == before
  finally:
    _umount(mnt)


@pytest.mark.slow
def test_a_diverged_loss_names_the_last_good_checkpoint(tmp_path):
  wd = tmp_path / "w"
  out = _cli([TINY, "--config.loop.iterations=1", "--config.ppo.learning_rate=1e30", f"--workdir={wd}"])
  assert out.returncode == errors.EXIT_DIVERGED
  line = _error_line(out)
  assert "training diverged: non-finite metrics at step" in line and "ppo/policy_loss=nan" in line
  assert f"the last good checkpoint is {wd}/checkpoints/" in line and "lower ppo.learning_rate" in line
  assert os.listdir(wd / "checkpoints" / "policy") == ["0"]  # pi_0 kept; no pi_1 was written
  _no_partial_checkpoints(wd)
  assert not (wd / ".lock").exists()


def test_a_fresh_run_that_fails_in_its_first_phase_leaves_nothing(tmp_path):
  """SFT diverges on a fresh workdir: everything the run wrote (behaviour logs, tokenizer, config.json) goes,
  so the corrected command is not refused as a changed setting."""
  wd = tmp_path / "w"
  out = _cli([TINY, "--config.sft.learning_rate=1e30", f"--workdir={wd}"])
  assert out.returncode == errors.EXIT_DIVERGED
  line = _error_line(out)
  assert "sft/loss=nan" in line and f"nothing was kept in {wd}" in line and "lower sft.learning_rate" in line
  assert not wd.exists()


def test_storage_errors_are_recognised_in_library_messages():
  """tensorstore (under orbax) reports a full disk as a ValueError with the OS words and code."""
  e = ValueError('RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database at local file "/w/checkpoints/ppo/1/'
                 '1.orbax-checkpoint-tmp/state/": Failed to write 32 bytes: No space left on device '
                 "[os_error_code='28']")
  assert errors.storage_errno(e) == errno.ENOSPC
  assert errors.describe_storage(e) == "no space left on device (writing /w/checkpoints/ppo/1/1)"
  wrapped = RuntimeError("save failed")
  wrapped.__cause__ = OSError(errno.EROFS, "Read-only file system", "/w/progress.json")
  assert errors.describe_storage(wrapped) == "read-only file system (writing /w/progress.json)"
  assert errors.storage_errno(ValueError("bad shape")) is None
