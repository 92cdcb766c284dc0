"""Checkpointing of every Iterative PPO phase (Algorithm 1: pi_k, Q_k, optimiser states) with orbax.

A ``Checkpointer`` owns one ``orbax.checkpoint.CheckpointManager`` rooted at ``workdir/checkpoints/<name>``
(e.g. 'qfit', 'ppo', 'loop'). Each step stores two items:
  * 'state': an arbitrary pytree of arrays (nnx.State, optax state, step counters, uint32 PRNG key data);
  * 'metadata': a JSON-serialisable dict (phase, iteration, data paths, config hash, ...).
``save`` blocks until the checkpoint is committed, so a process killed right after ``save`` returns leaves a
complete checkpoint (orbax only marks a step finished after all its files are written).

Restoring into shardings: build the abstract tree from shapes (``jax.eval_shape`` of the init function, with the
target ``NamedSharding`` on each leaf, or ``abstract_like`` of an existing tree), and pass it to ``restore``;
every array is then read straight into its sharding. Typed PRNG keys should be stored as
``jax.random.key_data(key)`` and re-wrapped on restore.
"""

import contextlib
import os
import shutil
import time
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

CHECKPOINTS_DIRNAME = "checkpoints"


def abstract_like(tree: Any) -> Any:
  """Abstract version of a concrete pytree: a ShapeDtypeStruct per array, keeping its sharding.

  Args:
    tree: pytree of jax.Arrays (or anything with shape/dtype).

  Returns:
    Pytree of ``jax.ShapeDtypeStruct`` with the same structure, usable as ``restore``'s target.
  """
  def to_struct(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree.map(to_struct, tree)


_PARTIAL = ".orbax-checkpoint-tmp"  # orbax writes a step under this suffix and renames it when committed


def _steps(root: str):
  """(path, is_complete) of every step directory under `root` (any depth: checkpointer names may nest)."""
  for directory, subdirs, files in os.walk(root):
    if _PARTIAL in os.path.basename(directory):
      yield directory, False
      subdirs[:] = []
    elif os.path.basename(directory).isdigit() and "_CHECKPOINT_METADATA" in files:
      yield directory, True
      subdirs[:] = []


def remove_partial(root: str | os.PathLike, *, settle_s: float = 0.25, rounds: int = 20) -> list[str]:
  """Removes the half-written steps a failed save left under `root` (disk full, a crash); returns their paths.

  A failed save can leave tensorstore writes in flight that land (and recreate their directories) after the
  first removal, once the removal has freed space; so the directory is scanned again `settle_s` later, until
  a scan finds nothing (at most `rounds` times).
  """
  removed = []
  for _ in range(rounds):
    partial = [p for p, complete in _steps(os.fspath(root)) if not complete]
    if not partial:
      break
    for path in partial:
      shutil.rmtree(path, ignore_errors=True)
    removed += [p for p in partial if p not in removed]
    time.sleep(settle_s)
  return removed


def latest_complete(root: str | os.PathLike) -> str | None:
  """The most recently committed step directory under `root` (by modification time), or None."""
  complete = [p for p, ok in _steps(os.fspath(root)) if ok]
  return max(complete, key=os.path.getmtime) if complete else None


class Checkpointer:
  """Saves and restores (pytree state, JSON metadata) pairs by integer step under ``workdir/checkpoints/<name>``."""

  def __init__(self, workdir: str | os.PathLike, name: str, *, max_to_keep: int | None = 3):
    """Creates (or reopens, for resume) the checkpoint directory.

    Args:
      workdir: run directory.
      name: sub-directory under ``checkpoints/`` (one per phase or model).
      max_to_keep: keep only the newest this many steps; None keeps all.
    """
    self.directory = os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINTS_DIRNAME, name)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest complete step, or None if there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every complete step kept on disk, ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, tree: Any, metadata: Mapping[str, Any] | None = None, *,
           overwrite: bool = False) -> None:
    """Saves ``tree`` and ``metadata`` as ``step`` and waits until the checkpoint is committed.

    Args:
      step: integer step (e.g. the global step, or the outer iteration for the loop checkpoint).
      tree: pytree of arrays.
      metadata: JSON-serialisable dict (empty if None).
      overwrite: replace an existing checkpoint at ``step``; otherwise that is an error.

    Raises:
      ValueError: if ``step`` already exists and ``overwrite`` is False (orbax would silently skip the save).
    """
    step = int(step)
    if step in self._manager.all_steps():
      if not overwrite:
        raise ValueError(f"Checkpoint step {step} already exists in {self.directory}; pass overwrite=True.")
      self._manager.delete(step)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(tree),
        metadata=ocp.args.JsonSave(dict(metadata or {})),
    )
    # force=True: the caller decides when to save; no interval policy should drop the request.
    try:
      saved = self._manager.save(step, args=args, force=True)
      self._manager.wait_until_finished()
    except BaseException:
      # Let the save's other writes end before the caller tidies its staging directory (remove_partial).
      with contextlib.suppress(Exception):
        self._manager.wait_until_finished()
      raise
    if not saved:
      raise RuntimeError(f"Orbax declined to save step {step} in {self.directory}.")

  def _resolve(self, step: int | None) -> int:
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    elif int(step) not in self._manager.all_steps():
      raise FileNotFoundError(f"No checkpoint step {step} in {self.directory}; have {self.all_steps()}.")
    return int(step)

  def restore(self, step: int | None = None, abstract_tree: Any = None) -> tuple[Any, dict[str, Any]]:
    """Restores the state pytree and metadata of ``step`` (the latest if None).

    Args:
      step: which step; None means ``latest_step()``.
      abstract_tree: target structure with ``jax.ShapeDtypeStruct`` leaves carrying the wanted shardings
        (from ``jax.eval_shape`` or ``abstract_like``). None restores the saved structure as plain containers
        with orbax's default placement.

    Returns:
      (tree, metadata).

    Raises:
      FileNotFoundError: no such step (or no checkpoint at all).
    """
    step = self._resolve(step)
    state_args = ocp.args.StandardRestore(abstract_tree) if abstract_tree is not None else ocp.args.StandardRestore()
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=state_args, metadata=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["metadata"] or {})

  def restore_metadata(self, step: int | None = None) -> dict[str, Any]:
    """Reads only the metadata of ``step`` (the latest if None), without touching the arrays."""
    step = self._resolve(step)
    restored = self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    return dict(restored["metadata"] or {})

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
