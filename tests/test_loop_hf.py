"""Iterative PPO from a (tiny, local) Hugging Face checkpoint: chat-template rendering and HF export.

The "pretrained" directory is made here without any hub: a BPE trained on simulator text, given a ChatML
chat template, and a tiny random Llama-family model exported with models/hf.py.
"""

import os

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("jinja2")  # transformers renders chat templates with jinja2

from configs import sales_hf  # noqa: E402
from iterppo_jax import conversation as conv_lib  # noqa: E402
from iterppo_jax import loop  # noqa: E402
from iterppo_jax import tokenizer as tok_lib  # noqa: E402
from iterppo_jax.envs import sales  # noqa: E402
from iterppo_jax.models import hf as hf_lib  # noqa: E402
from iterppo_jax.models import transformer as tf  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("pretrained")
  records = sales.SalesEnv().play(sales.make_sales_policy("behavior"), 60, seed=3)
  tok = tok_lib.train_bpe(tok_lib.corpus_from_conversations(records), 400, str(root / "tok"))
  tok.hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
  tok.hf.chat_template = CHATML
  tok.save(str(root / "tok"))
  cfg = tf.TransformerConfig(vocab_size=len(tok.hf), num_layers=1, embed_dim=32, mlp_dim=64, num_heads=2,
                             num_kv_heads=1, head_dim=16, max_len=256)
  params = nnx.split(tf.Transformer(cfg, rngs=nnx.Rngs(7)))[1]
  return hf_lib.export(cfg, params, str(root / "model"), tokenizer_dir=str(root / "tok"), family="llama")


def test_loop_from_a_hf_checkpoint_renders_chats_and_exports(model_dir, tmp_path):
  c = sales_hf.get_config("tiny")
  c.model_dir, c.export_dir = model_dir, str(tmp_path / "export")
  c.loop.iterations, c.loop.tensorboard = 1, False
  c.sft.steps = 2  # a short behaviour-cloning pass on top of the checkpoint
  c.data.max_prompt_len = 160
  c.loop.eval_pretrained = True  # the checkpoint as loaded is evaluated first, on the same customers
  workdir = str(tmp_path / "run")
  summary = loop.run(c, workdir)
  assert len(summary["iterations"]) == 2
  pretrained = conv_lib.read_jsonl(os.path.join(workdir, "data", "eval_pretrained.jsonl"))
  evaluated = conv_lib.read_jsonl(os.path.join(workdir, "data", "eval_0.jsonl"))
  assert len(pretrained) == c.loop.eval_conversations
  assert [r.id for r in pretrained] == [r.id for r in evaluated]  # the same held-out customers
  assert summary["pretrained"]["conversion"] == pytest.approx(np.mean([r.outcome for r in pretrained]))
  assert "| pretrained, before SFT |" in summary["table"] and "where the time went: " in summary["table"]
  assert {"eval_pretrained", "sft", "qfit", "ppo", "eval"} <= set(summary["phase_seconds"])
  # pi_0 started from the checkpoint: its sft-free copy equals the exported-then-loaded weights... and the
  # states the model saw were chats in the checkpoint's template.
  run_, _ = loop.setup(c, workdir)
  assert run_.renderer.name == "chat" and run_.renderer.end_text == "<|im_end|>"
  logs = conv_lib.read_jsonl(os.path.join(workdir, "data", "behavior.jsonl"))
  prompt = run_.examples(logs[:1])[0].prompt
  assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
  # The final policy came back out as a Hugging Face directory of the same family, equal to the checkpoint.
  assert summary["export_dir"] == c.export_dir
  cfg, exported = hf_lib.load_pretrained(c.export_dir)
  assert cfg.family == "llama" and cfg.vocab_size == run_.model_cfg.vocab_size
  final = loop.restore_params(run_, "policy", 1, exported)
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(final)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0)
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = transformers.AutoModelForCausalLM.from_pretrained(c.export_dir)
  assert model.config.model_type == "llama"
  ids = np.asarray([[5, 9, 11, 3]])
  with torch.no_grad():
    theirs = model(torch.tensor(ids)).logits.numpy()
  ours = nnx.merge(hf_lib.abstract_model(cfg)[0], exported)(ids, np.arange(4)[None])[0]
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


def test_sales_hf_argument_is_the_hf_config():
  """`--config=configs/sales.py:hf` (the issue's spelling) is configs/sales_hf.py; `:hf,tiny` its tiny sizes."""
  from configs import sales
  assert sales.get_config("hf").to_dict() == sales_hf.get_config().to_dict()
  assert sales.get_config("hf,tiny").to_dict() == sales_hf.get_config("tiny").to_dict()
  assert "model_dir" in sales.get_config("hf") and "model_dir" not in sales.get_config()
