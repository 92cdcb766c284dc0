"""Atomic file writes: a workdir never holds a half-written file (DESIGN.md, "Writes are atomic").

Write to a temporary file in the destination's directory, flush and fsync it, then ``os.replace`` it over the
destination (atomic on POSIX within one filesystem). If the writer raises, the temporary file is removed and the
old destination, if any, is left untouched.
"""

import contextlib
import json
import os
import socket
import tempfile
import time
from typing import Any, Iterable, Iterator

from iterppo_jax import errors


def _fsync_directory(directory: str) -> None:
  """Makes the rename itself durable; some filesystems do not support it, which is harmless."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _current_umask() -> int:
  """The process umask; read from /proc where possible because os.umask() briefly changes it for all threads."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  umask = os.umask(0o022)
  os.umask(umask)
  return umask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
  """Opens a temporary file that replaces ``path`` only if the ``with`` body finishes without raising.

  Args:
    path: destination file; its parent directory is created if missing.
    mode: 'w' (text) or 'wb' (bytes).
    encoding: text encoding (ignored for 'wb').

  Yields:
    A writable file object.
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open supports modes 'w' and 'wb', got {mode!r}.")
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  # Same directory as the destination so os.replace never crosses a filesystem boundary.
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
    os.chmod(tmp_path, 0o666 & ~_current_umask())
    with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp_path)
    raise
  _fsync_directory(directory)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically."""
  with atomic_open(path, "wb") as f:
    f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
  """Writes ``text`` to ``path`` atomically."""
  with atomic_open(path, "w", encoding=encoding) as f:
    f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
  """Serialises ``obj`` to JSON first (so an unserialisable object never touches disk), then writes atomically."""
  atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def atomic_write_rows(path: str | os.PathLike, rows: Iterable[Any]) -> None:
  """Writes ``rows`` to ``path`` atomically as JSONL, one JSON object a line (a study's rows file)."""
  with atomic_open(path) as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def read_rows(path: str | os.PathLike) -> list[Any]:
  """The rows of a JSONL file written by atomic_write_rows, blank lines skipped."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def save_figure(fig, path: str, dpi: int = 120) -> str:
  """Saves a matplotlib figure as PNG atomically (a reader never sees half a plot), closes it; returns `path`."""
  import matplotlib.pyplot as plt  # plotting is optional for the library's other writers
  try:
    with atomic_open(path, "wb", encoding=None) as f:
      fig.savefig(f, dpi=dpi, format="png")
  finally:
    plt.close(fig)
  return path


class WorkdirLocked(errors.WorkdirError):
  """Another live run holds the workdir."""


LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


@contextlib.contextmanager
def workdir_lock(workdir: str, log=print) -> Iterator[str]:
  """Holds `workdir` for one run: a lock file made atomically (O_EXCL) with the holder's pid, host and start.

  A second run on the same workdir stops at once (WorkdirLocked, naming the holder). A lock left by a process
  that is gone (killed, or the machine rebooted: same host, dead pid) is taken over with a message, so a killed
  run resumes by rerunning its command. A workdir this lock created and that is still empty on exit is removed
  again, so a run that failed before writing anything leaves nothing behind.
  """
  created = not os.path.exists(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        with open(path) as f:
          holder = json.load(f)
      except (OSError, ValueError):
        holder = {}
      pid, host = holder.get("pid"), holder.get("host")
      if isinstance(pid, int) and host == me["host"] and not _alive(pid):
        log(f"note: {path}: the run that held this workdir (pid {pid}, started {holder.get('started')}) is gone; "
            "taking over its lock")
        os.remove(path)
        continue
      raise WorkdirLocked(f"{workdir} is in use by pid {pid} on {host} (since {holder.get('started')}); wait for "
                          f"that run to end, or use another --workdir (if it is gone, remove {path})") from None
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    break
  try:
    yield path
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
    if created:
      with contextlib.suppress(OSError):
        os.rmdir(workdir)  # only if nothing was written
