"""Helpers shared by config files (kept tiny, like big_vision's configs/common.py)."""


def parse_arg(arg, **defaults):
  """Parses the colon argument of `--config=configs/x.py:arg` into a dict.

  `arg` is a comma-separated list of `key=value` or bare flags (`tiny` -> tiny=True); values are cast to the
  type of the default. An unknown key is an error, so a typo fails before any work starts.
  """
  out = dict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; expected one of {sorted(defaults)}")
    if not value:
      out[key] = True
    elif isinstance(defaults[key], bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(defaults[key])(value)
  return out
