"""Jitted batched sampling from the policy with a KV cache (the rollout step of PPO).

One call = one compiled program per (B, P, N) and static options: the prompt is prefilled in a
single forward pass, then a ``jax.lax.while_loop`` emits one token per iteration from the cache,
with no host round trip, and stops early once every row has produced an end token.

Prompts may be left- or right-padded (or have holes): they are compacted to left padding inside,
so all rows write the cache at the same slot and advance in lock-step, each with its own
positions (0 at its first real token).

Log-probabilities: ``SampleOutput.logprobs`` is log pi(token | context) under the *policy* itself,
i.e. temperature 1 and no top-p truncation. That is the quantity PPO's ratio and KL penalty need,
whatever sampling distribution produced the rollout. ``sampling_logprobs`` is the log-probability
under the distribution actually sampled from (temperature + top-p; 0 for greedy).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from iterppo_jax.models.transformer import init_cache, positions_from_valid

Array = jax.Array

# Incremented each time the sampler is traced; tests use it to prove there is no recompilation.
_TRACES = {'sample': 0}


def num_traces() -> int:
  """How many times the jitted sampler has been traced in this process."""
  return _TRACES['sample']


@struct.dataclass
class SampleOutput:
  tokens: Array             # [B,N] int32 sampled tokens; pad_id after a row's end token
  logprobs: Array           # [B,N] f32 log pi(token) at temperature 1, untruncated; 0 where invalid
  sampling_logprobs: Array  # [B,N] f32 log-prob under the sampling distribution; 0 where invalid
  valid: Array              # [B,N] bool, True up to and including the first end token
  lengths: Array            # [B] int32 number of valid new tokens
  prompt_tokens: Array      # [B,P] int32 prompt compacted to left padding (pad_id at padding)
  prompt_valid: Array       # [B,P] bool validity of prompt_tokens


def left_pad(tokens: Array, valid: Array, pad_id: int):
  """Moves every row's valid tokens to the right end, keeping their order.

  Args:
    tokens: [B,P] int, any padding pattern.
    valid: [B,P] bool.
  Returns:
    (tokens [B,P] with pad_id at padding, valid [B,P]), left-padded.
  """
  # A stable sort on validity puts padding (False) first and keeps the valid tokens in order.
  order = jnp.argsort(valid.astype(jnp.int32), axis=1, stable=True)
  valid = jnp.take_along_axis(valid, order, axis=1)
  tokens = jnp.where(valid, jnp.take_along_axis(tokens, order, axis=1), pad_id)
  return tokens.astype(jnp.int32), valid


def top_p_filter(logits: Array, top_p: float) -> Array:
  """Nucleus filtering: keeps the smallest set of tokens whose probability reaches top_p.

  Args:
    logits: [B,V] float.
    top_p: in (0, 1]; the most likely token is always kept, so top_p -> 0 is greedy.
  Returns:
    [B,V] logits with the dropped tokens at -inf.
  """
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = (mass_before < top_p).at[:, 0].set(True)
  kth = jnp.sum(keep, axis=-1, keepdims=True) - 1
  threshold = jnp.take_along_axis(sorted_logits, kth, axis=-1)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def _choose(logits: Array, key: Array, temperature: Array, top_p: float, greedy: bool):
  """Picks one token per row with `key` (one key, or [B] keys: one per row). Returns (tokens [B], sampling
  logprobs [B])."""
  if greedy:
    tokens = jnp.argmax(logits, axis=-1)
    return tokens.astype(jnp.int32), jnp.zeros(tokens.shape, jnp.float32)
  scaled = logits / temperature
  if top_p < 1.0:
    scaled = top_p_filter(scaled, top_p)
  if key.ndim:  # a key per row: a row's draw does not depend on which other rows share its batch
    tokens = jax.vmap(lambda k, row: jax.random.categorical(k, row))(key, scaled).astype(jnp.int32)
  else:
    tokens = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
  sampling_logp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[:, None], -1)
  return tokens, sampling_logp[:, 0]


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'top_p', 'greedy',
                                             'eos_ids', 'pad_id', 'ignore_eos'))
def _sample(graphdef, state, prompt_tokens, prompt_valid, key, temperature, *, max_new_tokens,
            top_p, greedy, eos_ids, pad_id, ignore_eos):
  _TRACES['sample'] += 1
  model = nnx.merge(graphdef, state)
  B, P = prompt_tokens.shape
  N = max_new_tokens
  tokens, valid = left_pad(prompt_tokens, prompt_valid.astype(bool), pad_id)

  # ---- prefill: the whole prompt in one pass, cache slots [0, P); only the last slot's logits
  # are needed, so the LM head and the last block's queries and MLP run for that slot alone
  cache = init_cache(model.config, B, P + N)
  hidden, cache = model.trunk(tokens, positions_from_valid(valid), None, cache, 0, valid=valid,
                              out_slots=(P - 1, 1))
  logits = model.logits(hidden)[:, 0]
  next_position = jnp.sum(valid, axis=1).astype(jnp.int32)  # [B]

  # ---- decode: token i is chosen from `logits`, then written to cache slot P + i
  def emit(i, last_logits, done, out):
    """Chooses token i of every row and writes it to column i of `out`."""
    step_key = jax.vmap(jax.random.fold_in, (0, None))(key, i) if key.ndim else jax.random.fold_in(key, i)
    token, sampling_logp = _choose(last_logits, step_key, temperature, top_p, greedy)
    active = ~done
    token = jnp.where(active, token, pad_id)
    logp = jnp.take_along_axis(jax.nn.log_softmax(last_logits, -1), token[:, None], -1)[:, 0]
    column = {'tokens': token, 'valid': active,
              'logprobs': jnp.where(active, logp, 0.), 'sampling_logprobs':
              jnp.where(active, sampling_logp, 0.)}
    out = {k: jax.lax.dynamic_update_slice(v, column[k][:, None].astype(v.dtype), (0, i))
           for k, v in out.items()}
    if not ignore_eos:
      done = done | (active & jnp.isin(token, jnp.asarray(eos_ids)))
    return token, active, done, out

  # The loop stops one token short: the last token needs no forward pass after it.
  def cond(carry):
    i, done = carry[0], carry[3]
    return (i < N - 1) & ~jnp.all(done) if not ignore_eos else i < N - 1

  def body(carry):
    i, cache, last_logits, done, position, out = carry
    token, active, done, out = emit(i, last_logits, done, out)
    logits, _, cache = model(token[:, None], position[:, None], None, cache, P + i,
                             valid=active[:, None])
    return i + 1, cache, logits[:, 0], done, position + 1, out

  out = {'tokens': jnp.full((B, N), pad_id, jnp.int32), 'valid': jnp.zeros((B, N), bool),
         'logprobs': jnp.zeros((B, N), jnp.float32),
         'sampling_logprobs': jnp.zeros((B, N), jnp.float32)}
  carry = (jnp.int32(0), cache, logits, jnp.zeros((B,), bool), next_position, out)
  i, _, logits, done, _, out = jax.lax.while_loop(cond, body, carry)
  if N:  # token N-1, or (when every row has ended early) a column of padding that is already there
    out = emit(i, logits, done, out)[-1]
  return SampleOutput(tokens=out['tokens'], logprobs=out['logprobs'],
                      sampling_logprobs=out['sampling_logprobs'], valid=out['valid'],
                      lengths=jnp.sum(out['valid'], axis=1).astype(jnp.int32),
                      prompt_tokens=tokens, prompt_valid=valid)


def sample(model_graphdef: nnx.GraphDef, model_state: Any, prompt_tokens: Array,
           prompt_valid: Array, key: Array, *, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, greedy: bool = False, eos_id: Union[int, Sequence[int]],
           pad_id: int, ignore_eos: bool = False) -> SampleOutput:
  """Samples continuations of a batch of prompts from a ``Transformer``.

  Compiles once per (B, P, max_new_tokens) and static option set; temperature and the model
  state are traced, so changing them does not recompile.

  Args:
    model_graphdef: from ``nnx.split(model)``.
    model_state: the matching state (params).
    prompt_tokens: [B,P] int32, left- or right-padded.
    prompt_valid: [B,P] bool, True at real prompt tokens.
    key: PRNG key, or [B] keys (one per row: a row's sample is then the same in any batch); step i uses
      ``fold_in(key, i)``.
    max_new_tokens: N, the number of token slots in the output.
    temperature: softmax temperature of the sampling distribution (> 0).
    top_p: nucleus mass in (0, 1]; 1 disables the filter.
    greedy: argmax decoding (ignores temperature, top_p and key).
    eos_id: end token id, or several (e.g. end-of-turn and end-of-text).
    pad_id: emitted after a row has ended.
    ignore_eos: keep generating all N tokens regardless of end tokens.

  Returns:
    SampleOutput; ``logprobs`` are under the temperature-1, untruncated policy.
  """
  if not greedy and temperature <= 0:
    raise ValueError(f'temperature must be > 0 (use greedy=True for argmax), got {temperature}')
  if not 0 < top_p <= 1:
    raise ValueError(f'top_p must be in (0, 1], got {top_p}')
  eos_ids = tuple(int(e) for e in np.atleast_1d(eos_id))
  return _sample(model_graphdef, model_state, jnp.asarray(prompt_tokens, jnp.int32),
                 jnp.asarray(prompt_valid, bool), key, jnp.float32(temperature),
                 max_new_tokens=int(max_new_tokens), top_p=float(top_p), greedy=bool(greedy),
                 eos_ids=eos_ids, pad_id=int(pad_id), ignore_eos=bool(ignore_eos))
