r"""Throughput of the jitted pieces: sampler, SFT step, Q-fit step, and a PPO iteration split by phase.

  python -m experiments.benchmark --config=configs/benchmark.py                 # ppo_tiny, CPU-sized
  python -m experiments.benchmark --config=configs/benchmark.py:ppo_0p5b        # Qwen2.5-0.5B shapes, a GPU
  python -m experiments.benchmark --config=configs/benchmark.py --config.iterations=10

Workloads are named shapes (a plain lookup below); any key can still be overridden with --config.key=value.
"""

import ml_collections


def _gpu(**model) -> dict:
  """An accelerator workload: bf16 compute over f32 params, 32 prompts of 48 tokens and 128 new ones, H100 peaks
  (bf16 dense 989 TFLOP/s, SXM HBM 3350 GB/s) for the MFU and HBM columns."""
  return dict(model=dict(dtype="bfloat16", param_dtype="float32", **model),
              batch=dict(prompts=32, prompt_len=48, new_tokens=128), peak_tflops=989.0, peak_hbm_gbps=3350.0)


# Named workloads: model shape and batch. Everything not named here takes the defaults in get_config.
WORKLOADS = {
    # A CPU-sized policy: every number in the table comes back in about a minute on two cores.
    "ppo_tiny": dict(model=dict(num_layers=4, embed_dim=256, mlp_dim=1024, num_heads=4, num_kv_heads=4,
                                head_dim=64, vocab_size=2048, tie_embeddings=False),
                     batch=dict(prompts=16, prompt_len=48, new_tokens=32)),
    # Qwen2.5-0.5B shapes (24 layers, GQA 14/2, vocab 151936, untied here).
    "ppo_0p5b": _gpu(num_layers=24, embed_dim=896, mlp_dim=4864, num_heads=14, num_kv_heads=2, head_dim=64,
                     vocab_size=151936, tie_embeddings=False, rope_theta=1000000.0),
    # Llama-3.2-1B shapes (16 layers, width 2048, GQA 32/8, vocab 128256, tied): issue 3's GPU row.
    "llama_1b": _gpu(num_layers=16, embed_dim=2048, mlp_dim=8192, num_heads=32, num_kv_heads=8, head_dim=64,
                     vocab_size=128256, tie_embeddings=True, rope_theta=500000.0),
    # Llama-3.2-3B and Llama-3.1-8B shapes, for the largest-model search on one GPU (sweep.workloads); add
    # --config.model.remat=True, --config.model.param_dtype=bfloat16 to trade compute and precision for memory.
    "llama_3b": _gpu(num_layers=28, embed_dim=3072, mlp_dim=8192, num_heads=24, num_kv_heads=8, head_dim=128,
                     vocab_size=128256, tie_embeddings=True, rope_theta=500000.0),
    "llama_8b": _gpu(num_layers=32, embed_dim=4096, mlp_dim=14336, num_heads=32, num_kv_heads=8, head_dim=128,
                     vocab_size=128256, tie_embeddings=False, rope_theta=500000.0),
    # SmolLM2-135M-Instruct's shapes (configs/sales_smollm.py) with its LoRA, at a laptop's batch: how long the
    # CPU preset's sampling, SFT, Q-fit and PPO take per token (random weights: the timings do not depend on them).
    "smollm2": dict(model=dict(num_layers=30, embed_dim=576, mlp_dim=1536, num_heads=9, num_kv_heads=3, head_dim=64,
                               vocab_size=49152, tie_embeddings=True, rope_theta=100000.0),
                    batch=dict(prompts=16, prompt_len=256, new_tokens=40), lora=dict(rank=8), iterations=2),
    # Smaller than tiny, for the benchmark's own smoke test.
    "smoke": dict(model=dict(num_layers=1, embed_dim=64, mlp_dim=128, num_heads=2, num_kv_heads=2, head_dim=32,
                             vocab_size=128, tie_embeddings=False),
                  batch=dict(prompts=8, prompt_len=8, new_tokens=4), ppo=dict(minibatch_size=4)),
}


def get_config(arg=None):
  workload = arg or "ppo_tiny"
  if workload not in WORKLOADS:
    raise ValueError(f"unknown benchmark workload {workload!r}; expected one of {', '.join(WORKLOADS)}")
  c = ml_collections.ConfigDict()
  c.workload = workload  # the name printed with the table
  c.seed = 0  # parameters, prompts and sampling keys
  c.iterations = 5  # timed calls of each piece after the first (compiling) call; the table shows their mean
  c.peak_tflops = 0.0  # per-device peak for MFU (H100 bf16 dense: 989); 0 leaves the MFU column empty
  c.peak_hbm_gbps = 0.0  # per-device memory bandwidth for the HBM column (H100 SXM: 3350); 0 leaves it empty
  c.xla_flags = ""  # appended to XLA_FLAGS before jax opens its backend (threading experiments on CPU)
  c.pieces = ("sampler", "sft", "qfit", "ppo")  # which rows to time; the sweep times "ppo" only
  c.json_out = ""  # also write the rows, peak device memory and machine (a sweep: its cells) to this JSON file

  # ---- issue #7's scaling table: one PPO iteration per (new_tokens, prompts) cell, each in its own process
  # (a clean peak-memory reading, and a cell that runs out of memory is a row, not the end of the sweep) ----
  c.sweep = ml_collections.ConfigDict()
  c.sweep.new_tokens = ()  # e.g. (128, 512, 2048); empty: no sweep, the usual table
  c.sweep.prompts = ()  # e.g. (32, 128); empty: batch.prompts only
  c.sweep.workloads = ()  # e.g. ("llama_1b", "llama_3b"): the same iteration per named shape (largest that fits)
  c.sweep.cell_timeout_s = 0  # a cell running longer becomes a "timed out" row (bounded device time); 0: no limit

  c.model = ml_collections.ConfigDict()
  c.model.style = "llama"  # llama | gpt2
  c.model.num_layers = 4
  c.model.embed_dim = 256
  c.model.mlp_dim = 1024
  c.model.num_heads = 4
  c.model.num_kv_heads = 4
  c.model.head_dim = 64
  c.model.vocab_size = 2048
  c.model.tie_embeddings = False
  c.model.rope_theta = 10000.0
  c.model.dtype = "float32"  # compute dtype: bfloat16 on accelerators
  c.model.param_dtype = "float32"  # master weights and optimizer state stay f32
  c.model.remat = False  # recompute blocks in the backward pass (memory for compute)

  # LoRA (models/lora.py): rank > 0 trains adapters on frozen weights in the SFT, Q-fit and PPO rows (the
  # model-FLOPs columns still count 6 per parameter per token for training: an upper bound then)
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 16.0
  c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")

  c.batch = ml_collections.ConfigDict()
  c.batch.prompts = 16  # rows of every batch (sampler, SFT, Q-fit, PPO rollout)
  c.batch.prompt_len = 48  # prompt tokens; SFT / Q-fit sequences are prompt_len + new_tokens long
  c.batch.new_tokens = 32  # sampled tokens per row (the sampler row ignores end tokens: always all of them)

  c.ppo = ml_collections.ConfigDict()
  # Issue 7's iteration: one epoch of one minibatch (the whole batch); training configs use more.
  c.ppo.epochs = 1  # passes over each rollout batch
  c.ppo.minibatch_size = 0  # rows per PPO update step; must divide batch.prompts; 0: all of them (one minibatch)
  c.ppo.kl_coef = 0.05

  c.learning_rate = 1e-4  # all optimizers (the value does not change the timings)
  # (axis, size) pairs for sharding.make_mesh; -1 takes the remaining devices.
  c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]

  for section, values in WORKLOADS[workload].items():
    if isinstance(values, dict):
      c[section].update(values)
    else:
      c[section] = values
  return c
