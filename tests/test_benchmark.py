"""Smoke test of experiments/benchmark.py: one timed call of every piece on a workload smaller than ppo_tiny."""

import importlib.util
import os

import pytest

from experiments import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("sampler", "sft step", "qfit step", "ppo generation", "ppo scoring", "ppo update", "ppo iteration")


def _config(arg):
  spec = importlib.util.spec_from_file_location("benchmark_config", os.path.join(ROOT, "configs", "benchmark.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_benchmark_table():
  config = _config("smoke")
  config.iterations = 1
  rows = benchmark.run_benchmark(config)
  assert [r["name"] for r in rows] == list(ROWS)
  for r in rows:
    assert r["ms"] > 0 and r["tokens_per_s"] > 0 and r["compile_s"] >= 0, r
  table = benchmark.format_table(rows, "smoke")
  assert all(name in table for name in ROWS)
  print(table)


def test_workloads():
  tiny, big = _config(None), _config("ppo_0p5b")
  assert (tiny.model.num_layers, tiny.model.embed_dim, tiny.model.vocab_size, tiny.batch.new_tokens) == (4, 256, 2048, 32)
  assert (big.model.num_layers, big.model.embed_dim, big.model.num_heads, big.model.num_kv_heads) == (24, 896, 14, 2)
  assert (big.model.vocab_size, big.model.dtype, big.model.param_dtype) == (151936, "bfloat16", "float32")
  assert (big.batch.prompts, big.batch.new_tokens) == (32, 128)
  with pytest.raises(ValueError, match="unknown benchmark workload"):
    _config("nope")
