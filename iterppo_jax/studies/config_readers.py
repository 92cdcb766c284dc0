"""Where each setting is read: the functions that read a key of `settings.Settings`, found in the source.

  python -m experiments.config_readers                 # every key and the functions that read it
  python -m experiments.config_readers --shared_only   # keys read in more than one library module

A key's path from configs/ to the code that uses it should be one straight line: settings.load types it, one
function turns it into the argument of the code that needs it, and everything after takes that argument
(issue #17). This study reads the source (Python's `ast`; nothing is imported or run) and lists, for every key,
the functions whose code reads it:

- a read is an attribute chain through the typed settings, `config.ppo.clip_eps`, `run.config.data.max_prompt_len`,
  `self.config.loop.play_batch`, or through a name bound to a section, `p = config.ppo; p.clip_eps`, or a
  `config.get("resume", default)`;
- the roots it follows are the names the code base gives the settings (ROOTS) and `.config` of anything;
- a whole section passed on (`loop.optimizer(c.ppo)`, `registry.make_env(config.env)`) is a read of the section,
  listed under its name: the function it is passed to is that section's one reader;
- assignments (`c.loop.iterations = 4`, a study steering a copy of the config) are not reads;
- modules with a config schema of their own (OWN_SCHEMA: the benchmark's) are left out, as their `config.ppo` is
  not the run's.

Static reading cannot follow a settings object through a function argument of another name or a getattr with a
computed name; `unread` lists the keys it found no read of (tests/test_config_readers.py keeps that list to the
keys read whole as a section).
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import os
import typing

from iterppo_jax import settings

ROOTS = ("c", "s", "config", "settings", "typed")  # names the code base gives a run's settings
OWN_SCHEMA = ("iterppo_jax/studies/benchmark.py", "experiments/benchmark.py", "experiments/benchmark_suite.py")
SOURCES = ("iterppo_jax", "experiments")


def settings_keys(cls=settings.Settings, prefix: str = "") -> tuple[set[str], set[str]]:
  """(the dotted leaf keys, the dotted section names) of the typed settings."""
  hints = typing.get_type_hints(cls)
  leaves, sections = set(), set()
  for f in dataclasses.fields(cls):
    if f.name == "extras":  # a domain's own env keys: not known statically
      continue
    if dataclasses.is_dataclass(hints[f.name]):
      sections.add(prefix + f.name)
      sub_leaves, sub_sections = settings_keys(hints[f.name], f"{prefix}{f.name}.")
      leaves |= sub_leaves
      sections |= sub_sections
    else:
      leaves.add(prefix + f.name)
  return leaves, sections


def _chain(node) -> list[str]:
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if isinstance(node, ast.Name):
    parts.append(node.id)
  return parts[::-1]


def _path(parts: list[str], aliases: dict, leaves: set, sections: set) -> str | None:
  """The key or section an attribute chain reaches ('' for the settings themselves), or None."""
  if not parts:
    return None
  if parts[0] in aliases:
    path, rest = aliases[parts[0]], parts[1:]
  else:
    for i, p in enumerate(parts):
      if (p in ROOTS and i == 0) or (p == "config" and i > 0):
        path, rest = "", parts[i + 1:]
        break
    else:
      return None
  for p in rest:
    nxt = f"{path}.{p}" if path else p
    if nxt in leaves:
      return nxt
    if nxt not in sections:
      return None
    path = nxt
  return path


def _key(parts: list[str], aliases: dict, leaves: set, sections: set) -> str | None:
  """The key or section an attribute chain reads, or None."""
  return _path(parts, aliases, leaves, sections) or None


def file_readers(path: str, rel: str, leaves: set, sections: set) -> dict[str, set[str]]:
  """{key or section: {'rel:function', ...}} for one source file."""
  with open(path) as f:
    tree = ast.parse(f.read(), filename=path)
  found = collections.defaultdict(set)

  def walk(node, where: list[str], aliases: dict):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
        walk(child, where + [getattr(child, "name", "<lambda>")], dict(aliases))
        continue
      if isinstance(child, ast.Assign) and len(child.targets) == 1 and isinstance(child.targets[0], ast.Name):
        bound = _key(_chain(child.value), aliases, leaves, sections)
        if bound in sections:
          aliases[child.targets[0].id] = bound
      here = f"{rel}:{'.'.join(where) or '<module>'}"
      if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) and child.func.attr == "get"
          and child.args and isinstance(child.args[0], ast.Constant) and isinstance(child.args[0].value, str)):
        section = _path(_chain(child.func.value), aliases, leaves, sections)  # config.get("resume", default)
        if section is not None and section not in leaves:
          key = f"{section}.{child.args[0].value}" if section else child.args[0].value
          if key in leaves:
            found[key].add(here)
      if isinstance(child, ast.Attribute):
        if isinstance(child.ctx, ast.Store):
          continue
        key = _key(_chain(child), aliases, leaves, sections)
        if key:
          found[key].add(here)
          continue
      walk(child, where, aliases)

  walk(tree, [], {})
  return found


def readers(root: str, sources=SOURCES, skip=OWN_SCHEMA) -> dict[str, set[str]]:
  """{key or section: {'path:function', ...}} over the .py files under root/<sources> (settings.py itself and
  `skip` left out)."""
  leaves, sections = settings_keys()
  out = collections.defaultdict(set)
  for source in sources:
    for dirpath, _, names in sorted(os.walk(os.path.join(root, source))):
      for name in sorted(names):
        if not name.endswith(".py"):
          continue
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        if rel == "iterppo_jax/settings.py" or rel in skip:
          continue
        for key, where in file_readers(path, rel, leaves, sections).items():
          out[key] |= where
  return dict(out)


def modules(where: set[str], library_only: bool = False) -> list[str]:
  """The modules of 'path:function' entries (the library's but studies/, with library_only)."""
  mods = {w.split(":")[0] for w in where}
  if library_only:
    mods = {m for m in mods if m.startswith("iterppo_jax/") and not m.startswith("iterppo_jax/studies/")}
  return sorted(mods)


def unread(found: dict[str, set[str]]) -> list[str]:
  """The leaf keys no function reads by name nor as part of a section read whole."""
  leaves, _ = settings_keys()
  out = []
  for key in sorted(leaves):
    parts = key.split(".")
    enclosing = [".".join(parts[:i]) for i in range(1, len(parts))]
    if not found.get(key) and not any(found.get(s) for s in enclosing):
      out.append(key)
  return out


def table(found: dict[str, set[str]], shared_only: bool = False) -> str:
  """A markdown table: key, the library modules (but studies/) that read it, and every reading function."""
  leaves, sections = settings_keys()
  rows = ["| key | library modules | read in |", "|---|---|---|"]
  for key in sorted(leaves | sections):
    where = found.get(key, set())
    lib = modules(where, library_only=True)
    if shared_only and len(lib) < 2:
      continue
    rows.append(f"| `{key}`{' (section)' if key in sections else ''} | {len(lib)} | "
                f"{', '.join(sorted(where)) or '-'} |")
  return "\n".join(rows)
