"""Examples and token batches: hand-computed returns and links, exact loss masks, truncation that keeps
what matters, deterministic fixed-shape batches, and per-host slices."""

import numpy as np
import pytest

from iterppo_jax import conversation as conv_lib
from iterppo_jax import data
from iterppo_jax import rendering
from iterppo_jax import tokenizer as tok_lib
from iterppo_jax.envs import sales

T = conv_lib.Turn


def _sale():
  """Three decisions; the purchase comes right after the third: targets 0.9^2, 0.9, 1 at gamma 0.9."""
  return conv_lib.Conversation(
      id="sale", domain="sales", policy="hand", outcome=1.0, end_reason="outcome", turns=[
          T("customer", "Hi.", flag=0),
          T("suggestion", "What are you looking for?"),
          T("business", "What are you looking for?", feedback="accept"),
          T("customer", "A laptop.", flag=0),
          T("suggestion", "", abstain=True),
          T("business", "What is your budget?", feedback="none"),
          T("customer", "About 900.", flag=0),
          T("suggestion", "The Nimbus Pro is $899."),
          T("business", "The Nimbus Pro is $899, want it?", feedback="edit"),
          T("customer", "Yes, I'll buy it.", flag=1)])


def _silent():
  """One decision after which the business sent nothing."""
  return conv_lib.Conversation(
      id="silent", domain="sales", policy="hand", outcome=0.0, end_reason="business_silent",
      turns=[T("customer", "Hello?", flag=0), T("suggestion", "Hi there!")])


@pytest.fixture(scope="module")
def records():
  return sales.SalesEnv().play(sales.make_sales_policy("behavior"), 200, seed=0)


@pytest.fixture(scope="module")
def tok(records, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tok") / "tokenizer")
  return tok_lib.train_bpe(tok_lib.corpus_from_conversations(records), 512, out)


def test_examples_match_hand_computation():
  examples = data.examples_from_conversations([_sale(), _silent()], gamma=0.9)
  assert [e.conversation_id for e in examples] == ["sale", "sale", "sale", "silent"]
  assert [e.turn for e in examples] == [0, 1, 2, 0]
  np.testing.assert_allclose([e.target for e in examples], [0.81, 0.9, 1.0, 0.0])
  assert [e.reward for e in examples] == [0.0, 0.0, 1.0, 0.0]
  assert [e.next_index for e in examples] == [1, 2, -1, -1]
  assert [e.done for e in examples] == [False, False, True, True]
  assert [e.outcome for e in examples] == [1.0, 1.0, 1.0, 0.0]
  assert examples[1].suggestion == conv_lib.ABSTAIN_TEXT
  assert [e.sent for e in examples] == ["What are you looking for?", "What is your budget?",
                                        "The Nimbus Pro is $899, want it?", None]
  assert [e.feedback for e in examples] == ["accept", "none", "edit", None]
  assert examples[0].prompt == "<customer> Hi. <eot> <suggestion>"
  assert examples[2].prompt == conv_lib.render_state(_sale().turns[:7])
  short = data.examples_from_conversations([_sale()], gamma=0.9, max_render_turns=1)
  assert short[2].prompt == ("<customer> Hi. <eot> <customer> A laptop. <eot> <customer> About 900. <eot> "
                             "<suggestion>")  # older rounds keep the customer's messages


def test_next_index_links_simulated_logs(records):
  examples = data.examples_from_conversations(records, gamma=0.95)
  assert len(examples) == sum(len(r.agent_steps()) for r in records)
  for i, e in enumerate(examples):
    if e.done:
      assert e.next_index == -1
      assert i + 1 == len(examples) or examples[i + 1].turn == 0
    else:
      nxt = examples[e.next_index]
      assert (nxt.conversation_id, nxt.turn) == (e.conversation_id, e.turn + 1)
      # The Bellman identity of Monte Carlo returns: G_i = o_{i+1} + gamma G_{i+1}.
      assert e.target == pytest.approx(e.reward + 0.95 * nxt.target)
  for e in examples:
    if e.done:
      assert e.target == pytest.approx(e.reward)


def test_encode_pairs_masks_exactly_the_action(tok):
  examples = data.examples_from_conversations([_sale(), _silent()], gamma=0.9)
  prompts = [e.prompt for e in examples]
  actions = [e.suggestion for e in examples]
  out = data.encode_pairs(tok, prompts, actions, max_prompt_len=96, max_action_len=24)
  length = 120
  assert out["tokens"].shape == out["positions"].shape == out["valid"].shape == (4, length)
  assert out["tokens"].dtype == np.int32 and out["loss_mask"].dtype == np.float32
  for b, (prompt, action) in enumerate(zip(prompts, actions)):
    tokens, mask, valid = out["tokens"][b], out["loss_mask"][b], out["valid"][b]
    p, n = out["prompt_len"][b], valid.sum()
    assert tok.decode(tokens[mask == 1]) == conv_lib.render_action(action)
    assert tok.decode(tokens[:p]) == prompt
    assert mask[:p].sum() == 0 and mask[n:].sum() == 0 and mask[p:n].all()
    assert valid[:n].all() and not valid[n:].any()
    assert (tokens[n:] == tok.pad_id).all()
    assert out["last_index"][b] == n - 1 and tokens[n - 1] == tok.eot_id
    np.testing.assert_array_equal(out["positions"][b][:n], np.arange(n))
    # What a sampler produces: the prompt ids followed by the action ids.
    assert list(tokens[:n]) == tok.encode(prompt + conv_lib.render_action(action))
  # '' abstains, like rendering.Renderer.parse's output.
  empty = data.encode_pairs(tok, prompts[:1], [""], 96, 24)
  abstain = data.encode_pairs(tok, prompts[:1], [conv_lib.ABSTAIN_TEXT], 96, 24)
  np.testing.assert_array_equal(empty["tokens"], abstain["tokens"])


def test_truncation_keeps_prompt_end_and_action_eot(tok):
  prompt = data.examples_from_conversations([_sale()], gamma=0.9)[2].prompt
  full = tok.encode(prompt)
  long_action = "This is a very long suggestion about laptops and phones and cameras " * 4
  out = data.encode_pairs(tok, [prompt], [long_action], max_prompt_len=10, max_action_len=8)
  assert out["prompt_len"][0] == 10 and out["valid"][0].all()
  np.testing.assert_array_equal(out["tokens"][0, :10], full[-10:])
  action = out["tokens"][0, 10:]
  assert action[-1] == tok.eot_id and out["loss_mask"][0, 10:].all()
  np.testing.assert_array_equal(action[:-1], tok.encode(conv_lib.render_action(long_action))[:7])
  prompts = data.encode_prompts(tok, [prompt, "<customer> Hi. <eot> <suggestion>"], max_len=12)
  assert prompts["tokens"].shape == (2, 12)
  np.testing.assert_array_equal(prompts["tokens"][0], full[-12:])
  short = tok.encode("<customer> Hi. <eot> <suggestion>")
  np.testing.assert_array_equal(prompts["tokens"][1, -len(short):], short)
  assert (prompts["tokens"][1, :-len(short)] == tok.pad_id).all()
  assert prompts["valid"][:, -1].all() and prompts["valid"].sum(1).tolist() == [12, len(short)]
  # What was cut is counted, and a run says so in one line (issue #16: actions used to be cut silently).
  assert prompts["cut"].tolist() == [True, False]
  pair = data.encode_pairs(tok, [prompt, "<customer> Hi. <eot> <suggestion>"], [long_action, "Hi!"],
                           max_prompt_len=10, max_action_len=8)
  assert pair["prompt_cut"].tolist() == [True, False] and pair["action_cut"].tolist() == [True, False]
  note = data.truncation_note(pair, "qfit/0")
  assert note.startswith("qfit/0: 1 of 2 prompts (50.0%)") and "1 of 2 actions (50.0%)" in note
  roomy = data.encode_pairs(tok, [prompt], ["Hi!"], max_prompt_len=200, max_action_len=16)
  assert data.truncation_note(roomy, "qfit/0") is None


def test_example_arrays(tok, records):
  examples = data.examples_from_conversations(records[:20], gamma=0.95)
  arrays = data.example_arrays(tok, examples, 64, 16)
  assert arrays["target"].shape == (len(examples),)
  np.testing.assert_array_equal(arrays["next_index"], [e.next_index for e in examples])
  with pytest.raises(ValueError, match="no sent message"):
    data.example_arrays(tok, data.examples_from_conversations([_silent()], 0.9), 64, 16, action="sent")


def test_batch_iterator_is_fixed_shape_and_deterministic():
  n = 23
  arrays = {"x": np.arange(n), "y": np.arange(n * 3).reshape(n, 3).astype(np.float32)}
  batches = list(data.batch_iterator(arrays, batch_size=5, seed=1, epochs=2))
  assert len(batches) == 2 * (n // 5)
  assert all(b["x"].shape == (5,) and b["y"].shape == (5, 3) for b in batches)
  assert all((b["y"][:, 0] == 3 * b["x"]).all() for b in batches)  # rows stay together
  epoch0 = np.concatenate([b["x"] for b in batches[:4]])
  assert len(set(epoch0)) == 20  # no repeats within an epoch
  again = list(data.batch_iterator(arrays, batch_size=5, seed=1, epochs=2))
  assert all((a["x"] == b["x"]).all() for a, b in zip(batches, again))
  other = list(data.batch_iterator(arrays, batch_size=5, seed=2, epochs=2))
  assert any((a["x"] != b["x"]).any() for a, b in zip(batches, other))
  assert any((batches[i]["x"] != batches[i + 4]["x"]).any() for i in range(4))  # epochs differ
  ordered = list(data.batch_iterator(arrays, 5, seed=0, shuffle=False))
  np.testing.assert_array_equal(np.concatenate([b["x"] for b in ordered]), np.arange(20))
  # Keeping the remainder: the last batch is filled up and marked.
  kept = list(data.batch_iterator(arrays, 5, seed=1, drop_remainder=False))
  assert len(kept) == 5 and all(b["x"].shape == (5,) for b in kept)
  assert [int(b["batch_valid"].sum()) for b in kept] == [5, 5, 5, 5, 3]
  counted = np.concatenate([b["x"][b["batch_valid"]] for b in kept])
  assert sorted(counted) == list(range(n))
  with pytest.raises(ValueError, match="no batch"):
    next(data.batch_iterator(arrays, 50, seed=0))
  with pytest.raises(ValueError, match="disagree"):
    next(data.batch_iterator({"a": np.zeros(3), "b": np.zeros(4)}, 2, seed=0))


def test_host_slice():
  batch = {"tokens": np.arange(24).reshape(8, 3), "target": np.arange(8.0)}
  parts = [data.host_slice(batch, i, 4) for i in range(4)]
  assert all(p["tokens"].shape == (2, 3) for p in parts)
  np.testing.assert_array_equal(np.concatenate([p["tokens"] for p in parts]), batch["tokens"])
  np.testing.assert_array_equal(parts[1]["target"], [2.0, 3.0])
  with pytest.raises(ValueError, match="does not split"):
    data.host_slice(batch, 0, 3)
  with pytest.raises(ValueError, match="out of range"):
    data.host_slice(batch, 4, 4)


def test_prompt_buckets_pad_a_batch_to_its_longest_prompt_only(tok):
  """data.prompt_bucket: a batch of short prompts is not prefilled over max_len columns; the tokens are the same."""
  short = "<customer> Hi. <eot> <suggestion>"
  n = len(tok.encode(short))
  full = data.encode_prompts(tok, [short, short], max_len=64)
  bucketed = data.encode_prompts(tok, [short, short], max_len=64, bucket=8)
  width = -(-n // 8) * 8
  assert bucketed["tokens"].shape == (2, width) < full["tokens"].shape
  np.testing.assert_array_equal(bucketed["tokens"], full["tokens"][:, -width:])
  np.testing.assert_array_equal(bucketed["valid"], full["valid"][:, -width:])
  long = data.encode_prompts(tok, [short * 20], max_len=64, bucket=8)  # never wider than max_len, cut counted
  assert long["tokens"].shape == (1, 64) and long["cut"].tolist() == [True]


def test_an_encoding_cuts_every_phase_alike(tok, records):
  """data.Encoding carries one set of budgets and one rendering window: its states, examples, prompts and pairs
  are the module functions' at those budgets, and a shorter window or budget changes what the model sees."""
  enc = data.Encoding(tok, rendering.TAGS, max_prompt_len=48, max_action_len=12, max_render_turns=1)
  assert enc.max_len == 60 and enc.end_id == tok.eot_id
  examples = enc.examples(records[:10], 0.9)
  assert examples == data.examples_from_conversations(records[:10], 0.9, 1)
  turns = records[0].turns[:records[0].agent_steps()[2]]
  assert enc.state(turns) == rendering.TAGS.state(turns, 1) != rendering.TAGS.state(turns, None)
  prompts = [e.prompt for e in examples]
  got, want = enc.prompts(prompts), data.encode_prompts(tok, prompts, 48)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])
  got = enc.arrays(examples)
  want = data.example_arrays(tok, examples, 48, 12)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])
  assert got["tokens"].shape[1] == 60 and got["prompt_cut"].any()  # 48 tokens cut some prompts of these logs
  pairs = enc.pairs(prompts[:3], [e.suggestion for e in examples[:3]])
  np.testing.assert_array_equal(pairs["tokens"], got["tokens"][:3])
