"""Tokenizers for the conversation text of the SR MDP: a small byte-level BPE trained on simulator logs, or
any local Hugging Face tokenizer, both with our special tokens (DESIGN.md, `tokenizer.py`).

The rendered state s_i (conversation.render_state) and action a_i (conversation.render_action) use role tags,
an end-of-turn marker and an abstention marker. Each is one special token that BPE never splits, so

  * a model reads a role change or the end of a turn as one symbol,
  * abstaining (PAPER.md: "the agent may abstain") is a one-token action, and
  * a prompt always ends in the special `<suggestion>` token, so encoding prompt and action separately and
    concatenating the ids is exactly what a sampler continuing the prompt produces (data.encode_pairs).

`Tokenizer` is a thin wrapper with the handful of ids the rest of the code needs; `hf` is the underlying
`transformers` tokenizer, which is what gets saved into a workdir's `tokenizer/` and loaded back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable, Iterator, Sequence

from iterppo_jax import conversation as conv_lib

PAD = "<pad>"
BOS = "<bos>"
EOT = conv_lib.END_OF_TURN
# Order fixes the ids of a freshly trained BPE: pad=0, bos=1, eot=2, then roles, then abstain.
SPECIAL_TOKENS = (PAD, BOS, EOT, *conv_lib.ROLE_TAGS.values(), conv_lib.ABSTAIN_TEXT)
# The tokens our rendering needs beyond pad/bos/eos; listed as the tokenizer's extra special tokens.
FORMAT_TOKENS = (*conv_lib.ROLE_TAGS.values(), conv_lib.ABSTAIN_TEXT)


class Tokenizer:
  """Our view of a Hugging Face tokenizer: encode without automatic specials, and the special ids.

  Attributes:
    hf: the underlying `transformers` tokenizer (a PreTrainedTokenizerFast / TokenizersBackend).
    pad_id, bos_id, eot_id: ids of padding, beginning of sequence and end of turn (the eos token).
    vocab_size: number of ids including added tokens; a model's embedding needs at least this many rows.
  """

  def __init__(self, hf):
    self.hf = hf
    missing = [t for t in (EOT, *FORMAT_TOKENS) if self.token_id(t) is None]
    if missing:
      raise ValueError(f"tokenizer lacks special tokens {missing}; use load_tokenizer to add them")
    self.eot_id = self.token_id(EOT)
    self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else self.token_id(PAD)
    self.bos_id = hf.bos_token_id if hf.bos_token_id is not None else self.token_id(BOS)
    self.vocab_size = len(hf)

  def token_id(self, token: str) -> int | None:
    """The id of a single token, or None when the vocabulary does not have it."""
    tid = self.hf.convert_tokens_to_ids(token)
    if tid is None or (tid == self.hf.unk_token_id and token != self.hf.unk_token):
      return None
    return int(tid)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; no bos/eos are added (the rendered text carries its own markers)."""
    return list(self.hf.encode(text, add_special_tokens=False))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` over many texts at once (the Rust tokenizer runs them in parallel)."""
    if not texts:
      return []
    return [list(ids) for ids in self.hf(list(texts), add_special_tokens=False)["input_ids"]]

  def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
    """Text of `ids`; with skip_special the role/turn markers (and pad, bos) are dropped."""
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special,
                          clean_up_tokenization_spaces=False)

  def save(self, out_dir: str) -> None:
    """Saves the tokenizer as a transformers directory (atomically: temp dir, then rename)."""
    _atomic_save(self.hf, out_dir)


def _atomic_save(hf, out_dir: str) -> None:
  """save_pretrained into a sibling temp dir, then swap it in, so a crash never leaves half a tokenizer."""
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.tmp-")
  old = None
  try:
    hf.save_pretrained(tmp)
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.old-")
      os.rmdir(old)
      os.rename(out_dir, old)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and not os.path.exists(out_dir):
      os.rename(old, out_dir)  # put the previous tokenizer back
      old = None
    raise
  finally:
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)


# ---- training a BPE on conversation text ----

def corpus_from_conversations(records: Iterable[conv_lib.Conversation]) -> Iterator[str]:
  """Each conversation rendered in full (roles, markers and all), as a model will see it."""
  for record in records:
    yield " ".join(conv_lib.render_turn(t) for t in record.turns)


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str) -> Tokenizer:
  """Trains a byte-level BPE with our special tokens and saves it as a transformers tokenizer.

  Byte-level (GPT-2 style) so that any text, including what a sampler emits, can be encoded without an
  unknown token. The special tokens are added before training: they take ids 0..6 and are matched before
  pre-tokenization, so merges never cross or split them.

  Args:
    texts: training text, e.g. `corpus_from_conversations(records)`.
    vocab_size: total vocabulary including the 256 byte symbols and the special tokens.
    out_dir: where `save_pretrained` writes; `AutoTokenizer.from_pretrained(out_dir)` loads it.
  Returns:
    The trained tokenizer, as loaded back from `out_dir`.
  """
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  import transformers

  min_size = 256 + len(SPECIAL_TOKENS)
  if vocab_size < min_size:
    raise ValueError(f"vocab_size must be at least {min_size} (bytes + special tokens), got {vocab_size}")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = [tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  # clean_up_tokenization_spaces=False: decode must give back exactly the rendered text.
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOT,
      additional_special_tokens=list(FORMAT_TOKENS), clean_up_tokenization_spaces=False)
  _atomic_save(hf, out_dir)
  return load_tokenizer(out_dir)


def train_on_simulator(env, n: int, seed: int, vocab_size: int, out_dir: str, policy=None) -> Tokenizer:
  """Plays `n` conversations in `env` (behaviour policy unless given) and trains a BPE on them."""
  if policy is None:
    from iterppo_jax.envs import sales
    policy = sales.make_sales_policy("behavior")
  records = env.play(policy, n, seed=seed)
  return train_bpe(corpus_from_conversations(records), vocab_size, out_dir)


# ---- loading ----

def load_tokenizer(path: str) -> Tokenizer:
  """Loads a local Hugging Face tokenizer directory and makes sure it has our special tokens.

  A pretrained model's tokenizer keeps its own pad/bos when it has them; the role tags, `<eot>` and
  `<no suggestion>` (and `<pad>` / `<bos>` where it has none) are added as special tokens. When tokens are
  added, `vocab_size` grows past the checkpoint's vocabulary and the model's embedding (and output layer)
  must be grown to `vocab_size` rows before use.

  Args:
    path: a directory with tokenizer.json / tokenizer_config.json (nothing is downloaded).
  Raises:
    FileNotFoundError naming `path` when it is not a directory holding a tokenizer.
  """
  import transformers

  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
  try:
    hf = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError) as e:
    raise FileNotFoundError(f"no loadable Hugging Face tokenizer in {path!r}: {e}") from e
  _add_missing_specials(hf)
  return Tokenizer(hf)


def from_hf(hf) -> Tokenizer:
  """Our Tokenizer around a Hugging Face tokenizer object (e.g. models.gguf.tokenizer_from_gguf's), with our
  special tokens added as `load_tokenizer` adds them."""
  _add_missing_specials(hf)
  return Tokenizer(hf)


def _add_missing_specials(hf) -> int:
  """Adds whichever of our special tokens `hf` lacks; returns how many were added."""
  from tokenizers import AddedToken

  vocab = hf.get_vocab()
  added = 0
  updates = {}
  if hf.pad_token is None:
    updates["pad_token"] = AddedToken(PAD, special=True, normalized=False)
  if hf.bos_token is None:
    updates["bos_token"] = AddedToken(BOS, special=True, normalized=False)
  if updates:
    before = len(hf)
    hf.add_special_tokens(updates)
    added += len(hf) - before
  missing = [t for t in (EOT, *FORMAT_TOKENS) if t not in vocab]
  if missing:
    added += hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                           special_tokens=True)
  return added
