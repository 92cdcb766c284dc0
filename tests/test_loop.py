"""The Iterative PPO loop end to end at tiny sizes: phases, checkpoints, metrics, and exact resume."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import sales as sales_config
from iterppo_jax import checkpoint as ckpt_lib
from iterppo_jax import conversation as conv_lib
from iterppo_jax import errors
from iterppo_jax import loop
from iterppo_jax import metrics as metrics_lib
from iterppo_jax import q_ranking
from iterppo_jax import workdir as workdir_lib
from iterppo_jax.studies import q_ranking_ablation as ablation


def tiny_config(**loop_overrides):
  c = sales_config.get_config("tiny")
  c.loop.tensorboard = False
  for k, v in loop_overrides.items():
    c.loop[k] = v
  return c


def final_policy(workdir, step):
  c = ckpt_lib.Checkpointer(workdir, "policy")
  tree, _ = c.restore(step)
  c.close()
  return jax.tree.leaves(tree)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  summary = loop.run(tiny_config(), workdir)
  return workdir, summary


def test_phases_checkpoints_and_metrics(full_run):
  workdir, summary = full_run
  assert len(summary["iterations"]) == 3  # pi_0, pi_1, pi_2
  assert set(summary["reference"]) == {"behavior", "oracle"}
  assert summary["reference"]["oracle"]["conversion"] > summary["reference"]["behavior"]["conversion"]
  for s in summary["iterations"]:
    assert 0 <= s["conversion_lo"] <= s["conversion"] <= s["conversion_hi"] <= 1
  assert os.path.exists(summary["plot"]) and os.path.getsize(summary["plot"]) > 1000
  assert "pi_2" in summary["table"]
  for name, steps in (("policy", [0, 1, 2]), ("qmodel", [0, 1])):
    c = ckpt_lib.Checkpointer(workdir, name)
    assert c.all_steps() == steps
    c.close()
  records = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  phases = {r.get("phase") for r in records}
  assert {"sft", "qfit/0", "qfit_eval", "ppo/0", "ppo/1", "eval"} <= phases
  assert any("ppo/kl" in r for r in records) and any("eval/conversion" in r for r in records)
  # The logs of every iteration are kept and readable.
  # D_0 is the behaviour logs (loop.first_data='behavior'); later iterations deploy pi_k.
  assert not os.path.exists(os.path.join(workdir, "data", "iter_0.jsonl"))
  for name in ("behavior", "iter_1", "eval_0", "eval_2"):
    assert conv_lib.read_jsonl(os.path.join(workdir, "data", f"{name}.jsonl"))
  # Issue #16: pi_k is deployed with one randomised turn per conversation, logged with its propensity; Q_k's
  # ranking of actions is measured against the simulator's true Q^{pi_k} every iteration; cut prompts are counted.
  deployed = conv_lib.read_jsonl(os.path.join(workdir, "data", "iter_1.jsonl"))
  assert all(0 <= r.metadata["explore"]["turn"] < 10 for r in deployed)
  reached = [r.metadata["explore"] for r in deployed if "taken" in r.metadata["explore"]]
  assert reached and all(e["propensity"] == 1 / len(e["candidates"]) for e in reached)
  for k in (0, 1):
    assert os.path.exists(os.path.join(workdir, "data", f"ranking_{k}.json"))
    ranked = [r for r in records if r.get("phase") == "qfit_eval" and r.get("iteration") == k]
    r = ranked[-1]
    assert r["qfit/rank_candidates"] >= 4 and 0 <= r["qfit/rank_states"] <= 2
    # States whose candidates are all equally good (tiny policies rarely sell) are not counted; top-1 is NaN then.
    assert (r["qfit/rank_states"] == 0) == np.isnan(r["qfit/rank_top1"])
    # against pi_k's own samples too; Q's pick can gain at most what the best candidate gains over them
    assert "qfit/rank_pick_gain_own" in r
    # what the exact Q^{pi_k} would score in top-1 against this measured truth: a share
    assert np.isnan(r["qfit/rank_truth_top1_ceiling"]) or 0 <= r["qfit/rank_truth_top1_ceiling"] <= 1
    assert np.isnan(r["qfit/rank_truth_spearman_ceiling"]) or -1 <= r["qfit/rank_truth_spearman_ceiling"] <= 1
    assert np.isnan(r["qfit/rank_top1"]) or r["qfit/rank_pick_gain_own"] <= r["qfit/rank_best_gain_own"] + 1e-9
  assert any("data/qfit/0/prompt_cut_share" in r for r in records)
  with open(os.path.join(workdir, "progress.json")) as f:
    progress = json.load(f)
  assert {"sft", "qfit/0", "policy/1", "policy/2", "eval/2"} <= set(progress)


@pytest.mark.parametrize("stop", [{"stop_after_phase": "qfit/0"}, {"stop_after_ppo_step": 2}],
                         ids=["between_phases", "inside_ppo"])
def test_resume_gives_identical_parameters(full_run, tmp_path, stop):
  workdir, _ = full_run
  resumed = str(tmp_path / "resumed")
  with pytest.raises(loop.Interrupted):
    loop.run(tiny_config(**stop), resumed)
  assert not os.path.exists(os.path.join(resumed, "summary.json"))
  loop.run(tiny_config(), resumed)
  for a, b in zip(final_policy(workdir, 2), final_policy(resumed, 2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # And the policy really changed during the run (so equality above is not vacuous).
  changed = any(not np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(final_policy(workdir, 0), final_policy(workdir, 2)))
  assert changed


def test_offline_iteration_on_user_logs(full_run, tmp_path):
  workdir, _ = full_run
  logs = os.path.join(workdir, "data", "iter_1.jsonl")
  out = str(tmp_path / "offline")
  offline = tiny_config(logs=logs)
  offline.inner = "rloo"  # the solver a user's offline run gets from configs/sales.py
  summary = loop.run(offline, out)
  assert summary["offline"] and summary["conversations"] == 16
  c = ckpt_lib.Checkpointer(out, "policy")
  assert c.all_steps() == [0, 1]
  c.close()
  assert os.path.isdir(os.path.join(out, "checkpoints", "rloo")) and not os.path.exists(
      os.path.join(out, "checkpoints", "ppo"))
  # A bad log fails with file:line before anything is trained.
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"outcome": 1, "turns": [{"role": "robot", "text": "hi"}]}\n')
  with pytest.raises(conv_lib.ConversationFormatError, match=r"bad\.jsonl:1: .*unknown role"):
    loop.run(tiny_config(logs=str(bad)), str(tmp_path / "offline_bad"))


def test_rerun_with_other_settings_is_refused(tmp_path):
  workdir = str(tmp_path)
  c = tiny_config()
  workdir_lib.check_resumable(c, workdir)  # no run there yet
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(c.to_json_best_effort(indent=2))
  workdir_lib.check_resumable(c, workdir)  # the same settings continue the run
  more = tiny_config(iterations=5, stop_after_phase="sft")
  workdir_lib.check_resumable(more, workdir)  # going further is a continuation
  other = tiny_config()
  other.ppo.kl_coef = 0.5
  other.qfit.method = "td"
  with pytest.raises(errors.WorkdirError, match=rf"ppo\.kl_coef: {c.ppo.kl_coef} -> 0\.5; qfit\.method: 'mc' -> 'td'"):
    workdir_lib.check_resumable(other, workdir)
  # a run that began before a setting existed ran without it: the setting at its default continues the run
  saved = json.loads(c.to_json_best_effort())
  del saved["ppo"]["center_reward"]
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(saved, f)
  workdir_lib.check_resumable(c, workdir)
  changed = tiny_config()
  changed.ppo.center_reward = "state"
  with pytest.raises(errors.WorkdirError, match=r"ppo\.center_reward: 'none' -> 'state'"):
    workdir_lib.check_resumable(changed, workdir)
  fresh_only = tiny_config()
  fresh_only.resume = False
  with pytest.raises(errors.WorkdirError, match="already holds a run"):
    workdir_lib.check_resumable(fresh_only, workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write('{"seed": 0,')  # a truncated file
  with pytest.raises(errors.WorkdirError, match="not a readable run config"):
    workdir_lib.check_resumable(c, workdir)


def test_branch_from_a_runs_pi0(full_run, tmp_path):
  """--branch_from: a run that starts from another run's pi_0. With the same settings it reproduces the source's
  pi_1 bit for bit (so it needs nothing else of the source); settings that shape pi_0 are refused."""
  source, _ = full_run
  same = str(tmp_path / "same")
  assert workdir_lib.branch_from(source, tiny_config(), same)
  summary = loop.run(tiny_config(iterations=1), same)
  for a, b in zip(final_policy(source, 1), final_policy(same, 1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with open(os.path.join(source, "progress.json")) as f:
    assert summary["iterations"][0] == json.load(f)["eval/0"]
  # pi_0 was not trained again: its SFT rows are the source's, copied once
  rows = lambda wd: [r for r in metrics_lib.read_metrics(os.path.join(wd, "metrics.jsonl"))  # noqa: E731
                    if r.get("phase") == "sft"]
  assert rows(same) == rows(source) and rows(same)
  # a later phase's setting may change: a branch with another KL coefficient gets another pi_1
  other = tiny_config(iterations=1)
  other.ppo.kl_coef = 0.5
  workdir = str(tmp_path / "other")
  workdir_lib.branch_from(source, other, workdir)
  loop.run(other, workdir)
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(final_policy(source, 1), final_policy(workdir, 1)))
  assert not workdir_lib.branch_from(source, other, workdir)  # a workdir holding a run is resumed, not copied over
  # settings that shape pi_0 or its evaluation are refused, naming each, and nothing is written
  bad = tiny_config()
  bad.sft.steps += 1
  bad.loop.eval_conversations += 1
  with pytest.raises(errors.WorkdirError, match=r"loop\.eval_conversations: (\d+) -> \d+; sft\.steps: (\d+) -> \d+\)"):
    workdir_lib.branch_from(source, bad, str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad")
  # a source that has not evaluated pi_0 yet is refused
  partial = str(tmp_path / "partial")
  shutil.copytree(source, partial)
  with open(os.path.join(partial, "progress.json"), "w") as f:
    json.dump({"sft": True}, f)
  with pytest.raises(errors.WorkdirError, match="missing: eval/0, reference"):
    workdir_lib.branch_from(partial, tiny_config(), str(tmp_path / "from_partial"))


@pytest.mark.slow
def test_qfit_steps_selected_by_the_logs_only_ranking(tmp_path):
  """qfit.select_every: Q_0 is fitted in chunks, each scored on held-out randomised turns; the best is kept."""
  c = tiny_config(iterations=1, first_data="policy", conversations=40, rank_states=0, true_q_states=0)
  c.qfit.select_every = 2
  loop.run(c, str(tmp_path))
  records = metrics_lib.read_metrics(os.path.join(str(tmp_path), "metrics.jsonl"))
  scores = [r for r in records if "qfit/select_adv_corr" in r]
  assert [r["step"] for r in scores] == [2, 4]  # qfit.steps = 4 in chunks of 2
  final = [r for r in records if r.get("phase") == "qfit_eval"][-1]
  finite = {r["step"]: r["qfit/select_adv_corr"] for r in scores if np.isfinite(r["qfit/select_adv_corr"])}
  if finite:  # the kept Q-model is the best scored one, and its held-out measure is the one it was kept for
    assert final["qfit/selected_step"] == max(finite, key=finite.get)
    assert final["qfit/logged_adv_corr"] == pytest.approx(finite[final["qfit/selected_step"]], abs=1e-6)
  else:  # no held-out return varied (a tiny untrained policy rarely sells): nothing to prefer, the first is kept
    assert final["qfit/selected_step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("count", [1, 3])
def test_td_qfit_evaluates_pi_k_on_every_turn(tmp_path, monkeypatch, count):
  """qfit.method=td on logs with randomised turns (one, or loop.explore_count = 3 per conversation): every turn is
  fitted, and the decision before a randomised turn bootstraps from pi_k's own sample there
  (data.Example.own_action), not from the draw."""
  from iterppo_jax import qfit as qfit_lib
  seen = []
  original = qfit_lib.bootstrap_targets

  def recording(q_next, rewards, next_index, done, gamma, lam, succ_override=None):
    seen.append(0 if succ_override is None else int(np.isfinite(succ_override).sum()))
    return original(q_next, rewards, next_index, done, gamma, lam, succ_override)

  monkeypatch.setattr(qfit_lib, "bootstrap_targets", recording)
  c = tiny_config(iterations=1, first_data="policy", conversations=40, rank_states=0, true_q_states=0,
                  stop_after_phase="qfit/0")
  c.qfit.method = "td"
  c.loop.explore_count = count
  with pytest.raises(loop.Interrupted):
    loop.run(c, str(tmp_path))
  records = conv_lib.read_jsonl(os.path.join(str(tmp_path), "data", "iter_0.jsonl"))
  assert all(len(loop.explore.planned_turns(r.metadata["explore"])) == count for r in records)
  examples = loop.data_lib.examples_from_conversations(records, c.gamma, c.env.max_render_turns)
  ids = sorted({e.conversation_id for e in examples})
  held = set(ids[-max(len(ids) // 10, 1):])
  train = [e for e in examples if e.conversation_id not in held]
  expected = sum(1 for i, e in enumerate(examples) if e.conversation_id not in held and e.next_index >= 0
                 and examples[e.next_index].own_action is not None)
  assert expected > 0 and seen and all(n == expected for n in seen)
  fitted = [r for r in metrics_lib.read_metrics(os.path.join(str(tmp_path), "metrics.jsonl"))
            if r.get("phase") == "qfit_eval"][-1]
  assert fitted["qfit/train_examples"] == len(train)  # turns before t* too
  assert any(not e.target_valid for e in train)


@pytest.mark.slow
def test_monte_carlo_with_too_few_unbiased_targets_says_what_to_change(tmp_path):
  """A Monte Carlo fit reads returns from each conversation's last planned randomised turn on; with every turn
  planned (explore_count = max_turns) that is at most one turn per conversation, fewer than a batch of 64 here.
  The run stops with one message naming the keys to change (not data.py's 'drop_remainder'), and D_0 is kept."""
  c = tiny_config(iterations=1, first_data="policy", conversations=40, rank_states=0, true_q_states=0)
  c.qfit.method, c.qfit.targets, c.qfit.batch_size = "mc", "unbiased", 64
  c.loop.explore_count = c.env.max_turns
  with pytest.raises(errors.SettingsError, match=(r"qfit/0: \d+ of \d+ logged turns are training targets .*fewer "
                                                  r"than qfit.batch_size=64 .*qfit.method=td uses every turn")):
    loop.run(c, str(tmp_path))
  assert len(conv_lib.read_jsonl(os.path.join(str(tmp_path), "data", "iter_0.jsonl"))) == 40


@pytest.mark.parametrize("key, value", [("loop.rank_states", -1), ("loop.rank_rollouts", 0),
                                        ("loop.rank_policy_samples", 0), ("qfit.select_every", -2)])
def test_ranking_counts_are_checked_before_any_work(tmp_path, key, value):
  c = tiny_config()
  section, name = key.split(".")
  c[section][name] = value
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=rf"config\.{key} must be an integer >= \d, got {value}"):
    loop.setup(c, str(workdir))
  assert not workdir.exists()  # nothing written


def test_table_variants_fit_what_they_say_whatever_the_runs_shrinkage():
  """A variant's overrides go onto the run's own config, so a variant that names its cells' prior must set it: on
  a run shrunk to 'additive' (sales', and negotiation's until finding 39), 'shrunk to their act's mean' once
  fitted the additive prior."""
  for name, (what, overrides) in ablation.VARIANTS.items():
    if "act's mean" in what:
      assert overrides["qfit.shrink_to"] == "act" and overrides["qfit.shrink"] > 0, name
    if "state mean + act offset" in what:
      assert overrides["qfit.shrink_to"] == "additive" and overrides["qfit.shrink"] > 0, name
    if "plain cell means" in what:
      assert overrides["qfit.shrink"] == 0, name
  assert "table_plain" in ablation.VARIANTS and "table_shrink_5" in ablation.VARIANTS


def test_ranking_ablation_scores_a_run_that_measured_no_ranking(full_run, tmp_path):
  """experiments.q_ranking_ablation on a run made with loop.rank_states=0: the precise truth is measured in its
  own directory and every variant's Q_k is scored on it (the refit turns the ranking on for that set)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(full_run[0], workdir)
  os.remove(os.path.join(workdir, "data", "ranking_0.json"))
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  saved["loop"]["rank_states"] = 0
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(saved, f)
  base = ablation.read_run_config(workdir)
  truth = ablation.precise_truth(workdir, 0, base, states=3, rollouts=8)
  row = ablation.refit(base, workdir, 0, "table_data_50", truth, os.path.join(workdir, "data", "behavior.jsonl"))
  assert 1 <= row["rank_states"] <= 3 and 0.0 <= row["rank_top1"] <= 1.0 and row["rank_top1_chance"] > 0
  assert 0 < row["train_examples"]
  # no truth at all: the logs-only measures alone, the same fit
  logs_only = ablation.refit(base, workdir, 0, "table_data_50", None, os.path.join(workdir, "data", "behavior.jsonl"))
  assert logs_only["rank_top1"] is None and logs_only["train_examples"] == row["train_examples"]
  # a second draw: another file and other states of the same logs; the first draw is read back, not remeasured
  again = ablation.precise_truth(workdir, 0, base, states=3, rollouts=8, draw=1)
  assert again != truth and ablation.precise_truth(workdir, 0, base, states=3, rollouts=8) == truth
  first, second = q_ranking.ActionSet.load(truth), q_ranking.ActionSet.load(again)
  assert len(second.where) == len(first.where) and sorted(second.where) != sorted(first.where)
  with pytest.raises(errors.SettingsError, match="--truth_draw: expected an integer >= 0"):
    ablation.precise_truth(workdir, 0, base, states=3, rollouts=8, draw=-1)
