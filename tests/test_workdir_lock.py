"""io_utils.workdir_lock: one run per workdir, a killed run's lock taken over, nothing left by a run that wrote
nothing; and loop.run refusing a workdir another live run holds, before writing anything."""

import json
import os
import socket
import subprocess
import sys

import pytest

from configs import sales as sales_config
from iterppo_jax import io_utils
from iterppo_jax import loop


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_a_second_holder_is_refused_and_the_lock_goes_on_exit(tmp_path):
  wd = str(tmp_path / "run")
  with io_utils.workdir_lock(wd) as path:
    holder = json.load(open(path))
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(io_utils.WorkdirLocked, match=rf"in use by pid {os.getpid()} on "):
      with io_utils.workdir_lock(wd):
        pass
    open(os.path.join(wd, "config.json"), "w").close()  # the run wrote something
  assert sorted(os.listdir(wd)) == ["config.json"]  # lock released, the run's file kept


def test_an_empty_workdir_the_lock_made_is_removed_again(tmp_path):
  wd = tmp_path / "fresh"
  with io_utils.workdir_lock(str(wd)):
    assert wd.exists()
  assert not wd.exists()


def test_a_lock_of_a_dead_process_is_taken_over_and_another_hosts_is_not(tmp_path):
  wd = tmp_path / "run"
  wd.mkdir()
  lock = wd / io_utils.LOCK_NAME
  lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "then"}))
  said = []
  with io_utils.workdir_lock(str(wd), log=said.append):
    assert json.loads(lock.read_text())["pid"] == os.getpid()
  assert len(said) == 1 and "is gone; taking over its lock" in said[0]
  lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
  with pytest.raises(io_utils.WorkdirLocked, match="in use by pid 1 on elsewhere"):
    with io_utils.workdir_lock(str(wd)):
      pass


def test_the_loop_refuses_a_workdir_a_live_run_holds_before_writing(tmp_path):
  wd = str(tmp_path / "run")
  with io_utils.workdir_lock(wd):  # this process stands in for the first run
    with pytest.raises(io_utils.WorkdirLocked):
      loop.run(sales_config.get_config("tiny"), wd)
    assert os.listdir(wd) == [io_utils.LOCK_NAME]  # nothing of the second run


def test_a_bad_setting_leaves_no_workdir_behind(tmp_path):
  """loop.run takes the lock (which makes the workdir) before setup checks the settings; the refused run must
  leave nothing, not even the empty directory."""
  c = sales_config.get_config("tiny")
  c.loop.first_data = "polciy"
  with pytest.raises(ValueError, match="config.loop.first_data must be one of"):
    loop.run(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
