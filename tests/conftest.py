"""Test-session settings, applied before any test module imports JAX.

XLA compilation dominates a tiny model's test: the loop's jitted programs are built afresh by every run (their
functions close over a run's models), yet they are the same programs across the many tiny runs of the suite. A
persistent compilation cache, shared with the tests' subprocesses through the environment, compiles each once.
Results are unchanged: a cache hit is the executable a compile would have produced.
"""

import os
import tempfile

_CREATED = None  # the cache directory this session made (and removes at its end)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CREATED = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="iterppo-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def pytest_sessionfinish(session, exitstatus):
  if _CREATED:
    import shutil
    shutil.rmtree(_CREATED, ignore_errors=True)
