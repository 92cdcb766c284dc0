"""Test-session settings, applied before any test module imports JAX.

XLA compilation dominates a tiny model's test: the loop's jitted programs are built afresh by every run (their
functions close over a run's models), yet they are the same programs across the many tiny runs of the suite. A
persistent compilation cache, shared with the tests' subprocesses through the environment, compiles each once.
Results are unchanged: a cache hit is the executable a compile would have produced.

The suite runs in two worker processes (pytest.ini), which share the cache with each other and with their
subprocesses. JAX writes an entry in place, so another process could read one half written; a size limit (far above
what the suite writes) turns on JAX's file lock around every read and write, which rules that out.
"""

import importlib.util
import os
import tempfile

_CREATED = None  # the cache directory this session made (and removes at its end)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CREATED = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="iterppo-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
if importlib.util.find_spec("filelock") is not None:  # the lock needs it (torch, a test dependency, brings it)
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(64 << 30))


def pytest_sessionfinish(session, exitstatus):
  if _CREATED:
    import shutil
    shutil.rmtree(_CREATED, ignore_errors=True)
