"""Hugging Face import/export (models/hf.py) against transformers itself, on tiny random models.

For each supported family a tiny transformers model (2 layers, D=64, 4 heads, 2 kv heads, V=128)
is built in float32 with PyTorch, its weights randomised at a scale where a wrong transpose, norm
or bias shows up, saved with save_pretrained and loaded with ``hf.load_pretrained``. Checked: logits
on random tokens, greedy generations (our sampler vs ``generate(do_sample=False)``), and the
exported directory read back by ``AutoModelForCausalLM``. No network: everything is local.

The sharded-load check runs this file as a script in a subprocess with 8 forced host devices.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from iterppo_jax import sampling  # noqa: E402
from iterppo_jax.models import hf  # noqa: E402
from iterppo_jax.models import transformer as tr  # noqa: E402

V, T, NEW = 128, 12, 8
_SIZES = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# Llama-3.1 RoPE scaling at toy scale: with theta 1e4, head_dim 16 and orig 32 the wavelengths
# 6.3, 20, 63, ... fall below orig/high = 8 (kept), between (smoothed) and above orig/low = 32
# (scaled): all three regimes.
_LLAMA3_ROPE = {'rope_type': 'llama3', 'rope_theta': 10000.0, 'factor': 8.0,
                'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                'original_max_position_embeddings': 32}

FAMILIES = {
    'llama': lambda: transformers.LlamaConfig(**_SIZES),
    'llama3_tied': lambda: transformers.LlamaConfig(**_SIZES, rope_parameters=_LLAMA3_ROPE,
                                                    tie_word_embeddings=True),
    'qwen2': lambda: transformers.Qwen2Config(**_SIZES, rope_parameters={
        'rope_type': 'default', 'rope_theta': 1000000.0}),
    # A window shorter than the test sequences, so the sliding-window mask is exercised.
    'mistral': lambda: transformers.MistralConfig(**_SIZES, sliding_window=5),
    'gemma': lambda: transformers.GemmaConfig(**_SIZES, head_dim=16),
    'gpt2': lambda: transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4,
                                            n_positions=64, bos_token_id=1, eos_token_id=2),
}


def _randomise(model, seed):
  """Weights at a scale where every tensor matters (HF inits norms to 1/0 and weights tiny)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      centre = 1.0 if ('norm' in name or 'ln_' in name) and name.endswith('weight') else 0.0
      p.copy_(centre + 0.15 * torch.randn(p.shape, generator=gen))
  return model


def _hf_model(family, seed=0):
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
  model.generation_config.eos_token_id = None  # generate exactly NEW tokens
  model.generation_config.pad_token_id = 0
  return _randomise(model, seed)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


def _our_logits(config, params, tokens):
  graphdef, _ = hf.abstract_model(config)
  model = nnx.merge(graphdef, params)
  B, L = tokens.shape
  return np.asarray(model(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(L), (B, L)))[0])


def _tokens(seed, shape=(3, T)):
  return np.random.default_rng(seed).integers(0, V, size=shape).astype(np.int32)


def _tensor_index(directory):
  """{tensor name: (shape, dtype)} over every *.safetensors file of a model directory."""
  from safetensors import safe_open
  index = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith('.safetensors'):
      with safe_open(os.path.join(directory, name), framework='pt') as f:
        for key in f.keys():
          t = f.get_slice(key)
          index[key] = (tuple(t.get_shape()), t.get_dtype())
  assert index, f'no safetensors in {directory}'
  return index


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def loaded(request, tmp_path_factory):
  family = request.param
  model = _hf_model(family)
  path = str(tmp_path_factory.mktemp(family) / 'hf')
  model.save_pretrained(path)
  config, params = hf.load_pretrained(path)
  return family, model, path, config, params


def test_logits_match_transformers(loaded):
  family, model, _, config, params = loaded
  tokens = _tokens(1)
  ours, theirs = _our_logits(config, params, tokens), _hf_logits(model, tokens)
  assert np.abs(theirs).max() > 1.0  # logits at a scale where mistakes show
  diff = float(np.abs(ours - theirs).max())
  print(f'{family}: max |logit diff| = {diff:.2e}')
  assert diff < 1e-4, (family, diff)


def test_greedy_generation_matches_transformers(loaded):
  family, model, _, config, params = loaded
  prompts = _tokens(2, (2, 6))
  with torch.no_grad():
    theirs = model.generate(torch.tensor(prompts), do_sample=False, max_new_tokens=NEW,
                            attention_mask=torch.ones(prompts.shape, dtype=torch.long))
  theirs = theirs[:, prompts.shape[1]:].numpy()
  graphdef, _ = hf.abstract_model(config)
  out = sampling.sample(graphdef, params, prompts, np.ones(prompts.shape, bool),
                        jax.random.key(0), max_new_tokens=NEW, greedy=True, eos_id=0, pad_id=0,
                        ignore_eos=True)
  np.testing.assert_array_equal(np.asarray(out.tokens), theirs, err_msg=family)


def test_export_reloads_in_transformers(loaded, tmp_path):
  family, model, path, config, params = loaded
  out = hf.export(config, params, str(tmp_path / 'export'), tokenizer_dir=path)
  with open(os.path.join(out, 'config.json')) as f:
    written = json.load(f)
  assert written['model_type'] == model.config.model_type
  assert written['eos_token_id'] == model.config.eos_token_id
  # What a serving engine (vLLM) reads besides config.json: the architecture class and the tensors by their
  # Hugging Face names. Both must be exactly what transformers itself writes for this model.
  assert written['architectures'] == model.config.architectures == [type(model).__name__]
  assert _tensor_index(out) == _tensor_index(path)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(reloaded) is type(model)
  tokens = _tokens(3)
  np.testing.assert_allclose(_hf_logits(reloaded, tokens), _hf_logits(model, tokens),
                             atol=1e-6, rtol=0)
  # And back into ours: the same config.
  assert hf.load_pretrained(out)[0] == config


def test_multi_shard_bf16_checkpoint(tmp_path):
  model = _hf_model('llama').to(torch.bfloat16)
  model.save_pretrained(str(tmp_path), max_shard_size='40KB')
  assert os.path.exists(tmp_path / 'model.safetensors.index.json')
  assert len([n for n in os.listdir(tmp_path) if n.endswith('.safetensors')]) > 2
  config, params = hf.load_pretrained(str(tmp_path))
  flat = {'.'.join(map(str, p)): np.asarray(v.get_value()) for p, v in params.flat_state()}
  assert all(v.dtype == np.float32 for v in flat.values())
  want = model.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(flat['trunk.blocks.1.mlp.down'], want)
  # bf16 parameters stay bf16.
  _, params16 = hf.load_pretrained(str(tmp_path), dtype='bfloat16', param_dtype='bfloat16')
  assert {v.get_value().dtype for _, v in params16.flat_state()} == {jnp.dtype('bfloat16')}
  # ... and export as bf16 tensors, bit-identical to the checkpoint's.
  out = hf.export(config, params16, str(tmp_path / 'bf16_export'))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert reloaded.dtype == torch.bfloat16
  for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
    assert torch.equal(a, b), name


@pytest.mark.parametrize('style', ['llama', 'gpt2'])
def test_native_model_exports_as_hf(style, tmp_path):
  """A model trained from scratch here (our own config) exports as a Llama / GPT-2 checkpoint."""
  config = tr.TransformerConfig.tiny(V, num_layers=2, embed_dim=64, mlp_dim=128, num_heads=4,
                                     num_kv_heads=2 if style == 'llama' else 4, head_dim=16,
                                     max_len=64, style=style)
  model = tr.Transformer(config, rngs=nnx.Rngs(0))
  params = nnx.state(model)
  out = hf.export(config, params, str(tmp_path / 'native'))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert reloaded.config.model_type == style
  tokens = _tokens(4)
  diff = np.abs(_hf_logits(reloaded, tokens) - _our_logits(config, params, tokens)).max()
  assert diff < 1e-4, diff
  # Exporting twice replaces the directory atomically.
  hf.export(config, params, out)
  assert sorted(os.listdir(tmp_path)) == ['native']


def test_export_refuses_inexpressible_family(tmp_path):
  config = hf.config_from_hf(FAMILIES['gemma']().to_dict())
  params = nnx.state(tr.Transformer(config, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match='llama cannot express'):
    hf.export(config, params, str(tmp_path / 'x'), family='llama')


_BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize('hf_config, match', [
    (dict(_BASE, model_type='phi'), "model_type 'phi'.*supported families: llama"),
    (dict(_BASE, model_type='mixtral', num_local_experts=8), "model_type 'mixtral'"),
    (dict(_BASE, model_type='gemma2'), "model_type 'gemma2'"),
    (dict(_BASE, model_type='llama', attention_bias=True), 'llama: attention_bias=True'),
    (dict(_BASE, model_type='llama', num_local_experts=4), 'llama: mixture of experts'),
    (dict(_BASE, model_type='llama', rope_scaling={'rope_type': 'yarn', 'factor': 4.0}),
     "llama: rope type 'yarn'.*'llama3'"),
    (dict(_BASE, model_type='llama', hidden_act='gelu'), "llama: hidden_act='gelu'"),
    (dict(_BASE, model_type='qwen2', use_sliding_window=True, sliding_window=8),
     'qwen2: sliding-window'),
    (dict(_BASE, model_type='gemma', final_logit_softcapping=30.0), 'Gemma 2/3'),
    (dict(model_type='gpt2', vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
          activation_function='relu'), "gpt2: activation_function='relu'"),
])
def test_unsupported_configs_are_refused(hf_config, match):
  with pytest.raises(ValueError, match=match):
    hf.config_from_hf(hf_config)


def test_unsupported_directory_is_refused(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps(dict(_BASE, model_type='phi3')))
  with pytest.raises(ValueError, match="'phi3'"):
    hf.load_pretrained(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='config.json'):
    hf.load_pretrained(str(tmp_path / 'missing'))


def test_config_old_rope_layout():
  """Checkpoints saved by transformers 4.x keep rope_theta and rope_scaling at the top level."""
  old = dict(_BASE, model_type='llama', rope_theta=500000.0,
             rope_scaling={'rope_type': 'llama3', 'factor': 32.0, 'low_freq_factor': 1.0,
                           'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192},
             tie_word_embeddings=True)
  c = hf.config_from_hf(old)
  assert (c.rope_theta, c.rope_scaling, c.rope_factor, c.rope_original_max_len) == (
      500000.0, 'llama3', 32.0, 8192)
  assert c.tie_embeddings and c.head_dim == 16


def test_llama3_inv_freq_matches_transformers():
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  hf_config = transformers.LlamaConfig(**_SIZES, rope_parameters=_LLAMA3_ROPE)
  theirs, _ = ROPE_INIT_FUNCTIONS['llama3'](hf_config)
  ours = tr.rope_inv_freq(hf.config_from_hf(hf_config.to_dict()))
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-6)


def test_resize_vocab_keeps_old_logits(loaded, tmp_path):
  family, _, _, config, params = loaded
  new_config, grown = hf.resize_vocab(config, params, V + 7)
  assert new_config.vocab_size == V + 7
  tokens = _tokens(6)
  before, after = _our_logits(config, params, tokens), _our_logits(new_config, grown, tokens)
  np.testing.assert_allclose(after[..., :V], before, atol=1e-5)
  assert np.all(np.abs(after[..., V:] - after[..., V:V + 1]) < 1e-5)  # all new tokens alike
  out = hf.export(new_config, grown, str(tmp_path / 'grown'))
  assert transformers.AutoConfig.from_pretrained(out).vocab_size == V + 7
  with pytest.raises(ValueError, match='shrink'):
    hf.resize_vocab(config, params, V - 1)


# ---- sharded load on 8 forced host devices ---------------------------------------------------------

def _sharded_worker(path: str) -> dict:
  from iterppo_jax import sharding
  mesh = sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])
  config, params = hf.load_pretrained(path, mesh=mesh)
  _, single = hf.load_pretrained(path)
  expected = sharding.state_shardings(mesh, sharding.DEFAULT_RULES, hf.abstract_model(config)[1])
  tokens = _tokens(5, (4, T))
  return {
      'devices': jax.device_count(),
      'expected': sharding.describe(expected),
      'actual': sharding.describe(jax.tree.map(lambda x: x.sharding, params)),
      'shards': {k: len(v.get_value().addressable_shards) for k, v in
                 [('.'.join(map(str, p)), v) for p, v in params.flat_state()]
                 if k == 'trunk.blocks.0.mlp.up'},
      'max_abs_diff': float(np.abs(_our_logits(config, params, tokens)
                                   - _our_logits(config, single, tokens)).max()),
  }


def test_sharded_load_on_8_devices(tmp_path):
  model = _hf_model('qwen2')
  model.save_pretrained(str(tmp_path), max_shard_size='60KB')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = os.pathsep.join([root, env.get('PYTHONPATH', '')])
  result = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-5000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['devices'] == 8
  assert report['actual'] == report['expected']
  spec = lambda part: [v for k, v in report['actual'].items() if part in k][0]  # noqa: E731
  assert spec("[0]['mlp']['up']") == ['fsdp', 'tensor']
  assert spec("[0]['attn']['q_proj']") == ['fsdp', 'tensor']
  assert spec("[0]['attn']['q_bias']") == ['tensor']
  assert spec("['embedding']") == ['tensor', 'fsdp']
  assert spec("['final_norm']['scale']") == []
  assert report['shards'] == {'trunk.blocks.0.mlp.up': 8}
  assert report['max_abs_diff'] < 1e-5


if __name__ == '__main__':
  print(json.dumps(_sharded_worker(sys.argv[1])))
