"""Baselines at the same conversation budget: turn-level maths against NumPy, every method end to end at tiny
sizes (rows, exact conversation counts, resume), and the table and plot on a fake rows file."""

import json
import math
import os

import jax
import numpy as np
import pytest

from configs import sales as sales_config
from flax import nnx

from iterppo_jax import checkpoint as ckpt_lib
from iterppo_jax import conversation as conv_lib
from iterppo_jax import data as data_lib
from iterppo_jax import errors
from iterppo_jax import loop
from iterppo_jax import online_ppo
from iterppo_jax import ppo
from iterppo_jax import sharding
from iterppo_jax import train_state as ts
from iterppo_jax.envs import registry
from iterppo_jax.models import heads
from iterppo_jax.models import transformer as tf
from iterppo_jax.studies import baselines

# ---- turn-level maths ----


def numpy_turn_advantages(rewards, values, lengths, gamma, lam):
  """Reference: per conversation, backwards over its decisions, nothing after the last one."""
  adv = np.zeros_like(rewards)
  ret = np.zeros_like(rewards)
  for c, n in enumerate(lengths):
    next_value = next_adv = next_ret = 0.0
    for i in reversed(range(n)):
      delta = rewards[c, i] + gamma * next_value - values[c, i]
      adv[c, i] = delta + gamma * lam * next_adv
      ret[c, i] = rewards[c, i] + gamma * next_ret
      next_value, next_adv, next_ret = values[c, i], adv[c, i], ret[c, i]
  return adv, ret


@pytest.mark.parametrize("lam", [0.0, 0.7, 1.0])
def test_turn_advantages_match_numpy(lam):
  rng = np.random.default_rng(0)
  lengths = [1, 4, 7, 3, 10]
  gamma = 0.95
  # Decisions arrive flat and shuffled (as examples do across a batch); the grid puts them back in place.
  ids = [f"c{c}" for c, n in enumerate(lengths) for _ in range(n)]
  turns = [i for n in lengths for i in range(n)]
  flat_rewards = rng.normal(size=len(ids)).astype(np.float32)
  flat_values = rng.normal(size=len(ids)).astype(np.float32)
  perm = rng.permutation(len(ids))
  row, col, mask = online_ppo.decision_grid([ids[p] for p in perm], [turns[p] for p in perm])
  assert mask.shape == (len(lengths), max(lengths)) and mask.sum() == len(ids)
  grid_r = online_ppo.to_grid(flat_rewards[perm], row, col, mask)
  grid_v = online_ppo.to_grid(flat_values[perm], row, col, mask)
  adv, ret = online_ppo.turn_advantages(grid_r, grid_v, mask, gamma, lam)
  # Conversation order on the grid is first appearance in the shuffled list; map the reference the same way.
  order = list(dict.fromkeys(ids[p] for p in perm))
  ref_r = np.zeros_like(grid_r)
  ref_v = np.zeros_like(grid_v)
  for d, (c, i) in enumerate(zip(ids, turns)):
    ref_r[order.index(c), i], ref_v[order.index(c), i] = flat_rewards[d], flat_values[d]
  ref_adv, ref_ret = numpy_turn_advantages(ref_r, ref_v, [lengths[int(c[1:])] for c in order], gamma, lam)
  np.testing.assert_allclose(np.asarray(adv), ref_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret), ref_ret, rtol=1e-5, atol=1e-5)
  if lam == 1.0:  # GAE with lambda = 1 is the Monte Carlo advantage G_i - V(s_i)
    np.testing.assert_allclose(np.asarray(adv), np.where(mask, ref_ret - ref_v, 0.0), atol=1e-5)


def test_turn_returns_are_the_logged_q_targets():
  """Without a KL term the return-to-go of r_i = o_{i+1} is exactly data.Example.target (what Q_k regresses)."""
  config = sales_config.get_config("tiny")
  env = registry.make_env(config.env)
  records = env.play(registry.make_policy("sales", "behavior", config.env), 12, seed=3)
  examples = data_lib.examples_from_conversations(records, config.gamma)
  assert any(e.reward for e in examples)  # some conversation converts, so the returns are not all 0
  row, col, mask = online_ppo.decision_grid([e.conversation_id for e in examples], [e.turn for e in examples])
  rewards = online_ppo.to_grid(np.asarray([e.reward for e in examples]), row, col, mask)
  _, ret = online_ppo.turn_advantages(rewards, np.zeros_like(rewards), mask, config.gamma, 0.95)
  np.testing.assert_allclose(np.asarray(ret)[row, col], [e.target for e in examples], atol=1e-6)


def test_decision_grid_and_token_broadcast():
  with pytest.raises(ValueError, match="appears twice"):
    online_ppo.decision_grid(["a", "a"], [0, 0])
  mask = np.asarray([[True, True, False], [True, False, False]])
  out = np.asarray(online_ppo.token_advantages(np.asarray([2.0, -1.0]), mask))
  np.testing.assert_array_equal(out, [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])


def test_online_update_raises_the_suggestions_that_led_to_a_sale():
  """One online update on hand-made decisions: the tokens of a suggestion followed by a sale become likelier,
  those of one followed by nothing less likely (the sign of the turn advantage reaches every token)."""
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  P, N, D = 6, 3, 4
  model_cfg = tf.TransformerConfig(vocab_size=16, num_layers=1, embed_dim=16, mlp_dim=32, num_heads=2,
                                   num_kv_heads=1, head_dim=8, max_len=P + N)
  opt = ts.make_optimizer(ts.OptimizerConfig(learning_rate=3e-3, warmup_steps=1))
  policy_tr, policy_state = ts.init_trainable(lambda: tf.Transformer(model_cfg, rngs=nnx.Rngs(0)), opt, mesh)
  ref = ts.copy_params(policy_state.params)
  critic_tr, critic_state = ts.init_trainable(
      lambda: heads.scalar_model_from_policy(nnx.merge(policy_tr.graphdef, ref), rngs=nnx.Rngs(1)), opt, mesh)
  rng = np.random.default_rng(0)
  prompt = rng.integers(1, 16, size=(D, P)).astype(np.int32)
  response = rng.integers(1, 16, size=(D, N)).astype(np.int32)
  prompt_valid, response_valid = np.ones((D, P), bool), np.ones((D, N), bool)
  tokens, valid, positions = (np.asarray(x) for x in ppo.sequence_layout(prompt, prompt_valid, response,
                                                                          response_valid))
  row, col, grid_mask = online_ppo.decision_grid(["a", "b", "c", "d"], [0, 0, 0, 0])
  arrays = {"tokens": tokens, "valid": valid, "positions": positions, "response_valid": response_valid,
            "reward": np.asarray([1, 0, 1, 0], np.float32), "row": row, "col": col, "grid_mask": grid_mask}
  cfg = online_ppo.OnlineConfig(kl_coef=0.0, epochs=4, minibatch_size=4)
  steps = online_ppo.make_steps(policy_tr, critic_tr, cfg, P)
  logprob = loop._logprob_fn(policy_tr.graphdef)
  before = np.asarray(logprob(ref, prompt, prompt_valid, response, response_valid)).sum(1)
  state, metrics = online_ppo.update(steps, ppo.PPOState(policy=policy_state, critic=critic_state), ref, arrays,
                                     cfg, mesh, seed=0)
  after = np.asarray(logprob(state.policy.params, prompt, prompt_valid, response, response_valid)).sum(1)
  assert np.all((after - before)[[0, 2]] > 0) and np.all((after - before)[[1, 3]] < 0)
  assert metrics["online_ppo/decisions"] == 4 and metrics["online_ppo/outcome_rate"] == 0.5


def test_online_batches_and_eval_points():
  assert baselines.online_batches(20, 8) == [8, 8, 4]
  assert baselines.online_batches(16, 8) == [8, 8]
  assert baselines.online_eval_points([8, 8, 4], 0) == [3]
  assert baselines.online_eval_points([8, 8, 8, 8], 16) == [2, 4]
  assert baselines.online_eval_points([8, 8, 4], 10) == [2, 3]  # 16 crossed 10, 20 crossed 20


def test_config_checks():
  c = sales_config.get_config("tiny")
  c.baselines.ks = (3,)  # 16 conversations do not split into 3 equal iterations
  with pytest.raises(errors.SettingsError, match="must split into 3"):  # a setting: exit status 2, one line
    baselines.check_config(c)
  c = sales_config.get_config("tiny")
  c.baselines.methods = ("pi0", "dagger")
  with pytest.raises(errors.SettingsError, match="subset of"):
    baselines.check_config(c)
  assert set(baselines.method_fns(sales_config.get_config("tiny"))) == {
      "behavior", "oracle", "pi0", "offline", "filtered_bc", "filtered_bc_own", "myopic", "online_ppo", "iterative_ppo_k1",
      "iterative_ppo_k2"}


# ---- every method end to end ----


def tiny_config():
  c = sales_config.get_config("tiny")
  c.loop.tensorboard = False
  c.baselines.ks = (1,)  # K = 2 runs the same loop path as the myopic learner's two iterations, at twice the cost
  return c


@pytest.fixture(scope="module")
def all_rows(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("baselines"))
  return workdir, baselines.run_all(tiny_config(), workdir, log=lambda _: None)


def _by_method(rows):
  return {r["method"]: r for r in rows}


def _log_sizes(run_dir, prefix):
  names = sorted(n for n in os.listdir(os.path.join(run_dir, "data")) if n.startswith(prefix) and
                 n.endswith(".jsonl"))
  return {n: len(conv_lib.read_jsonl(os.path.join(run_dir, "data", n))) for n in names}


def test_every_method_writes_its_row(all_rows):
  workdir, rows = all_rows
  budget = tiny_config().baselines.budget
  assert [r["method"] for r in rows] == list(baselines.method_fns(tiny_config()))
  assert baselines.read_rows(os.path.join(workdir, baselines.ROWS_FILE)) == rows
  for r in rows:
    assert r["seed"] == 0 and r["budget"] == budget and r["behavior_logs"] == 80
    assert 0 <= r["conversion_lo"] <= r["conversion"] <= r["conversion_hi"] <= 1
    assert r["eval_conversations"] == 16
    learned = r["method"] not in ("behavior", "oracle", "pi0")
    assert r["conversations_used"] == (budget if learned else 0)
    if learned:
      xs = [p["conversations_used"] for p in r["curve"]]
      assert xs[0] == 0 and xs[-1] == budget and xs == sorted(xs)
      assert r["curve"][-1]["conversion"] == r["conversion"] and r["seconds"] > 0
  by = _by_method(rows)
  assert by["oracle"]["conversion"] > by["behavior"]["conversion"]


def test_offline_uses_exactly_the_budget(all_rows):
  workdir, rows = all_rows
  by = _by_method(rows)
  run_dir = os.path.join(workdir, by["offline"]["run_dir"])
  # All of the budget collected once with pi_0, one Q fit, one policy update.
  assert _log_sizes(run_dir, "iter_") == {"iter_0.jsonl": 16}
  assert {r.policy for r in conv_lib.read_jsonl(os.path.join(run_dir, "data", "iter_0.jsonl"))} == {"pi_0"}
  for name, steps in (("policy", [0, 1]), ("qmodel", [0])):
    c = ckpt_lib.Checkpointer(run_dir, name)
    assert c.all_steps() == steps
    c.close()
  # Iterative PPO with K = 1 is the same run, reported under its own name.
  k1 = by["iterative_ppo_k1"]
  assert k1["run_dir"] == by["offline"]["run_dir"] and k1["conversion"] == by["offline"]["conversion"]


def test_iterated_methods_split_the_budget(all_rows):
  workdir, rows = all_rows
  by = _by_method(rows)
  myopic_dir = os.path.join(workdir, by["myopic"]["run_dir"])
  assert by["myopic"]["gamma"] == 0.0
  assert _log_sizes(myopic_dir, "iter_") == {"iter_0.jsonl": 8, "iter_1.jsonl": 8}
  with open(os.path.join(myopic_dir, "config.json")) as f:
    assert json.load(f)["gamma"] == 0.0
  # Filtered BC counts, per iteration, exactly the successful conversations of its own logs and their sent messages.
  bc = by["filtered_bc"]
  bc_dir = os.path.join(workdir, bc["run_dir"])
  assert _log_sizes(bc_dir, "iter_") == {"iter_0.jsonl": 8, "iter_1.jsonl": 8}
  for k in range(2):
    records = conv_lib.read_jsonl(os.path.join(bc_dir, "data", f"iter_{k}.jsonl"))
    wins = [r for r in records if r.outcome >= 1]
    assert bc["successes"][k] == len(wins)
    assert bc["bc_examples"][k] == sum(t.role == "business" for r in wins for t in r.turns)
  # ... and the own-suggestion variant every suggestion of pi_k in its own successful conversations
  own = by["filtered_bc_own"]
  own_dir = os.path.join(workdir, own["run_dir"])
  for k in range(2):
    wins = [r for r in conv_lib.read_jsonl(os.path.join(own_dir, "data", f"iter_{k}.jsonl")) if r.outcome >= 1]
    assert own["successes"][k] == len(wins)
    assert own["bc_examples"][k] == sum(len(r.agent_steps()) for r in wins)
  policies = ckpt_lib.Checkpointer(bc_dir, "policy")
  leaves = {s: jax.tree.leaves(policies.restore(s)[0]) for s in policies.all_steps()}
  policies.close()
  assert sorted(leaves) == [0, 1, 2]
  for k in range(2):  # pi_{k+1} moved away from pi_k exactly when there was something to clone
    moved = any(not np.array_equal(a, b) for a, b in zip(leaves[k], leaves[k + 1]))
    assert moved == (bc["bc_examples"][k] > 0)


def test_filtered_bc_pooled_adds_the_logs_q_pools(tmp_path):
  c = tiny_config()
  c.baselines.methods = ("filtered_bc_pooled",)
  with pytest.raises(errors.SettingsError, match="qfit.pool"):  # tiny pools nothing: it would be filtered_bc
    baselines.check_config(c)
  c.qfit.pool = 1
  c.qfit.view = "dialogue_state"  # tiny's token Q-model pools nothing (settings refuse it)
  rows = baselines.run_all(c, str(tmp_path), log=lambda _: None)
  row = _by_method(rows)["filtered_bc_pooled"]
  run_dir = os.path.join(str(tmp_path), row["run_dir"])
  logs = [conv_lib.read_jsonl(os.path.join(run_dir, "data", f"{n}.jsonl")) for n in ("behavior", "iter_0", "iter_1")]
  wins = [[r for r in records if r.outcome >= 1] for records in logs]
  sent = lambda rs: sum(t.role == "business" for r in rs for t in r.turns)
  assert wins[0]  # the staff's logs hold successes, so iteration 0 has something to clone beyond its own
  # iteration k clones the successes of D_k and of D_{k-1}, the staff's logs being D_{-1}
  assert row["successes"] == [len(wins[1]) + len(wins[0]), len(wins[2]) + len(wins[1])]
  assert row["bc_examples"] == [sent(wins[1]) + sent(wins[0]), sent(wins[2]) + sent(wins[1])]


def test_online_ppo_learns_on_its_sampled_tokens(all_rows):
  workdir, rows = all_rows
  row = _by_method(rows)["online_ppo"]
  run_dir = os.path.join(workdir, row["run_dir"])
  assert _log_sizes(run_dir, "online_") == {"online_0.jsonl": 8, "online_1.jsonl": 8}
  assert row["updates"] == 2
  for u in range(2):
    records = conv_lib.read_jsonl(os.path.join(run_dir, "data", f"online_{u}.jsonl"))
    with open(os.path.join(run_dir, "data", f"online_{u}.tokens.json")) as f:
      sampled = json.load(f)
    assert set(sampled) == {f"{r.id}/{i}" for r in records for i in range(len(r.agent_steps()))}
    assert all(0 < len(ids) <= tiny_config().data.max_action_len for ids in sampled.values())
  # The online update changed the policy (tiny learning rates still move weights).
  c = ckpt_lib.Checkpointer(run_dir, "online_ppo")
  state, meta = c.restore(2)
  c.close()
  c = ckpt_lib.Checkpointer(run_dir, "policy")
  pi0, _ = c.restore(0)
  c.close()
  assert meta["update"] == 2
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state["state"]["policy"]["params"]),
                                                      jax.tree.leaves(pi0)))


def test_rerun_reuses_rows_and_finished_methods(all_rows):
  workdir, rows = all_rows
  path = os.path.join(workdir, baselines.ROWS_FILE)
  # Drop a finished row from the file: the rerun takes it from the method's own directory, not by training again.
  kept = [r for r in rows if r["method"] != "online_ppo"]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  ran = []
  again = baselines.run_all(tiny_config(), workdir, log=ran.append)
  assert ran == ["baselines: online_ppo seed 0"]
  assert _by_method(again)["online_ppo"] == _by_method(rows)["online_ppo"]
  other = tiny_config()
  other.baselines.budget = 32
  with pytest.raises(ValueError, match="budget 16, not 32"):
    baselines.run_all(other, workdir)


# ---- table and plot ----


def test_table_and_plot_on_fake_rows(tmp_path):
  rows = []
  for seed, (a, b) in enumerate([(0.10, 0.20), (0.14, 0.26), (0.12, 0.29)]):
    rows.append({"method": "pi0", "seed": seed, "conversion": a, "conversion_lo": a - 0.03,
                 "conversion_hi": a + 0.03, "conversations_used": 0, "seconds": 100.0 + seed,
                 "curve": [{"conversations_used": 0, "conversion": a}]})
    rows.append({"method": "iterative_ppo_k2", "seed": seed, "conversion": b, "conversion_lo": b - 0.04,
                 "conversion_hi": b + 0.04, "conversations_used": 768, "seconds": 600.0,
                 "curve": [{"conversations_used": x, "conversion": b * x / 768} for x in (0, 384, 768)]})
  rows.append({"method": "behavior", "seed": 0, "conversion": 0.25, "conversion_lo": 0.21, "conversion_hi": 0.30,
               "conversations_used": 0, "seconds": None})
  path = tmp_path / "baselines.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  rows = baselines.read_rows(str(path))
  agg = {a["method"]: a for a in baselines.aggregate(rows)}
  ippo = agg["iterative_ppo_k2"]
  conv = np.asarray([0.20, 0.26, 0.29])
  half = 4.303 * conv.std(ddof=1) / math.sqrt(3)  # t_{0.975, 2}
  assert ippo["conversion"] == pytest.approx(conv.mean())
  assert (ippo["conversion_lo"], ippo["conversion_hi"]) == pytest.approx((conv.mean() - half, conv.mean() + half))
  assert agg["pi0"]["seconds"] == pytest.approx(101.0) and agg["behavior"]["seconds"] is None
  # One seed: that seed's own (Wilson) interval.
  assert (agg["behavior"]["conversion_lo"], agg["behavior"]["conversion_hi"]) == (0.21, 0.30)
  text = baselines.table(rows)
  assert f"| iterative_ppo_k2 | 3 | {conv.mean():.3f} ({conv.mean() - half:.3f}-{conv.mean() + half:.3f}) |" in text
  assert "| behavior | 1 | 0.250 (0.210-0.300) | 0.250 | 0 | - |" in text
  out = baselines.plot(rows, str(tmp_path / "baselines.png"))
  assert os.path.getsize(out) > 5000
