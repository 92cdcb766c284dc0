"""experiments.policy_shift: pi_k's act shares and Q_k's mean over pi_k's and pi_{k+1}'s decisions, from files."""

import json

import numpy as np
import pytest

from iterppo_jax import conversation as conv_lib
from iterppo_jax import errors
from iterppo_jax import q_ranking
from iterppo_jax import q_table
from iterppo_jax.envs import registry
from iterppo_jax.envs import sales
from iterppo_jax.studies import policy_shift


@pytest.fixture
def run(tmp_path):
  from configs import sales as sales_config
  c = sales_config.get_config()
  env = registry.make_env(c.env)
  wd = tmp_path / "run"
  (wd / "data").mkdir(parents=True)
  (wd / "checkpoints" / "qtable").mkdir(parents=True)
  (wd / "config.json").write_text(json.dumps({"env": {"domain": "sales"}, "ppo": {"kl_coef": 0.05}}))
  for k, name in enumerate(("behavior", "oracle")):
    records = env.play(registry.make_policy(c.env.domain, name, c.env), 12, seed=k)
    with open(wd / "data" / f"eval_{k}.jsonl", "w") as f:
      for r in records:
        f.write(json.dumps(r.to_json()) + "\n")
  # Q_0 values one act (the oracle's closing question) at 1 and everything else at 0
  q = q_table.TableQ({}, {("close",): 1.0}, 0.0, sales.dialogue_state, sales.act_key)
  q.save(str(wd / "checkpoints" / "qtable" / "0.json"))
  return wd


def test_rows_count_acts_and_q_on_both_policies(run):
  rows = policy_shift.shift_rows(str(run))
  assert [r["k"] for r in rows] == [0, 1]
  decisions = [[(r.turns[:i], t.text) for r in conv_lib.read_jsonl(str(run / "data" / f"eval_{k}.jsonl"))
                for i, t in enumerate(r.turns) if t.role == "suggestion"] for k in (0, 1)]
  close_share = [np.mean([sales.act_key(t, x)[:1] == ("close",) for t, x in d]) for d in decisions]
  # Q_0 is 1 - UNSEEN_PENALTY on 'close' and -UNSEEN_PENALTY elsewhere (no cell was logged)
  for key, share in (("q_on_pi_k", close_share[0]), ("q_on_pi_next", close_share[1])):
    assert rows[0][key] == pytest.approx(share - q_table.UNSEEN_PENALTY)
  assert rows[0]["act_share"].get("close", 0.0) == pytest.approx(close_share[0])
  assert "q_on_pi_k" not in rows[1]  # no eval_2 to compare with
  assert rows[1]["conversion"] == pytest.approx(np.mean([r.outcome for r in conv_lib.read_jsonl(
      str(run / "data" / "eval_1.jsonl"))]))
  text = policy_shift.table(rows)
  assert text.count("\n| ") == 2 and "| 1 |" in text and "| - | - | - |" in text


def test_rows_give_the_exact_steps_raise_at_the_runs_beta_or_another(run):
  rows = policy_shift.shift_rows(str(run))
  q = q_table.TableQ.load(str(run / "checkpoints" / "qtable" / "0.json"), sales.dialogue_state, sales.act_key)
  by_state = {}
  for r in conv_lib.read_jsonl(str(run / "data" / "eval_0.jsonl")):
    for i, t in enumerate(r.turns):
      if t.role == "suggestion":
        by_state.setdefault(repr(sales.dialogue_state(r.turns[:i])), []).append(q.score(r.turns[:i], t.text))
  reach = q_ranking.step_reach(list(by_state.values()), 0.05)
  raise_, sd, sd_v = reach["step_raise"], reach["q_sd_in_state"], reach["q_sd_of_state_value"]
  assert rows[0]["beta"] == 0.05 and rows[0]["step_raise"] == pytest.approx(raise_) and raise_ > 0
  assert rows[0]["q_sd_in_state"] == pytest.approx(sd) and sd > 0
  assert rows[0]["q_sd_of_state_value"] == pytest.approx(sd_v) and sd_v > 0
  assert f"| {raise_:+.3f} (0.05) | {sd:.3f} | {sd_v:.3f} |" in policy_shift.table(rows)
  wider = policy_shift.shift_rows(str(run), beta=0.5)[0]
  assert wider["beta"] == 0.5 and 0 < wider["step_raise"] < raise_


def test_oracle_agreement_overall_per_act_and_for_the_staffs_logs(run):
  rows = policy_shift.shift_rows(str(run))
  behavior, oracle = rows
  assert oracle["oracle_agreement"] == 1.0  # eval_1 was played by the oracle: every suggestion is its act
  assert 0.0 < behavior["oracle_agreement"] < 1.0  # the staff's mistakes
  for r in rows:
    assert sum(n for n, _ in r["oracle_agreement_by_act"].values()) == r["decisions"]
    assert r["oracle_agreement"] == pytest.approx(
        sum(n * share for n, share in r["oracle_agreement_by_act"].values()) / r["decisions"])
  assert set(oracle["oracle_agreement_by_act"]) <= set(sales.ACT_KINDS)
  # the staff's own logs (sent messages, no suggestions) become a first row 'staff'
  staff = conv_lib.read_jsonl(str(run / "data" / "eval_0.jsonl"))
  with open(run / "data" / "behavior.jsonl", "w") as f:
    for r in staff:
      f.write(json.dumps(r.to_json()) + "\n")
  rows = policy_shift.shift_rows(str(run))
  assert [r["k"] for r in rows] == ["staff", 0, 1]
  assert rows[0]["decisions"] == sum(t.role == "business" for r in staff for t in r.turns)
  text = policy_shift.agreement_table(rows)
  assert text.splitlines()[0] == "| the oracle's act | staff's logs | pi_0 | pi_1 |"
  assert text.splitlines()[-1].startswith("| every act | ") and "1.00 (" in text.splitlines()[-1]


def test_a_directory_that_is_not_a_run_is_one_clear_error(tmp_path):
  with pytest.raises(errors.DataError, match="config.json: not a loop run's config"):
    policy_shift.shift_rows(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"env": {"domain": "sales"}}))
  with pytest.raises(errors.DataError, match="eval_0.jsonl not found"):
    policy_shift.shift_rows(str(tmp_path))
