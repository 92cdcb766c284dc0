"""A tensorflow-datasets builder for logged conversations of the SR MDP (DESIGN.md, `tfds_conversations.py`).

The logs that Algorithm 1 collects each iteration (JSONL, conversation.py) become a versioned TFDS dataset in
the array_record format, readable by random access with `builder.as_data_source()`. Both writing and reading
take TFDS's no-TensorFlow path (array_record + numpy decoding), so nothing here needs TensorFlow; the
turns are stored as a nested `Sequence` feature, which that path supports.

Layout under `data_dir`: `conversations/1.1.0/` with dataset_info.json, features.json and
`conversations-{train,heldout}.array_record-*` shards.

Every JSONL line is validated before anything is written: a malformed line raises the conversation module's
error naming `file:line` and leaves no dataset behind (or, with skip_invalid, is counted and skipped).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from iterppo_jax import conversation as conv_lib
from iterppo_jax import errors

NAME = "conversations"
DATASET_VERSION = "1.1.0"
HELDOUT_SPLIT = "heldout"


def _heldout(conversation_id: str, fraction: float) -> bool:
  """A stable split by conversation id: the same id lands on the same side on every machine and run."""
  digest = hashlib.sha256(conversation_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def _to_example(index: int, conv: conv_lib.Conversation) -> dict:
  # None has no TFDS encoding: a missing flag is -1 and a missing feedback is '' (roles fix which apply).
  return {
      "index": index, "id": conv.id, "domain": conv.domain, "policy": conv.policy,
      "outcome": conv.outcome, "end_reason": conv.end_reason,
      "metadata": json.dumps(conv.metadata, ensure_ascii=False), "context": conv.context,
      "turns": [{"role": t.role, "text": t.text, "flag": -1 if t.flag is None else t.flag,
                 "feedback": t.feedback or "", "abstain": t.abstain} for t in conv.turns],
  }


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _from_example(ex: dict) -> conv_lib.Conversation:
  t = ex["turns"]
  turns = [conv_lib.Turn(role=_text(role), text=_text(text), flag=None if int(flag) < 0 else int(flag),
                         feedback=_text(feedback) or None, abstain=bool(abstain))
           for role, text, flag, feedback, abstain in zip(t["role"], t["text"], t["flag"], t["feedback"],
                                                          t["abstain"])]
  return conv_lib.Conversation(
      id=_text(ex["id"]), domain=_text(ex["domain"]), policy=_text(ex["policy"]), turns=turns,
      outcome=float(ex["outcome"]), end_reason=_text(ex["end_reason"]),
      metadata=json.loads(_text(ex["metadata"])), context=_text(ex["context"]))


# skip_registration: tfds's global name registry is not needed (we load by data_dir) and a re-import
# (tests, notebooks) would otherwise collide with the earlier registration.
class ConversationsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Logged SR-MDP conversations from JSONL files; one example per conversation.

  Constructor arguments beyond tfds's (data_dir, file_format, ...), all keyword-only:
    jsonl_paths: the log files (needed to build; not to read an existing dataset).
    heldout_fraction: share of conversation ids (by hash) put in a 'heldout' split; 0 gives 'train' only.
    skip_invalid: skip and count malformed lines instead of failing (see `report`).
  """
  name = NAME
  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {"1.0.0": "First release: SR-MDP conversations (turns with role, text, outcome flag, "
                            "business feedback, abstain); metadata as JSON text.",
                   "1.1.0": "The agent's private context of each conversation ('' when none)."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # No checksums or metadata files live beside this module. tfds 4.9.10 would otherwise resolve the
    # package path through `importlib_resources`, which it only declares as a dependency for Python < 3.9,
    # so download_and_prepare fails with ModuleNotFoundError on a clean Python 3.11 install.
    return None

  def __init__(self, *, jsonl_paths: Sequence[str] = (), heldout_fraction: float = 0.0,
               skip_invalid: bool = False, **kwargs):
    self.jsonl_paths = tuple(jsonl_paths)
    self.heldout_fraction = float(heldout_fraction)
    self.skip_invalid = skip_invalid
    self.report = conv_lib.ReadReport()
    super().__init__(**kwargs)

  def _info(self):
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self,
        description="Logged conversations of the suggested-response MDP (iterppo_jax.conversation).",
        features=tfds.features.FeaturesDict({
            "index": np.int64,  # position in the input files, so `load` returns the original order
            "id": text, "domain": text, "policy": text, "outcome": np.float64, "end_reason": text,
            "metadata": text,  # JSON: free-form per domain, so no fixed schema
            "context": text,  # the agent's private information (Conversation.context); '' when none
            "turns": tfds.features.Sequence({
                "role": text, "text": text,
                "flag": np.int32,  # customer outcome flag o_i; -1 on other roles
                "feedback": text,  # business feedback; '' on other roles
                "abstain": np.bool_,
            }),
        }),
        disable_shuffling=True,  # keep the logs' order; readers shuffle themselves (data.batch_iterator)
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if not self.jsonl_paths:
      raise ValueError("ConversationsBuilder needs jsonl_paths to build a dataset")
    splits = {"train": self._generate_examples(heldout=False)}
    if self.heldout_fraction > 0:
      splits[HELDOUT_SPLIT] = self._generate_examples(heldout=True)
    return splits

  def _generate_examples(self, heldout: bool):
    index = 0
    for path in self.jsonl_paths:
      for conv in conv_lib.iter_jsonl(path, skip_invalid=self.skip_invalid):
        if (self.heldout_fraction > 0 and _heldout(conv.id, self.heldout_fraction)) == heldout:
          yield index, _to_example(index, conv)
        index += 1


class DatasetExists(errors.RunError, FileExistsError):
  """The dataset's version directory exists and overwrite was not asked for."""
  exit_code = errors.EXIT_WORKDIR


def builder(data_dir: str, **kwargs):
  """A ConversationsBuilder over `data_dir` (array_record files); kwargs go to its constructor."""
  return ConversationsBuilder(data_dir=data_dir, file_format="array_record", **kwargs)


def validate(jsonl_paths: Sequence[str], skip_invalid: bool = False) -> conv_lib.ReadReport:
  """Reads every line once; raises ConversationFormatError (file:line) unless skip_invalid."""
  report = conv_lib.ReadReport()
  if not jsonl_paths:
    raise conv_lib.ConversationFormatError("no JSONL log files given")
  for path in jsonl_paths:
    for _ in conv_lib.iter_jsonl(path, skip_invalid=skip_invalid, report=report):
      pass
  return report


def build(jsonl_paths: Sequence[str], data_dir: str, skip_invalid: bool = False,
          heldout_fraction: float = 0.0, overwrite: bool = False):
  """Validates the logs, then writes them as a TFDS dataset under `data_dir`.

  The dataset is generated in a temporary directory beside its destination and renamed into place, so an
  error at any point leaves `data_dir` as it was.

  Args:
    jsonl_paths: log files, read in the given order.
    data_dir: TFDS data dir; the dataset lands in `data_dir/conversations/1.1.0`.
    skip_invalid: skip malformed lines (counted in `builder.report`) instead of failing.
    heldout_fraction: share of conversations (by id hash) in a 'heldout' split.
    overwrite: replace an existing dataset of this version (otherwise that is an error).
  Returns:
    The builder of the finished dataset; `builder.report` holds the read/skipped counts.
  Raises:
    ConversationFormatError naming file:line for a malformed line (unless skip_invalid), before any write.
    DatasetExists (a FileExistsError) if the dataset exists and not overwrite.
  """
  jsonl_paths = [os.fspath(p) for p in jsonl_paths]
  report = validate(jsonl_paths, skip_invalid)
  if report.read == 0:
    raise conv_lib.ConversationFormatError(f"no valid conversations in {len(jsonl_paths)} file(s) "
                                           f"({report.skipped} skipped; first: {report.errors[:1]})")
  data_dir = os.path.abspath(data_dir)
  final = os.path.join(data_dir, NAME, DATASET_VERSION)
  if os.path.exists(final) and not overwrite:
    raise DatasetExists(f"dataset already exists at {final}; pass overwrite=True (--overwrite) to replace")
  os.makedirs(data_dir, exist_ok=True)
  staging = tempfile.mkdtemp(dir=data_dir, prefix=".tmp-build-")
  try:
    b = builder(staging, jsonl_paths=jsonl_paths, heldout_fraction=heldout_fraction,
                skip_invalid=skip_invalid)
    b.download_and_prepare(
        download_dir=os.path.join(staging, "downloads"),
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    old = os.path.join(staging, "old")
    if os.path.exists(final):
      os.rename(final, old)  # kept until the new one is in place, then removed with the staging dir
    try:
      os.rename(os.path.join(staging, NAME, DATASET_VERSION), final)
    except BaseException:
      if os.path.exists(old) and not os.path.exists(final):
        os.rename(old, final)
      raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  result = builder(data_dir)
  result.report = report
  return result


def dataset_dir(data_dir: str) -> str:
  return os.path.join(os.path.abspath(data_dir), NAME, DATASET_VERSION)


def load(data_dir: str, split: str = "train") -> list[conv_lib.Conversation]:
  """Reads a built dataset back into Conversation records, in the order of the input files."""
  if not os.path.isdir(dataset_dir(data_dir)):
    raise FileNotFoundError(f"no {NAME} dataset at {dataset_dir(data_dir)}; build it first")
  source = builder(data_dir).as_data_source(split=split)
  examples = [source[i] for i in range(len(source))]
  examples.sort(key=lambda ex: int(ex["index"]))
  return [_from_example(ex) for ex in examples]
