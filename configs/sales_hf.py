r"""Iterative PPO on the sales simulator starting from a pretrained Hugging Face LLM.

  python -m experiments.iterative_ppo --config=configs/sales_hf.py --workdir=/tmp/ippo_hf \
      --config.model_dir=/models/Qwen2-0.5B-Instruct

The model directory is a local Hugging Face checkpoint (config.json, tokenizer files, *.safetensors)
of a Llama, Qwen2, Mistral, Gemma (1) or GPT-2 family model (iterppo_jax/models/hf.py refuses
anything else with a message saying why). Its config.json fixes the architecture, so the
``model.*`` size keys inherited from configs/sales.py are ignored when ``model_dir`` is set; its
tokenizer is used unless ``tokenizer.path`` says otherwise, and states are rendered with its chat
template when it has one (iterppo_jax/chat_format.py).

Everything else is configs/sales.py, with sizes for a ~0.5-3B model on accelerators: bf16 compute,
smaller batches, small learning rates, and few SFT steps since pi_0 is already a language model.
`:tiny` keeps the tiny sizes of configs/sales.py (for tests with a tiny local checkpoint).
"""

from configs import common
from configs import sales


def get_config(arg=None):
  args = common.parse_arg(arg, tiny=False)
  c = sales.get_config(arg)

  # ---- the pretrained model ----
  # A local HF model dir (config.json + *.safetensors + tokenizer), or a Llama-family .gguf file (models/gguf.py:
  # tokenizer and chat template from its metadata); '' = train from scratch.
  c.model_dir = ""
  c.export_dir = ""  # if set, the final policy is also written here as an HF model of the same family
  c.data.chat_template = True  # render states/actions with the tokenizer's chat template when it has one
  c.data.system_prompt = ""  # opens every state (the business goal, for a prompted pi_0); '' = the template's

  if args["tiny"]:
    c.sft.steps = 0  # a pretrained pi_0 is deployed as is
    return c

  # ---- compute: bf16 matmuls, f32 master weights (Adam moments in bf16 lose small updates) ----
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = True  # recompute block activations in the backward pass: long prompts, big models

  # ---- tokens: real tokenizers and chat templates make states longer than our own BPE tags ----
  c.tokenizer.path = ""  # '' = the tokenizer in model_dir (our role/turn tokens are added to it)
  c.data.max_prompt_len = 512  # 6 rounds of history in a chat template (~300-450 tokens)
  c.data.max_action_len = 48  # a sales message of one or two sentences plus the end-of-turn token

  # ---- SFT: pi_0 is pretrained; a short behaviour-cloning pass teaches the sales register ----
  c.sft.steps = 50  # 0 deploys the pretrained model as pi_0 unchanged
  c.sft.batch_size = 16
  c.sft.learning_rate = 1e-5  # full fine-tuning of a pretrained LM: 100x below from-scratch rates
  c.sft.warmup_steps = 10

  # ---- Q-fit: trunk from pi_k, fresh scalar head ----
  c.qfit.steps = 200
  c.qfit.batch_size = 16
  c.qfit.learning_rate = 1e-5

  # ---- PPO ----
  c.ppo.learning_rate = 1e-6  # policy steps on an LLM must be small to stay near pi_k
  c.ppo.critic.learning_rate = 1e-5
  c.ppo.batch_size = 32  # prompts per rollout batch
  c.ppo.minibatch_size = 8
  c.ppo.steps = 20

  # ---- the outer loop ----
  c.loop.play_batch = 64  # conversations advanced in lock-step when the LLM plays (KV cache memory)
  c.loop.first_data = "behavior"  # the staff's logs: an LLM pi_0 deployed on CPU costs minutes per 100 conversations
  c.qfit.pool = 0  # pooling samples pi_k at every state of D_{k-1}: as costly for an LLM as deploying it
  c.loop.true_q_states = 8
  c.loop.true_q_rollouts = 4

  # ---- devices: FSDP over every device (parameters and Adam state sharded along 'embed') ----
  c.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1))
  return c
