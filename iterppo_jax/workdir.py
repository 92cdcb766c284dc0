"""A run's working directory: which phases are done, whether a rerun may continue the run, and its logs.

  workdir/progress.json       Progress: completed phases and what they produced (written atomically)
  workdir/config.json         check_resumable: a rerun continues only under the settings the run began with;
                              read_run_env: its `env` section, for the studies that read a finished run
  workdir/data/<name>.jsonl   play_and_log / read_logs: the conversations each phase played (one part per
                              process in a multi-process run, read back as one dataset)
  workdir/metrics.jsonl       phase_seconds: wall time per phase, over every process that worked on the run

The loop (loop.py) and the studies that reuse its phases read and write a workdir through these alone.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
from typing import Any

from iterppo_jax import conversation as conv_lib
from iterppo_jax import distributed
from iterppo_jax import errors
from iterppo_jax import io_utils
from iterppo_jax import metrics as metrics_lib
from iterppo_jax import settings


class Progress:
  """workdir/progress.json: completed phases and what they produced (small JSON, written atomically).

  Every process of a multi-process run keeps the same record; process 0 alone writes it (distributed.is_writer).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "progress.json")
    self.active = distributed.is_writer()
    self.done: dict[str, Any] = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.done = json.load(f)

  def get(self, phase: str):
    return self.done.get(phase)

  def mark(self, phase: str, payload: Any = True) -> None:
    self.done[phase] = payload
    if self.active:
      io_utils.atomic_write_json(self.path, self.done)


# Settings a rerun into the same workdir may change (check_resumable): how far the run goes, where it runs and
# what it writes beside its results; every other setting shapes the results, so a run keeps the ones it began with.
RESUMABLE_CHANGES = ("resume", "loop.iterations", "loop.stop_after_phase", "loop.stop_after_ppo_step",
                     "loop.tensorboard", "export_dir", "mesh", "mesh_rules", "distributed", "cluster")


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _changed(saved: dict, config, allowed: tuple[str, ...]) -> str:
  """'key: old -> new; ...' for each setting of `config` that differs from the flat `saved` one and is not under a
  prefix in `allowed`; '' if none."""
  now = _flat(json.loads(config.to_json_best_effort()))
  # a setting added to the library after the run began counts as its default there (the run ran without it)
  saved = {**{k: v for k, v in _defaults().items() if k in now and k not in saved}, **saved}
  changed = [k for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k) and not any(k == a or k.startswith(a + ".") for a in allowed)]
  return "; ".join(f"{k}: {saved.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}" for k in changed)


def _defaults() -> dict:
  """settings.Settings' defaults, flat and as config.json writes them (tuples as lists)."""
  return _flat(json.loads(json.dumps(dataclasses.asdict(settings.Settings()))))


def check_resumable(config, workdir: str) -> None:
  """Refuses, before anything is written, to continue the run in `workdir` under other settings.

  A workdir without config.json holds no run: nothing to check. With `resume` False an existing run is
  refused outright. Otherwise every setting but RESUMABLE_CHANGES must equal the one the run began with
  (more iterations may be asked for: the run goes on from its last completed phase).

  Raises:
    errors.WorkdirError: naming the file and each differing setting with its old and new value.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  if not config.get("resume", settings.Settings.resume):
    raise errors.WorkdirError(f"{workdir} already holds a run ({path}) and resume is False: pick a new --workdir, or "
                     "pass --config.resume=True to continue it")
  try:
    with open(path) as f:
      saved = _flat(json.load(f))
  except (OSError, ValueError) as e:
    raise errors.WorkdirError(f"{path}: not a readable run config ({e}); pick a new --workdir") from e
  listed = _changed(saved, config, RESUMABLE_CHANGES)
  if listed:
    raise errors.WorkdirError(f"{path} holds a run begun with other settings ({listed}). Rerun with the run's own "
                     "settings to continue it, or pick a new --workdir for the new ones.")


# Settings that act only after pi_0 and its evaluation (the Q-fit, the improvement step, what later rounds deploy
# and measure): a run branched from another run's pi_0 (branch_from) may choose them anew.
BRANCHABLE = RESUMABLE_CHANGES + ("qfit", "ppo", "group", "inner", "gamma", "loop.first_data", "loop.conversations",
                                  "loop.deploy_temperature", "loop.explore_turns", "loop.explore_count",
                                  "loop.rank_states", "loop.rank_policy_samples", "loop.rank_rollouts",
                                  "loop.true_q_states", "loop.true_q_rollouts", "baselines")
_BRANCH_PHASES = ("sft", "eval/0", "reference")  # what a branch keeps of its source's progress
_BRANCH_FILES = ("tokenizer", os.path.join("data", "behavior.jsonl"), os.path.join("data", "eval_0.jsonl"),
                 os.path.join("checkpoints", "policy", "0"))


def branch_from(source: str, config, workdir: str) -> bool:
  """Starts the run in `workdir` from the pi_0 of the run in `source`, so that settings of later phases can be
  compared from the same pi_0 (paired, without repeating the SFT).

  Copies the source's tokenizer, the behaviour logs pi_0 was cloned from, pi_0's checkpoint and evaluation and
  the scripted references, and writes `config` as the new run's config; the loop then resumes after pi_0's
  evaluation. Every setting but BRANCHABLE must equal the source's. A `workdir` that already holds a run is left
  as it is (returns False: the caller resumes it, check_resumable judging its settings).

  Raises:
    errors.WorkdirError: the source lacks pi_0 or its evaluation, or a setting that shapes them differs (each
      named with the source's value and the new one); nothing is written then.
  """
  held = os.path.exists(os.path.join(workdir, "config.json"))
  distributed.barrier("branch_from/check")  # every process has looked before process 0 writes anything
  if held:
    return False
  src_config = os.path.join(source, "config.json")
  try:
    with open(src_config) as f:
      saved = _flat(json.load(f))
    with open(os.path.join(source, "progress.json")) as f:
      progress = json.load(f)
    metrics_file = os.path.join(source, metrics_lib.METRICS_FILENAME)  # pi_0's rows; its time is the source's
    rows = [r for r in (metrics_lib.read_metrics(metrics_file) if os.path.exists(metrics_file) else [])
            if r.get("phase") in ("data", "sft") or (r.get("phase") == "eval" and r.get("iteration") == 0)]
  except (OSError, ValueError) as e:
    raise errors.WorkdirError(f"--branch_from={source}: not a loop run's workdir ({type(e).__name__}: {e})") from e
  missing = [p for p in _BRANCH_PHASES if p not in progress] + [
      f for f in _BRANCH_FILES if not os.path.exists(os.path.join(source, f))]
  if missing:
    raise errors.WorkdirError(f"--branch_from={source}: the run has not completed pi_0 and its evaluation (missing: "
                              f"{', '.join(missing)}); rerun it until eval/0 is done, or branch from another run")
  listed = _changed(saved, config, BRANCHABLE)
  if listed:
    raise errors.WorkdirError(f"--branch_from={source}: these settings shape pi_0 or its evaluation and differ from "
                              f"{src_config} ({listed}); a branch may change only later phases' settings "
                              f"({', '.join(BRANCHABLE)})")
  if not distributed.is_writer():  # process 0 copies into the (shared) workdir; the others wait for it
    distributed.barrier("branch_from")
    return True
  os.makedirs(workdir, exist_ok=True)
  for rel in _BRANCH_FILES:
    src, dst = os.path.join(source, rel), os.path.join(workdir, rel)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.isdir(src):
      shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
      shutil.copy2(src, dst)
  io_utils.atomic_write_text(os.path.join(workdir, metrics_lib.METRICS_FILENAME),
                             "".join(json.dumps(r) + "\n" for r in rows))
  io_utils.atomic_write_json(os.path.join(workdir, "progress.json"),
                             {**{p: progress[p] for p in _BRANCH_PHASES}, "branched_from": os.path.abspath(source)})
  # last: a config.json marks a workdir as holding a run, so an interrupted copy is simply redone
  io_utils.atomic_write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
  distributed.barrier("branch_from")
  return True


def read_run_env(workdir: str) -> dict:
  """The `env` section of a run's config.json (with its `domain`); a DataError naming the file otherwise."""
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      env = json.load(f)["env"]
    env["domain"]  # pylint: disable=pointless-statement
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise errors.DataError(f"{path}: not a loop run's config ({type(e).__name__}: {e})") from e
  return env


def read_logs(workdir: str, name: str) -> list[conv_lib.Conversation]:
  """The conversations of dataset `name` (workdir/data/name.jsonl, or the parts name.p<i>-of-<P>.jsonl that the P
  processes of a multi-process run wrote, read back in process order: one dataset in conversation order)."""
  path = os.path.join(workdir, "data", f"{name}.jsonl")
  if os.path.exists(path):
    return conv_lib.read_jsonl(path)
  parts = sorted(glob.glob(os.path.join(workdir, "data", glob.escape(name) + ".p*-of-*.jsonl")))
  by_count: dict[int, dict[int, str]] = {}
  for p in parts:
    m = re.fullmatch(r"\.p(\d+)-of-(\d+)\.jsonl", os.path.basename(p)[len(name):])
    if m:
      by_count.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
  for count, found in sorted(by_count.items()):
    if len(found) == count:
      return [r for i in range(count) for r in conv_lib.read_jsonl(found[i])]
  raise FileNotFoundError(path)


def play_and_log(workdir: str, env, play_batch: int, policy, n: int, seed: int,
                 name: str) -> list[conv_lib.Conversation]:
  """Plays n conversations (or reloads them if this phase already wrote them) and keeps workdir/data/name.jsonl.

  In a multi-process run each process plays its block of conversation indices (distributed.shard_range) and
  keeps it as data/name.p<i>-of-<P>.jsonl; after a barrier every process reads all blocks back as one dataset.
  Conversations are seeded on their index (and a model samples per conversation and turn), so the dataset is
  the one a single process plays.
  """
  try:  # written before, whole (also by another number of processes, in a run resumed on those)
    records = read_logs(workdir, name)
  except FileNotFoundError:
    records = None
  path = os.path.join(workdir, "data", f"{distributed.shard_name(name)}.jsonl")
  if records is None and not os.path.exists(path):
    start, stop = distributed.shard_range(n)
    bar = lambda starts: metrics_lib.progress(starts, total=len(starts), desc=name)  # noqa: E731
    records = env.play(policy, stop - start, seed=seed, start=start, batch_size=play_batch, progress=bar)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    conv_lib.write_jsonl(path, records)
    model = getattr(policy, "policy", policy)  # an LMPolicy, or the one inside explore.RandomisedTurn
    note = model.truncation_note() if hasattr(model, "truncation_note") else None
    if note:
      print(f"warning: {name}: {note}")
  if distributed.process_count() == 1:
    return records
  distributed.barrier(f"play_and_log/{name}")
  return read_logs(workdir, name)  # every block, in process order


def phase_seconds(workdir: str) -> dict[str, float]:
  """Wall seconds per phase name (sft, collect, qfit, ppo, eval, ...) summed over iterations, from the run's
  metrics.jsonl (so a resumed run counts the phases of its earlier processes too)."""
  out: dict[str, float] = {}
  if not os.path.exists(os.path.join(workdir, metrics_lib.METRICS_FILENAME)):
    return out
  for row in metrics_lib.read_metrics(workdir):
    for name, value in row.items():
      if name.startswith("time/"):
        out[name[5:]] = out.get(name[5:], 0.0) + float(value)
  return out
