"""What experiments/vllm_check.py checks on the iterppo_jax side: a tiny random checkpoint of each Hugging Face
family, loaded (models/hf.load_pretrained), its weights moved as training would, exported (models/hf.export),
then generated from greedily by transformers and by our sampler; and the rows that compare both with vLLM's
tokens (which the experiment gets from a worker in vLLM's own Python)."""

from __future__ import annotations

import json
import os

from iterppo_jax import errors

FAMILIES = ("llama", "qwen2", "mistral", "gemma", "gpt2")
NEW_TOKENS = 8
PROMPTS = ((5, 17, 99, 3, 250, 41, 7), (200, 12, 12, 64, 1, 130, 77), (9, 8, 7, 6, 5, 4, 3))


def _hf_config(transformers, family: str):
  sizes = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=64, eos_token_id=2, bos_token_id=1)
  if family == "llama":
    return transformers.LlamaConfig(**sizes)
  if family == "qwen2":
    return transformers.Qwen2Config(**sizes)
  if family == "mistral":
    return transformers.MistralConfig(**sizes, sliding_window=None)
  if family == "gemma":
    return transformers.GemmaConfig(**sizes, head_dim=64)
  if family == "gpt2":
    return transformers.GPT2Config(vocab_size=256, n_embd=128, n_layer=2, n_head=2, n_positions=64, bos_token_id=1,
                                   eos_token_id=2)
  raise errors.SettingsError(f"unknown family {family!r}; expected one of {FAMILIES}")


def export_family(family: str, workdir: str, seed: int = 0) -> dict:
  """Builds, loads, moves and exports one family; returns the export dir and transformers' and our tokens."""
  import jax
  import numpy as np
  import torch
  import transformers

  from iterppo_jax import sampling
  from iterppo_jax.models import hf

  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(_hf_config(transformers, family)).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # weights at a scale where every tensor matters
    for name, p in model.named_parameters():
      centre = 1.0 if ("norm" in name or "ln_" in name) and name.endswith("weight") else 0.0
      p.copy_(centre + 0.15 * torch.randn(p.shape, generator=gen))
  source = os.path.join(workdir, family, "source")
  model.save_pretrained(source)

  config, params = hf.load_pretrained(source)
  keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(params))))
  moved = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(next(keys), x.shape, x.dtype), params)
  out = hf.export(config, moved, os.path.join(workdir, family, "export"))

  prompts = np.asarray(PROMPTS, np.int32)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    theirs = reloaded.generate(torch.tensor(prompts, dtype=torch.long), max_new_tokens=NEW_TOKENS, do_sample=False,
                               min_new_tokens=NEW_TOKENS, pad_token_id=0)[:, prompts.shape[1]:].numpy()
  graphdef, _ = hf.abstract_model(config)
  ours = sampling.sample(graphdef, moved, prompts, np.ones(prompts.shape, bool), jax.random.key(0),
                         max_new_tokens=NEW_TOKENS, greedy=True, eos_id=2, pad_id=0, ignore_eos=True).tokens
  with open(os.path.join(out, "config.json")) as f:
    written = json.load(f)
  return {"export": out, "architectures": written["architectures"], "model_type": written["model_type"],
          "transformers_class": type(reloaded).__name__, "transformers": np.asarray(theirs).tolist(),
          "ours": np.asarray(ours).tolist()}


def compare(families, ours: dict, theirs: dict) -> tuple[list[dict], bool]:
  """One row per family: the export's and vLLM's architecture, and whether vLLM's, transformers' and our greedy
  tokens agree; and whether every family passed."""
  rows, ok = [], True
  for family in families:
    a, v = ours[family], theirs[family]
    row = {"family": family, "exported_architectures": a["architectures"], "vllm_architectures": v["architecture"],
           "vllm_model_type": v["model_type"], "transformers_class": a["transformers_class"],
           "vllm_equals_transformers": v["tokens"] == a["transformers"], "ours_equals_transformers":
           a["ours"] == a["transformers"], "error": v["error"], "tokens": {"transformers": a["transformers"],
                                                                            "ours": a["ours"], "vllm": v["tokens"]}}
    row["same_family"] = (v["architecture"] == a["architectures"] and v["model_type"] == a["model_type"])
    ok &= row["same_family"] and row["vllm_equals_transformers"] and row["ours_equals_transformers"]
    rows.append(row)
  return rows, ok
