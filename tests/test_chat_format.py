"""chat_format: the SR state and action in a tokenizer's chat template (local tokenizers only)."""

import pytest

pytest.importorskip('jinja2')  # transformers renders chat templates with jinja2

from iterppo_jax import chat_format  # noqa: E402
from iterppo_jax import conversation as conv_lib  # noqa: E402
from iterppo_jax import tokenizer as tok_lib  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Gemma's shape: strict user/assistant alternation starting with the user, 'model' role.
GEMMA = ("{{ bos_token }}{% for m in messages %}"
         "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
         "{% endif %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

T = conv_lib.Turn
TURNS = [
    T('customer', 'Hi there', flag=0),
    T('suggestion', 'Hello! What are you looking for?'),
    T('business', 'Hello! What are you looking for?', feedback='accept'),
    T('customer', 'A laptop', flag=0),
    T('suggestion', 'Budget?'),
    T('business', 'What is your budget?', feedback='edit'),
    T('customer', 'About 500', flag=0),
    T('suggestion', '', abstain=True),
    T('business', 'We have one for 499.', feedback='reject'),
    T('customer', 'Sounds good', flag=0),
]


@pytest.fixture(scope='module')
def hf_tok(tmp_path_factory):
  texts = [' '.join(t.text for t in TURNS)] * 4 + ['suggested edit reject no reply customer chat']
  tok = tok_lib.train_bpe(texts, 320, str(tmp_path_factory.mktemp('tok') / 'bpe'))
  hf = tok.hf
  hf.add_special_tokens({'additional_special_tokens': [
      '<|im_start|>', '<|im_end|>', '<start_of_turn>', '<end_of_turn>']})
  return hf


def _with_template(hf, template):
  import copy
  t = copy.deepcopy(hf)
  t.chat_template = template
  return t


def test_without_template_falls_back_to_our_tags(hf_tok):
  assert not chat_format.has_chat_template(hf_tok)
  assert chat_format.render_state_chat(TURNS, hf_tok, 2) == conv_lib.render_state(TURNS, 2)
  assert chat_format.render_action_chat('Deal!', hf_tok) == conv_lib.render_action('Deal!')


def test_chatml_state_and_action(hf_tok):
  tok = _with_template(hf_tok, CHATML)
  assert chat_format.has_chat_template(tok)
  state = chat_format.render_state_chat(TURNS, tok)
  assert state == (
      '<|im_start|>user\nHi there<|im_end|>\n'
      '<|im_start|>assistant\nHello! What are you looking for?<|im_end|>\n'
      '<|im_start|>user\nA laptop<|im_end|>\n'
      '<|im_start|>assistant\n[suggested (edit): Budget?] What is your budget?<|im_end|>\n'
      '<|im_start|>user\nAbout 500<|im_end|>\n'
      '<|im_start|>assistant\n[suggested: <no suggestion>] We have one for 499.<|im_end|>\n'
      '<|im_start|>user\nSounds good<|im_end|>\n'
      '<|im_start|>assistant\n')
  action = chat_format.render_action_chat('Great, shall I order it?', tok)
  assert action == 'Great, shall I order it?<|im_end|>'
  assert chat_format.chat_end_of_turn(tok) == '<|im_end|>'
  # Prompt and action tokenize separately exactly as together (data.encode_pairs relies on it).
  wrapped = tok_lib.Tokenizer(tok)
  assert wrapped.encode(state) + wrapped.encode(action) == wrapped.encode(state + action)
  assert wrapped.encode(action)[-1] == tok.convert_tokens_to_ids('<|im_end|>')


def test_max_turns_keeps_last_rounds_and_older_customer_messages(hf_tok):
  tok = _with_template(hf_tok, CHATML)
  state = chat_format.render_state_chat(TURNS, tok, max_turns=2)
  # Older rounds keep the customer's words only: the need stays in the state, old staff messages go.
  assert state.startswith('<|im_start|>user\nHi there\nA laptop\nAbout 500<|im_end|>')
  assert 'What are you looking for' not in state and 'What is your budget' not in state


def test_strict_alternation_template(hf_tok):
  tok = _with_template(hf_tok, GEMMA)
  assert chat_format.chat_end_of_turn(tok) == '<end_of_turn>'
  state = chat_format.render_state_chat(TURNS, tok)
  assert state.endswith('<start_of_turn>user\nSounds good<end_of_turn>\n<start_of_turn>model\n')
  # A business greeting first: the template refuses assistant-first, so a placeholder user opens.
  greeting = [T('business', 'Welcome to the shop!', feedback='none'),
              T('customer', 'Hi', flag=0)]
  state = chat_format.render_state_chat(greeting, tok)
  assert state.startswith('<bos><start_of_turn>user\n(the customer opened the chat)<end_of_turn>')
  assert 'Welcome to the shop!' in state
  # The same state under ChatML needs no placeholder.
  assert 'opened' not in chat_format.render_state_chat(greeting, _with_template(hf_tok, CHATML))


def test_messages_merge_same_role_and_keep_unsent_suggestions():
  turns = [T('customer', 'Hi', flag=0), T('customer', 'Anyone?', flag=0),
           T('suggestion', 'Hello!'), T('customer', 'Hello?', flag=0)]
  assert chat_format.state_messages(turns) == [
      {'role': 'user', 'content': 'Hi\nAnyone?'},
      {'role': 'assistant', 'content': '[suggested (not sent): Hello!]'},
      {'role': 'user', 'content': 'Hello?'}]


def test_the_agents_context_comes_last_in_the_chat(hf_tok):
  tok = _with_template(hf_tok, CHATML)
  turns = [conv_lib.Turn('customer', 'Hi, a laptop please.', flag=0)]
  text = chat_format.render_state_chat(turns, tok, None, 'Loyalty tier: gold.')
  assert text.endswith('Hi, a laptop please.\n\n[context] Loyalty tier: gold.<|im_end|>\n<|im_start|>assistant\n')
  assert chat_format.render_state_chat(turns, tok, None, '') == chat_format.render_state_chat(turns, tok)


def test_a_system_prompt_opens_the_state_or_the_first_user_message(hf_tok):
  goal = 'You sell electronics; your goal is a purchase.'
  chatml = chat_format.render_state_chat(TURNS[:4], _with_template(hf_tok, CHATML), system=goal)
  assert chatml.startswith(f'<|im_start|>system\n{goal}<|im_end|>\n<|im_start|>user\nHi there')
  # Gemma's template refuses a system role (strict alternation): the goal opens the first user message
  gemma = chat_format.render_state_chat(TURNS[:4], _with_template(hf_tok, GEMMA), system=goal)
  assert f'<start_of_turn>user\n{goal}\n\nHi there<end_of_turn>' in gemma
  assert chat_format.render_state_chat(TURNS[:4], _with_template(hf_tok, CHATML)).startswith('<|im_start|>user')
