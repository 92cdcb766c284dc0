"""What every entry point shares: the locked `--config` flag and a clear error for an unknown key.

absl's config flags already refuse an unknown `--config.key=value` (lock_config=True), but with a long
traceback from deep inside flag parsing. `run` checks the overrides first and names the key, the closest
known keys and the config file, then exits with status 2 before any work starts.
"""

import difflib
import importlib.util
import sys

from absl import app
from absl import flags
from ml_collections import config_flags


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


def _load(spec: str):
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_ippo_config", path)
  if module_spec is None:
    sys.exit(f"error: config file {path!r} not found")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None) if arg else module.get_config()


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
  if not overrides:
    return
  known = _flatten(_load(spec))
  for key in overrides:
    if key not in known:
      close = difflib.get_close_matches(key, known, n=3)
      hint = f" Did you mean: {', '.join(close)}?" if close else ""
      sys.exit(f"error: unknown config key {key!r} (from --config.{key}) in {spec}.{hint}")


def run(main, default="configs/sales.py"):
  check_overrides(sys.argv[1:], default)
  app.run(main)
