"""Logged conversations -> (state, action, return) examples -> fixed-shape token batches (DESIGN.md).

One `Example` per decision point of the SR MDP (PAPER.md): the state s_i rendered as a prompt, the agent's
suggestion a_i, the message m_i the business actually sent, and the Monte Carlo discounted return
G_i = sum_{j>i} gamma^{j-i-1} o_j that Algorithm 1 step 2 regresses Q^{pi_k}(s_i, a_i) on. `next_index`
and `done` link each decision to the next one of its conversation, for TD(0)/TD(lambda) targets.

Token layout (static shapes, so a jitted step never recompiles):

  encode_prompts  [pad ... pad | prompt]                 left-padded, for the sampler to continue
  encode_pairs    [prompt | action ... <eot> | pad ...]  right-padded, length max_prompt_len + max_action_len

Prompt and action are encoded separately and concatenated: the prompt ends in the special `<suggestion>`
token, so this is what a sampler emitting action tokens after the prompt ids produces (tokenizer.py).
`batch_iterator` and `host_slice` cut these arrays into global batches and each host's share of them.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from iterppo_jax import conversation as conv_lib
from iterppo_jax import explore
from iterppo_jax import rendering
from iterppo_jax.envs import base


@dataclasses.dataclass(frozen=True)
class Example:
  """One decision point a_i of a logged conversation."""
  conversation_id: str
  turn: int  # index of this decision within its conversation (0, 1, ...)
  prompt: str  # render_state of the turns before the suggestion (ends with the <suggestion> tag)
  suggestion: str  # the agent's a_i; ABSTAIN_TEXT when it abstained
  sent: str | None  # the business message m_i actually sent; None when the business sent nothing
  feedback: str | None  # how the business user treated a_i (conversation.FEEDBACKS); None if nothing sent
  target: float  # Monte Carlo discounted return from a_i (base.discounted_targets)
  reward: float  # outcome flag o of the customer message right after this decision; 0 if none
  next_index: int  # index of this conversation's next decision in the same list; -1 if last
  done: bool  # no next decision (next_index == -1)
  outcome: float  # the conversation's outcome label
  explored: bool = False  # a_i was drawn uniformly from logged candidates (a turn explore.RandomisedTurn drew)
  target_valid: bool = True  # `target` samples Q^{pi}(s_i, a_i) of the deployed pi: False before t*, the last
  #   randomised turn (explore.py)
  own_action: str | None = None  # at a randomised turn, when the draw was not the deployed pi's own sample: that
  #   sample (TD bootstraps from it, since Q^{pi}(s, a) continues with pi's action, not the randomised one)


def examples_from_conversations(records: Sequence[conv_lib.Conversation], gamma: float,
                                max_render_turns: int | None = None, renderer=None) -> list[Example]:
  """Every decision point of every conversation, in order.

  Args:
    records: logged conversations.
    gamma: discount of the Monte Carlo returns (0 <= gamma <= 1).
    max_render_turns: rounds of history kept in each prompt (conversation.render_state).
    renderer: how prompts are written (rendering.Renderer); default our role tags.
  Returns:
    Examples grouped by conversation, decisions in turn order; `next_index` points into this list.
  """
  renderer = renderer or rendering.TAGS
  out: list[Example] = []
  for record in records:
    info = explore.explored(record)
    steps = record.agent_steps()
    targets = base.discounted_targets(record, gamma)
    turns = record.turns
    first = len(out)
    for k, i in enumerate(steps):
      suggestion = turns[i]
      sent = feedback = None
      reward = 0.0
      j = i + 1
      if j < len(turns) and turns[j].role == "business":
        sent, feedback = turns[j].text, turns[j].feedback
        j += 1
      if j < len(turns) and turns[j].role == "customer":
        reward = float(turns[j].flag or 0)
      last = k == len(steps) - 1
      out.append(Example(
          conversation_id=record.id, turn=k,
          prompt=renderer.state(turns[:i], max_render_turns, record.context),
          suggestion=conv_lib.ABSTAIN_TEXT if suggestion.abstain else suggestion.text,
          sent=sent, feedback=feedback, target=float(targets[k]), reward=reward,
          next_index=-1 if last else first + k + 1, done=last, outcome=float(record.outcome),
          explored=explore.draw_at(info, k) is not None,
          target_valid=k >= explore.last_turn(info),
          own_action=_own_action(info, k)))
  return out


def turns_before(record: conv_lib.Conversation, example: Example) -> list:
  """The transcript `example`'s decision was made on (its conversation's turns before the suggestion)."""
  return record.turns[:record.agent_steps()[example.turn]]


def _own_action(info: dict | None, k: int) -> str | None:
  """The deployed policy's own sample at decision k when a randomised draw replaced it, else None."""
  draw = explore.draw_at(info, k)
  if draw is None or draw["taken"] == 0:
    return None
  own = draw["candidates"][0]  # explore.RandomisedTurn puts pi_k's own sample first
  return own or conv_lib.ABSTAIN_TEXT


# ---- tokens ----

def _truncate_left(ids: list[int], max_len: int) -> list[int]:
  # The most recent turns matter most for the next suggestion, so a long prompt loses its beginning.
  return ids[len(ids) - max_len:] if len(ids) > max_len else ids


def encode_prompts(tokenizer, prompts: Sequence[str], max_len: int, bucket: int = 0) -> dict[str, np.ndarray]:
  """Prompts for sampling, left-padded so every row's last prompt token sits at column P-1.

  Args:
    tokenizer: a tokenizer.Tokenizer.
    prompts: B rendered states.
    max_len: longer prompts keep their last max_len tokens.
    bucket: 0: P = max_len. N > 0: P = the longest prompt rounded up to a multiple of N (at most max_len), so a
      batch of short prompts is not prefilled over max_len columns (positions follow `valid`, so the padding
      width changes no number but the float rounding of masked sums; one compiled sampler per width).
  Returns:
    tokens [B, P] int32 (pad_id on the left), valid [B, P] bool, cut [B] bool (the prompt lost tokens).
  """
  encoded = tokenizer.encode_batch(list(prompts))
  width = max_len
  if bucket:
    longest = max([1, *map(len, encoded)])  # an all-empty batch still gets one column
    width = min(max_len, -(-longest // bucket) * bucket)
  tokens = np.full((len(prompts), width), tokenizer.pad_id, dtype=np.int32)
  valid = np.zeros((len(prompts), width), dtype=bool)
  cut = np.zeros((len(prompts),), dtype=bool)
  for b, ids in enumerate(encoded):
    cut[b] = len(ids) > max_len
    ids = _truncate_left(ids, max_len)
    if ids:
      tokens[b, width - len(ids):] = ids
      valid[b, width - len(ids):] = True
  return {"tokens": tokens, "valid": valid, "cut": cut}


def encode_actions(tokenizer, actions: Sequence[str], max_len: int, renderer=None,
                   cut: list[bool] | None = None) -> list[list[int]]:
  """Action ids as the model emits them (render_action), at most `max_len` and always ending in <eot>.

  An empty action means abstaining and is encoded as ABSTAIN_TEXT (what rendering.Renderer.parse maps to '').
  `cut`, when given, is extended with one flag per action: whether it lost tokens.
  """
  if max_len < 2:
    raise ValueError(f"max_action_len must leave room for a token and <eot>, got {max_len}")
  renderer = renderer or rendering.TAGS
  end_id = renderer.end_id(tokenizer)
  texts = [renderer.action(a) for a in actions]
  out = []
  for ids in tokenizer.encode_batch(texts):
    if ids[-1] != end_id:  # the action ends with its end marker; a special token is never merged
      raise ValueError(f"encoded action does not end with {renderer.end_text!r}; is it a special token?")
    out.append(ids if len(ids) <= max_len else ids[:max_len - 1] + [end_id])
    if cut is not None:
      cut.append(len(ids) > max_len)
  return out


def encode_pairs(tokenizer, prompts: Sequence[str], actions: Sequence[str], max_prompt_len: int,
                 max_action_len: int, renderer=None) -> dict[str, np.ndarray]:
  """(state, action) pairs as one right-padded sequence each, for SFT, Q-fitting and PPO scoring.

  Prompts keep their last `max_prompt_len` tokens; actions are cut to `max_action_len` keeping the final
  <eot>. With L = max_prompt_len + max_action_len:

  Args:
    tokenizer: a tokenizer.Tokenizer.
    prompts: B rendered states (conversation.render_state).
    actions: B action texts (suggestions or sent messages; ABSTAIN_TEXT or '' to abstain).
    max_prompt_len, max_action_len: token budgets.
  Returns:
    tokens [B, L] int32 (pad_id after the action),
    positions [B, L] int32 (0, 1, ... over the real tokens, 0 on padding),
    valid [B, L] bool (real tokens),
    loss_mask [B, L] float32 (1 on the action tokens including <eot>, 0 on prompt and padding),
    last_index [B] int32 (column of the action's <eot>: where a Q-model reads its value),
    state_index [B] int32 (column of the prompt's last token: where a dueling Q-model reads V(s)),
    prompt_len [B] int32,
    prompt_cut, action_cut [B] bool (the prompt lost its oldest tokens; the action was cut short).
  """
  if len(prompts) != len(actions):
    raise ValueError(f"{len(prompts)} prompts but {len(actions)} actions")
  n, length = len(prompts), max_prompt_len + max_action_len
  tokens = np.full((n, length), tokenizer.pad_id, dtype=np.int32)
  positions = np.zeros((n, length), dtype=np.int32)
  valid = np.zeros((n, length), dtype=bool)
  loss_mask = np.zeros((n, length), dtype=np.float32)
  last_index = np.zeros((n,), dtype=np.int32)
  prompt_len = np.zeros((n,), dtype=np.int32)
  prompt_cut = np.zeros((n,), dtype=bool)
  prompt_ids = tokenizer.encode_batch(list(prompts))
  action_cut: list[bool] = []
  action_ids = encode_actions(tokenizer, actions, max_action_len, renderer, cut=action_cut)
  for b, (p, a) in enumerate(zip(prompt_ids, action_ids)):
    prompt_cut[b] = len(p) > max_prompt_len
    p = _truncate_left(p, max_prompt_len)
    total = len(p) + len(a)
    tokens[b, :total] = p + a
    positions[b, :total] = np.arange(total)
    valid[b, :total] = True
    loss_mask[b, len(p):total] = 1.0
    last_index[b] = total - 1
    prompt_len[b] = len(p)
  return {"tokens": tokens, "positions": positions, "valid": valid, "loss_mask": loss_mask,
          "last_index": last_index, "state_index": np.maximum(prompt_len - 1, 0).astype(np.int32),
          "prompt_len": prompt_len, "prompt_cut": prompt_cut,
          "action_cut": np.asarray(action_cut, dtype=bool).reshape(n)}


def truncation_note(arrays: dict[str, np.ndarray], what: str) -> str | None:
  """One line counting the rows of encode_pairs / encode_prompts arrays that lost tokens, or None if none did.

  A cut prompt lost its oldest tokens (the model does not see them); a cut action was shortened (the model is
  trained on, or scores, a different message than the one logged). Raise data.max_prompt_len or
  data.max_action_len, or render fewer rounds in full (env.max_render_turns), when these counts matter.
  """
  n = len(arrays["tokens"])
  prompts = int(np.sum(arrays.get("prompt_cut", arrays.get("cut", np.zeros(n, bool)))))
  actions = int(np.sum(arrays.get("action_cut", np.zeros(n, bool))))
  if not prompts and not actions:
    return None
  return (f"{what}: {prompts} of {n} prompts ({prompts / max(n, 1):.1%}) longer than data.max_prompt_len lost their "
          f"oldest tokens; {actions} of {n} actions ({actions / max(n, 1):.1%}) were cut to data.max_action_len")


def example_arrays(tokenizer, examples: Sequence[Example], max_prompt_len: int, max_action_len: int,
                   action: str = "suggestion", renderer=None) -> dict[str, np.ndarray]:
  """encode_pairs over examples, plus their targets, rewards and links; row r is examples[r].

  Args:
    action: 'suggestion' (a_i: what Q and the policy are about) or 'sent' (m_i: behaviour cloning of the
      business staff; every example must have a sent message, so filter first and mind next_index).
  Returns:
    encode_pairs' arrays and target, reward, outcome [B] float32, done [B] bool, next_index [B] int32.
  """
  if action not in ("suggestion", "sent"):
    raise ValueError(f"action must be 'suggestion' or 'sent', got {action!r}")
  texts = [getattr(e, action) for e in examples]
  if any(t is None for t in texts):
    raise ValueError("some examples have no sent message; filter them before action='sent'")
  out = encode_pairs(tokenizer, [e.prompt for e in examples], texts, max_prompt_len, max_action_len, renderer)
  out["target"] = np.asarray([e.target for e in examples], dtype=np.float32)
  out["reward"] = np.asarray([e.reward for e in examples], dtype=np.float32)
  out["outcome"] = np.asarray([e.outcome for e in examples], dtype=np.float32)
  out["done"] = np.asarray([e.done for e in examples], dtype=bool)
  out["next_index"] = np.asarray([e.next_index for e in examples], dtype=np.int32)
  return out


@dataclasses.dataclass(frozen=True)
class Encoding:
  """How a run writes conversations as model input: its tokenizer and renderer with the budgets of its settings
  (data.max_prompt_len, data.max_action_len, data.prompt_bucket, env.max_render_turns), read once where the run
  is set up (loop.make_encoding) and carried from there, so every phase cuts prompts and actions alike."""
  tokenizer: object
  renderer: object
  max_prompt_len: int
  max_action_len: int
  max_render_turns: int | None = None
  prompt_bucket: int = 0

  @property
  def max_len(self) -> int:
    """Tokens of a (prompt, action) row: the model's context must hold this many."""
    return self.max_prompt_len + self.max_action_len

  @property
  def end_id(self) -> int:
    """The token that ends a response (the sampler's eos)."""
    return self.renderer.end_id(self.tokenizer)

  def state(self, turns, context: str = "") -> str:
    """The state after `turns` as a prompt, in the run's rendering window."""
    return self.renderer.state(turns, self.max_render_turns, context)

  def examples(self, records, gamma: float) -> list[Example]:
    return examples_from_conversations(records, gamma, self.max_render_turns, renderer=self.renderer)

  def prompts(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    return encode_prompts(self.tokenizer, texts, self.max_prompt_len)

  def pairs(self, prompts: Sequence[str], actions: Sequence[str]) -> dict[str, np.ndarray]:
    return encode_pairs(self.tokenizer, prompts, actions, self.max_prompt_len, self.max_action_len, self.renderer)

  def arrays(self, examples: Sequence[Example], action: str = "suggestion") -> dict[str, np.ndarray]:
    return example_arrays(self.tokenizer, examples, self.max_prompt_len, self.max_action_len, action=action,
                          renderer=self.renderer)


# ---- batches ----

def batch_iterator(arrays: dict[str, np.ndarray], batch_size: int, seed: int, epochs: int = 1,
                   shuffle: bool = True, drop_remainder: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-shape batches of rows of `arrays` (all share the leading dimension N).

  The order of epoch e is a permutation drawn from (seed, e) alone, so the same seed gives the same
  batches and a resumed run can skip ahead. With drop_remainder=False the last partial batch of each epoch
  is filled up with repeated rows (real data, so no fully masked sequences reach the model) and every batch
  carries `batch_valid` [batch_size] bool marking the rows to count.

  Yields:
    dicts with the keys of `arrays`, each [batch_size, ...].
  """
  sizes = {k: len(v) for k, v in arrays.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"arrays disagree on the number of rows: {sizes}")
  n = next(iter(sizes.values()))
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if drop_remainder and n < batch_size:
    raise ValueError(f"{n} rows < batch_size {batch_size}: drop_remainder would yield no batch")
  for epoch in range(epochs):
    order = np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)
    stop = (n // batch_size) * batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
      rows = order[start:start + batch_size]
      count = len(rows)
      if count < batch_size:
        rows = np.concatenate([rows, np.resize(order, batch_size - count)])
      batch = {k: v[rows] for k, v in arrays.items()}
      if not drop_remainder:
        batch["batch_valid"] = np.arange(batch_size) < count
      yield batch


def host_slice(batch: dict[str, np.ndarray], process_index: int, process_count: int
               ) -> dict[str, np.ndarray]:
  """This host's contiguous rows of a global batch (what jax.make_array_from_process_local_data wants)."""
  sizes = {len(v) for v in batch.values()}
  if len(sizes) != 1:
    raise ValueError(f"batch arrays disagree on the number of rows: {sorted(sizes)}")
  n = sizes.pop()
  if n % process_count:
    raise ValueError(f"global batch of {n} rows does not split over {process_count} processes")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} out of range for {process_count} processes")
  per = n // process_count
  return {k: v[process_index * per:(process_index + 1) * per] for k, v in batch.items()}
