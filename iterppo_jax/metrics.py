"""Metric logging for every phase of Iterative PPO (collect, Q-fit, PPO, evaluate): JSONL, TensorBoard, progress.

Metrics are flat dicts of scalars with slash names ('ppo/clipfrac', 'qfit/brier'). Each ``MetricWriter.write``
appends one JSON object to ``workdir/metrics.jsonl`` (flushed at once, so a killed run keeps what it logged) and,
optionally, the same scalars to TensorBoard. Non-finite values fail fast, naming the step (STYLE.md section 3).

Note on resume: the JSONL file is appended to, so a run resumed from a checkpoint may log some steps twice;
``read_metrics(..., dedup=True)`` keeps the last record of each (phase, iteration, step).
"""

import json
import math
import os
import sys
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from iterppo_jax import errors

METRICS_FILENAME = "metrics.jsonl"
NO_PROGRESS_ENV = "IPPO_NO_PROGRESS"


def to_float(value: Any, name: str = "value") -> float:
  """Converts a Python/NumPy/JAX scalar (or size-1 array) to a Python float.

  Raises:
    ValueError: if ``value`` has more than one element.
  """
  array = np.asarray(value)  # works for jax.Array without importing jax here (fetches it to host)
  if array.size != 1:
    raise ValueError(f"Metric {name!r} must be a scalar, got shape {array.shape}.")
  return float(array.reshape(()))


def _matches(name: str, families: bool | Sequence[str]) -> bool:
  if isinstance(families, bool):
    return families
  # A family is a prefix ('ppo/' or 'ppo') or an exact key ('qfit/loss').
  return any(name == f or name.startswith(f.rstrip("/") + "/") for f in families)


def check_finite(metrics: Mapping[str, Any], step: int, families: bool | Sequence[str] = True) -> None:
  """Raises if any metric in the checked families is NaN or infinite.

  Args:
    metrics: flat dict of scalars.
    step: the step being logged (named in the error).
    families: True checks every key; False none; a sequence of key prefixes ('ppo/', 'qfit/loss') checks the keys
      equal to or under one of them.

  Raises:
    errors.DivergedError (a FloatingPointError): naming the step and every offending key with its value.
  """
  bad = {}
  for name, value in metrics.items():
    if _matches(name, families):
      number = to_float(value, name)
      if not math.isfinite(number):
        bad[name] = number
  if bad:
    listing = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
    raise errors.DivergedError(f"non-finite metrics at step {step}: {listing}")


class MetricWriter:
  """Writes scalar metrics to ``workdir/metrics.jsonl`` and (optionally) TensorBoard event files in ``workdir``.

  Only one process should write (pass ``active=jax.process_index() == 0`` on multi-host runs); the finiteness
  check runs on every process so all of them fail together.
  """

  def __init__(
      self,
      workdir: str | os.PathLike,
      *,
      tensorboard: bool = True,
      fail_on_nonfinite: bool | Sequence[str] = True,
      active: bool = True,
      filename: str = METRICS_FILENAME,
  ):
    """Opens (appends to) the JSONL file and, if asked, a TensorBoard writer.

    Args:
      workdir: run directory (created if missing).
      tensorboard: also write TensorBoard events; if tensorboardX is missing, warns once and carries on.
      fail_on_nonfinite: which key families raise on NaN/inf (see ``check_finite``).
      active: False makes writes no-ops (non-zero hosts), but still checks finiteness.
      filename: JSONL file name inside ``workdir``.
    """
    self.workdir = os.fspath(workdir)
    self.path = os.path.join(self.workdir, filename)
    self.fail_on_nonfinite = fail_on_nonfinite
    self.active = active
    self._file = None
    self._tb = None
    if not active:
      return
    os.makedirs(self.workdir, exist_ok=True)
    self._file = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # optional dependency, imported only when asked for
      except ImportError as e:
        warnings.warn(f"tensorboardX unavailable ({e}); writing metrics to JSONL only.", stacklevel=2)
      else:
        self._tb = SummaryWriter(logdir=self.workdir)

  def write(
      self,
      step: int,
      metrics: Mapping[str, Any],
      *,
      phase: str | None = None,
      iteration: int | None = None,
  ) -> dict[str, Any]:
    """Checks, then logs one record of scalars.

    Args:
      step: the step of this record (TensorBoard x-axis).
      metrics: flat dict of scalars (Python, NumPy or JAX; converted to float).
      phase: optional phase name ('collect', 'qfit', 'ppo', 'eval'), stored in the record.
      iteration: optional outer Iterative PPO iteration k, stored in the record.

    Returns:
      The record written (with 'step' and, if given, 'phase' and 'iteration').

    Raises:
      errors.DivergedError: a checked metric is non-finite (nothing is written then).
    """
    step = int(step)
    values = {name: to_float(value, name) for name, value in metrics.items()}
    check_finite(values, step, self.fail_on_nonfinite)
    record: dict[str, Any] = {"step": step}
    if phase is not None:
      record["phase"] = phase
    if iteration is not None:
      record["iteration"] = int(iteration)
    reserved = set(record) & set(values)
    if reserved:
      raise ValueError(f"Metric names {sorted(reserved)} clash with record fields at step {step}.")
    record.update(values)
    if self._file is not None:
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()  # a killed run keeps every line it logged
    if self._tb is not None:
      for name, value in values.items():
        if math.isfinite(value):  # an undefined statistic (NaN) stays in the JSONL; TensorBoard shows a gap
          self._tb.add_scalar(name, value, step)
      self._tb.flush()
    return record

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def read_metrics(path: str | os.PathLike, dedup: bool = False) -> list[dict[str, Any]]:
  """Loads a metrics JSONL file (or ``<dir>/metrics.jsonl`` when given a directory).

  Args:
    path: file or workdir.
    dedup: keep only the last record of each (phase, iteration, step), in first-seen order (for resumed runs).

  Returns:
    The records, as dicts.

  Raises:
    ValueError: naming file and line of a malformed record.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILENAME)
  records = []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_number}: malformed metrics record: {e}") from e
  if dedup:
    latest: dict[tuple, dict[str, Any]] = {}
    for record in records:
      latest[(record.get("phase"), record.get("iteration"), record.get("step"))] = record
    records = list(latest.values())
  return records


def progress_enabled() -> bool:
  """Progress bars only on an interactive terminal, and never when IPPO_NO_PROGRESS=1."""
  if os.environ.get(NO_PROGRESS_ENV, "") not in ("", "0"):
    return False
  return sys.stderr.isatty()


def progress(iterable: Iterable, total: int | None = None, desc: str | None = None, **kwargs) -> Iterable:
  """A tqdm progress bar over ``iterable``, silent when not on a TTY or when IPPO_NO_PROGRESS=1.

  Args:
    iterable: what to iterate over.
    total: its length, if not inferable.
    desc: label shown before the bar.
    **kwargs: passed to tqdm.

  Returns:
    An iterable yielding the same items.
  """
  if not progress_enabled():
    return iterable
  from tqdm.auto import tqdm  # imported lazily: no work at import time
  return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, **kwargs)
