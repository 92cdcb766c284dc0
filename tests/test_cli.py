"""Entry points refuse an unknown --config key at once, naming it and the closest known keys."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module,config", [("experiments.iterative_ppo", "configs/sales.py"),
                                           ("experiments.simulate", "configs/booking.py")])
def test_unknown_override_fails_before_any_work(module, config, tmp_path):
  out = subprocess.run([sys.executable, "-m", module, f"--config={config}", "--config.loop.iteratons=3",
                        f"--workdir={tmp_path}/w"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
  assert out.returncode == 2
  assert "unknown config key 'loop.iteratons'" in out.stderr
  assert "loop.iterations" in out.stderr  # the suggestion
  assert "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "w")  # nothing was started


@pytest.mark.parametrize("override, message", [
    ("--config.loop.first_data=polciy", "error: config.loop.first_data must be one of behavior, policy, explore, "
                                        "got 'polciy'"),
    ("--config.ppo.batch_size=0", "error: config.ppo.batch_size must be an integer >= 1, got 0"),
    ("--config.model.num_layers=0", "error: config.model.num_layers must be an integer >= 1, got 0"),
    ("--config.loop.iterations=-1", "error: config.loop.iterations must be an integer >= 0, got -1"),
    ("--config.tokenizer.vocab_size=100", "error: config.tokenizer.vocab_size must be an integer >= 263, got 100")])
# The other sizes the issue named (loop.conversations, sft.behavior_conversations, sft.steps) take the same path:
# their messages are checked in process, faster, in tests/test_settings.py.
def test_a_bad_setting_is_one_line_before_any_work(override, message, tmp_path):
  out = subprocess.run([sys.executable, "-m", "experiments.iterative_ppo", "--config=configs/sales.py:tiny",
                        override, f"--workdir={tmp_path}/w"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
  assert out.returncode == 2  # usage (iterppo_jax/errors.py)
  assert message in out.stderr and "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "w")


def test_a_background_thread_error_is_one_warning_line(capsys):
  import threading
  from absl import flags
  from experiments import cli
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  saved = (sys.unraisablehook, threading.excepthook)

  def main(argv):
    t = threading.Thread(target=lambda: 1 / 0)
    t.start()
    t.join()
    return "done"
  try:
    assert cli.guard(main)(["prog"]) == "done"
  finally:
    sys.unraisablehook, threading.excepthook = saved
  err = capsys.readouterr().err
  assert "warning: 1 error(s) in background threads, first: ZeroDivisionError: division by zero" in err
  assert "Traceback" not in err


_ORPHAN_TASK = '''
import asyncio, gc, sys
from absl import app
from experiments import cli
from iterppo_jax import errors

async def write():
  raise OSError(28, "No space left on device")

def main(argv):
  loop = asyncio.new_event_loop()
  task = loop.create_task(write())
  loop.run_until_complete(asyncio.sleep(0.01))
  loop.close()
  sys.modules["__main__"].orphan = task  # released at exit, after the error line: asyncio logs it then
  raise errors.StorageError("no space left on device (test)")

app.run(cli.guard(main), flags_parser=cli._parse_flags)
'''


def test_an_asyncio_task_error_logged_after_the_error_line_is_not_printed():
  """A failed orbax write leaves asyncio tasks whose exception nobody retrieved; the garbage collector logs each
  (with a traceback) whenever it frees them, which can be after our one line, at exit."""
  from iterppo_jax import errors
  out = subprocess.run([sys.executable, "-c", _ORPHAN_TASK], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
  assert out.returncode == errors.EXIT_STORAGE, out.stderr
  assert out.stderr.strip() == "error: no space left on device (test)", out.stderr
