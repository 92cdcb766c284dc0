"""The errors a run reports to its user as one line, and the exit code each kind ends with.

Entry points (`experiments/cli.py`) print a `RunError` as `error: <message>` and exit with its `exit_code`;
anything else is an internal error (exit 1, traceback with `--debug`). The library raises these where it knows
what went wrong and what the user can do about it; each subclass also derives from the builtin its callers
would catch (ValueError for settings and data), so library users may catch either.

| exit | kind                                                                 |
|------|----------------------------------------------------------------------|
| 0    | finished                                                             |
| 1    | internal error (a bug: rerun with --debug and report the traceback)  |
| 2    | usage: unknown flag or config key, bad setting, missing config file  |
| 3    | bad data: a log file that cannot be read or does not fit the format  |
| 4    | workdir: in use by another run, or holds a run with other settings   |
| 5    | storage: disk full, read-only or unwritable path, I/O error          |
| 6    | diverged: a loss became NaN or infinite                              |
| 130  | interrupted (Ctrl-C); the same command resumes                       |
"""

import errno
import re

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_WORKDIR = 4
EXIT_STORAGE = 5
EXIT_DIVERGED = 6
EXIT_INTERRUPTED = 130


class RunError(Exception):
  """An error the user can act on; entry points print its message as one line and exit with `exit_code`."""
  exit_code = EXIT_INTERNAL


class SettingsError(RunError, ValueError):
  """A setting (config key) out of its allowed range or choices, or an inconsistent combination."""
  exit_code = EXIT_USAGE


class DataError(RunError, ValueError):
  """Input data (logged conversations) that cannot be read or does not fit the format."""
  exit_code = EXIT_DATA


class WorkdirError(RunError, RuntimeError):
  """The workdir is held by another live run, or holds a run with other settings."""
  exit_code = EXIT_WORKDIR


class StorageError(RunError):
  """Writing under the workdir failed: disk full, read-only, no permission, I/O error."""
  exit_code = EXIT_STORAGE


class DivergedError(RunError, FloatingPointError):
  """A checked loss became NaN or infinite."""
  exit_code = EXIT_DIVERGED


# What the OS says, by errno and by the words libraries put into their own messages (tensorstore, under orbax,
# raises ValueError("... No space left on device [os_error_code='28']") rather than an OSError).
_STORAGE = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large (a file size limit)",
    errno.EIO: "input/output error",
}
_WORDS = {
    "no space left on device": errno.ENOSPC, "disk quota exceeded": errno.EDQUOT,
    "read-only file system": errno.EROFS, "permission denied": errno.EACCES, "file too large": errno.EFBIG,
}


def _chain(e: BaseException):
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def storage_errno(e: BaseException) -> int | None:
  """The storage errno behind `e` (or anything in its cause chain), or None when `e` is not about storage."""
  for link in _chain(e):
    if isinstance(link, OSError) and link.errno in _STORAGE:
      return link.errno
    text = str(link).lower()
    m = re.search(r"os_error_code='?(\d+)", text)
    if m and int(m.group(1)) in _STORAGE:
      return int(m.group(1))
    for words, code in _WORDS.items():
      if words in text:
        return code
  return None


def storage_path(e: BaseException) -> str | None:
  """The file the failed write was for, when the error names one (a checkpoint: its step directory)."""
  for link in _chain(e):
    path = None
    if isinstance(link, OSError) and link.filename:
      path = str(link.filename)
    else:
      m = re.search(r'local file "([^"]+)"', str(link))
      path = m.group(1) if m else None
    if path:
      return path.split(".orbax-checkpoint-tmp")[0]  # orbax's staging name -> the step being saved
  return None


def describe_storage(e: BaseException, where: str | None = None) -> str:
  """'no space left on device (writing PATH)' for a storage error; `where` stands in for an unnamed path."""
  code = storage_errno(e)
  what = _STORAGE.get(code, "a write failed")
  path = storage_path(e)
  if path:
    return f"{what} (writing {path})"
  return f"{what} (writing under {where})" if where else what
