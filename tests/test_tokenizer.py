"""The BPE tokenizer: trained on simulator text, loadable by transformers, special tokens atomic, exact
round trips, short encodings, and loading foreign tokenizers (missing special tokens are added)."""

import os

import numpy as np
import pytest
import transformers

from iterppo_jax import conversation as conv_lib
from iterppo_jax import tokenizer as tok_lib
from iterppo_jax.envs import sales


@pytest.fixture(scope="module")
def records():
  return sales.SalesEnv().play(sales.make_sales_policy("behavior"), 300, seed=0)


@pytest.fixture(scope="module")
def trained(records, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tok") / "tokenizer")
  return tok_lib.train_bpe(tok_lib.corpus_from_conversations(records), 1024, out), out


def test_reloads_with_auto_tokenizer(trained):
  tok, out = trained
  hf = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  assert (hf.pad_token, hf.bos_token, hf.eos_token) == ("<pad>", "<bos>", "<eot>")
  assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (tok.pad_id, tok.bos_id, tok.eot_id)
  assert len(hf) == tok.vocab_size <= 1024
  text = "<customer> Do you have a laptop? <eot> <suggestion>"
  assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
  # No temp dirs are left beside the saved tokenizer.
  assert os.listdir(os.path.dirname(out)) == ["tokenizer"]


def test_special_tokens_are_single_ids(trained):
  tok, _ = trained
  ids = [tok.encode(t) for t in tok_lib.SPECIAL_TOKENS]
  assert all(len(i) == 1 for i in ids), ids
  assert [i[0] for i in ids] == list(range(len(tok_lib.SPECIAL_TOKENS)))
  assert tok.encode(conv_lib.ABSTAIN_TEXT) == [tok.token_id("<no suggestion>")]
  # Never split or merged with neighbouring text.
  assert tok.encode("x<eot>y")[1] == tok.eot_id


def test_round_trip_of_rendered_conversation(trained, records):
  tok, _ = trained
  texts = list(tok_lib.corpus_from_conversations(records[:50]))
  for text, ids in zip(texts, tok.encode_batch(texts)):
    assert tok.decode(ids) == text
  stripped = tok.decode(tok.encode(texts[0]), skip_special=True)
  assert "<customer>" not in stripped and "<eot>" not in stripped
  odd = "Café ☕ naïve — 100% off?! \t tabs\nnewline 😀"  # byte-level: nothing is unknown
  assert tok.decode(tok.encode(odd)) == odd


def test_prompt_and_action_encode_separately(trained, records):
  """The prompt ends in a special token, so joint and separate encodings agree (what a sampler produces)."""
  tok, _ = trained
  for r in records[:30]:
    for i in r.agent_steps():
      prompt = conv_lib.render_state(r.turns[:i])
      action = conv_lib.render_action(r.turns[i].text or conv_lib.ABSTAIN_TEXT)
      assert tok.encode(prompt + action) == tok.encode(prompt) + tok.encode(action)


def test_encodings_are_short(trained):
  tok, _ = trained
  held_out = sales.SalesEnv().play(sales.make_sales_policy("behavior"), 100, seed=1)
  business = [t.text for r in held_out for t in r.turns if t.role == "business"]
  mean = np.mean([len(ids) for ids in tok.encode_batch(business)])
  print(f"\nmean tokens per business message: {mean:.1f}")
  assert mean <= 15


def test_load_tokenizer_errors_name_the_path(tmp_path):
  missing = str(tmp_path / "no_such_tokenizer")
  with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
    tok_lib.load_tokenizer(missing)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="empty"):
    tok_lib.load_tokenizer(str(empty))


def test_load_foreign_tokenizer_adds_special_tokens(tmp_path):
  import tokenizers
  from tokenizers import models, pre_tokenizers, trainers
  raw = tokenizers.Tokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = tokenizers.decoders.ByteLevel()
  raw.train_from_iterator(["hello there, how can I help you today?"] * 20, trainers.BpeTrainer(
      vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=None).save_pretrained(str(tmp_path))
  base_size = raw.get_vocab_size()
  tok = tok_lib.load_tokenizer(str(tmp_path))
  assert tok.vocab_size == base_size + len(tok_lib.SPECIAL_TOKENS)
  for t in tok_lib.SPECIAL_TOKENS:
    assert len(tok.encode(t)) == 1, t
  text = "<customer> hello there <eot> <suggestion> <no suggestion> <eot>"
  assert tok.decode(tok.encode(text)) == text


def test_train_bpe_replaces_existing_dir(tmp_path, records):
  out = str(tmp_path / "tok")
  corpus = list(tok_lib.corpus_from_conversations(records[:50]))
  tok_lib.train_bpe(corpus, 300, out)
  tok = tok_lib.train_bpe(corpus, 400, out)
  assert tok.vocab_size == len(transformers.AutoTokenizer.from_pretrained(out, local_files_only=True))
  assert sorted(os.listdir(tmp_path)) == ["tok"]
  with pytest.raises(ValueError, match="at least"):
    tok_lib.train_bpe(corpus, 100, out)


def test_train_on_simulator(tmp_path):
  tok = tok_lib.train_on_simulator(sales.SalesEnv(), n=100, seed=0, vocab_size=512, out_dir=str(tmp_path / "t"))
  assert tok.vocab_size <= 512 and tok.eot_id == 2
  assert tok_lib.load_tokenizer(str(tmp_path / "t")).vocab_size == tok.vocab_size
