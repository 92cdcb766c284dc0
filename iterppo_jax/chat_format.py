"""The SR state and action in a pretrained model's own chat format (its tokenizer's chat template).

A chat model is best prompted the way it was tuned, so when the tokenizer has a chat template the
state s_i is rendered as a chat, ending with the template's generation prompt, and the action a_i as
the assistant message that closes that turn (text + the template's end-of-turn marker). Without a
template both fall back to our own tags (``conversation.render_state`` / ``render_action``).

Mapping (the agent plays the business):
  * customer c_i            -> a 'user' message
  * business m_i (what was sent) -> an 'assistant' message
  * suggestion a_i          -> not a message of its own. When it differs from what was sent (edited,
    influenced, rejected, or the agent abstained), it stays visible as a bracketed note at the start
    of that assistant message: ``[suggested (edit): <a_i>] <m_i>``; an abstention reads
    ``[suggested: <no suggestion>]``. A suggestion sent verbatim adds nothing.
Why a note inside the assistant message rather than a system message or a message of its own: most
templates (Gemma, Mistral, Llama-2) demand strict user/assistant alternation and reject system
messages after the first, so only the user/assistant sequence renders everywhere.

Consecutive messages of one role are joined with a newline (alternation again). A state that opens
with the business (a greeting) starts with an assistant message, and one where the business speaks
twice ends with one; only when the template refuses that are placeholder user messages added:
``(the customer opened the chat)`` first, ``(no reply from the customer yet)`` last.

Token boundaries: ``render_state_chat`` ends with the generation prompt and ``render_action_chat``
starts with the message text, so prompt + action is exactly the full chat. The suffix after the end
of turn marker (e.g. a newline) is dropped: sampling stops at the marker.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from iterppo_jax import conversation as conv_lib

_OPENER = '(the customer opened the chat)'
_WAITING = '(no reply from the customer yet)'
_SENTINEL = '\u2063ACTION\u2063'  # invisible separator: never altered by a template


def has_chat_template(hf_tokenizer: Any) -> bool:
  """Whether the tokenizer carries a chat template."""
  return bool(getattr(hf_tokenizer, 'chat_template', None))


def _note(suggestion: conv_lib.Turn, business: conv_lib.Turn) -> str:
  if suggestion.abstain:
    return f'[suggested: {conv_lib.ABSTAIN_TEXT}] '
  if suggestion.text.strip() == business.text.strip():
    return ''
  feedback = business.feedback if business.feedback not in (None, 'none') else 'not sent'
  return f'[suggested ({feedback}): {suggestion.text}] '


def state_messages(turns: Sequence[conv_lib.Turn],
                   max_turns: Optional[int] = None) -> List[Dict[str, str]]:
  """The chat messages of a state (see the module docstring for the mapping)."""
  turns = conv_lib.compact_turns(turns, max_turns)  # older rounds: the customer's messages only
  messages: List[Dict[str, str]] = []

  def add(role: str, content: str) -> None:
    if messages and messages[-1]['role'] == role:
      messages[-1]['content'] += '\n' + content
    else:
      messages.append({'role': role, 'content': content})

  pending: Optional[conv_lib.Turn] = None  # a suggestion waiting for the message that was sent
  for turn in turns:
    if turn.role == 'customer':
      if pending is not None:  # a suggestion nobody sent (the log ends or skips the business)
        add('assistant', _note(pending, conv_lib.Turn('business', '')).strip())
        pending = None
      add('user', turn.text)
    elif turn.role == 'suggestion':
      pending = turn
    else:
      note = _note(pending, turn) if pending is not None else ''
      add('assistant', note + turn.text)
      pending = None
  return messages


def _apply(hf_tokenizer: Any, messages: List[Dict[str, str]], generation_prompt: bool) -> str:
  return hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                          add_generation_prompt=generation_prompt)


def _with_system(messages: List[Dict[str, str]], system: str) -> List[List[Dict[str, str]]]:
  """The ways to put a system prompt first, best first: the template's own system message, else (templates
  that refuse the role, e.g. Gemma's) folded into the first user message."""
  if not system:
    return [messages]
  if messages and messages[0]['role'] == 'user':
    folded = [{'role': 'user', 'content': f"{system}\n\n{messages[0]['content']}"}] + messages[1:]
  else:
    folded = [{'role': 'user', 'content': system}] + messages
  return [[{'role': 'system', 'content': system}] + messages, folded]


def render_state_chat(turns: Sequence[conv_lib.Turn], hf_tokenizer: Any,
                      max_turns: Optional[int] = None, context: str = '', system: str = '') -> str:
  """The state s_i as chat text ending with the generation prompt (our tags without a template).

  Args:
    turns: the conversation so far (customer, suggestion and business turns).
    hf_tokenizer: a ``transformers`` tokenizer (``Tokenizer.hf``).
    max_turns: keep only the last rounds (a round starts at a customer message).
    context: the agent's private information (Conversation.context), added to the last user message (or as
      one) so that it sits right before the generation prompt, where truncation never reaches.
    system: a system prompt (the business goal for a prompted pi_0); '' keeps the template's default.
  """
  if not has_chat_template(hf_tokenizer):
    return conv_lib.render_state(turns, max_turns, context)
  messages = state_messages(turns, max_turns)
  if context:
    note = f'{conv_lib.CONTEXT_MARK} {context}'
    if messages and messages[-1]['role'] == 'user':
      messages[-1] = {**messages[-1], 'content': f"{messages[-1]['content']}\n\n{note}"}
    else:
      messages.append({'role': 'user', 'content': note})
  fixed = list(messages)  # for templates that demand user first and last
  if fixed and fixed[0]['role'] == 'assistant':
    fixed.insert(0, {'role': 'user', 'content': _OPENER})
  if fixed and fixed[-1]['role'] == 'assistant':
    fixed.append({'role': 'user', 'content': _WAITING})
  tries = _with_system(messages, system) + (_with_system(fixed, system) if fixed != messages else [])
  for attempt in tries[:-1]:
    try:
      return _apply(hf_tokenizer, attempt, True)
    except Exception:  # a jinja2 TemplateError raised by the template (roles must alternate, no system role)
      pass
  return _apply(hf_tokenizer, tries[-1], True)


def render_action_chat(text: str, hf_tokenizer: Any) -> str:
  """The action a_i as the text that follows ``render_state_chat``: message + end-of-turn marker.

  Raises:
    ValueError when the template does not render an assistant message as a continuation of its
    generation prompt (then prompt + action could not be split at a token boundary).
  """
  if not has_chat_template(hf_tokenizer):
    return conv_lib.render_action(text)
  return text + chat_end_of_turn(hf_tokenizer)


def chat_end_of_turn(hf_tokenizer: Any) -> str:
  """What the template writes after an assistant message's text (e.g. '<|im_end|>'), stripped."""
  messages = [{'role': 'user', 'content': 'hi'}]
  prompt = _apply(hf_tokenizer, messages, True)
  full = _apply(hf_tokenizer, messages + [{'role': 'assistant', 'content': _SENTINEL}], False)
  at = full.find(_SENTINEL)
  if at < 0 or full[:at] != prompt:
    raise ValueError('the chat template does not render an assistant message as a continuation of '
                     'its generation prompt; cannot split state and action')
  return full[at + len(_SENTINEL):].rstrip()
