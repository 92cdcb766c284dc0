"""A language model as a policy of the SR MDP: rendered states in, suggestions out (envs.base.Policy).

Prompts are tokenized, left-truncated and left-padded to a fixed length; the number of rows is padded up to
a power-of-two bucket, so a whole simulation compiles the sampler a handful of times, not once per batch.
Randomness is folded from (seed, conversation, turn) when the policy plays (each Observation's key): a
conversation's suggestions do not depend on which others share its batch, how the conversations are batched, or
how many processes play them (distributed.py). Prompts given without keys (`generate`) fold (seed, call number).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import jax
import numpy as np

from iterppo_jax import data as data_lib
from iterppo_jax import rendering
from iterppo_jax import sampling
from iterppo_jax import sharding


def bucket_size(n: int, smallest: int = 8) -> int:
  size = smallest
  while size < n:
    size *= 2
  return size


class LMPolicy:
  """Samples suggestions from a Transformer (graphdef + params) given rendered states."""

  def __init__(self, name: str, graphdef, params, tokenizer, *, max_prompt_len: int, max_new_tokens: int,
               seed: int, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
               max_batch: int = 512, renderer: rendering.Renderer | None = None,
               max_render_turns: int | None = None, prompt_bucket: int = 0, mesh=None, rules=None):
    self.name, self.graphdef, self.params, self.tokenizer = name, graphdef, params, tokenizer
    self.max_prompt_len, self.max_new_tokens = max_prompt_len, max_new_tokens
    self.temperature, self.top_p, self.greedy = temperature, top_p, greedy
    self.mesh, self.rules = mesh, rules
    with self._on_mesh():  # the key lives where the policy samples
      self.key = jax.random.key(seed)
    self.calls = 0
    self.max_batch = max_batch
    # With our own tags the environment's rendering (Observation.text) is already the prompt.
    self.renderer = renderer or rendering.TAGS
    self.max_render_turns = max_render_turns
    self.prompt_bucket = prompt_bucket  # data.encode_prompts: pad a batch to its longest prompt's bucket
    self.end_id = self.renderer.end_id(tokenizer)
    # What the token budgets cut, over every call: prompts that lost their oldest tokens, suggestions that hit
    # max_new_tokens before their end marker (sent as cut), and all suggestions generated.
    self.cut_prompts = self.cut_actions = self.generated = 0

  def truncation_note(self) -> str | None:
    """One line counting cut prompts and suggestions so far, or None when nothing was cut."""
    if not self.cut_prompts and not self.cut_actions:
      return None
    n = max(self.generated, 1)
    return (f"{self.name}: {self.cut_prompts} of {self.generated} prompts ({self.cut_prompts / n:.1%}) lost their oldest "
            f"tokens (data.max_prompt_len); {self.cut_actions} suggestions ({self.cut_actions / n:.1%}) hit "
            f"data.max_action_len before their end marker")

  def generate(self, prompts: Sequence[str], keys: Sequence[Sequence[int]] | None = None) -> list[str]:
    """Decoded suggestion texts ('' = abstain) for rendered prompts.

    `keys[i]` (integers, e.g. an Observation's key) seeds prompt i's sample on its own; without keys one key
    per call is folded from the call number.
    """
    with self._on_mesh():
      return self._generate(prompts, keys)

  def _on_mesh(self):
    """The policy's own mesh and rules (a process's own devices in a multi-process run), else the active ones."""
    if self.mesh is None:
      return contextlib.nullcontext()
    return sharding.use_mesh(self.mesh, self.rules or sharding.DEFAULT_RULES)

  def _row_keys(self, keys: Sequence[Sequence[int]]):
    """[B] PRNG keys: the policy's key folded with a 32-bit hash of each row's integers."""
    words = np.asarray([np.random.SeedSequence([int(v) for v in k]).generate_state(1)[0] for k in keys], np.uint32)
    return jax.vmap(jax.random.fold_in, (None, 0))(self.key, words)

  def _generate(self, prompts: Sequence[str], keys) -> list[str]:
    out: list[str] = []
    # The sampled token ids of the last call, per prompt (online PPO learns on these exact tokens).
    self.last_ids: list[list[int]] = []
    for start in range(0, len(prompts), self.max_batch):
      chunk = list(prompts[start:start + self.max_batch])
      n = len(chunk)
      rows = bucket_size(n)
      padded = chunk + [chunk[-1]] * (rows - n)
      enc = data_lib.encode_prompts(self.tokenizer, padded, self.max_prompt_len, self.prompt_bucket)
      self.cut_prompts += int(enc["cut"][:n].sum())
      self.generated += n
      if keys is None:
        key = jax.random.fold_in(self.key, self.calls)
      else:
        chunk_keys = list(keys[start:start + self.max_batch])
        key = self._row_keys(chunk_keys + [chunk_keys[-1]] * (rows - n))
      self.calls += 1
      res = sampling.sample(self.graphdef, self.params, enc["tokens"], enc["valid"], key,
                            max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                            top_p=self.top_p, greedy=self.greedy, eos_id=self.end_id,
                            pad_id=self.tokenizer.pad_id)
      tokens, valid = jax.device_get((res.tokens, res.valid))
      for b in range(n):
        ids = [int(t) for t, v in zip(tokens[b], valid[b]) if v]
        self.cut_actions += int(not ids or ids[-1] != self.end_id)
        self.last_ids.append(ids)
        out.append(self.renderer.parse(self.tokenizer.decode(ids)))
    return out

  def __call__(self, observations) -> list[str]:
    keys = [o.key for o in observations] if all(o.key for o in observations) else None
    if self.renderer is rendering.TAGS:
      return self.generate([o.text for o in observations], keys)
    return self.generate([self.renderer.state(o.conversation.turns, self.max_render_turns, o.conversation.context)
                          for o in observations], keys)


def recognised_rate(texts: Sequence[str], parse_fn) -> float:
  """Share of messages the simulator's parser reads as an on-topic dialogue act."""
  acts = [parse_fn(t).kind for t in texts if t]
  return float(np.mean([a != "off_topic" for a in acts])) if acts else 0.0
