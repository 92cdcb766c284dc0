"""Hugging Face checkpoints in and out: config.json + *.safetensors <-> our NNX ``Transformer``.

Supported families (``model_type`` in config.json), and what each turns on in ``TransformerConfig``:

  llama    RoPE (optionally 'linear' or Llama-3.1 'llama3' frequency scaling), RMSNorm, SwiGLU, GQA
  mistral  the Llama architecture; a ``sliding_window`` becomes our sliding attention window
  qwen2    Llama plus biases on q/k/v (``qkv_bias``); sliding-window layers are refused
  gemma    (Gemma 1) GeGLU MLP, embeddings times sqrt(D), RMSNorm scales stored as w in x * (1 + w),
           tied LM head
  gpt2     learned positions, LayerNorm, GELU, biases, Conv1D ([in, out]) weights, fused q/k/v

Anything else (another model_type, MoE, attention biases on Llama, RoPE types other than
default/linear/llama3, softcapping of Gemma 2/3, ...) is refused with a ValueError naming the
option and what is supported, never silently approximated.

Weights are mapped by a table per family (STYLE.md section 4): a Hugging Face key template (``{i}``
is the layer) -> our parameter path, with a transform and a shape assert for every tensor. Loading
reads one tensor at a time (safetensors ``safe_open``, numpy, bf16 through ml_dtypes), converts it
and puts it straight onto its ``NamedSharding`` with ``jax.make_array_from_callback``, so each
device receives only its own shard and the whole model never sits on one device.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iterppo_jax import sharding
from iterppo_jax.models.transformer import Transformer, TransformerConfig

FAMILIES = ('llama', 'mistral', 'qwen2', 'gemma', 'gpt2')
_ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
                  'qwen2': 'Qwen2ForCausalLM', 'gemma': 'GemmaForCausalLM',
                  'gpt2': 'GPT2LMHeadModel'}
# transformers' default of tie_word_embeddings per family, for config.json files that omit it.
_DEFAULT_TIE = {'llama': False, 'mistral': False, 'qwen2': False, 'gemma': True, 'gpt2': True}
# Tokenizer and generation files copied next to an exported model.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'tokenizer.model', 'vocab.json', 'merges.txt', 'added_tokens.json',
                   'chat_template.jinja', 'chat_template.json', 'generation_config.json')
# Keys that carry no weights: buffers some older checkpoints saved.
_IGNORED_KEYS = (r'.*rotary_emb\.inv_freq', r'(transformer\.)?h\.\d+\.attn\.(masked_)?bias')


def _refuse(family: str, what: str, supported: str) -> None:
  raise ValueError(f'{family}: {what} is not supported; supported: {supported}')


# ---- config.json <-> TransformerConfig -----------------------------------------------------------

def _rope(family: str, hf: Dict[str, Any]) -> Dict[str, Any]:
  """Our RoPE fields from the old (rope_theta + rope_scaling) or new (rope_parameters) layout."""
  params = dict(hf.get('rope_parameters') or {})
  scaling = dict(hf.get('rope_scaling') or {})
  if params and any(isinstance(v, dict) for v in params.values()):
    _refuse(family, 'per-layer-type rope_parameters', 'one RoPE setting for all layers')
  params = {**scaling, **params}
  theta = float(params.get('rope_theta', hf.get('rope_theta', 10000.0)))
  kind = params.get('rope_type', params.get('type', 'default')) or 'default'
  partial = params.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))
  if partial not in (None, 1, 1.0):
    _refuse(family, f'partial_rotary_factor={partial}', 'rotary embedding over the whole head')
  out: Dict[str, Any] = dict(rope_theta=theta)
  if kind == 'default':
    return out
  if kind == 'linear':
    return dict(out, rope_scaling='linear', rope_factor=float(params['factor']))
  if kind == 'llama3':
    return dict(out, rope_scaling='llama3', rope_factor=float(params['factor']),
                rope_low_freq_factor=float(params['low_freq_factor']),
                rope_high_freq_factor=float(params['high_freq_factor']),
                rope_original_max_len=int(params.get('original_max_position_embeddings',
                                                     hf.get('max_position_embeddings', 8192))))
  _refuse(family, f'rope type {kind!r}', "'default', 'linear' and 'llama3'")
  raise AssertionError  # unreachable


def _check_llama_like(family: str, hf: Dict[str, Any]) -> None:
  for key in ('num_experts', 'num_local_experts', 'n_routed_experts', 'moe_intermediate_size'):
    if hf.get(key):
      _refuse(family, f'mixture of experts ({key}={hf[key]})', 'dense MLPs')
  if hf.get('mlp_bias'):
    _refuse(family, 'mlp_bias=True', 'MLPs without biases')
  if hf.get('attention_bias') and family != 'qwen2':
    _refuse(family, 'attention_bias=True', 'attention without biases (q/k/v biases: qwen2)')
  if hf.get('use_bidirectional_attention'):
    _refuse(family, 'use_bidirectional_attention=True', 'causal attention')
  for key in ('attn_logit_softcapping', 'final_logit_softcapping', 'query_pre_attn_scalar'):
    if hf.get(key) is not None:
      _refuse(family, f'{key}={hf[key]} (Gemma 2/3 style)', 'Gemma 1')


def config_from_hf(hf: Dict[str, Any], *, dtype: str = 'float32',
                   param_dtype: str = 'float32') -> TransformerConfig:
  """Builds our config from a Hugging Face config.json dict.

  Args:
    hf: the parsed config.json.
    dtype, param_dtype: our compute and parameter dtypes (not taken from the checkpoint).

  Raises:
    ValueError naming the family and option when the checkpoint is outside what we support.
  """
  family = hf.get('model_type')
  if family not in FAMILIES:
    arch = ', '.join(hf.get('architectures') or []) or 'unknown architecture'
    raise ValueError(f'model_type {family!r} ({arch}) is not supported; supported families: '
                     f'{", ".join(FAMILIES)}')
  if hf.get('is_encoder_decoder') or hf.get('add_cross_attention'):
    _refuse(family, 'cross-attention / encoder-decoder', 'decoder-only models')
  tie = bool(hf.get('tie_word_embeddings', _DEFAULT_TIE[family]))
  common = dict(dtype=dtype, param_dtype=param_dtype, tie_embeddings=tie, family=family)

  if family == 'gpt2':
    act = hf.get('activation_function', 'gelu_new')
    acts = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu'}
    if act not in acts:
      _refuse(family, f'activation_function={act!r}', ', '.join(acts))
    if not hf.get('scale_attn_weights', True):
      _refuse(family, 'scale_attn_weights=False', 'attention scaled by 1/sqrt(head_dim)')
    if hf.get('scale_attn_by_inverse_layer_idx'):
      _refuse(family, 'scale_attn_by_inverse_layer_idx=True', 'the same attention scale per layer')
    D, N = int(hf['n_embd']), int(hf['n_head'])
    return TransformerConfig(
        vocab_size=int(hf['vocab_size']), num_layers=int(hf['n_layer']), embed_dim=D,
        mlp_dim=int(hf.get('n_inner') or 4 * D), num_heads=N, num_kv_heads=N, head_dim=D // N,
        max_len=int(hf['n_positions']), style='gpt2', norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)),
        mlp_activation='' if acts[act] == 'gelu_tanh' else acts[act], **common)

  _check_llama_like(family, hf)
  act = hf.get('hidden_activation') or hf.get('hidden_act', 'silu')
  if family == 'gemma':
    # transformers runs every Gemma 1 checkpoint with the tanh GELU, whatever 'gelu' it names.
    if act not in ('gelu', 'gelu_pytorch_tanh', 'gelu_new'):
      _refuse(family, f'hidden_act={act!r}', "'gelu_pytorch_tanh'")
    activation = 'gelu_tanh'
  else:
    if act != 'silu':
      _refuse(family, f'hidden_act={act!r}', "'silu'")
    activation = ''
  window = 0
  if family == 'qwen2':
    layer_types = hf.get('layer_types') or []
    if hf.get('use_sliding_window') or any(t != 'full_attention' for t in layer_types):
      _refuse(family, 'sliding-window attention layers (use_sliding_window)',
              'full attention in every layer')
  if family == 'mistral':
    window = int(hf.get('sliding_window') or 0)
  D, N = int(hf['hidden_size']), int(hf['num_attention_heads'])
  extra: Dict[str, Any] = {}
  if family == 'gemma':
    extra = dict(embed_scale=math.sqrt(D), norm_offset=1.0)
  return TransformerConfig(
      vocab_size=int(hf['vocab_size']), num_layers=int(hf['num_hidden_layers']), embed_dim=D,
      mlp_dim=int(hf['intermediate_size']), num_heads=N,
      num_kv_heads=int(hf.get('num_key_value_heads') or N),
      head_dim=int(hf.get('head_dim') or D // N),
      max_len=int(hf.get('max_position_embeddings', 2048)), style='llama',
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)), mlp_activation=activation,
      qkv_bias=family == 'qwen2', sliding_window=window, **_rope(family, hf), **extra, **common)


def _family_of(config: TransformerConfig, family: Optional[str]) -> str:
  family = family or config.family or ('gpt2' if config.style == 'gpt2' else 'llama')
  if family not in FAMILIES:
    raise ValueError(f'cannot export as {family!r}; supported families: {", ".join(FAMILIES)}')
  return family


def config_to_hf(config: TransformerConfig, family: Optional[str] = None,
                 torch_dtype: str = 'float32') -> Dict[str, Any]:
  """The config.json dict of ``config`` as a ``family`` model (default: the family it came from).

  Raises:
    ValueError when the family cannot express the config (checked by reading the dict back).
  """
  c = config
  family = _family_of(c, family)
  out: Dict[str, Any] = {'architectures': [_ARCHITECTURES[family]], 'model_type': family,
                         'vocab_size': c.vocab_size, 'tie_word_embeddings': c.tie_embeddings,
                         'torch_dtype': torch_dtype, 'use_cache': True,
                         # Token ids belong to the tokenizer: export() carries them over from
                         # tokenizer_dir's config.json, or takes them from hf_overrides.
                         'bos_token_id': None, 'eos_token_id': None, 'pad_token_id': None}
  if family == 'gpt2':
    out.update(n_embd=c.embed_dim, n_layer=c.num_layers, n_head=c.num_heads,
               n_inner=c.mlp_dim, n_positions=c.max_len, layer_norm_epsilon=c.norm_eps,
               activation_function='gelu' if c.mlp_activation == 'gelu' else 'gelu_new',
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  else:
    out.update(hidden_size=c.embed_dim, intermediate_size=c.mlp_dim,
               num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
               num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
               max_position_embeddings=c.max_len, rms_norm_eps=c.norm_eps,
               rope_theta=c.rope_theta, attention_dropout=0.0,
               hidden_act='gelu_pytorch_tanh' if family == 'gemma' else 'silu')
    rope = None
    if c.rope_scaling == 'linear':
      rope = {'rope_type': 'linear', 'factor': c.rope_factor}
    elif c.rope_scaling == 'llama3':
      rope = {'rope_type': 'llama3', 'factor': c.rope_factor,
              'low_freq_factor': c.rope_low_freq_factor,
              'high_freq_factor': c.rope_high_freq_factor,
              'original_max_position_embeddings': c.rope_original_max_len}
    out['rope_scaling'] = rope
    if family in ('llama', 'gemma'):
      out.update(attention_bias=False)
    if family == 'llama':
      out.update(mlp_bias=False)
    if family == 'mistral':
      out.update(sliding_window=c.sliding_window or None)
    if family == 'qwen2':
      out.update(use_sliding_window=False, sliding_window=None,
                 max_window_layers=c.num_layers)
  # Round trip: a family that cannot express an option would silently drop it.
  back = config_from_hf(out, dtype=c.dtype, param_dtype=c.param_dtype)
  mine = dataclasses.replace(c, family=family, remat=back.remat)
  if c.mlp_activation == ('silu' if c.style == 'llama' else 'gelu_tanh'):
    mine = dataclasses.replace(mine, mlp_activation='')  # the style's default, spelled out
  if back != mine:
    diff = {f.name: (getattr(mine, f.name), getattr(back, f.name))
            for f in dataclasses.fields(c) if getattr(mine, f.name) != getattr(back, f.name)}
    raise ValueError(f'{family} cannot express this model config; (ours, as {family}) differ in '
                     f'{diff}')
  return out


# ---- the weight tables -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Transform:
  """How one Hugging Face tensor becomes one or more of our parameters, and back.

  to_ours(hf_array, our_shapes) -> tuple of arrays (one per target); to_hf(*ours) -> hf array;
  hf_shape(our_shapes) -> the shape the Hugging Face tensor must have.
  """
  to_ours: Callable[[np.ndarray, Sequence[Tuple[int, ...]]], Tuple[np.ndarray, ...]]
  to_hf: Callable[..., np.ndarray]
  hf_shape: Callable[[Sequence[Tuple[int, ...]]], Tuple[int, ...]]


def _split_last(x, n):
  return tuple(np.split(x, n, axis=-1))


COPY = Transform(lambda w, s: (w,), lambda x: x, lambda s: tuple(s[0]))
# nn.Linear stores [out, in]; we store [in, out].
LINEAR = Transform(lambda w, s: (w.T,), lambda x: x.T, lambda s: tuple(s[0])[::-1])
# q/k/v: Linear [N*H, D] -> [D, N, H].
LINEAR_HEADS_IN = Transform(lambda w, s: (w.T.reshape(s[0]),),
                            lambda x: x.reshape(x.shape[0], -1).T,
                            lambda s: (s[0][1] * s[0][2], s[0][0]))
# o: Linear [D, N*H] -> [N, H, D].
LINEAR_HEADS_OUT = Transform(lambda w, s: (w.T.reshape(s[0]),),
                             lambda x: x.reshape(-1, x.shape[-1]).T,
                             lambda s: (s[0][2], s[0][0] * s[0][1]))
# q/k/v bias: [N*H] -> [N, H].
BIAS_HEADS = Transform(lambda w, s: (w.reshape(s[0]),), lambda x: x.reshape(-1),
                       lambda s: (s[0][0] * s[0][1],))
# GPT-2 Conv1D stores [in, out]. Fused q/k/v [D, 3*N*H] -> three [D, N, H].
CONV_QKV = Transform(lambda w, s: tuple(p.reshape(t) for p, t in zip(_split_last(w, 3), s)),
                     lambda *xs: np.concatenate([x.reshape(x.shape[0], -1) for x in xs], -1),
                     lambda s: (s[0][0], sum(t[1] * t[2] for t in s)))
CONV_QKV_BIAS = Transform(lambda w, s: tuple(p.reshape(t) for p, t in zip(_split_last(w, 3), s)),
                          lambda *xs: np.concatenate([x.reshape(-1) for x in xs]),
                          lambda s: (sum(t[0] * t[1] for t in s),))
# GPT-2 attention output Conv1D [N*H, D] -> [N, H, D].
CONV_HEADS_OUT = Transform(lambda w, s: (w.reshape(s[0]),), lambda x: x.reshape(-1, x.shape[-1]),
                           lambda s: (s[0][0] * s[0][1], s[0][2]))

Row = Tuple[str, Tuple[str, ...], Transform]  # (HF key template, our path templates, transform)

_LLAMA_ROWS: Tuple[Row, ...] = (
    ('model.embed_tokens.weight', ('trunk.embedding',), COPY),
    ('model.layers.{i}.input_layernorm.weight', ('trunk.blocks.{i}.attn_norm.scale',), COPY),
    ('model.layers.{i}.self_attn.q_proj.weight', ('trunk.blocks.{i}.attn.q_proj',), LINEAR_HEADS_IN),
    ('model.layers.{i}.self_attn.k_proj.weight', ('trunk.blocks.{i}.attn.k_proj',), LINEAR_HEADS_IN),
    ('model.layers.{i}.self_attn.v_proj.weight', ('trunk.blocks.{i}.attn.v_proj',), LINEAR_HEADS_IN),
    ('model.layers.{i}.self_attn.o_proj.weight', ('trunk.blocks.{i}.attn.o_proj',), LINEAR_HEADS_OUT),
    ('model.layers.{i}.post_attention_layernorm.weight', ('trunk.blocks.{i}.mlp_norm.scale',), COPY),
    ('model.layers.{i}.mlp.gate_proj.weight', ('trunk.blocks.{i}.mlp.gate',), LINEAR),
    ('model.layers.{i}.mlp.up_proj.weight', ('trunk.blocks.{i}.mlp.up',), LINEAR),
    ('model.layers.{i}.mlp.down_proj.weight', ('trunk.blocks.{i}.mlp.down',), LINEAR),
    ('model.norm.weight', ('trunk.final_norm.scale',), COPY),
)
_QKV_BIAS_ROWS: Tuple[Row, ...] = (
    ('model.layers.{i}.self_attn.q_proj.bias', ('trunk.blocks.{i}.attn.q_bias',), BIAS_HEADS),
    ('model.layers.{i}.self_attn.k_proj.bias', ('trunk.blocks.{i}.attn.k_bias',), BIAS_HEADS),
    ('model.layers.{i}.self_attn.v_proj.bias', ('trunk.blocks.{i}.attn.v_bias',), BIAS_HEADS),
)
_GPT2_ROWS: Tuple[Row, ...] = (
    ('transformer.wte.weight', ('trunk.embedding',), COPY),
    ('transformer.wpe.weight', ('trunk.pos_embedding',), COPY),
    ('transformer.h.{i}.ln_1.weight', ('trunk.blocks.{i}.attn_norm.scale',), COPY),
    ('transformer.h.{i}.ln_1.bias', ('trunk.blocks.{i}.attn_norm.bias',), COPY),
    ('transformer.h.{i}.attn.c_attn.weight', ('trunk.blocks.{i}.attn.q_proj',
                                              'trunk.blocks.{i}.attn.k_proj',
                                              'trunk.blocks.{i}.attn.v_proj'), CONV_QKV),
    ('transformer.h.{i}.attn.c_attn.bias', ('trunk.blocks.{i}.attn.q_bias',
                                            'trunk.blocks.{i}.attn.k_bias',
                                            'trunk.blocks.{i}.attn.v_bias'), CONV_QKV_BIAS),
    ('transformer.h.{i}.attn.c_proj.weight', ('trunk.blocks.{i}.attn.o_proj',), CONV_HEADS_OUT),
    ('transformer.h.{i}.attn.c_proj.bias', ('trunk.blocks.{i}.attn.o_bias',), COPY),
    ('transformer.h.{i}.ln_2.weight', ('trunk.blocks.{i}.mlp_norm.scale',), COPY),
    ('transformer.h.{i}.ln_2.bias', ('trunk.blocks.{i}.mlp_norm.bias',), COPY),
    ('transformer.h.{i}.mlp.c_fc.weight', ('trunk.blocks.{i}.mlp.up',), COPY),
    ('transformer.h.{i}.mlp.c_fc.bias', ('trunk.blocks.{i}.mlp.up_bias',), COPY),
    ('transformer.h.{i}.mlp.c_proj.weight', ('trunk.blocks.{i}.mlp.down',), COPY),
    ('transformer.h.{i}.mlp.c_proj.bias', ('trunk.blocks.{i}.mlp.down_bias',), COPY),
    ('transformer.ln_f.weight', ('trunk.final_norm.scale',), COPY),
    ('transformer.ln_f.bias', ('trunk.final_norm.bias',), COPY),
)
_LM_HEAD_ROW: Row = ('lm_head.weight', ('lm_head',), LINEAR)


def weight_table(config: TransformerConfig, family: Optional[str] = None) -> Tuple[Row, ...]:
  """The (HF key template, our path templates, transform) rows of a family."""
  family = _family_of(config, family)
  rows = _GPT2_ROWS if family == 'gpt2' else _LLAMA_ROWS
  if config.qkv_bias and family != 'gpt2':
    rows = rows + _QKV_BIAS_ROWS
  if not config.tie_embeddings:
    rows = rows + (_LM_HEAD_ROW,)
  return rows


def _expand(rows: Sequence[Row], num_layers: int) -> Iterator[Tuple[str, Tuple[str, ...], Transform]]:
  """Instantiates ``{i}`` templates for every layer."""
  for hf_key, ours, transform in rows:
    layers = range(num_layers) if '{i}' in hf_key else (None,)
    for i in layers:
      fmt = (lambda t: t) if i is None else (lambda t: t.replace('{i}', str(i)))
      yield fmt(hf_key), tuple(fmt(o) for o in ours), transform


def _compile(rows: Sequence[Row]) -> List[Tuple[re.Pattern, Row]]:
  """Each template as a regex (``{i}`` -> the layer number); GPT-2's prefix is optional."""
  out = []
  for row in rows:
    pattern = re.escape(row[0]).replace(re.escape('{i}'), r'(\d+)')
    if pattern.startswith(re.escape('transformer.')):
      pattern = '(?:' + re.escape('transformer.') + ')?' + pattern[len(re.escape('transformer.')):]
    out.append((re.compile(pattern + '$'), row))
  return out


def _path_tuple(path: str) -> Tuple[Any, ...]:
  return tuple(int(p) if p.isdigit() else p for p in path.split('.'))


# ---- loading ---------------------------------------------------------------------------------------

def _weight_files(model_dir: str) -> List[str]:
  index = os.path.join(model_dir, 'model.safetensors.index.json')
  if os.path.exists(index):
    with open(index) as f:
      names = sorted(set(json.load(f)['weight_map'].values()))
    return [os.path.join(model_dir, n) for n in names]
  single = os.path.join(model_dir, 'model.safetensors')
  if os.path.exists(single):
    return [single]
  files = sorted(glob.glob(os.path.join(model_dir, '*.safetensors')))
  if not files:
    bins = glob.glob(os.path.join(model_dir, '*.bin')) + glob.glob(os.path.join(model_dir, '*.pt'))
    hint = ' (found PyTorch .bin files: re-save with save_pretrained(safe_serialization=True))' \
        if bins else ''
    raise FileNotFoundError(f'no *.safetensors weights in {model_dir!r}{hint}')
  return files


def read_config(model_dir: str) -> Dict[str, Any]:
  path = os.path.join(model_dir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{model_dir!r} has no config.json (expected a Hugging Face model dir)')
  with open(path) as f:
    return json.load(f)


def abstract_model(config: TransformerConfig) -> Tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, abstract state) of ``Transformer(config)``; nothing is allocated."""
  # jax.eval_shape, not nnx.eval_shape: under an active mesh (sharding.use_mesh) the latter reads the
  # parameters' logical names as mesh axes
  return jax.eval_shape(lambda: nnx.split(Transformer(config, rngs=nnx.Rngs(0))))


def load_pretrained(model_dir: str, *, mesh=None, rules: Optional[sharding.Rules] = None,
                    dtype: str = 'float32', param_dtype: str = 'float32'
                    ) -> Tuple[TransformerConfig, nnx.State]:
  """Loads a local Hugging Face model directory into our ``Transformer``'s parameters.

  Args:
    model_dir: a directory with config.json and model.safetensors (or sharded safetensors with
      model.safetensors.index.json).
    mesh: where the parameters live; default a one-device mesh on ``jax.devices()[0]``.
    rules: logical -> mesh axis rules (default: the active ``sharding.use_mesh``'s, else ``DEFAULT_RULES``).
    dtype: compute dtype of the returned config; param_dtype: dtype the weights are cast to.

  Returns:
    (config, params): ``nnx.merge(abstract_model(config)[0], params)`` is the model.

  Raises:
    ValueError for unsupported families/options, unknown or missing tensors and shape mismatches.
  """
  from safetensors import safe_open

  config = config_from_hf(read_config(model_dir), dtype=dtype, param_dtype=param_dtype)
  ignored = [re.compile(p + '$') for p in _IGNORED_KEYS]

  def tensors():
    for path in _weight_files(model_dir):
      with safe_open(path, framework='numpy') as f:
        for key in f.keys():
          if any(p.match(key) for p in ignored) or (config.tie_embeddings and key == 'lm_head.weight'):
            continue
          yield (f'{path}: {key}', key, tuple(f.get_slice(key).get_shape()),
                 lambda f=f, key=key: f.get_tensor(key))

  return config, place_tensors(config, tensors(), source=model_dir, mesh=mesh, rules=rules,
                               param_dtype=param_dtype)


# (where, Hugging Face key, shape in Hugging Face layout, load() -> that array)
HfTensor = Tuple[str, str, Tuple[int, ...], Callable[[], np.ndarray]]


def place_tensors(config: TransformerConfig, tensors: Iterable[HfTensor], *, source: str, mesh=None,
                  rules: Optional[sharding.Rules] = None, param_dtype: str = 'float32') -> nnx.State:
  """Our parameters from Hugging Face tensors of any source (safetensors here, GGUF in gguf.py).

  Each tensor is matched to its row of ``weight_table``, its shape checked before it is read, then loaded,
  transformed to our layout and put straight onto its ``NamedSharding`` (each device gets only its shard).

  Args:
    tensors: (where, Hugging Face key, shape in Hugging Face layout, load) tuples, ``where`` naming the tensor
      in errors; ``load()`` is called once, when the tensor is placed.
    source: the checkpoint, named in errors; mesh, rules: as ``load_pretrained``'s.
  Raises:
    ValueError for a tensor with no place in the model, a shape mismatch, or parameters no tensor fills.
  """
  if mesh is None:
    mesh = sharding.make_mesh([('data', 1), ('fsdp', 1), ('tensor', 1)], jax.devices()[:1])
  _, abstract = abstract_model(config)
  rules = sharding.active_rules() if rules is None else rules
  shardings = dict(sharding.state_shardings(mesh, rules, abstract).flat_state())
  variables = dict(abstract.flat_state())
  target_dtype = jnp.dtype(param_dtype)
  compiled = _compile(weight_table(config))
  values: Dict[Tuple[Any, ...], jax.Array] = {}
  for where, key, shape_hf, load in tensors:
    for pattern, (_, ours, transform) in compiled:
      m = pattern.match(key)
      if m:
        break
    else:
      raise ValueError(f'{where}: tensor {key!r} has no place in our {config.family} model '
                       f'(unsupported option or architecture?)')
    targets = [_path_tuple(o.replace('{i}', m.group(1)) if m.groups() else o) for o in ours]
    missing = [t for t in targets if t not in variables]
    if missing:
      raise ValueError(f'{where}: tensor {key!r} maps to {missing}, which the model lacks '
                       f'(layer index beyond num_layers?)')
    shapes = [tuple(variables[t].get_value().shape) for t in targets]
    expected = tuple(transform.hf_shape(shapes))
    if tuple(shape_hf) != expected:
      raise ValueError(f'{where}: tensor {key!r} has shape {tuple(shape_hf)}, expected '
                       f'{expected} for {[".".join(map(str, t)) for t in targets]}')
    for t, shape, ours_array in zip(targets, shapes, transform.to_ours(load(), shapes)):
      assert ours_array.shape == shape, (key, t, ours_array.shape, shape)
      host = np.ascontiguousarray(ours_array.astype(target_dtype))
      values[t] = jax.make_array_from_callback(shape, shardings[t].get_value(), lambda idx, h=host: h[idx])
  missing = sorted('.'.join(map(str, p)) for p in variables if p not in values)
  if missing:
    raise ValueError(f'{source}: the checkpoint lacks tensors for {missing[:8]}'
                     f'{" ..." if len(missing) > 8 else ""}')
  return nnx.from_flat_state([(p, v.replace(values[p])) for p, v in variables.items()])


def resize_vocab(config: TransformerConfig, params: nnx.State, vocab_size: int, *, mesh=None,
                 rules: Optional[sharding.Rules] = None
                 ) -> Tuple[TransformerConfig, nnx.State]:
  """Grows the vocabulary to ``vocab_size`` rows, e.g. after ``tokenizer.load_tokenizer`` added our
  role / end-of-turn tokens to a pretrained tokenizer.

  New embedding rows (and LM-head columns) start at the mean of the existing ones, so the new tokens
  begin with the average logit instead of an arbitrary one (Hewitt 2021, "Initializing new word
  embeddings for pretrained language models"). Shrinking is refused.

  Returns:
    (config with the new vocab_size, params placed by ``mesh`` / ``rules``; default one device).
  """
  old = config.vocab_size
  if vocab_size < old:
    raise ValueError(f'cannot shrink the vocabulary from {old} to {vocab_size}')
  if vocab_size == old:
    return config, params
  new_config = dataclasses.replace(config, vocab_size=vocab_size)
  if mesh is None:
    mesh = sharding.make_mesh([('data', 1), ('fsdp', 1), ('tensor', 1)], jax.devices()[:1])
  rules = sharding.active_rules() if rules is None else rules
  out_shardings = sharding.state_shardings(mesh, rules, abstract_model(new_config)[1])

  def grow(state):
    def pad(x, axis):
      mean = jnp.mean(x.astype(jnp.float32), axis=axis, keepdims=True).astype(x.dtype)
      reps = [1] * x.ndim
      reps[axis] = vocab_size - old
      return jnp.concatenate([x, jnp.tile(mean, reps)], axis=axis)

    flat = dict(state.flat_state())
    out = []
    for path, v in flat.items():
      if path == ('trunk', 'embedding'):
        v = v.replace(pad(v.get_value(), 0))
      elif path == ('lm_head',):
        v = v.replace(pad(v.get_value(), 1))
      out.append((path, v))
    return nnx.from_flat_state(out)

  return new_config, jax.jit(grow, out_shardings=out_shardings)(params)


# ---- export ----------------------------------------------------------------------------------------

def _to_host(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def export(config: TransformerConfig, params: Any, out_dir: str, *,
           tokenizer_dir: Optional[str] = None, family: Optional[str] = None,
           save_dtype: Optional[str] = None, hf_overrides: Optional[Dict[str, Any]] = None) -> str:
  """Writes a Hugging Face model directory that transformers loads as ``family``.

  Args:
    config: the model's config (its ``family`` is the default export family; our own configs
      export as 'llama' or 'gpt2' by style).
    params: the model's nnx.State (or an ``nnx.Module``).
    out_dir: the directory to write; replaced atomically (temp dir, then rename).
    tokenizer_dir: tokenizer files (and generation_config.json) copied from here; when it also
      holds a config.json, its bos/eos/pad token ids are carried over.
    family: override the family (e.g. a native model as 'llama').
    save_dtype: dtype of the written tensors; default that of the params.
    hf_overrides: extra config.json entries (e.g. ``{'eos_token_id': 7}``).

  Returns:
    ``out_dir``.
  """
  from safetensors.numpy import save_file

  if isinstance(params, nnx.Module):
    params = nnx.state(params)
  family = _family_of(config, family)
  flat = {p: v.get_value() if isinstance(v, nnx.Variable) else v
          for p, v in nnx.to_flat_state(params)}
  first = next(iter(flat.values()))
  dtype = jnp.dtype(save_dtype or first.dtype)
  hf_config = config_to_hf(config, family, torch_dtype=str(dtype))
  if tokenizer_dir and os.path.exists(os.path.join(tokenizer_dir, 'config.json')):
    source = read_config(tokenizer_dir)
    hf_config.update({k: source[k] for k in ('bos_token_id', 'eos_token_id', 'pad_token_id')
                      if k in source})
  hf_config.update(hf_overrides or {})

  tensors: Dict[str, np.ndarray] = {}
  for hf_key, ours, transform in _expand(weight_table(config, family), config.num_layers):
    arrays = []
    for o in ours:
      p = _path_tuple(o)
      if p not in flat:
        raise ValueError(f'params lack {o!r}, needed for {hf_key!r}')
      arrays.append(_to_host(flat[p]))
    tensor = np.ascontiguousarray(transform.to_hf(*arrays).astype(dtype))
    assert tensor.shape == tuple(transform.hf_shape([a.shape for a in arrays])), hf_key
    tensors[hf_key] = tensor

  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(out_dir)}.tmp-')
  try:
    save_file(tensors, os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)
    if tokenizer_dir:
      for name in TOKENIZER_FILES:
        src = os.path.join(tokenizer_dir, name)
        if os.path.exists(src):
          shutil.copy2(src, os.path.join(tmp, name))
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(out_dir)}.old-')
      os.rmdir(old)
      os.rename(out_dir, old)
      os.rename(tmp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir
