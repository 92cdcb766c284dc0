"""Noisy outcome labels on purpose, and how wrong the logged labels are (issues #8 and #10).

In production the outcome flag o_i is read by a classifier over the customer's text (PAPER.md, "SR MDP"), so
the labels Q is regressed on are sometimes wrong. The simulators log the classifier's flag on every customer
turn and keep what really happened in `metadata.true_outcome`, so the error can be measured
(`classifier_error`) and made worse on purpose (`flip_labels`) to see what a noisy label does to Q_k and to
pi_{k+1}. `qfit_records` is what the Q-fit sees when its data are degraded on purpose: flipped labels and a
share of D_k's conversations.

A flip changes labels only, never text: the state a model sees (conversation.render_state) does not show the
flags, so a flipped conversation is the same conversation with the other outcome.
"""

from __future__ import annotations

import copy
import dataclasses
import zlib
from typing import Sequence

import numpy as np

from iterppo_jax import conversation as conv_lib


def _record_draw(seed: int, record_id: str, stream: int) -> float:
  """A uniform number fixed by (seed, conversation id, stream): the same conversation gets the same draw
  whatever the order or the subset of the list, so a resumed run or a smaller D_k flips the same ones."""
  key = [int(seed), zlib.crc32(record_id.encode("utf-8")), int(stream)]
  return float(np.random.default_rng(np.random.SeedSequence(key)).random())


def _check_rate(name: str, value: float) -> float:
  value = float(value)
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
  return value


def _customer_indices(record: conv_lib.Conversation) -> list[int]:
  return [i for i, t in enumerate(record.turns) if t.role == "customer"]


def logged_label(record: conv_lib.Conversation) -> int:
  """The outcome label as logged: 1 when any customer turn carries the classifier's flag."""
  return int(any(t.flag for t in record.turns if t.role == "customer"))


def flip_one(record: conv_lib.Conversation) -> conv_lib.Conversation:
  """A copy of `record` with its outcome label flipped, the customer flags changed to agree.

  A success loses its flag(s) and becomes a conversation the customer left (how the simulator ends one whose
  purchase the classifier missed); a failure gains a flag on its last customer message and ends with the
  outcome. The metadata keeps `true_outcome` untouched and gains `label_flipped: True` and the logged
  `unflipped_end_reason`.

  A failure whose only customer message is the opening gains that flag, which no decision's return counts
  (returns count customer messages after the decision): its outcome changes, its Q targets do not.
  """
  label = logged_label(record)
  if record.outcome not in (0, 1) or float(record.outcome) != label:
    raise ValueError(f"record {record.id}: flip_labels needs a binary outcome that agrees with the customer flags, "
                     f"got outcome {record.outcome!r} with flags {[t.flag for t in record.turns if t.role == 'customer']}")
  out = copy.deepcopy(record)
  customers = _customer_indices(out)
  if label:
    for i in customers:
      out.turns[i] = dataclasses.replace(out.turns[i], flag=0)
    out.outcome, new_reason = 0.0, "customer_left"
  else:
    out.turns[customers[-1]] = dataclasses.replace(out.turns[customers[-1]], flag=1)
    out.outcome, new_reason = 1.0, "outcome"
  out.metadata = {**out.metadata, "label_flipped": True, "unflipped_end_reason": record.end_reason}
  out.end_reason = new_reason
  return out


def flip_labels(records: Sequence[conv_lib.Conversation], rate: float,
                seed: int) -> list[conv_lib.Conversation]:
  """Copies of `records` with each conversation's outcome label flipped with probability `rate`.

  Args:
    records: logged conversations with binary outcomes (the input is not changed).
    rate: flip probability per conversation, in [0, 1].
    seed: which conversations flip; the draw is per conversation id (`_record_draw`), so it does not depend
      on the order of `records` and a subset flips the same conversations as the whole.

  Returns:
    New records; unflipped ones are deep copies, flipped ones come from `flip_one`.

  Raises:
    ValueError: a rate outside [0, 1], a customer-less record, or an outcome that is not 0/1 or disagrees with
      the flags.
  """
  rate = _check_rate("label flip rate", rate)
  out = []
  for r in records:
    if not _customer_indices(r):
      raise ValueError(f"record {r.id} has no customer message to carry an outcome flag")
    out.append(flip_one(r) if rate > 0 and _record_draw(seed, r.id, 0) < rate else copy.deepcopy(r))
  return out


def subsample(records: Sequence[conv_lib.Conversation], fraction: float,
              seed: int) -> list[conv_lib.Conversation]:
  """Keeps each conversation with probability `fraction` (at least one), in the input order.

  Like the flips, the choice is per conversation id, so a resumed run keeps the same ones.
  """
  fraction = _check_rate("data fraction", fraction)
  if fraction >= 1.0:
    return list(records)
  kept = [r for r in records if _record_draw(seed, r.id, 1) < fraction]
  if not kept and records:
    kept = [min(records, key=lambda r: _record_draw(seed, r.id, 1))]
  return kept


def qfit_records(records: Sequence[conv_lib.Conversation], *, label_flip: float = 0.0,
                 data_fraction: float = 1.0, seed: int = 0) -> list[conv_lib.Conversation]:
  """What the Q-fit of an iteration sees of D_k when Q is degraded on purpose (issue #10).

  Args:
    records: D_k as logged.
    label_flip: probability of flipping each kept conversation's outcome label (0: none).
    data_fraction: share of D_k's conversations kept (1: all).
    seed: fixes which conversations are kept and which flip.

  Returns:
    The kept records (the same objects when no label flips; copies otherwise).
  """
  kept = subsample(records, data_fraction, seed)
  return flip_labels(kept, label_flip, seed) if label_flip > 0 else kept


def classifier_error(records: Sequence[conv_lib.Conversation]) -> dict[str, float]:
  """How often the logged outcome label disagrees with what happened (metadata.true_outcome).

  Returns:
    labelled: conversations that carry `metadata.true_outcome`;
    true_positives_n / true_negatives_n: how many really converted / did not;
    false_positive_rate: P(logged 1 | true 0); false_negative_rate: P(logged 0 | true 1) (NaN with no such
      conversations); error_rate: P(logged != true); flipped: conversations marked `label_flipped`.

  Raises:
    ValueError: when no record carries `metadata.true_outcome` (e.g. a user's own logs: there is no truth to
      compare with).
  """
  pairs = [(logged_label(r), int(r.metadata["true_outcome"])) for r in records if "true_outcome" in r.metadata]
  if not pairs:
    raise ValueError("classifier_error needs records with metadata.true_outcome (simulator logs); none of the "
                     f"{len(records)} records has it")
  logged, truth = np.asarray(pairs).T
  pos, neg = truth == 1, truth == 0
  rate = lambda wrong, group: float(np.mean(wrong[group])) if group.any() else float("nan")  # noqa: E731
  return {"labelled": float(len(pairs)), "true_positives_n": float(pos.sum()), "true_negatives_n": float(neg.sum()),
          "false_positive_rate": rate(logged == 1, neg), "false_negative_rate": rate(logged == 0, pos),
          "error_rate": float(np.mean(logged != truth)),
          "flipped": float(sum(bool(r.metadata.get("label_flipped")) for r in records))}
