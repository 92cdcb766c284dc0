"""GRPO and RLOO as Iterative PPO's inner solver (iterppo_jax/group_pg.py; config.inner = grpo | rloo).

  * the group advantages, the KL-regularised sequence reward and the loss gradient against hand-computed values;
  * the closed form of the inner step, pi* ∝ pi_k exp(r / beta) (PAPER.md, "Why it works"): a tabular policy
    trained with the group maths lands on it with the KL in the reward, and away from it with DeepSeekMath's
    in-loss k3 KL (the reason 'reward' is the default); a real Transformer trained by solvers.train (the grpo and rloo rows)
    (sampler, scoring pass, jitted donated step) lands on it for both GRPO and RLOO;
  * the loop end to end with inner = grpo through iterppo_jax/studies/ablate_inner.py, with an exact resume inside the
    GRPO phase; and the ablation's rows, table and plot.
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iterppo_jax import checkpoint as ckpt_lib
from iterppo_jax import group_pg
from iterppo_jax import loop
from iterppo_jax import metrics as metrics_lib
from iterppo_jax import ppo
from iterppo_jax import sharding
from iterppo_jax import solvers
from iterppo_jax import train_state as ts
from iterppo_jax.studies import ablate_inner
from tests import test_loop as loop_tests
from tests import test_ppo_closed_form as toy

# ---- the maths against hand-computed values ----

# Three groups of G = 4: mixed, one outlier, all equal.
SCORES = jnp.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0, 3.0, 3.0, 3.0, 3.0])


def test_grpo_advantages_hand_computed():
  # Group 1: mean 0.5, sample std sqrt(1/3) -> +-0.5 / 0.57735 = +-0.866025.
  # Group 2: mean 2.75, deviations (-0.75, -0.75, -0.75, 2.25), sample variance 6.75 / 3 = 2.25, std 1.5.
  # Group 3: all equal -> 0 (no division by zero thanks to eps).
  expected = [0.866025, -0.866025, -0.866025, 0.866025, -0.5, -0.5, -0.5, 1.5, 0.0, 0.0, 0.0, 0.0]
  np.testing.assert_allclose(group_pg.grpo_advantages(SCORES, 4, 1e-6), expected, atol=1e-5)
  # G = 2: (1, 3) has mean 2 and sample std sqrt(2).
  np.testing.assert_allclose(group_pg.grpo_advantages(jnp.array([1.0, 3.0]), 2, 0.0), [-2 ** -0.5, 2 ** -0.5],
                             rtol=1e-6)


def test_rloo_advantages_hand_computed():
  # Group 1: 1 - (0 + 0 + 1) / 3 = 2/3 and 0 - (1 + 0 + 1) / 3 = -2/3.
  # Group 2: 2 - (2 + 2 + 5) / 3 = -1 and 5 - (2 + 2 + 2) / 3 = 3; group 3: 3 - 3 = 0.
  expected = [2 / 3, -2 / 3, -2 / 3, 2 / 3, -1.0, -1.0, -1.0, 3.0, 0.0, 0.0, 0.0, 0.0]
  np.testing.assert_allclose(group_pg.rloo_advantages(SCORES, 4), expected, rtol=1e-6, atol=1e-6)
  # Groups are contiguous rows: the same scores read as G = 2 give other baselines.
  np.testing.assert_allclose(group_pg.rloo_advantages(SCORES[:4], 2), [1.0, -1.0, -1.0, 1.0])


def test_bad_groups_are_refused():
  with pytest.raises(ValueError, match="multiple of 4"):
    group_pg.grpo_advantages(SCORES[:10], 4)
  with pytest.raises(ValueError, match="group_size must be >= 2"):
    group_pg.rloo_advantages(SCORES, 1)
  with pytest.raises(ValueError, match="algorithm"):
    group_pg.GroupConfig(algorithm="ppo")
  with pytest.raises(ValueError, match="RLOO puts the KL in the reward"):
    group_pg.GroupConfig(algorithm="rloo", kl_in="loss")


def test_sequence_reward_is_q_minus_beta_k1_sum():
  score = jnp.array([1.0, 0.5])
  logprobs = jnp.array([[-1.0, -2.0, jnp.nan], [-0.5, -0.5, -0.5]])  # NaN at a masked slot must not leak
  ref_logprobs = jnp.array([[-1.5, -1.0, 0.0], [-1.0, -0.5, -0.7]])
  mask = jnp.array([[True, True, False], [True, True, True]])
  rewards, kl = group_pg.sequence_rewards(score, logprobs, ref_logprobs, mask, 0.5)
  # Row 0: k1 = (0.5, -1.0), sum -0.5, r = 1 - 0.5 * (-0.5) = 1.25. Row 1: sum 0.7, r = 0.5 - 0.35 = 0.15.
  np.testing.assert_allclose(kl, [-0.5, 0.7], rtol=1e-6)
  np.testing.assert_allclose(rewards, [1.25, 0.15], rtol=1e-6)
  # The same as the gamma = 1 return of PPO's token rewards (one reward model, two solvers).
  token, _ = ppo.token_rewards(score, logprobs, ref_logprobs, mask, 0.5)
  np.testing.assert_allclose(jnp.sum(token, axis=1), rewards, rtol=1e-6)


def test_loss_gradient_is_advantage_per_valid_token():
  logprobs = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -0.7, -0.9]])
  mask = jnp.array([[True, True, False], [True, True, True]])
  advantages = jnp.array([2.0, -1.0])

  def loss(lp, coef):
    return group_pg.group_policy_loss(lp, logprobs, logprobs + 0.1, advantages, mask, 0.2, coef)[0]

  # At rho = 1 the clip is inactive: dL/dlogp_{i,t} = -A_i / (number of valid tokens) = -A_i / 5.
  grad = jax.grad(loss)(logprobs, 0.0)
  np.testing.assert_allclose(grad, [[-0.4, -0.4, 0.0], [0.2, 0.2, 0.2]], rtol=1e-6)
  # The in-loss k3 term: d/dlogp [c (e^{ref - lp} - (ref - lp) - 1)] / 5 = c (1 - e^{0.1}) / 5 per valid token.
  extra = jax.grad(loss)(logprobs, 0.3) - grad
  np.testing.assert_allclose(extra, 0.3 * (1 - np.exp(0.1)) / 5 * np.asarray(mask), rtol=1e-5)


# ---- the closed-form optimum of the inner step ----

TAB_ITERATIONS, TAB_BATCH, TAB_EPOCHS, TAB_MINIBATCHES = 120, 4096, 2, 4
TAB_REWARDS = jnp.asarray(toy.REWARDS)
TAB_REF_LOGITS = jnp.asarray(toy.REF_LOGITS)


def _optimum(pi_ref, beta):
  target = np.asarray(pi_ref, np.float64) * np.exp(np.asarray(toy.REWARDS, np.float64) / beta)
  return target / target.sum()


@functools.partial(jax.jit, static_argnames=("beta", "algorithm", "kl_in"))
def _train_tabular(key, beta, algorithm, kl_in):
  """Tabular one-token policy trained by the group maths (sample groups, rewards, advantages, clipped loss)."""
  cfg = group_pg.GroupConfig(algorithm=algorithm, group_size=4, kl_coef=beta, kl_in=kl_in)
  ref_table = jax.nn.log_softmax(TAB_REF_LOGITS)
  optimizer = optax.adam(optax.linear_schedule(0.05, 0.0, TAB_ITERATIONS * TAB_EPOCHS * TAB_MINIBATCHES))
  mask = jnp.ones((TAB_BATCH, 1), bool)
  loss_kl_coef = beta if kl_in == "loss" else 0.0

  def loss_fn(logits, batch):
    logprobs = jax.nn.log_softmax(logits)[batch["actions"]]
    return group_pg.group_policy_loss(logprobs, batch["old_logprobs"], batch["ref_logprobs"], batch["advantages"],
                                      batch["mask"], 0.2, loss_kl_coef)[0]

  def update(carry, minibatch):
    logits, opt_state = carry
    updates, opt_state = optimizer.update(jax.grad(loss_fn)(logits, minibatch), opt_state, logits)
    return (optax.apply_updates(logits, updates), opt_state), None

  def iteration(carry, step):
    logits, _ = carry
    key_sample, key_shuffle = jax.random.split(jax.random.fold_in(key, step))
    actions = jax.random.categorical(key_sample, logits, shape=(TAB_BATCH, 1))  # rows 4i..4i+3: one group
    old_logprobs = jax.nn.log_softmax(logits)[actions]
    ref_logprobs = ref_table[actions]
    score = TAB_REWARDS[actions[:, 0]]
    regularised, _ = group_pg.sequence_rewards(score, old_logprobs, ref_logprobs, mask, beta)
    advantages = group_pg.advantages_for(cfg, regularised if kl_in == "reward" else score)
    batch = {"actions": actions, "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs,
             "advantages": advantages, "mask": mask}

    def epoch(carry, epoch_key):
      order = jax.random.permutation(epoch_key, TAB_BATCH).reshape(TAB_MINIBATCHES, -1)
      return jax.lax.scan(update, carry, jax.tree.map(lambda x: x[order], batch))

    return jax.lax.scan(epoch, carry, jax.random.split(key_shuffle, TAB_EPOCHS))[0], None

  logits = TAB_REF_LOGITS  # start at pi_ref, as RLHF does
  (logits, _), _ = jax.lax.scan(iteration, (logits, optimizer.init(logits)), jnp.arange(TAB_ITERATIONS))
  return jax.nn.softmax(logits)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_tabular_group_solver_reaches_closed_form(algorithm, beta):
  pi_ref = np.asarray(jax.nn.softmax(TAB_REF_LOGITS), np.float64)
  optimum = _optimum(pi_ref, beta)
  assert toy._total_variation(pi_ref, optimum) > 0.3  # far from the start: no pass by standing still
  trained = np.asarray(_train_tabular(jax.random.key(0), beta, algorithm, "reward"), np.float64)
  assert toy._total_variation(trained, optimum) < 0.02, (trained.round(3), optimum.round(3))


def test_in_loss_k3_kl_misses_closed_form():
  # DeepSeekMath's placement: its KL gradient is that of KL(pi_k || pi) and the std rescales Q but not the KL.
  beta = 0.5
  pi_ref = np.asarray(jax.nn.softmax(TAB_REF_LOGITS), np.float64)
  optimum = _optimum(pi_ref, beta)
  trained = np.asarray(_train_tabular(jax.random.key(0), beta, "grpo", "loss"), np.float64)
  tv = toy._total_variation(trained, optimum)
  assert tv > 0.1, (trained.round(3), optimum.round(3))
  # It still improves the expected reward (it is a sound RL update, with another regulariser).
  assert float(trained @ toy.REWARDS) > float(pi_ref @ toy.REWARDS) + 0.2


@pytest.mark.slow  # ~15-20 s each on two cores
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_group_solvers_reach_closed_form(algorithm):
  """The real code path: a one-layer Transformer, the jitted sampler, scoring pass and donated update step."""
  beta, steps, batch, minibatch = 0.5, 60, 512, 128
  config = toy._config()
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  tx = optax.adam(optax.linear_schedule(toy.LEARNING_RATE, 0.0, steps * 2 * (batch // minibatch)))
  policy, state = ts.init_trainable(lambda: toy._make_reference(config), tx, mesh)
  ref_params = ts.copy_params(state.params)  # pi_k: frozen, and a copy (the state is donated)
  pi_ref = toy._next_token_probs(policy, ref_params)
  optimum = _optimum(pi_ref, beta)
  assert toy._total_variation(pi_ref, optimum) > 0.3, (pi_ref.round(3), optimum.round(3))
  cfg = group_pg.GroupConfig(algorithm=algorithm, group_size=4, kl_coef=beta, epochs=2, minibatch_size=minibatch,
                             max_new_tokens=1)
  prompts = {"tokens": np.full((1, 1), toy.PROMPT_TOKEN, np.int32), "valid": np.ones((1, 1), bool)}
  solver = solvers.SOLVERS[algorithm]
  with pytest.raises(ValueError, match="multiple of group size 4"):
    solvers.train(solver, policy, None, solvers.init_state(state, beta), ref_params, toy._reward_fn,
                  jnp.asarray(toy.REWARDS), prompts, cfg, steps=1, batch_size=510, seed=0, eos_id=toy.VOCAB - 1,
                  pad_id=0)
  state, metrics = solvers.train(solver, policy, None, solvers.init_state(state, beta), ref_params, toy._reward_fn,
                                 jnp.asarray(toy.REWARDS), prompts, cfg, steps=steps, batch_size=batch, seed=0,
                                 eos_id=toy.VOCAB - 1, pad_id=0)
  trained = toy._next_token_probs(policy, state.model.params)
  tv = toy._total_variation(trained, optimum)
  print(f"{algorithm}: TV(pi_ref, pi*)={toy._total_variation(pi_ref, optimum):.3f} TV(trained, pi*)={tv:.4f}")
  assert metrics[f"{algorithm}/response_len"] == 1.0
  assert tv < 0.05, (algorithm, trained.round(3), optimum.round(3))
  # The sampled KL agrees with the exact KL(pi || pi_ref) of the trained policy.
  exact_kl = float(np.sum(trained * np.log(trained / pi_ref)))
  assert abs(metrics[f"{algorithm}/kl_k1"] - exact_kl) < 0.1 + 0.2 * exact_kl, (metrics, exact_kl)


# ---- the loop with inner = grpo, and the ablation entry point ----


def _policy_leaves(workdir, step):
  c = ckpt_lib.Checkpointer(workdir, "policy")
  tree, _ = c.restore(step)
  c.close()
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow  # ~90 s on two cores
def test_loop_with_grpo_and_resume_inside_the_phase(tmp_path):
  config = loop_tests.tiny_config(iterations=1)
  workdir = str(tmp_path / "ablate")
  rows = ablate_inner.run_ablation(config, workdir, inners=("grpo",))
  run_dir = os.path.join(workdir, "grpo")
  assert [r["iteration"] for r in rows] == [0, 1] and rows[0]["kl_to_prev"] is None
  assert rows[1]["kl_to_prev"] > 0 and rows[1]["inner_seconds"] > 0
  with open(os.path.join(workdir, "ablate_inner.jsonl")) as f:
    assert [json.loads(line) for line in f] == rows
  # GRPO ran (its own checkpoints and metrics), not PPO, and nothing of a critic.
  assert os.path.isdir(os.path.join(run_dir, "checkpoints", "grpo", "0"))
  assert not os.path.exists(os.path.join(run_dir, "checkpoints", "ppo"))
  records = metrics_lib.read_metrics(run_dir)
  grpo = [r for r in records if r.get("phase") == "grpo/0"]
  assert len(grpo) == config.ppo.steps and all("grpo/kl_k1" in r for r in grpo)
  assert not any(k.startswith("ppo/") for r in records for k in r)

  # Resume inside the GRPO phase, from the same shared prefix: identical final parameters.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(os.path.join(workdir, "_shared"), resumed)
  grpo_config = loop_tests.tiny_config(iterations=1, stop_after_ppo_step=2)
  grpo_config.inner = "grpo"
  with pytest.raises(loop.Interrupted, match="grpo step 2"):
    loop.run(grpo_config, resumed)
  grpo_config.loop.stop_after_ppo_step = 0
  loop.run(grpo_config, resumed)
  for a, b in zip(_policy_leaves(run_dir, 1), _policy_leaves(resumed, 1)):
    np.testing.assert_array_equal(a, b)
  # The policy really changed (so the equality is not vacuous).
  assert any(not np.array_equal(a, b) for a, b in zip(_policy_leaves(run_dir, 0), _policy_leaves(run_dir, 1)))


def test_ablation_rows_table_and_plot(tmp_path):
  def evaluation(conversion):
    return {"conversion": conversion, "conversion_lo": conversion - 0.05, "conversion_hi": conversion + 0.05,
            "accept_rate": 0.4, "kl_to_pi0": 0.1}

  summary = {"iterations": [evaluation(0.10), evaluation(0.20), evaluation(0.15)]}
  records = [{"phase": "time", "iteration": 0, "step": 0, "time/sft": 9.0},
             {"phase": "time", "iteration": 0, "step": 0, "time/ppo": 30.0},
             {"phase": "improve", "iteration": 0, "step": 0, "improve/kl_to_pi_k": 0.5},
             {"phase": "improve", "iteration": 1, "step": 1, "improve/kl_to_pi_k": 0.9},
             {"phase": "improve", "iteration": 1, "step": 1, "improve/kl_to_pi_k": 0.7},  # resumed: the last wins
             {"phase": "time", "iteration": 1, "step": 1, "time/ppo": 40.0}]
  rows = ablate_inner.solver_rows("rloo", summary, records)
  assert [(r["iteration"], r["kl_to_prev"], r["inner_seconds"]) for r in rows] == [
      (0, None, None), (1, 0.5, 30.0), (2, 0.7, 40.0)]
  rows += ablate_inner.solver_rows("ppo", summary, records)
  text = ablate_inner.table(rows)
  assert "| rloo | pi_1 | 0.200 (0.150-0.250) | 0.500 | 30 | 0.10 |" in text
  assert "| ppo | pi_0 | 0.100 (0.050-0.150) | - | - | 0.10 |" in text
  path = ablate_inner.plot(rows, str(tmp_path / "ablate.png"), {"oracle": evaluation(0.9)})
  assert os.path.getsize(path) > 1000
  with pytest.raises(ValueError, match="subset"):
    ablate_inner.run_ablation(loop_tests.tiny_config(), str(tmp_path / "bad"), inners=("ppo", "dpo"))
  bad = loop_tests.tiny_config()
  bad.ppo.batch_size = 6
  with pytest.raises(ValueError, match="multiple of group.size"):
    ablate_inner.run_ablation(bad, str(tmp_path / "bad"), inners=("grpo",))
