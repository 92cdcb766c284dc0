r"""Issue #7's GPU measurements as one prepared run: `python -m experiments.benchmark_suite`.

  python -m experiments.benchmark_suite --config=configs/benchmark_suite.py --config.out=/tmp/suite
  python -m experiments.benchmark_suite --config=configs/benchmark_suite.py --config.out=/tmp/suite \
      '--config.steps=("largest",)'          # one step, e.g. in a second device call
  python -m experiments.benchmark_suite --config=configs/benchmark_suite.py --config.out=docs/benchmark_gpu \
      '--config.steps=()'                    # no step: rebuild suite.md from the JSON files already there

`:smoke` is the same suite on shapes a CPU runs in a minute (the suite's own test).
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.out = ""  # folder for <step>.json, one per step, and suite.md (docs/performance.md's tables); required
  c.steps = ("phases", "scaling", "largest")  # run in this order; each one's JSON is written as soon as it ends
  c.iterations = 5  # "phases": timed calls after the compiling one (configs/benchmark.py's iterations)
  c.sweep_iterations = 2  # the same for every cell of "scaling" and "largest" (each cell compiles anew)
  c.workload = "ppo_0p5b"  # configs/benchmark.py workload of "phases" (every piece) and "scaling"
  c.scaling_new_tokens = (128, 512, 2048)  # issue #7's scaling table: sampled tokens ...
  c.scaling_prompts = (32, 128)  # ... by batch size, one process per cell
  c.largest_workloads = ("llama_1b", "llama_3b", "llama_8b")  # Llama shapes, smallest first: the largest that runs
  # Memory options for "largest": remat and bf16 parameters (and optimizer state); fsdp needs several devices.
  c.largest_overrides = ("--config.model.remat=True", "--config.model.param_dtype=bfloat16")
  # Seconds for "phases", and for one sweep cell (past it, the cell is a "timed out" row). With the defaults,
  # phases + scaling end within 600 s (one device call) and largest within 200 s (a second one).
  c.timeout_s = ml_collections.ConfigDict(dict(phases=200, cell=60))
  if arg == "smoke":
    c.workload = "smoke"
    c.iterations = c.sweep_iterations = 1
    c.scaling_new_tokens = (4, 8)
    c.scaling_prompts = (8,)
    c.largest_workloads = ("smoke",)
    c.timeout_s.update(dict(phases=300, cell=300))
  elif arg:
    raise ValueError(f"unknown benchmark_suite preset {arg!r}; expected none or 'smoke'")
  return c
