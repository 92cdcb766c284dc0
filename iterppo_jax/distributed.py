"""Multi-process runs on jax.distributed (issue #19): one mesh over every process's devices.

A run that outgrows one machine starts the same command on every host (`--config.distributed=True`;
a Cloud TPU slice or SLURM give each process its rank through the environment). All processes then build one
mesh over all devices and run every jitted step together (SPMD), each feeding its own rows of a global batch
(`device_batch`). What is not SPMD is split or confined here, so that the rest of the code asks one module:

  * simulation: each process plays a contiguous block of an iteration's conversations (`shard_range`) on its
    own devices (`local_mesh`, `local_params`) and writes its own JSONL; every process then reads all of them,
    so host-side work (Q-fit tables, tokenisation, example arrays) is identical everywhere;
  * the files every run writes once (metrics, progress, summary, plots, config) come from process 0 alone
    (`is_writer`); orbax checkpoints are saved and restored by all processes together;
  * values on the host: `to_host` gathers arrays that other processes hold parts of.

With one process (the default) every function here is a no-op or the single-process expression it replaces, so
one-process runs pay nothing for this.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from iterppo_jax import errors


class DistributedError(errors.RunError, RuntimeError):
  """A process could not join the run (coordinator unreachable, inconsistent ranks)."""
  exit_code = errors.EXIT_USAGE


# ---- joining the run ----

def _host_port(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedError(f"cluster.coordinator {address!r}: expected host:port (e.g. 10.0.0.2:8476)")
  return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float, retry_s: float = 0.5) -> None:
  """Returns once a TCP connection to `address` (host:port) succeeds; raises DistributedError after `timeout_s`.

  jax.distributed.initialize itself waits initialization_timeout (minutes) for an unreachable coordinator and
  then aborts the process from C++ with a long log; this check fails first, with the address and what to check.
  """
  host, port = _host_port(address)
  deadline = time.monotonic() + timeout_s
  last = None
  while True:
    try:
      with socket.create_connection((host, port), timeout=max(min(retry_s * 4, timeout_s), 0.1)):
        return
    except OSError as e:
      last = e
    if time.monotonic() >= deadline:
      break
    time.sleep(retry_s)
  raise DistributedError(
      f"could not reach the coordinator at {host}:{port} within {timeout_s:g} s ({last}); check that process 0 "
      "was started with the same cluster.coordinator, that the address is its host's and the port open "
      "between the hosts (raise cluster.connect_timeout_s if process 0 starts later)")


def initialize(enabled: bool, cluster) -> None:
  """Joins a multi-process run (config.distributed); does nothing when `enabled` is False.

  `cluster` is the config's `cluster` section (settings.Cluster: coordinator, num_processes, process_id,
  connect_timeout_s, init_timeout_s). Must run before anything touches a JAX device (entry points call it
  first). An empty coordinator, num_processes 0 or process_id -1 leave that value to jax.distributed.initialize,
  which reads JAX_COORDINATOR_ADDRESS / the Cloud TPU metadata / SLURM's variables. Processes other than 0 first
  wait for the coordinator's port (`wait_for_coordinator`) when its address and their rank are known here (given,
  or JAX_COORDINATOR_ADDRESS with JAX_PROCESS_ID or SLURM_PROCID).
  """
  if not enabled:
    return
  coordinator, num_processes, process_id = cluster.coordinator, cluster.num_processes, cluster.process_id
  # CPU devices of different processes exchange collectives through gloo (XLA's CPU default has none);
  # accelerators ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  address = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  rank = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", os.environ.get("SLURM_PROCID", -1)))
  if address and rank > 0:  # process 0 binds the port itself; an unknown rank (-1) cannot tell
    wait_for_coordinator(address, cluster.connect_timeout_s)
  kwargs: dict[str, Any] = {"initialization_timeout": int(cluster.init_timeout_s)}
  if coordinator:
    kwargs["coordinator_address"] = coordinator
  if num_processes > 0:
    kwargs["num_processes"] = num_processes
  if process_id >= 0:
    kwargs["process_id"] = process_id
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    raise DistributedError(f"jax.distributed.initialize failed ({first}); every process needs the same "
                           "cluster.coordinator and num_processes and its own process_id") from e


# ---- who does what ----

def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def is_writer() -> bool:
  """Whether this process writes the run's single files (metrics, progress, summary, plots, config.json)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier `name` (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # only multi-process runs need it
    multihost_utils.sync_global_devices(name)


def shard_range(n: int, index: int | None = None, count: int | None = None) -> tuple[int, int]:
  """[start, stop) of this process's contiguous block of n items (blocks of ceil(n / count), the last shorter)."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  block = -(-n // count)
  return min(index * block, n), min((index + 1) * block, n)


def shard_name(name: str, index: int | None = None, count: int | None = None) -> str:
  """The file stem of this process's part of dataset `name`: `name` alone with one process, else name.p<i>-of-<P>."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  return name if count == 1 else f"{name}.p{index}-of-{count}"


# ---- arrays ----

def to_host(tree: Any) -> Any:
  """`jax.device_get` of `tree`, gathering the arrays whose rows live on other processes' devices.

  Every process must call it at the same point with the same tree (a gather is a collective).
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return jax.device_get(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(get, tree)


def local_mesh():
  """A data-parallel mesh over this process's own devices (where it samples its share of conversations)."""
  from iterppo_jax import sharding  # sharding.py is the one caller of jax.make_mesh
  return sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)], devices=jax.local_devices())


def local_params(tree: Any, mesh) -> Any:
  """`tree` (global arrays) as full copies replicated over `mesh` (this process's devices), for sampling alone."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda x: jax.device_put(to_host(x), replicated), tree)


def device_batch(batch: dict, batch_sharding: NamedSharding) -> dict:
  """A host batch (every process holds the same global rows) as global arrays sharded by `batch_sharding`.

  With several processes each contributes only the rows its own devices hold
  (jax.make_array_from_process_local_data), so no process ships rows to another.
  """
  if jax.process_count() == 1:
    return jax.device_put(dict(batch), batch_sharding)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    rows = [idx[0] for idx in batch_sharding.addressable_devices_indices_map(v.shape).values()]
    start = min(r.start or 0 for r in rows)
    stop = max(len(v) if r.stop is None else r.stop for r in rows)
    out[k] = jax.make_array_from_process_local_data(batch_sharding, v[start:stop], v.shape)
  return out
