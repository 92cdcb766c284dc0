"""experiments/benchmark_suite.py: issue #7's GPU measurements as one prepared run, checked end to end on the
smoke shapes (so the device's minutes are not spent finding a broken command), and its report from JSON."""

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from experiments import benchmark as benchmark_main
from experiments import benchmark_suite
from iterppo_jax import errors
from iterppo_jax.studies import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(path, arg=None):
  spec = importlib.util.spec_from_file_location("suite_config", os.path.join(ROOT, "configs", path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def test_suite_runs_every_step_and_writes_the_report(tmp_path):
  """All three steps on the smoke shapes, each a process of its own: JSON per step with the machine, and
  suite.md with the per-piece table, the scaling cells and the largest-shape cell (remat + bf16 params)."""
  out = tmp_path / "suite"
  done = subprocess.run([sys.executable, "-m", "experiments.benchmark_suite",
                         "--config=configs/benchmark_suite.py:smoke", f"--config.out={out}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  for step in benchmark_suite.STEPS:
    result = json.loads((out / f"{step}.json").read_text())
    assert "error" not in result, (step, result)
    assert result["machine"]["platform"] == "cpu" and result["machine"]["date"]
  phases = json.loads((out / "phases.json").read_text())
  assert [r["name"] for r in phases["rows"]][:3] == ["sampler", "sft step", "qfit step"]
  scaling = json.loads((out / "scaling.json").read_text())["cells"]
  assert [(c["new_tokens"], c["prompts"], c["error"]) for c in scaling] == [(4, 8, ""), (8, 8, "")]
  largest = json.loads((out / "largest.json").read_text())["cells"]
  assert [(c["workload"], c["error"]) for c in largest] == [("smoke", "")]
  report = (out / "suite.md").read_text()
  assert "| ppo iteration |" in report and report.count("| ok |") == 3 and "failed" not in report


def _rows(names, ms=100.0):
  return [{"name": n, "ms": ms, "cpu_ms": ms, "tokens_per_s": 1.0, "compile_s": 1.0, "mfu": 0.25, "hbm": 0.5}
          for n in names]


def test_report_prefers_the_fused_iteration_and_keeps_failures(tmp_path):
  machine = {"device_kind": "NVIDIA H200", "platform": "gpu", "device_count": 1, "cpu_count": 16, "jax": "0.9",
             "date": "2026-12-01"}
  fused = ("ppo generation", "ppo scoring", "ppo update", "ppo iteration", "ppo scoring+update, fused",
           "ppo iteration, fused")
  phases = {"title": "workload ppo_0p5b", "machine": machine, "peak_bytes": 3 * 2**30,
            "rows": _rows(("sampler",)) + _rows(fused[:4], 500.0) + _rows(fused[4:], 250.0)}
  cells = [{"workload": "ppo_0p5b", "new_tokens": 128, "prompts": 32, "rows": _rows(fused, 200.0),
            "peak_bytes": 2**30, "error": ""},
           {"workload": "ppo_0p5b", "new_tokens": 2048, "prompts": 128, "rows": [], "peak_bytes": None,
            "error": "timed out after 150 s (sweep.cell_timeout_s)"}]
  (tmp_path / "phases.json").write_text(json.dumps(phases))
  (tmp_path / "scaling.json").write_text(json.dumps({"machine": machine, "cells": cells}))
  (tmp_path / "largest.json").write_text(json.dumps({"error": "timed out after 510 s"}))
  report = benchmark.suite_report(str(tmp_path), benchmark_suite.STEPS)
  assert "measured 2026-12-01 on 1 x NVIDIA H200" in report
  assert "**0.250 s**" in report and "google-tunix 0.1.7 2.14 s" in report  # the fused iteration, with the peers
  assert "Peak device memory: 3.0 GiB" in report
  assert "| 200.0 (1.56 per token) | 200.0 | 200.0 | 25.0% | 1.0 | ok |" in report
  assert "failed: timed out after 150 s" in report and "- largest: failed: timed out after 510 s" in report
  with pytest.raises(FileNotFoundError, match="no step results"):
    benchmark.suite_report(str(tmp_path / "empty"), benchmark_suite.STEPS)


def test_a_cell_past_its_time_limit_is_a_row():
  config = _config("benchmark.py", "smoke")
  config.sweep.new_tokens = (4,)
  config.sweep.cell_timeout_s = 1  # less than the cell's start-up
  (cell,) = benchmark_main.run_sweep(benchmark.load(config), ["--config=configs/benchmark.py:smoke"])
  assert cell["rows"] == [] and cell["error"].startswith("timed out after 1 s")


def test_failure_line_names_the_exception():
  output = "Traceback\n  File x\nXlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory\n-----\nFor simplicity, JAX ..."
  assert benchmark.failure_line(output, 1) == "XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory"
  assert benchmark.failure_line("", 3) == "exit status 3"


def test_bad_steps_and_missing_out_are_refused(tmp_path):
  for args, message in ((["--config.steps=('phases', 'nope')", f"--config.out={tmp_path}"], "unknown steps"),
                        ([], "--config.out is required")):
    done = subprocess.run([sys.executable, "-m", "experiments.benchmark_suite",
                           "--config=configs/benchmark_suite.py:smoke", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and message in done.stderr
  assert not any(tmp_path.iterdir())  # nothing was run or written


def test_settings_are_typed_and_checked_before_any_step():
  smoke = _config("benchmark_suite.py", "smoke")
  smoke.out = "/tmp/suite"
  good = benchmark_suite.load(smoke)
  assert good.timeout_s.cell == 300 and good.steps == benchmark_suite.STEPS
  with pytest.raises(dataclasses.FrozenInstanceError):
    good.out = "x"
  for key, value, message in (("out", "", "--config.out is required"),
                              ("steps", ("phases", "nope"), "unknown steps"),
                              ("workload", "nope", "config.workload: unknown benchmark workloads"),
                              ("largest_workloads", ("smoke", "nope"), "config.largest_workloads: unknown"),
                              ("scaling_prompts", (8, 0), "config.scaling_prompts must hold integers >= 1"),
                              ("iterations", 0, "config.iterations"),
                              ("sweep_iterations", "2", "config.sweep_iterations"),
                              ("color", "red", "config.color: unknown key")):
    config = {**smoke.to_dict(), key: value}  # a plain mapping: a ConfigDict refuses a value of another type
    with pytest.raises(errors.SettingsError, match=re.escape(message)):
      benchmark_suite.load(config)


def test_default_steps_fit_two_device_calls():
  """The defaults keep the promise in configs/benchmark_suite.py: phases + scaling within one 600 s device call,
  largest within a second one of 200 s; the commands are issue #7's workloads and options."""
  config = _config("benchmark_suite.py")
  timeout = {step: benchmark_suite.step_timeout(config, step) for step in benchmark_suite.STEPS}
  assert timeout["phases"] + timeout["scaling"] <= 590 and timeout["largest"] <= 200
  scaling = benchmark_suite.step_command(config, "scaling", "s.json")
  assert "--config=configs/benchmark.py:ppo_0p5b" in scaling and "--config.iterations=2" in scaling
  assert "--config.sweep.new_tokens=(128, 512, 2048)" in scaling and "--config.sweep.prompts=(32, 128)" in scaling
  largest = benchmark_suite.step_command(config, "largest", "l.json")
  assert "--config.model.remat=True" in largest and "--config.model.param_dtype=bfloat16" in largest
  assert "--config.sweep.workloads=('llama_1b', 'llama_3b', 'llama_8b')" in largest
  with pytest.raises(ValueError, match="unknown benchmark_suite step"):
    benchmark_suite.step_command(config, "nope", "x.json")


def test_a_failed_rerun_keeps_the_earlier_result(tmp_path):
  """A step that fails (here: out of time) leaves an earlier measurement of that step in place, and says why."""
  earlier = {"machine": {"date": "2026-12-01"}, "rows": [], "title": "earlier", "peak_bytes": None}
  (tmp_path / "phases.json").write_text(json.dumps(earlier))
  config = _config("benchmark_suite.py", "smoke")
  config.out = str(tmp_path)
  config.timeout_s.phases = 1  # less than the benchmark's start-up
  assert benchmark_suite.run_step(config, "phases") == {"error": "timed out after 1 s"}
  assert json.loads((tmp_path / "phases.json").read_text()) == earlier
  config.out = str(tmp_path / "fresh")  # nothing earlier: the reason is the step's result
  os.makedirs(config.out)
  assert benchmark_suite.run_step(config, "phases") == {"error": "timed out after 1 s"}
  assert json.loads((tmp_path / "fresh" / "phases.json").read_text()) == {"error": "timed out after 1 s"}
