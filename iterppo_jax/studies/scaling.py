"""How simulation scales with processes (issue #19): conversations per second of deploying pi_0 on P processes.

Every process of a multi-process run plays its own block of an iteration's conversations on its own devices
(workdir.play_and_log, distributed.py), so the collect and evaluation phases should speed up with the number of
processes until the machine's cores run out. `play_rate` measures that in the loop's own way: the run's sized
model (a fresh init: the rate depends on sizes, not on weights) deployed as an LMPolicy on the sales simulator,
each process its shard of `conversations` after an untimed warm-up batch that compiles the sampler's shapes.
experiments/simulate_scaling.py launches it with 1, 2, 4 processes and prints the table.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from flax import nnx

from iterppo_jax import distributed
from iterppo_jax import io_utils
from iterppo_jax import lm_policy
from iterppo_jax import settings
from iterppo_jax import tokenizer as tok_lib
from iterppo_jax.envs import registry
from iterppo_jax.models import transformer as tf


def _policy(config: settings.Settings, tokenizer, mesh) -> lm_policy.LMPolicy:
  from iterppo_jax import loop  # the loop's model shape; imported on use (loop imports the studies' report)
  encoding = loop.make_encoding(config, tokenizer)
  cfg = loop.model_config(config, encoding)
  graphdef, params = nnx.split(tf.Transformer(cfg, rngs=nnx.Rngs(config.seed)))
  return loop.make_lm_policy(config, "pi_0", graphdef, params, encoding, config.seed, mesh=mesh)


def play_rate(config, conversations: int, out_dir: str) -> dict:
  """Plays this process's share of `conversations` with pi_0 and times it; process 0 writes out_dir/rate.json.

  Returns (on every process) {'processes', 'conversations', 'seconds', 'conversations_per_second',
  'per_process_seconds'}; the rate counts all processes' conversations over the slowest one's wall time, between
  two barriers.
  """
  config = settings.load(config)
  domain = registry.domain(config.env)
  env = domain.make_env()
  tok_dir = os.path.join(out_dir, "tokenizer")
  if distributed.is_writer():
    behaviour = domain.policy("behavior")
    logs = env.play(behaviour, 200, seed=config.seed)
    tok_lib.train_bpe(tok_lib.corpus_from_conversations(logs), config.tokenizer.vocab_size, tok_dir)
  distributed.barrier("tokenizer")
  tokenizer = tok_lib.load_tokenizer(tok_dir)
  mesh = distributed.local_mesh() if distributed.process_count() > 1 else None
  policy = _policy(config, tokenizer, mesh)
  batch = config.loop.play_batch
  env.play(policy, min(batch, conversations), seed=config.seed + 1, batch_size=batch)  # compiles; not timed
  start, stop = distributed.shard_range(conversations)
  distributed.barrier("timed")
  t0 = time.perf_counter()
  env.play(policy, stop - start, seed=config.seed, start=start, batch_size=batch)
  mine = time.perf_counter() - t0
  distributed.barrier("played")
  wall = time.perf_counter() - t0
  per_process = [float(s) for s in np.asarray(_gathered(mine)).reshape(-1)]
  out = {"processes": distributed.process_count(), "devices": jax.device_count(), "conversations": conversations,
         "seconds": wall, "conversations_per_second": conversations / wall, "per_process_seconds": per_process}
  if distributed.is_writer():
    io_utils.atomic_write_json(os.path.join(out_dir, "rate.json"), out)
  return out


def _gathered(value: float):
  """[P] every process's `value`."""
  if distributed.process_count() == 1:
    return np.asarray([value])
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(np.asarray([value], np.float64))


def table(rows: list[dict]) -> str:
  """Markdown table of play_rate results, with the speed-up over the first row."""
  base = rows[0]["conversations_per_second"] if rows else 1.0
  lines = ["| processes | conversations | wall s | conversations/s | speed-up | slowest / fastest process s |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    per = r["per_process_seconds"]
    lines.append(f"| {r['processes']} | {r['conversations']} | {r['seconds']:.1f} | "
                 f"{r['conversations_per_second']:.1f} | {r['conversations_per_second'] / base:.2f}x | "
                 f"{max(per):.1f} / {min(per):.1f} |")
  return "\n".join(lines)


def read_rate(out_dir: str) -> dict:
  with open(os.path.join(out_dir, "rate.json")) as f:
    return json.load(f)
