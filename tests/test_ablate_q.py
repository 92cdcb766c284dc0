"""iterppo_jax/studies/ablate_q.py on a stand-in for loop.run that writes the loop's files (fast, no training).

The stand-in writes what the loop writes (config.json, progress.json, metrics.jsonl, data/eval_<k>.jsonl) with
Q errors that grow with the variant's label-flip rate and evaluation logs played by real simulator policies, so
the rows, the bound check, the tables and the plot are checked on the loop's file formats.
"""

import json
import os

import pytest

from configs import sales as sales_config
from iterppo_jax import bound
from iterppo_jax import conversation as conv_lib
from iterppo_jax import io_utils
from iterppo_jax import loop
from iterppo_jax import metrics as metrics_lib
from iterppo_jax import workdir as workdir_lib
from iterppo_jax.envs import base as env_base
from iterppo_jax.envs import registry
from iterppo_jax.studies import ablate_q

EVAL_POLICIES = ("random", "behavior", "oracle")  # pi_0, pi_1, pi_2 of the stand-in: each better than the last


def ablation_config():
  c = sales_config.get_config("tiny")
  c.loop.tensorboard = False
  # The keys the lead adds to configs/sales.py with the loop changes (kept here until then).
  if "label_flip" not in c.qfit:
    c.qfit.label_flip = 0.0
    c.qfit.data_fraction = 1.0
    c.qfit.model = {n: 0 for n in ("num_layers", "embed_dim", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")}
  return c


def fake_run(calls):
  """A loop.run stand-in: the shared prefix stops after collect/0; a variant adds qfit, KL and evals per k."""
  def run(config, workdir):
    calls.append((workdir, config.qfit.label_flip, config.qfit.steps, config.loop.stop_after_phase))
    os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
    io_utils.atomic_write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    progress = workdir_lib.Progress(workdir)
    env = registry.make_env(config.env)

    def evaluate(k):
      path = os.path.join(workdir, "data", f"eval_{k}.jsonl")
      records = env.play(registry.make_policy("sales", EVAL_POLICIES[k], config.env), 60, seed=99)
      conv_lib.write_jsonl(path, records)
      progress.mark(f"eval/{k}", env_base.summarize(records))

    if not progress.get("eval/0"):
      evaluate(0)
    if config.loop.stop_after_phase == "collect/0":
      raise loop.Interrupted("stopped after collect/0")
    with metrics_lib.MetricWriter(workdir, tensorboard=False) as w:
      for k in range(config.loop.iterations):
        flip = config.qfit.label_flip
        progress.mark(f"qfit/{k}", {"true_q_mae": 0.05 + flip, "true_q_max_err": 0.2 + flip,
                                    "true_q_corr": 0.5 - flip, "auc": 0.7, "label_error_rate": flip})
        w.write(k, {"improve/kl_to_pi_k": 1.0 + k}, phase="improve", iteration=k)
        evaluate(k + 1)
    return {}
  return run


def test_variants_rows_bound_tables_and_plot(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(ablate_q.loop, "run", fake_run(calls))
  config = ablation_config()
  workdir = str(tmp_path)
  rows = ablate_q.run_ablation(config, workdir, ("baseline", "flip_30", "few_qfit_steps"))
  # The prefix runs once, then each variant resumes in its own copy with its own overrides.
  assert calls[0] == (os.path.join(workdir, "_shared"), 0.0, 4, "collect/0")
  assert calls[1:] == [(os.path.join(workdir, "baseline"), 0.0, 4, ""),
                       (os.path.join(workdir, "flip_30"), 0.3, 4, ""),
                       (os.path.join(workdir, "few_qfit_steps"), 0.0, 1, "")]
  assert [(r["variant"], r["k"]) for r in rows] == [
      ("baseline", 0), ("baseline", 1), ("flip_30", 0), ("flip_30", 1), ("few_qfit_steps", 0), ("few_qfit_steps", 1)]
  flip = rows[2]
  assert flip["q_mae"] == pytest.approx(0.35) and flip["label_error"] == pytest.approx(0.3)
  assert flip["kl_to_prev"] == 1.0 and rows[3]["kl_to_prev"] == 2.0
  # The bound columns are bound.py's on the very evaluation logs the run wrote.
  read = lambda k: conv_lib.read_jsonl(os.path.join(workdir, "flip_30", "data", f"eval_{k}.jsonl"))  # noqa: E731
  expect = bound.logged_bound_row(1, read(1), read(2), gamma=config.gamma, beta=config.ppo.kl_coef, kl=2.0,
                                  eps_q_mean=0.35, eps_q_max=0.5)
  for key in ("improvement", "improvement_lo", "improvement_hi", "bound", "bound_value", "horizon", "holds"):
    assert rows[3][key] == expect[key]
  assert rows[3]["paired"]  # every pi_k is evaluated on the same customers
  assert rows[3]["bound"] == pytest.approx(config.ppo.kl_coef * 2.0 - 2 * 0.5)
  # random -> behaviour -> oracle: each step gains value, and conversion is pi_{k+1}'s.
  assert rows[0]["improvement"] > 0 and rows[1]["improvement"] > 0
  with open(os.path.join(workdir, "flip_30", "progress.json")) as f:
    assert rows[3]["conversion"] == json.load(f)["eval/2"]["conversion"]
  with open(os.path.join(workdir, "ablate_q.jsonl")) as f:
    assert [json.loads(line) for line in f] == json.loads(json.dumps(rows))
  md, png = ablate_q.write_report(rows, workdir)
  text = open(md).read()
  assert "| flip_30 | 1 | 0.350 | 0.500 | 0.20 | 0.300 | 2.000 |" in text
  assert "Improvement bound" in text and text.count("| few_qfit_steps |") == 4  # two tables x two iterations
  assert os.path.getsize(png) > 5000
  # report_only reads the same runs back without running anything.
  calls.clear()
  assert ablate_q.run_ablation(config, workdir, ("baseline", "flip_30", "few_qfit_steps"), report_only=True) == rows
  assert not calls


def test_variant_configs_and_bad_input():
  c = ablation_config()
  base = sales_config.get_config()
  small = ablate_q.VARIANTS["small_q"](base)
  assert small == {"qfit.model.num_layers": 1, "qfit.model.num_heads": 2, "qfit.model.num_kv_heads": 2,
                   "qfit.model.head_dim": 32, "qfit.model.embed_dim": 64, "qfit.model.mlp_dim": 256}
  tiny_small = ablate_q.variant_config(c, "small_q")
  m = tiny_small.qfit.model
  assert m.embed_dim == m.num_heads * m.head_dim and m.num_heads % m.num_kv_heads == 0
  assert ablate_q.variant_config(c, "fewer_conversations").qfit.data_fraction == 0.25
  assert c.qfit.data_fraction == 1.0  # the base config is not changed
  with pytest.raises(ValueError, match="qfit.nope"):
    ablate_q.apply_overrides(c, {"qfit.nope": 1})
  with pytest.raises(ValueError, match="unknown variant"):
    ablate_q.variant_config(c, "flip_50")
  with pytest.raises(ValueError, match="non-empty subset"):
    ablate_q.run_ablation(c, "/tmp/unused", ("baseline", "nope"))
