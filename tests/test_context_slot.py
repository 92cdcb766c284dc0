"""The agent's private context of a conversation (Conversation.context, TextEnv.agent_context): logged with the
record, shown in every state right before the agent's turn, and kept when a prompt is cut to its budget."""

import numpy as np

from iterppo_jax import conversation as conv_lib
from iterppo_jax import data as data_lib
from iterppo_jax import tokenizer as tok_lib
from iterppo_jax.envs import sales


class _SalesWithAccount(sales.SalesEnv):
  """Sales where the shop knows the customer's budget tier from their account (its private information)."""

  def agent_context(self, hidden) -> str:
    return f"Account note: budget tier {hidden.budget}."


def test_the_context_is_logged_shown_last_and_survives_truncation(tmp_path):
  env = _SalesWithAccount(max_render_turns=1)
  records = env.play(sales.make_sales_policy("behavior"), 30, seed=0)
  assert all(r.context.startswith("Account note: budget tier ") for r in records)
  path = str(tmp_path / "logs.jsonl")
  conv_lib.write_jsonl(path, records)
  assert conv_lib.read_jsonl(path) == records  # the JSON carries it

  episode = env.reset(1, seed=0)[0]
  assert episode.observation(1).text.endswith(f"[context] {episode.record.context} <suggestion>")

  examples = data_lib.examples_from_conversations(records, 0.95, max_render_turns=1)
  by_id = {r.id: r for r in records}
  assert all(e.prompt.endswith(f"[context] {by_id[e.conversation_id].context} <suggestion>") for e in examples)
  late = max(examples, key=lambda e: len(e.prompt))  # older rounds compacted, the context kept
  tokenizer = tok_lib.train_bpe(tok_lib.corpus_from_conversations(records), 400, str(tmp_path / "tok"))
  enc = data_lib.encode_prompts(tokenizer, [late.prompt], 24)
  assert enc["cut"][0]  # the prompt lost its oldest tokens ...
  kept = tokenizer.decode([int(t) for t, v in zip(enc["tokens"][0], enc["valid"][0]) if v])
  assert by_id[late.conversation_id].context.split()[-1] in kept  # ... but not the context


def test_without_a_context_nothing_changes():
  records = sales.SalesEnv().play(sales.make_sales_policy("behavior"), 5, seed=1)
  assert all(r.context == "" and "context" not in r.to_json() for r in records)
  turns = records[0].turns[:3]
  assert conv_lib.render_state(turns, 2, "") == conv_lib.render_state(turns, 2)
  assert "[context]" not in conv_lib.render_state(turns)
  assert np.all([not e.prompt.count("[context]") for e in data_lib.examples_from_conversations(records, 0.9)])
