"""experiments.baselines_summary: equal-budget rows of several workdirs, merged, with paired differences by seed."""

import os
import subprocess
import sys

import numpy as np
import pytest

from iterppo_jax import errors
from iterppo_jax import io_utils
from iterppo_jax import stats
from iterppo_jax.studies import baselines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(method, seed, conversion, budget=1536):
  return {"method": method, "seed": seed, "conversion": conversion, "conversion_lo": conversion - 0.04,
          "conversion_hi": conversion + 0.04, "conversations_used": budget, "seconds": 10.0, "budget": budget}


def _rows():
  out = []
  for seed, (ppo, bc, own) in enumerate(((0.30, 0.40, 0.29), (0.45, 0.50, 0.30), (0.55, 0.45, 0.31))):
    out += [_row("iterative_ppo_k4", seed, ppo), _row("filtered_bc", seed, bc), _row("filtered_bc_own", seed, own)]
  return out


def test_paired_differences_are_per_seed():
  rows = _rows() + [_row("filtered_bc_pooled", 1, 0.60)]
  p = baselines.paired(rows, "iterative_ppo_k4", "filtered_bc_own")
  assert p["seeds"] == [0, 1, 2] and p["per_seed"] == pytest.approx([0.01, 0.15, 0.24])
  assert p["mean"] == pytest.approx(stats.mean_interval([0.01, 0.15, 0.24]))
  # paired, the interval is narrower than the two unpaired ones would suggest when seeds move both methods alike
  assert baselines.paired(rows, "iterative_ppo_k4", "filtered_bc_pooled")["per_seed"] == pytest.approx([-0.15])
  assert baselines.paired(rows, "iterative_ppo_k4", "dagger") is None
  text = baselines.paired_table(rows, "iterative_ppo_k4")
  assert "| filtered_bc_own | 3 | +0.010 +0.150 +0.240 |" in text and "-0.150 (one seed)" in text
  assert "| iterative_ppo_k4 |" not in text.split("\n", 2)[2]  # not compared with itself


def test_merge_refuses_a_row_twice_or_two_budgets():
  rows = _rows()
  merged = baselines.merge_rows([("a", rows[:3]), ("b", rows[3:])])
  assert merged == rows
  with pytest.raises(errors.DataError, match="also in a"):
    baselines.merge_rows([("a", rows[:3]), ("b", rows[:1])])
  with pytest.raises(errors.DataError, match="budget 768"):
    baselines.merge_rows([("a", rows[:3]), ("b", [_row("pi0", 0, 0.1, budget=768)])])


def test_cli_merges_workdirs_and_files(tmp_path):
  rows = _rows()
  os.makedirs(tmp_path / "s0")
  io_utils.atomic_write_rows(tmp_path / "s0" / baselines.ROWS_FILE, [r for r in rows if r["seed"] == 0])
  io_utils.atomic_write_rows(tmp_path / "rest.jsonl", [r for r in rows if r["seed"] > 0])
  out = str(tmp_path / "merged")
  res = subprocess.run([sys.executable, "-m", "experiments.baselines_summary",
                        f"--rows={tmp_path / 's0'},{tmp_path / 'rest.jsonl'}", f"--out={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr
  assert sorted((r["method"], r["seed"]) for r in io_utils.read_rows(out + ".jsonl")) == sorted(
      (r["method"], r["seed"]) for r in rows)
  text = open(out + ".md").read()
  assert text == res.stdout
  assert f"{np.mean([0.30, 0.45, 0.55]):.3f}" in text and "| iterative_ppo_k4 minus |" in text
  # the same method with other settings, tagged: a method of its own, paired by seed
  io_utils.atomic_write_rows(tmp_path / "variant.jsonl", [_row("iterative_ppo_k4", s, 0.6) for s in (0, 1, 2)])
  res = subprocess.run([sys.executable, "-m", "experiments.baselines_summary", "--against=iterative_ppo_k4@v",
                        f"--rows={tmp_path / 'rest.jsonl'},{tmp_path / 's0'},{tmp_path / 'variant.jsonl'}@v"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr
  assert "| iterative_ppo_k4@v minus |" in res.stdout and "| iterative_ppo_k4 | 3 | +0.300 +0.150 +0.050 |" in res.stdout
  # @TAG:METHOD tags that method alone: more seeds of the variant, run in one workdir with untagged methods
  io_utils.atomic_write_rows(tmp_path / "more.jsonl", [_row("iterative_ppo_k4", 3, 0.7), _row("filtered_bc", 3, 0.5)])
  res = subprocess.run([sys.executable, "-m", "experiments.baselines_summary", "--against=iterative_ppo_k4@v",
                        f"--rows={tmp_path / 'rest.jsonl'},{tmp_path / 's0'},{tmp_path / 'variant.jsonl'}@v,"
                        f"{tmp_path / 'more.jsonl'}@v:iterative_ppo_k4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr
  assert "| filtered_bc | 4 | +0.200 +0.100 +0.150 +0.200 |" in res.stdout, res.stdout
  res = subprocess.run([sys.executable, "-m", "experiments.baselines_summary",
                        f"--rows={tmp_path / 'more.jsonl'}@v:dagger"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert res.returncode != 0 and "has no rows of dagger" in res.stderr and "Traceback" not in res.stderr
  res = subprocess.run([sys.executable, "-m", "experiments.baselines_summary", f"--rows={tmp_path / 'nowhere'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert res.returncode != 0 and "nowhere" in res.stderr and "Traceback" not in res.stderr
