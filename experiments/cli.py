"""What every entry point shares: the locked `--config` flag, and errors as one line with a documented exit code.

absl's config flags already refuse an unknown `--config.key=value` (lock_config=True), but with a long
traceback from deep inside flag parsing. `run` checks the config file and the overrides first and names the
key, the closest known keys and the config file, then exits with status 2 before any work starts.

`run` also turns what a run can fail on into one line on stderr and an exit code (the table is in
`iterppo_jax/errors.py` and the README): the project's own errors (`errors.RunError`: bad settings, bad logs,
a busy workdir, a full disk, a diverged loss), OS errors on the user's paths, bad flags and Ctrl-C. Anything
else is a bug: one line too, exit 1, and `--debug` shows its traceback (and the libraries' logs, which
otherwise repeat an orbax write error once per thread).
"""

import difflib
import functools
import importlib.util
import logging as py_logging
import os
import sys
import threading

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from iterppo_jax import errors


def define(define_fn, name: str, *args, **kwargs):
  """`define_fn(name, ...)` unless `name` is already a flag, then a holder of that one.

  Entry points define their flags at import, as absl wants; tests import several entry points into one process,
  where a second `--workdir` or `--config` would otherwise be a DuplicateFlagError. Flags are only parsed by
  the entry point that runs, so sharing one definition is safe.
  """
  if name in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
  return define_fn(name, *args, **kwargs)


def define_config(default="configs/sales.py"):
  # ml_collections applies --config.key=value overrides while the flag is being defined (at import), and an
  # unknown key would end in a long AttributeError: check them first, with the clear message.
  check_overrides(sys.argv[1:], default)
  return define(config_flags.DEFINE_config_file, "config", default, "Config file (path[:arg]).",
                lock_config=True)


def fail(code: int, message: str):
  """Prints `error: message` as one line on stderr and exits with `code` (errors.EXIT_*)."""
  text = " ".join(str(message).split())
  print(f"error: {text}", file=sys.stderr, flush=True)
  sys.exit(code)


def _load(spec: str):
  """The config of `path[:arg]`; a missing file, an error in it or a bad preset argument exits with 2."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_ippo_config", path)
  if module_spec is None or not os.path.isfile(path):
    fail(errors.EXIT_USAGE, f"config file {path!r} not found (from --config={spec})")
  try:
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None) if arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except  # the config file is the user's code
    where = ""
    tb = e.__traceback__
    while tb is not None:
      if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
        where = f":{tb.tb_lineno}"
      tb = tb.tb_next
    if isinstance(e, SyntaxError) and e.lineno:
      where = f":{e.lineno}"
    fail(errors.EXIT_USAGE, f"config {path}{where} (--config={spec}): {type(e).__name__}: {e}")


def _flatten(config, prefix=""):
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if hasattr(v, "items"):
      keys.extend(_flatten(v, prefix + k + "."))
  return keys


def check_overrides(argv, default):
  """Exits with a clear message when an override names a key the config does not have."""
  spec = default
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  if not overrides and spec == default and not any(a.startswith("--config") for a in argv):
    return  # the entry point's own default: nothing the user typed to check
  known = _flatten(_load(spec))
  for key in overrides:
    if key not in known:
      close = difflib.get_close_matches(key, known, n=3)
      hint = f" Did you mean: {', '.join(close)}?" if close else ""
      fail(errors.EXIT_USAGE, f"unknown config key {key!r} (from --config.{key}) in {spec}.{hint}")


_DEBUG = define(flags.DEFINE_bool, "debug", False,
                "On an error, show the full traceback and the libraries' logs instead of one line.")


class _NoLibraryErrors(py_logging.Filter):
  """Drops orbax's log records (a failed write is logged once per thread, then raised to us and reported once)
  and asyncio's "Task exception was never retrieved" for orbax's write tasks, which the garbage collector may
  log after our error line, even at exit; those are kept in `background`."""

  def __init__(self, background: list[str]):
    super().__init__()
    self.background = background

  def filter(self, record):
    if record.name == "asyncio" or record.name.startswith("asyncio."):
      exc = record.exc_info[1] if record.exc_info else None
      self.background.append(f"{type(exc).__name__}: {exc}" if exc else record.getMessage())
      return False
    return "orbax" not in record.pathname


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(errors.EXIT_USAGE, f"{e} (see --help)")


def guard(main):
  """`main` whose errors end as one line and an exit code (errors.py's table); --debug re-raises them."""

  @functools.wraps(main)
  def guarded(argv):
    background: list[str] = []
    if not _DEBUG.value:
      logging.get_absl_handler().addFilter(_NoLibraryErrors(background))
      # A failed orbax save also surfaces from its background threads and asyncio callbacks (each with a
      # traceback) before the main thread gets the error; that error is the one reported. A background error
      # that no main-thread error follows is summed up in one warning line at the end.
      sys.unraisablehook = lambda u: background.append(f"{type(u.exc_value).__name__}: {u.exc_value}")
      threading.excepthook = lambda a: background.append(f"{a.exc_type.__name__}: {a.exc_value}")
    try:
      result = main(argv)
      if background:
        print(f"warning: {len(background)} error(s) in background threads, first: {background[0][:200]} "
              "(--debug shows them)", file=sys.stderr)
      return result
    except (SystemExit, app.UsageError) as e:
      if isinstance(e, app.UsageError):
        fail(errors.EXIT_USAGE, str(e))
      raise
    except KeyboardInterrupt:
      if _DEBUG.value:
        raise
      fail(errors.EXIT_INTERRUPTED, "interrupted; rerunning the same command resumes from the last completed phase")
    except errors.RunError as e:
      if _DEBUG.value:
        raise
      fail(e.exit_code, str(e))
    except Exception as e:  # pylint: disable=broad-except
      if _DEBUG.value:
        raise
      if errors.storage_errno(e) is not None:
        fail(errors.EXIT_STORAGE, errors.describe_storage(e))
      if isinstance(e, OSError) and e.filename:  # a path the user gave: missing, not a directory, ...
        fail(errors.EXIT_STORAGE, f"{e.strerror or e} ({e.filename})")
      first = (str(e).strip().splitlines() or [""])[0][:300]
      fail(errors.EXIT_INTERNAL, f"internal error ({type(e).__name__}: {first}); rerun with --debug for the "
                                 "traceback, and please report it")

  return guarded


def run(main, default="configs/sales.py"):
  check_overrides(sys.argv[1:], default)
  app.run(guard(main), flags_parser=_parse_flags)
