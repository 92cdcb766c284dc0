"""Conversations per second of deploying pi_0 with 1, 2, 4, ... processes on this machine (issue #19).

  python -m experiments.simulate_scaling --processes=1,2,4 --conversations=512    # the table in docs/performance.md
  python -m experiments.simulate_scaling --config=configs/sales.py:tiny --processes=1,2 --conversations=64

Each row starts that many processes of this module on 127.0.0.1 (jax.distributed, one CPU device each, gloo);
each plays its block of the conversations (iterppo_jax/studies/scaling.py) and process 0 writes the rate. Other
XLA_FLAGS pass through: `XLA_FLAGS=--xla_cpu_multi_thread_eigen=false` keeps each process's maths on one thread,
as if each process had a core of its own.
"""

import os
import socket
import subprocess
import sys
import tempfile

from absl import flags

from experiments import cli
from iterppo_jax import distributed
from iterppo_jax import settings
from iterppo_jax.studies import scaling

_CONFIG = cli.define_config("configs/sales.py")
_PROCESSES = cli.define(flags.DEFINE_list, "processes", ["1", "2", "4"], "Process counts to measure.")
_CONVERSATIONS = cli.define(flags.DEFINE_integer, "conversations", 512, "Conversations per measurement.")
_OUT = cli.define(flags.DEFINE_string, "out", "", "Worker mode: the directory process 0 writes rate.json to.")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _measure(count: int, out_dir: str) -> dict:
  """Starts `count` workers (this module with --out) and returns process 0's rate.json."""
  port, argv = _free_port(), [a for a in sys.argv[1:] if not a.startswith("--processes")]
  env = {**os.environ, "IPPO_NO_PROGRESS": "1"}
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()  # one CPU device per process
                              if not f.startswith("--xla_force_host_platform_device_count"))
  procs = [subprocess.Popen([sys.executable, "-m", "experiments.simulate_scaling", *argv, f"--out={out_dir}",
                             "--config.distributed=True", f"--config.cluster.coordinator=127.0.0.1:{port}",
                             f"--config.cluster.num_processes={count}", f"--config.cluster.process_id={i}"],
                            env=env) for i in range(count)]
  codes = [p.wait() for p in procs]
  if any(codes):
    cli.fail(1, f"a worker of the {count}-process measurement failed (exit codes {codes})")
  return scaling.read_rate(out_dir)


def main(argv):
  del argv
  config = _CONFIG.value
  if _OUT.value:  # a worker
    s = settings.load(config)
    distributed.initialize(s.distributed, s.cluster)
    scaling.play_rate(config, _CONVERSATIONS.value, _OUT.value)
    return
  rows = []
  with tempfile.TemporaryDirectory(prefix="ippo-scaling-") as tmp:
    for count in [int(p) for p in _PROCESSES.value]:
      rows.append(_measure(count, os.path.join(tmp, str(count))))
      print(f"{count} process(es): {rows[-1]['conversations_per_second']:.1f} conversations/s", flush=True)
  print(scaling.table(rows))


if __name__ == "__main__":
  cli.run(main)
