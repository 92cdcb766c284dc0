"""Decoder-only transformer LM in Flax NNX: the policy pi, and the trunk of the Q-model and critic.

Two families share one code path, picked by ``TransformerConfig.style``:
  * ``'llama'``: rotary position embeddings (Su et al. 2021), RMSNorm, SwiGLU MLP, grouped-query
    attention (Ainslie et al. 2023), no biases, tied or untied LM head (Touvron et al. 2023).
  * ``'gpt2'``: learned position embeddings, LayerNorm with bias, GELU MLP, biases everywhere,
    tied LM head (Radford et al. 2019).
Both are pre-norm residual stacks with a final norm.

Options for imported Hugging Face checkpoints (``models/hf.py``), all off by default: q/k/v biases
(``qkv_bias``, Qwen2), the MLP activation (``mlp_activation``: Gemma's GeGLU is the gated MLP with
tanh-GELU), a scale on token embeddings (``embed_scale``, Gemma: sqrt(D)), zero-centred RMSNorm
scales (``norm_offset``, Gemma multiplies by 1 + w), RoPE frequency scaling (``rope_scaling``:
'linear' or Llama-3's 'llama3'), and a sliding attention window (``sliding_window``, Mistral v0.1).

Every parameter carries logical axis names (``vocab, embed, heads, kv_heads, kv, mlp, norm``) where
it is created; ``iterppo_jax.sharding`` maps them to mesh axes. Activations are constrained only at
block boundaries (``act_batch, act_len, act_embed``), a no-op when no mesh is active.

Dimension letters in einsum strings and shape comments: B batch, T tokens, S cache length,
D embed, N query heads, K kv heads, G = N // K query heads per kv head, H head dim, F mlp, V vocab.

Masks: without a cache, key j is visible to query i iff j <= i and both are valid tokens
(``make_attention_mask``). With a cache (``init_cache``), the call writes the new keys/values at
``cache_index`` (the same for every row: rows are left-padded and advance in lock-step) and attends
over valid cache slots ``< cache_index + t + 1``. Positions are per row, so a left-padded row
starts at position 0 at its first real token (``positions_from_valid``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iterppo_jax.sharding import constrain

Array = jax.Array
Cache = dict  # {'valid': [B,S] bool, 'layers': tuple of {'k': [B,K,S,H], 'v': [B,K,S,H]}}

ACT_BTD = ('act_batch', 'act_len', 'act_embed')
ACT_BTV = ('act_batch', 'act_len', 'act_vocab')
# Finite, so a query row with no visible key (padding) gets a uniform softmax instead of NaN.
_MASK_VALUE = -1e30


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Sizes and options of the decoder. Built in experiments/ from the run config."""
  vocab_size: int
  num_layers: int
  embed_dim: int       # D
  mlp_dim: int         # F
  num_heads: int       # N
  num_kv_heads: int    # K; must divide N (K < N is grouped-query attention)
  head_dim: int        # H
  max_len: int         # longest sequence (size of the learned position table for gpt2)
  style: str = 'llama'  # 'llama' | 'gpt2'
  tie_embeddings: bool = True  # LM head reuses the token embedding
  rope_theta: float = 10000.
  norm_eps: float = 1e-6
  dtype: str = 'float32'        # compute dtype; 'bfloat16' keeps f32 params and f32 logits
  param_dtype: str = 'float32'
  remat: bool = False           # recompute each block in the backward pass to save memory
  # ---- options for imported checkpoints (models/hf.py); the defaults are the two styles above ----
  mlp_activation: str = ''      # '' = the style's own (llama: silu, gpt2: gelu_tanh); or 'silu' |
                                # 'gelu_tanh' | 'gelu' (exact erf); llama style gates it (GLU)
  qkv_bias: bool = False        # biases on the q/k/v projections only (Qwen2); gpt2 has all biases
  embed_scale: float = 1.0      # token embeddings are multiplied by this (Gemma: sqrt(D))
  norm_offset: float = 0.0      # RMSNorm multiplies by (norm_offset + scale) (Gemma: 1, zero-init)
  rope_scaling: str = ''        # '' (none) | 'linear' | 'llama3' (Llama-3.1 frequency scaling)
  rope_factor: float = 1.0      # linear / llama3: long wavelengths are stretched by this
  rope_low_freq_factor: float = 1.0   # llama3: wavelengths above orig_len / this are scaled fully
  rope_high_freq_factor: float = 4.0  # llama3: wavelengths below orig_len / this are left alone
  rope_original_max_len: int = 8192   # llama3: the pretraining context length
  sliding_window: int = 0       # > 0: query i sees only keys j with i - j < sliding_window
  family: str = ''              # Hugging Face model_type this config was read from ('' = ours)

  def __post_init__(self):
    if self.style not in ('llama', 'gpt2'):
      raise ValueError(f"style must be 'llama' or 'gpt2', got {self.style!r}")
    if self.mlp_activation not in ('', 'silu', 'gelu_tanh', 'gelu'):
      raise ValueError(f"mlp_activation must be '', 'silu', 'gelu_tanh' or 'gelu', "
                       f'got {self.mlp_activation!r}')
    if self.rope_scaling not in ('', 'linear', 'llama3'):
      raise ValueError(f"rope_scaling must be '', 'linear' or 'llama3', got {self.rope_scaling!r}")
    if self.sliding_window < 0:
      raise ValueError(f'sliding_window must be >= 0, got {self.sliding_window}')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}')
    if self.style == 'llama' and self.head_dim % 2:
      raise ValueError('RoPE needs an even head_dim')

  @classmethod
  def tiny(cls, vocab_size: int, **overrides: Any) -> 'TransformerConfig':
    """About 3.5M params plus 256 per vocab entry: trains on CPU in tests and smoke runs."""
    base = dict(vocab_size=vocab_size, num_layers=4, embed_dim=256, mlp_dim=768, num_heads=4,
                num_kv_heads=4, head_dim=64, max_len=512)
    return cls(**{**base, **overrides})

  @classmethod
  def llama_1b(cls, vocab_size: int = 128256, **overrides: Any) -> 'TransformerConfig':
    """Llama-3.2-1B shapes (without its RoPE frequency scaling)."""
    base = dict(vocab_size=vocab_size, num_layers=16, embed_dim=2048, mlp_dim=8192, num_heads=32,
                num_kv_heads=8, head_dim=64, max_len=8192, rope_theta=500000., norm_eps=1e-5,
                tie_embeddings=True)
    return cls(**{**base, **overrides})

  @classmethod
  def gpt2_small(cls, vocab_size: int = 50257, **overrides: Any) -> 'TransformerConfig':
    """GPT-2 124M shapes."""
    base = dict(vocab_size=vocab_size, num_layers=12, embed_dim=768, mlp_dim=3072, num_heads=12,
                num_kv_heads=12, head_dim=64, max_len=1024, style='gpt2', norm_eps=1e-5,
                tie_embeddings=True)
    return cls(**{**base, **overrides})


# ---- small pieces --------------------------------------------------------------------------------

def logical_param(rngs: nnx.Rngs, init: Any, shape: Sequence[int],
                  names: Tuple[Optional[str], ...], dtype: Any) -> nnx.Param:
  """Creates an ``nnx.Param`` annotated with logical axis names (one per dimension).

  ``eager_sharding=False``: the names are logical, not mesh axes, so flax must not try to shard
  the value at creation; ``sharding.state_shardings`` maps them through the rules instead.
  """
  assert len(names) == len(shape), (names, shape)
  init = nnx.with_partitioning(init, names, eager_sharding=False)
  return nnx.Param(init(rngs.params(), tuple(shape), jnp.dtype(dtype)))


def _fan_in_init(in_axis, out_axis):
  return nnx.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal',
                                           in_axis=in_axis, out_axis=out_axis)


def make_attention_mask(valid: Array) -> Array:
  """Causal mask between valid tokens.

  Args:
    valid: [B,T] bool, True at real tokens.
  Returns:
    [B,T,T] bool; [b,i,j] is True iff j <= i and tokens i and j are both valid.
  """
  length = valid.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  return causal[None] & valid[:, None, :] & valid[:, :, None]


def positions_from_valid(valid: Array) -> Array:
  """Per-row positions [B,T] int32: 0 at each row's first valid token (padding gets 0 too)."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def rope_inv_freq(config: TransformerConfig) -> np.ndarray:
  """RoPE inverse frequencies [H/2] f32 with the config's frequency scaling (numpy: static config maths).

  'linear' divides every frequency by ``rope_factor``. 'llama3' (Llama 3.1) leaves wavelengths
  shorter than ``orig / high_freq_factor`` alone, divides those longer than
  ``orig / low_freq_factor`` by ``rope_factor``, and interpolates smoothly in between.
  """
  c = config
  half = c.head_dim // 2
  f32 = np.float32
  inv_freq = (f32(c.rope_theta) ** (-np.arange(half, dtype=f32) / f32(half))).astype(f32)
  if c.rope_scaling == 'linear':
    return (inv_freq / f32(c.rope_factor)).astype(f32)
  if c.rope_scaling == 'llama3':
    orig = f32(c.rope_original_max_len)
    low, high, factor = f32(c.rope_low_freq_factor), f32(c.rope_high_freq_factor), f32(c.rope_factor)
    wavelen = f32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return np.where(medium, smoothed, scaled).astype(f32)
  return inv_freq


# Up to this many angles (max_len x H/2), the sine and cosine tables are constants of the program.
_ROPE_TABLE_LIMIT = 1 << 18


@functools.lru_cache(maxsize=32)
def _rope_table(config: TransformerConfig) -> Tuple[np.ndarray, np.ndarray]:
  """(sin, cos) [max_len, H/2] f32 at every position, angles rounded to f32 as a runtime product would be."""
  angle = np.arange(config.max_len, dtype=np.float32)[:, None] * rope_inv_freq(config)[None]
  return np.sin(angle), np.cos(angle)


def rope_tables(config: TransformerConfig, positions: Array) -> Tuple[Array, Array]:
  """(sin, cos) [B,T,H/2] f32 of the rotary angles at ``positions`` [B,T], for ``rotate``.

  ``Trunk`` computes them once per call for all its layers. For models whose max_len x H/2 angles
  fit in ``_ROPE_TABLE_LIMIT`` they are looked up in tables computed once on the host: computed on
  the device, XLA:CPU fuses the sine and cosine into every RoPE fusion of every layer, forward and
  backward, and evaluates them per element there (a tenth of the CPU PPO step's time). Positions
  must lie in [0, max_len): a lookup beyond the table gives NaN, not a silently wrong rotation.
  """
  c = config
  if c.max_len * (c.head_dim // 2) <= _ROPE_TABLE_LIMIT:
    sin, cos = _rope_table(c)
    return (jnp.take(jnp.asarray(sin), positions, axis=0, mode='fill', fill_value=jnp.nan),
            jnp.take(jnp.asarray(cos), positions, axis=0, mode='fill', fill_value=jnp.nan))
  angle = positions.astype(jnp.float32)[..., None] * rope_inv_freq(c)  # [B,T,H/2]
  return jnp.sin(angle), jnp.cos(angle)


def rotate(x: Array, sin: Array, cos: Array) -> Array:
  """Rotary embedding in the rotate-half layout used by Hugging Face Llama checkpoints.

  Args:
    x: [B,T,N,H] queries or keys.
    sin, cos: [B,T,H/2] from ``rope_tables`` at x's positions.
  """
  sin, cos = sin[:, :, None, :], cos[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm; with ``offset`` (Gemma: 1) the stored scale is zero-centred: x * (offset + scale)."""

  def __init__(self, dim: int, *, eps: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
               offset: float = 0.0):
    init = (nnx.initializers.ones if offset == 0.0
            else nnx.initializers.constant(1.0 - offset))  # starts at an identity scale either way
    self.scale = logical_param(rngs, init, (dim,), ('norm',), param_dtype)
    self.eps, self.dtype, self.offset = eps, jnp.dtype(dtype), offset

  def __call__(self, x: Array) -> Array:
    x = x.astype(jnp.float32)  # statistics in f32 even under bf16 compute
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    if self.offset != 0.0:
      scale = scale + self.offset
    return (x * scale).astype(self.dtype)


class LayerNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.scale = logical_param(rngs, nnx.initializers.ones, (dim,), ('norm',), param_dtype)
    self.bias = logical_param(rngs, nnx.initializers.zeros, (dim,), ('norm',), param_dtype)
    self.eps, self.dtype = eps, jnp.dtype(dtype)

  def __call__(self, x: Array) -> Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return (x * self.scale[...] + self.bias[...]).astype(self.dtype)


def _norm(config: TransformerConfig, rngs: nnx.Rngs) -> nnx.Module:
  if config.style == 'llama':
    return RMSNorm(config.embed_dim, eps=config.norm_eps, dtype=config.dtype,
                   param_dtype=config.param_dtype, rngs=rngs, offset=config.norm_offset)
  return LayerNorm(config.embed_dim, eps=config.norm_eps, dtype=config.dtype,
                   param_dtype=config.param_dtype, rngs=rngs)


def _activation(config: TransformerConfig, x: Array) -> Array:
  name = config.mlp_activation or ('silu' if config.style == 'llama' else 'gelu_tanh')
  if name == 'silu':
    return jax.nn.silu(x)
  return jax.nn.gelu(x, approximate=name == 'gelu_tanh')


def _bias(rngs, shape, names, config, enabled):
  return (logical_param(rngs, nnx.initializers.zeros, shape, names, config.param_dtype)
          if enabled else None)


def _add(x: Array, bias: Optional[nnx.Param]) -> Array:
  return x if bias is None else x + bias[...].astype(x.dtype)


def _einsum_grad_specs(spec: str) -> Tuple[str, str]:
  """For 'x,w->y' with every letter in exactly two of x, w, y: the specs of dx and dw."""
  inputs, out = spec.split('->')
  x, w = inputs.split(',')
  return f'{out},{w}->{x}', f'{x},{out}->{w}'


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def dense(spec: str, x: Array, w: Array, preferred_element_type: Any = None) -> Array:
  """``jnp.einsum(spec, x, w)`` of an activation and a weight, with the same gradient as autodiff.

  Why not plain einsum: JAX differentiates ``dot_general`` w.r.t. its second operand as
  ``transpose(dot(dy, x))``, and XLA:CPU then moves that transpose onto the big [B*T, F] cotangent
  (a strided copy fused with the activation's backward; the CPU benchmark's policy step took 30%
  less CPU time without it). Here the weight gradient is ``einsum(x, dy)``, laid out as the weight.
  The maths, dtypes and shapes are those of autodiff (preferred type, then cast to the input's);
  GPUs, whose matmuls take transposed operands for free, compute the same thing either way.
  """
  return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)


def _dense_fwd(spec, x, w, preferred_element_type):
  return dense(spec, x, w, preferred_element_type), (x, w)


def _dense_bwd(spec, preferred_element_type, residuals, dy):
  x, w = residuals
  dx_spec, dw_spec = _einsum_grad_specs(spec)
  dx = jnp.einsum(dx_spec, dy, w, preferred_element_type=preferred_element_type)
  dw = jnp.einsum(dw_spec, x, dy, preferred_element_type=preferred_element_type)
  return dx.astype(x.dtype), dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def _cached_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """Attention of T new tokens over a KV cache laid out [B,K,S,H].

  The cache keeps each kv head's slots contiguous so that XLA:CPU can read it as the batched
  matmuls below without copying it: the [B,S,K,H] layout made every decoding step copy every
  layer's k and v transposed (a fifth of the sampler's time). The query, a few tokens, is what
  gets transposed instead.

  Args:
    q: [B,T,N,H] queries of the new tokens.
    k, v: [B,K,S,H] the cache, already holding the new tokens; N // K query heads per kv head.
    mask: [B,T,S] visible slots.

  Returns:
    [B,T,N,H].
  """
  B, T, N, H = q.shape
  K = k.shape[1]
  q = q.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,H]
  scores = jnp.einsum('BKGTH,BKSH->BKGTS', q, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, None, None], scores * H ** -0.5, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum('BKGTS,BKSH->BKGTH', probs, v)
  return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


class Attention(nnx.Module):
  """Multi-head / grouped-query self-attention with an optional functional KV cache."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c, pd = config, config.param_dtype
    D, N, K, H = c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim
    biases = c.style == 'gpt2'
    qkv_biases = biases or c.qkv_bias
    self.q_proj = logical_param(rngs, _fan_in_init(0, (1, 2)), (D, N, H),
                                ('embed', 'heads', 'kv'), pd)
    self.k_proj = logical_param(rngs, _fan_in_init(0, (1, 2)), (D, K, H),
                                ('embed', 'kv_heads', 'kv'), pd)
    self.v_proj = logical_param(rngs, _fan_in_init(0, (1, 2)), (D, K, H),
                                ('embed', 'kv_heads', 'kv'), pd)
    self.o_proj = logical_param(rngs, _fan_in_init((0, 1), 2), (N, H, D),
                                ('heads', 'kv', 'embed'), pd)
    self.q_bias = _bias(rngs, (N, H), ('heads', 'kv'), c, qkv_biases)
    self.k_bias = _bias(rngs, (K, H), ('kv_heads', 'kv'), c, qkv_biases)
    self.v_bias = _bias(rngs, (K, H), ('kv_heads', 'kv'), c, qkv_biases)
    self.o_bias = _bias(rngs, (D,), ('embed',), c, biases)
    self.config = config

  def __call__(self, x: Array, positions: Array, mask: Array,
               layer_cache: Optional[dict] = None, cache_index: Any = None,
               query: Optional[Tuple[Array, Array]] = None, rope: Optional[Tuple[Array, Array]] = None,
               query_rope: Optional[Tuple[Array, Array]] = None):
    """x: [B,T,D]; positions: [B,T]; mask: [B,T',S] (S = T without a cache).

    ``query``: optional (x [B,T',D], positions [B,T']) of the tokens that ask (a subset of x's,
    ``Trunk``'s ``out_slots``); by default every token of x asks (T' = T). Keys and values always
    come from all of x. ``rope``, ``query_rope``: optional ``rope_tables`` at ``positions`` and at
    the query's positions (the trunk shares them between layers); computed here when left out.

    Returns ([B,T',D], new layer cache or None).
    """
    c = self.config
    dt = jnp.dtype(c.dtype)
    query_x, query_positions = (x, positions) if query is None else query
    B, T, _ = query_x.shape
    q = _add(dense('BTD,DNH->BTNH', query_x, self.q_proj[...].astype(dt)), self.q_bias)
    k = _add(dense('BTD,DKH->BTKH', x, self.k_proj[...].astype(dt)), self.k_bias)
    v = _add(dense('BTD,DKH->BTKH', x, self.v_proj[...].astype(dt)), self.v_bias)
    if c.style == 'llama':
      if rope is None:
        rope = rope_tables(c, positions)
      if query_rope is None:
        query_rope = rope if query is None else rope_tables(c, query_positions)
      q = rotate(q, *query_rope)
      k = rotate(k, *rope)

    new_cache = None
    K, H = c.num_kv_heads, c.head_dim
    if layer_cache is not None:
      start = (0, 0, cache_index, 0)  # the cache is [B,K,S,H]
      k = jax.lax.dynamic_update_slice(
          layer_cache['k'], k.transpose(0, 2, 1, 3).astype(layer_cache['k'].dtype), start)
      v = jax.lax.dynamic_update_slice(
          layer_cache['v'], v.transpose(0, 2, 1, 3).astype(layer_cache['v'].dtype), start)
      new_cache = {'k': k, 'v': v}
      out = _cached_attention(q, k.astype(dt), v.astype(dt), mask)
    elif K == c.num_heads:
      # Plain multi-head attention: 4-D einsums. The grouped 5-D form below costs XLA:CPU about twice
      # as much in the backward pass (transposes), and the tiny CPU models do not use GQA.
      scores = jnp.einsum('BTNH,BSNH->BNTS', q, k, preferred_element_type=jnp.float32)
      scores = jnp.where(mask[:, None], scores * H ** -0.5, _MASK_VALUE)
      probs = jax.nn.softmax(scores, axis=-1).astype(dt)
      out = jnp.einsum('BNTS,BSNH->BTNH', probs, v)
    else:
      q = q.reshape(B, T, K, c.num_heads // K, H)
      scores = jnp.einsum('BTKGH,BSKH->BKGTS', q, k, preferred_element_type=jnp.float32)
      scores = jnp.where(mask[:, None, None], scores * H ** -0.5, _MASK_VALUE)
      probs = jax.nn.softmax(scores, axis=-1).astype(dt)
      out = jnp.einsum('BKGTS,BSKH->BTKGH', probs, v).reshape(B, T, c.num_heads, H)
    y = _add(dense('BTNH,NHD->BTD', out, self.o_proj[...].astype(dt)), self.o_bias)
    return y, new_cache


class MLP(nnx.Module):
  """Gated (llama: SwiGLU, or GeGLU with ``mlp_activation``) or plain GELU (gpt2) feed-forward."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c, pd = config, config.param_dtype
    D, F = c.embed_dim, c.mlp_dim
    gpt2 = c.style == 'gpt2'
    self.gate = None if gpt2 else logical_param(rngs, _fan_in_init(0, 1), (D, F),
                                                ('embed', 'mlp'), pd)
    self.up = logical_param(rngs, _fan_in_init(0, 1), (D, F), ('embed', 'mlp'), pd)
    self.down = logical_param(rngs, _fan_in_init(0, 1), (F, D), ('mlp', 'embed'), pd)
    self.up_bias = _bias(rngs, (F,), ('mlp',), c, gpt2)
    self.down_bias = _bias(rngs, (D,), ('embed',), c, gpt2)
    self.dtype = jnp.dtype(c.dtype)
    self.config = c

  def __call__(self, x: Array) -> Array:
    dt = self.dtype
    h = _add(dense('BTD,DF->BTF', x, self.up[...].astype(dt)), self.up_bias)
    if self.gate is None:
      h = _activation(self.config, h)  # GPT-2 uses the tanh approximation
    else:
      h = _activation(self.config, dense('BTD,DF->BTF', x, self.gate[...].astype(dt))) * h
    return _add(dense('BTF,FD->BTD', h, self.down[...].astype(dt)), self.down_bias)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.attn_norm = _norm(config, rngs)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = _norm(config, rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, positions, mask, layer_cache=None, cache_index=None, out_slots=None, rope=None):
    """``out_slots`` (see ``take_slots``): only these tokens' outputs are computed and returned;
    every token still writes its key and value (the cache, and the keys the kept tokens see).
    ``rope``: optional ``rope_tables`` at ``positions`` (llama style), shared by the trunk's layers."""
    x = constrain(x, ACT_BTD)
    normed = self.attn_norm(x)
    query = query_rope = None
    if out_slots is not None:
      query = (take_slots(normed, out_slots), take_slots(positions, out_slots))
      query_rope = None if rope is None else tuple(take_slots(t, out_slots) for t in rope)
      mask = take_slots(mask, out_slots)
      x = take_slots(x, out_slots)
    h, new_cache = self.attn(normed, positions, mask, layer_cache, cache_index, query, rope, query_rope)
    x = x + h
    x = x + self.mlp(self.mlp_norm(x))
    return constrain(x, ACT_BTD), new_cache


def take_slots(x: Array, out_slots: Any) -> Array:
  """Slots of ``x`` [B,T,...] along axis 1: ``(start, length)`` a static slice, the same for every
  row; an int array [B,M] a per-row gather (e.g. each row's last token). Returns [B,M,...]."""
  if isinstance(out_slots, tuple):
    start, length = out_slots
    return jax.lax.slice_in_dim(x, start, start + length, axis=1)
  index = out_slots.reshape(out_slots.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def _run_block(block, x, positions, mask, layer_cache, cache_index, rope):
  return block(x, positions, mask, layer_cache, cache_index, rope=rope)


# ---- the whole model -----------------------------------------------------------------------------

class Trunk(nnx.Module):
  """Embeddings, blocks and final norm: tokens -> hidden states. Shared by LM and scalar heads."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    # fan_in over D gives unit-norm-ish rows, so tied logits start at O(1) scale.
    embed_init = nnx.initializers.variance_scaling(1.0, 'fan_in', 'normal', in_axis=1, out_axis=0)
    self.embedding = logical_param(rngs, embed_init, (c.vocab_size, c.embed_dim),
                                   ('vocab', 'embed'), c.param_dtype)
    # Assigned once: nnx fixes an attribute as data or static on first assignment.
    self.pos_embedding = (
        logical_param(rngs, nnx.initializers.normal(0.01), (c.max_len, c.embed_dim),
                      (None, 'embed'), c.param_dtype) if c.style == 'gpt2' else None)
    self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = _norm(c, rngs)

  def __call__(self, tokens: Array, positions: Array, attn_mask: Optional[Array] = None,
               cache: Optional[Cache] = None, cache_index: Any = None, *,
               valid: Optional[Array] = None, out_slots: Any = None) -> Tuple[Array, Optional[Cache]]:
    """Runs the trunk.

    Args:
      tokens: [B,T] int32.
      positions: [B,T] int32, per row (see ``positions_from_valid``).
      attn_mask: optional [B,T,S] bool. Without a cache it replaces the default causal mask;
        with a cache it further restricts the cache mask.
      cache: optional KV cache from ``init_cache`` (S = its length).
      cache_index: scalar int, slot where token 0 of this call is written (same for all rows).
      valid: optional [B,T] bool, False at padding. Without a cache it is ANDed into the mask;
        with a cache it is what the cache records for the new slots (default: all valid).
      out_slots: optional; only these slots' hidden states are wanted: ``(start, length)``, the
        same slice of every row, or an int array [B,M] of per-row slots (``take_slots``). The last
        block then computes queries, attention output and MLP for those slots only (keys and values
        for all): a PPO batch reads N response slots of P + N, a Q-model one slot per row. Same
        numbers as slicing the full output.

    Returns:
      (hidden [B,T,D] after the final norm, or [B,M,D] with ``out_slots``, in the compute dtype;
      new cache or None).
    """
    c = self.config
    dt = jnp.dtype(c.dtype)
    B, T = tokens.shape
    if cache is None:
      mask = attn_mask if attn_mask is not None else make_attention_mask(jnp.ones((B, T), bool))
      if valid is not None:
        mask = mask & make_attention_mask(valid)
      kv_valid = None
    else:
      new_valid = jnp.ones((B, T), bool) if valid is None else valid.astype(bool)
      kv_valid = jax.lax.dynamic_update_slice(cache['valid'], new_valid, (0, cache_index))
      S = kv_valid.shape[1]
      # Query t sits in slot cache_index + t and sees valid slots at or before it.
      visible = jnp.arange(S)[None, :] <= cache_index + jnp.arange(T)[:, None]  # [T,S]
      mask = visible[None] & kv_valid[:, None, :]
      if attn_mask is not None:
        mask = mask & attn_mask
    if c.sliding_window:
      mask = mask & self._window(positions, cache, cache_index, mask.shape)

    # Gather from a table gathered over 'embed' (fsdp): a lookup from an fsdp-sharded table into
    # batch-over-fsdp activations makes GSPMD replicate the whole result (slow, warns).
    table = constrain(self.embedding[...], ('vocab', None))
    x = jnp.take(table, tokens, axis=0).astype(dt)
    if c.embed_scale != 1.0:
      x = x * jnp.asarray(c.embed_scale, dt)
    if self.pos_embedding is not None:
      x = x + jnp.take(self.pos_embedding[...], jnp.clip(positions, 0, c.max_len - 1),
                       axis=0).astype(dt)
    x = constrain(x, ACT_BTD)

    rope = rope_tables(c, positions) if c.style == 'llama' else None
    # Remat only where a backward pass may follow: with a cache (sampling) there is none, and nnx.remat of a
    # module closed over by the sampler's while_loop body fails (TraceContextError).
    run = nnx.remat(_run_block) if c.remat and cache is None else _run_block
    layer_caches = []
    last = len(self.blocks) - 1
    for i, block in enumerate(self.blocks):
      layer_cache = None if cache is None else cache['layers'][i]
      if i == last and out_slots is not None:  # not rematerialised: one block, and out_slots is static
        x, new_layer_cache = block(x, positions, mask, layer_cache, cache_index, out_slots, rope)
      else:
        x, new_layer_cache = run(block, x, positions, mask, layer_cache, cache_index, rope)
      layer_caches.append(new_layer_cache)
    hidden = self.final_norm(x)
    new_cache = None if cache is None else {'valid': kv_valid, 'layers': tuple(layer_caches)}
    return hidden, new_cache

  def _window(self, positions: Array, cache: Optional[Cache], cache_index: Any,
              mask_shape: Tuple[int, ...]) -> Array:
    """Sliding-window part of the mask: [B,T,S] bool, True where query - key < window.

    Without a cache the distance is taken between positions (exact under any padding); with a
    cache between slots, which equals the position distance because cached rows are left-padded
    and contiguous.
    """
    w = self.config.sliding_window
    if cache is None:
      return (positions[:, :, None] - positions[:, None, :]) < w
    _, T, S = mask_shape
    query_slot = cache_index + jnp.arange(T)[:, None]  # [T,1]
    return ((query_slot - jnp.arange(S)[None, :]) < w)[None]


class Transformer(nnx.Module):
  """Decoder-only LM: ``Trunk`` plus an LM head (tied to the embedding or its own [D,V] matrix)."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.trunk = Trunk(config, rngs=rngs)
    self.lm_head = None if config.tie_embeddings else logical_param(
        rngs, _fan_in_init(0, 1), (config.embed_dim, config.vocab_size), ('embed', 'vocab'),
        config.param_dtype)

  def logits(self, hidden: Array) -> Array:
    """[B,T,D] hidden -> [B,T,V] float32 logits (f32 accumulation even under bf16)."""
    dt = jnp.dtype(self.config.dtype)
    if self.lm_head is None:
      logits = dense('BTD,VD->BTV', hidden, self.trunk.embedding[...].astype(dt), jnp.float32)
    else:
      logits = dense('BTD,DV->BTV', hidden, self.lm_head[...].astype(dt), jnp.float32)
    return constrain(logits, ACT_BTV)

  def __call__(self, tokens: Array, positions: Array, attn_mask: Optional[Array] = None,
               cache: Optional[Cache] = None, cache_index: Any = None, *,
               valid: Optional[Array] = None, out_slots: Any = None
               ) -> Tuple[Array, Array, Optional[Cache]]:
    """Returns (logits [B,T,V] float32, hidden [B,T,D], new cache or None); T -> M with
    ``out_slots``.

    Arguments as in ``Trunk.__call__``.
    """
    hidden, new_cache = self.trunk(tokens, positions, attn_mask, cache, cache_index, valid=valid,
                                   out_slots=out_slots)
    return self.logits(hidden), hidden, new_cache


def init_cache(config: TransformerConfig, batch: int, cache_len: int,
               dtype: Any = None) -> Cache:
  """An empty KV cache: per layer k/v [B,K,S,H] zeros, and 'valid' [B,S] all False."""
  dtype = jnp.dtype(dtype or config.dtype)
  shape = (batch, config.num_kv_heads, cache_len, config.head_dim)
  layers = tuple({'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
                 for _ in range(config.num_layers))
  return {'valid': jnp.zeros((batch, cache_len), bool), 'layers': layers}


def num_params(model_or_state: Any) -> int:
  """Number of parameter scalars in a module or state (concrete or abstract)."""
  state = model_or_state
  if isinstance(model_or_state, nnx.Module):
    state = nnx.state(model_or_state, nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state) if hasattr(x, 'shape'))
