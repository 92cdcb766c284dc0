"""How a model reads states and writes actions: our role tags, or a pretrained model's chat template.

A `Renderer` is the one object data.py (examples and token batches), lm_policy.py (sampling suggestions)
and loop.py (the PPO stop token) share, so a state is rendered the same way when it is logged, fitted,
sampled from and scored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from iterppo_jax import chat_format
from iterppo_jax import conversation as conv_lib


@dataclasses.dataclass(frozen=True)
class Renderer:
  name: str
  state_fn: Callable[[Sequence[conv_lib.Turn], int | None, str], str]
  action_fn: Callable[[str], str]
  end_text: str  # what closes an action (a single special token): sampling stops there

  def state(self, turns: Sequence[conv_lib.Turn], max_turns: int | None = None, context: str = "") -> str:
    """The state s_i as the prompt text (ends where the model writes a_i); `context` is the conversation's
    private information for the agent (Conversation.context), placed last so truncation keeps it."""
    return self.state_fn(turns, max_turns, context)

  def action(self, text: str) -> str:
    """The action as the model writes it after the prompt; '' (abstain) is written as ABSTAIN_TEXT."""
    return self.action_fn(text if text.strip() else conv_lib.ABSTAIN_TEXT)

  def parse(self, generated: str) -> str:
    """Decoded model output -> suggestion text ('' means abstain)."""
    text = generated.split(self.end_text, 1)[0].strip()
    return "" if text == conv_lib.ABSTAIN_TEXT else text

  def end_id(self, tokenizer) -> int:
    token = tokenizer.token_id(self.end_text)
    if token is None:
      raise ValueError(f"the tokenizer has no single token for the end-of-action marker {self.end_text!r}")
    return token


TAGS = Renderer("tags", conv_lib.render_state, conv_lib.render_action, conv_lib.END_OF_TURN)


def chat(hf_tokenizer: Any, system: str = "") -> Renderer:
  """The tokenizer's chat template (chat_format.py), every state opening with `system` when it is given; our
  tags when the tokenizer has no template (they have no system prompt)."""
  if not chat_format.has_chat_template(hf_tokenizer):
    return TAGS
  end = chat_format.chat_end_of_turn(hf_tokenizer)
  return Renderer("chat", lambda turns, m, context: chat_format.render_state_chat(turns, hf_tokenizer, m, context,
                                                                                system),
                  lambda text: chat_format.render_action_chat(text, hf_tokenizer), end)
