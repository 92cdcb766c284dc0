r"""Issue #7's accelerator measurements as one prepared run, and docs/performance.md's tables from what it wrote.

  python -m experiments.benchmark_suite --config=configs/benchmark_suite.py --config.out=/tmp/suite

Steps (`--config.steps`), each `python -m experiments.benchmark` in a process of its own with a time limit, each
writing `<out>/<step>.json` as soon as it ends (a step that fails or runs out of time writes why):
- phases: every piece of the workload (ppo_0p5b): sampler, SFT step, Q-fit step, one PPO iteration by phase with
  MFU, HBM share and peak device memory;
- scaling: one PPO iteration per (sampled tokens, prompts) cell, each cell its own process (its own peak memory);
- largest: the same iteration for growing Llama shapes with remat and bf16 parameters, to find the largest that
  runs.
After every step `<out>/suite.md` is rewritten from all the JSON files in `out`, so steps run in separate device
calls (each call's files copied into one folder) make one report: `--config.steps=()` only rebuilds it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

from absl import flags

from configs import benchmark as benchmark_config
from experiments import cli
from iterppo_jax import errors
from iterppo_jax import settings
from iterppo_jax.studies import benchmark

STEPS = ("phases", "scaling", "largest")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Timeouts:
  phases: int
  cell: int


@dataclasses.dataclass(frozen=True)
class Settings:
  """configs/benchmark_suite.py, typed and checked (`load`); every key is in the file, so none has a default."""
  out: str
  steps: tuple[str, ...]
  iterations: int
  sweep_iterations: int
  workload: str
  scaling_new_tokens: tuple[int, ...]
  scaling_prompts: tuple[int, ...]
  largest_workloads: tuple[str, ...]
  largest_overrides: tuple[str, ...]
  timeout_s: Timeouts


COUNTS = {"iterations": 1, "sweep_iterations": 1, "timeout_s.phases": 1, "timeout_s.cell": 1}


def load(config) -> Settings:
  """The suite's ConfigDict as typed `Settings`, every key checked before any step runs: an unknown or missing
  key, a wrong type, no `out`, an unknown step or workload, or a sweep axis below 1 is one errors.SettingsError."""
  typed = settings.build(Settings, config)
  settings.check_keys(typed, {}, COUNTS, {})
  if not typed.out:
    raise errors.SettingsError("--config.out is required (the folder for the steps' JSON and suite.md)")
  unknown = [s for s in typed.steps if s not in STEPS]
  if unknown:
    raise errors.SettingsError(f"unknown steps {unknown} in --config.steps; expected some of {STEPS}")
  names = benchmark_config.WORKLOADS
  for key, workloads in (("workload", (typed.workload,)), ("largest_workloads", typed.largest_workloads)):
    bad = [w for w in workloads if w not in names]
    if bad or not workloads:
      raise errors.SettingsError(f"config.{key}: unknown benchmark workloads {bad or '()'}; expected some of "
                                 f"{', '.join(names)} (configs/benchmark.py)")
  for key in ("scaling_new_tokens", "scaling_prompts"):
    values = getattr(typed, key)
    if not values or any(n < 1 for n in values):
      raise errors.SettingsError(f"config.{key} must hold integers >= 1, got {values}")
  return typed


def step_command(config, step: str, json_path: str) -> list[str]:
  """The `experiments.benchmark` command line of one step."""
  workload = config.largest_workloads[0] if step == "largest" else config.workload
  # --config first: absl applies the --config.key overrides to the file it names.
  iterations = config.iterations if step == "phases" else config.sweep_iterations
  bench = [sys.executable, "-m", "experiments.benchmark", f"--config=configs/benchmark.py:{workload}",
           f"--config.iterations={iterations}", f"--config.json_out={json_path}"]
  cell = f"--config.sweep.cell_timeout_s={config.timeout_s.cell}"
  if step == "phases":
    return bench
  if step == "scaling":
    return bench + [cell, f"--config.sweep.new_tokens={tuple(config.scaling_new_tokens)}",
                    f"--config.sweep.prompts={tuple(config.scaling_prompts)}"]
  if step == "largest":
    return bench + [cell, f"--config.sweep.workloads={tuple(config.largest_workloads)}", *config.largest_overrides]
  raise errors.SettingsError(f"unknown benchmark_suite step {step!r}; expected some of {STEPS}")


def step_timeout(config, step: str) -> int:
  """Seconds one step may run: `timeout_s.phases`, or per sweep cell, with 20 s for the sweep's own process."""
  if step == "phases":
    return config.timeout_s.phases
  cells = (len(config.scaling_new_tokens) * len(config.scaling_prompts) if step == "scaling"
           else len(config.largest_workloads))
  return cells * config.timeout_s.cell + 20


def run_step(config, step: str) -> dict:
  """Runs one step and returns its JSON, kept as `<out>/<step>.json`.

  The benchmark writes to `<step>.json.part`, which replaces `<step>.json` only when the step succeeds. A failed
  step returns {"error": why}; that is written to `<step>.json` only where no earlier result is there, so a
  rerun that fails never erases a measurement (whose JSON carries its own date).
  """
  path = os.path.join(config.out, f"{step}.json")
  part = path + ".part"
  if os.path.exists(part):
    os.remove(part)  # a stale partial file from an earlier run must not pass for this one's result
  cmd = step_command(config, step, os.path.abspath(part))
  print(f"benchmark_suite {step}:", " ".join(cmd[1:]), flush=True)
  try:
    done = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True, timeout=step_timeout(config, step))
    print(done.stdout, flush=True)
    failure = "" if done.returncode == 0 else benchmark.failure_line(done.stderr or done.stdout, done.returncode)
  except subprocess.TimeoutExpired:
    failure = f"timed out after {step_timeout(config, step)} s"
  if failure or not os.path.exists(part):
    result = {"error": failure or "no JSON written"}
    if not os.path.exists(path):
      with open(path, "w") as f:
        json.dump(result, f)
    return result
  os.replace(part, path)
  with open(path) as f:
    return json.load(f)


def main(argv):
  del argv
  config = load(flags.FLAGS.config)
  os.makedirs(config.out, exist_ok=True)
  text = "" if config.steps else write_report(config)  # no step: rebuild the report from the JSON there
  for step in config.steps:
    result = run_step(config, step)
    if "error" in result:
      print(f"benchmark_suite {step} failed: {result['error']}", flush=True)
    text = write_report(config)  # after every step: a call cut short still leaves the tables so far
  print(text)


def write_report(config) -> str:
  """Writes `<out>/suite.md` from the steps' JSON in `out` and returns its text."""
  text = benchmark.suite_report(config.out, STEPS, config.workload)
  with open(os.path.join(config.out, "suite.md"), "w") as f:
    f.write(text)
  return text


if __name__ == "__main__":
  cli.define_config("configs/benchmark_suite.py")
  cli.run(main, default="configs/benchmark_suite.py")
