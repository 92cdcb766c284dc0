"""Times the jitted pieces of Iterative PPO on random tokens and prints one table.

  python -m experiments.benchmark --config=configs/benchmark.py            # ppo_tiny on whatever jax sees
  python -m experiments.benchmark --config=configs/benchmark.py:ppo_0p5b   # for a GPU
  python -m experiments.benchmark --config=configs/benchmark.py:ppo_0p5b \
      '--config.sweep.new_tokens=(128, 512, 2048)' '--config.sweep.prompts=(32, 128)'   # issue #7's scaling table
  python -m experiments.benchmark --config=configs/benchmark.py:ppo_0p5b --config.model.remat=True \
      '--config.sweep.workloads=("llama_1b", "llama_3b", "llama_8b")'                  # the largest that fits

A sweep runs one PPO iteration per cell, each cell in a process of its own (`--config.pieces=('ppo',)`): the
peak device memory is then that cell's, and a cell that runs out of memory becomes a "failed" row.

Rows: the sampler alone (ignore_eos, so every row makes all its tokens), one SFT step, one Q-fit step, and one
PPO iteration split into the pieces solvers.train runs, called the same way: generation (solvers.sample, every
row making all its tokens), scoring (PPO's Programs.experience: reference, critic and reward passes, the
policy's too unless the sampler's log-probs stand in (float32 compute), token rewards, GAE) and update
(solvers.run_epochs: every minibatch step of the iteration, cut on the device, and the one metrics transfer).
Each piece is called once to compile, then `iterations` more times.

Columns: "ms" is the steady-state mean wall time and "cpu ms" the mean process CPU time over the same calls
(all threads: on an idle machine cpu / wall is the parallelism, on a shared one wall is inflated by the other
jobs and cpu is the steadier number); "compile s" is the first call minus the mean. tokens/s counts generated
tokens for sampling and every sequence token (prompt + response) for the passes over whole sequences. MFU =
model FLOPs (2 per parameter per token forward, 6 forward + backward) per second over `peak_tflops`; HBM =
a lower bound on the bytes the piece must move (`_traffic` in iterppo_jax/studies/benchmark.py, which runs the
pieces and makes the tables) per second over `peak_hbm_gbps`. Both are left out ("-") when the peak is 0, as on
CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import flags

from experiments import cli
from iterppo_jax.studies import benchmark

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: cells run `-m experiments...`
_SWEPT = ("--config.sweep.", "--config.batch.new_tokens", "--config.batch.prompts", "--config.pieces",
          "--config.json_out")


def run_sweep(config: benchmark.Settings, argv) -> list[dict]:
  """One process per cell (this module, `pieces=('ppo',)`): its rows and peak memory, or why it failed.

  config: the command's settings (benchmark.load); argv: its own arguments, whose cell keys each cell replaces.
  """
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "configs/benchmark.py")
  path = spec.partition(":")[0]
  kept = [a for a in argv if not a.startswith("--config=") and not a.startswith(_SWEPT)]
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, cell in enumerate(benchmark.sweep_cells(config)):
      out = os.path.join(tmp, f"cell_{i}.json")
      cmd = [sys.executable, "-m", "experiments.benchmark", f"--config={path}:{cell['workload']}", *kept,
             f"--config.batch.new_tokens={cell['new_tokens']}", f"--config.batch.prompts={cell['prompts']}",
             "--config.pieces=('ppo',)", f"--config.json_out={out}"]
      print("sweep:", " ".join(cmd[3:]), flush=True)
      try:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=_ROOT,
                              timeout=config.sweep.cell_timeout_s or None)
        ok = done.returncode == 0 and os.path.exists(out)
        error = "" if ok else benchmark.failure_line(done.stderr or done.stdout, done.returncode)
      except subprocess.TimeoutExpired:
        error = f"timed out after {config.sweep.cell_timeout_s} s (sweep.cell_timeout_s)"
      if error:
        results.append({**cell, "rows": [], "peak_bytes": None, "error": error})
      else:
        with open(out) as f:
          results.append({**cell, **json.load(f), "error": ""})
  return results


def main(argv):
  config = benchmark.load(flags.FLAGS.config)  # every key checked before jax opens its backend
  if benchmark.is_sweep(config):
    results = run_sweep(config, sys.argv[1:])
    print(benchmark.format_sweep(results))
    if config.json_out:
      with open(config.json_out, "w") as f:
        json.dump({"machine": benchmark.machine(), "cells": results}, f)
    return
  del argv
  if config.xla_flags:
    # Read when jax opens its backend, which it has not done yet (nothing above has touched a device).
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {config.xla_flags}".strip()
  rows = benchmark.run_benchmark(config)
  peak_bytes = benchmark.peak_memory_bytes()
  print(benchmark.format_table(rows, benchmark.table_title(config)))
  print(f"peak device memory: {peak_bytes / 2**30:.2f} GiB" if peak_bytes else
        "peak device memory: not reported by this backend")
  if config.json_out:
    with open(config.json_out, "w") as f:
      json.dump({"title": benchmark.table_title(config), "machine": benchmark.machine(), "rows": rows,
                 "peak_bytes": peak_bytes}, f)


if __name__ == "__main__":
  # Defined here, not at import: tests import run_sweep, and absl refuses a second --config definition.
  cli.define_config("configs/benchmark.py")
  cli.run(main, default="configs/benchmark.py")
