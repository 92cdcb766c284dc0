"""The dialogue-state Q-model (q_table.py): SARSA and Monte Carlo tables against hand-computed values, its JSON,
the host-computed PPO reward, and the loop with qfit.view=dialogue_state (diagnostics, resume, refusals)."""

import dataclasses
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sales as sales_config
from iterppo_jax import conversation as conv_lib
from iterppo_jax import data as data_lib
from iterppo_jax import loop
from iterppo_jax import ppo
from iterppo_jax import q_ranking
from iterppo_jax import q_table
from iterppo_jax.envs import booking
from iterppo_jax.envs import registry
from iterppo_jax.envs import sales

GAMMA = 0.9


def chain():
  """Three logged conversations over states s0 -> s1 (or s2), two decisions each.

  A: (s0, a) r=0 -> (s1, b) r=1.           B: (s0, c) r=0 -> (s1, x) r=0, x a randomised draw where pi's own act is b.
  C: (s0, e) r=0 -> (s2, x) r=0, pi's own act at s2 is b, and (s2, b) is never logged.
  """
  D = q_table.Decision
  return [D(("s0",), ("a",), ("a",), 0.0, 1, GAMMA, True, "A"), D(("s1",), ("b",), ("b",), 1.0, -1, 1.0, True, "A"),
          D(("s0",), ("c",), ("c",), 0.0, 3, 0.0, False, "B"), D(("s1",), ("x",), ("b",), 0.0, -1, 0.0, True, "B"),
          D(("s0",), ("e",), ("e",), 0.0, 5, 0.0, False, "C"), D(("s2",), ("x",), ("b",), 0.0, -1, 0.0, True, "C")]


def test_sarsa_fixed_point_continues_with_pis_own_action():
  table = q_table.fit_sarsa(chain(), GAMMA)
  q = {key: v for key, (v, _) in table.cells.items()}
  assert q[(("s1",), ("b",))] == pytest.approx(1.0)
  assert q[(("s1",), ("x",))] == pytest.approx(0.0)
  assert q[(("s0",), ("a",))] == pytest.approx(GAMMA)
  # B's successor is pi's own act b at s1, not the randomised x: SARSA of pi, not of the logged continuation
  assert q[(("s0",), ("c",))] == pytest.approx(GAMMA)
  # (s2, b) was never logged: it takes b's mean Q (1.0), so Q(s0, e) = gamma
  assert q[(("s0",), ("e",))] == pytest.approx(GAMMA)
  # an unseen pair scores its act's mean, just below a seen cell with the same value
  assert table.value(("s9",), ("b",)) == pytest.approx(1.0 - q_table.UNSEEN_PENALTY)
  assert table.value(("s9",), ("zzz",)) == pytest.approx(table.default - q_table.UNSEEN_PENALTY)


def test_td_lambda_mixes_pis_returns_and_bootstraps():
  """(s0, a) leads to (s1, b) (then a sale) or to (s3, b) (no sale there; another conversation sold from (s3, b),
  so Q(s3, b) = 0.5). SARSA bootstraps from the cells, lambda = 1 follows each logged return, lambda = 0.5 mixes;
  with no randomised turn, lambda = 1 is the Monte Carlo mean."""
  D = q_table.Decision
  ds = [D(("s0",), ("a",), ("a",), 0.0, 1, GAMMA, True, "A"), D(("s1",), ("b",), ("b",), 1.0, -1, 1.0, True, "A"),
        D(("s0",), ("a",), ("a",), 0.0, 3, 0.0, True, "D"), D(("s3",), ("b",), ("b",), 0.0, -1, 0.0, True, "D"),
        D(("s3",), ("b",), ("b",), 1.0, -1, 1.0, True, "E")]
  def values(table):
    return {key: v for key, (v, _) in table.cells.items()}

  value = lambda lam: values(q_table.fit_sarsa(ds, GAMMA, lam=lam))[(("s0",), ("a",))]  # noqa: E731
  assert value(0.0) == pytest.approx(0.75 * GAMMA)
  assert value(0.5) == pytest.approx(0.625 * GAMMA)
  assert value(1.0) == pytest.approx(0.5 * GAMMA)
  assert values(q_table.fit_sarsa(ds, GAMMA, lam=1.0)) == pytest.approx(values(q_table.fit_mc(ds, all_turns=True)))
  # the trace is cut where the logged next act is a randomised draw (B's x at s1): lambda changes nothing there
  assert values(q_table.fit_sarsa(chain(), GAMMA, lam=1.0)) == pytest.approx(values(q_table.fit_sarsa(chain(), GAMMA)))
  with pytest.raises(ValueError, match="lam must be in"):
    q_table.fit_sarsa(ds, GAMMA, lam=1.5)


def test_sarsa_on_anothers_logs_averages_over_pis_samples():
  """Fitted Q evaluation: the logs follow another policy (at s1 it took b); pi's sampled acts there are b and y,
  and (s1, y) was logged once elsewhere with no sale, so Q^pi(s0, a) = gamma * (Q(s1, b) + Q(s1, y)) / 2. With
  the logged next act only (no samples) it is the logging policy's gamma * Q(s1, b)."""
  D = q_table.Decision
  ds = [D(("s0",), ("a",), ("b",), 0.0, 1, GAMMA, True, "A"),
        D(("s1",), ("b",), ("b",), 1.0, -1, 1.0, True, "A", own_acts=(("b",), ("y",))),
        D(("s1",), ("y",), ("y",), 0.0, -1, 0.0, True, "F")]
  q = {key: v for key, (v, _) in q_table.fit_sarsa(ds, GAMMA).cells.items()}
  assert q[(("s0",), ("a",))] == pytest.approx(GAMMA * 0.5)
  assert q[(("s1",), ("b",))] == pytest.approx(1.0)
  logged = [dataclasses.replace(d, own_acts=()) for d in ds]
  q_logged = {key: v for key, (v, _) in q_table.fit_sarsa(logged, GAMMA).cells.items()}
  assert q_logged[(("s0",), ("a",))] == pytest.approx(GAMMA)
  # several samples cut the lambda trace: lambda = 1 bootstraps there too instead of following the logged return
  q_lam = {key: v for key, (v, _) in q_table.fit_sarsa(ds, GAMMA, lam=1.0).cells.items()}
  assert q_lam[(("s0",), ("a",))] == pytest.approx(GAMMA * 0.5)


def test_monte_carlo_keeps_unbiased_returns_only():
  q = {key: v for key, (v, _) in q_table.fit_mc(chain()).cells.items()}
  assert (("s0",), ("c",)) not in q  # its return follows a randomised draw: not a sample of Q^pi
  assert q[(("s0",), ("a",))] == pytest.approx(GAMMA)
  assert q[(("s1",), ("x",))] == pytest.approx(0.0)
  q_all = {key: v for key, (v, _) in q_table.fit_mc(chain(), all_turns=True).cells.items()}
  assert q_all[(("s0",), ("c",))] == pytest.approx(0.0)


def test_json_round_trip_scores_the_same(tmp_path):
  table = q_table.fit_sarsa(chain(), GAMMA)
  path = str(tmp_path / "q.json")
  table.save(path)
  back = q_table.TableQ.load(path, sales.dialogue_state, sales.act_key)
  assert back.cells == table.cells and back.acts == pytest.approx(table.acts)
  turns = [conv_lib.Turn(role="customer", text="Hi, I need a laptop.")]
  assert sales.dialogue_state(turns)[0] is True  # the need is read from the text
  assert back.score(turns, "Which budget do you have in mind?") == pytest.approx(
      back.value(sales.dialogue_state(turns), sales.act_key(turns, "Which budget do you have in mind?")))


def test_host_reward_runs_inside_jit():
  seen = {}

  def score_fn(prompt_tokens, response, response_valid):
    seen["P"] = prompt_tokens.shape[1]
    return prompt_tokens[:, -1] * 10.0 + response_valid.sum(1)

  reward_fn = ppo.make_host_reward_fn(score_fn)
  P, N = 3, 4
  tokens = jnp.asarray([[0, 1, 2, 5, 6, 7, 7], [0, 0, 3, 5, 5, 9, 9]], jnp.int32)
  valid = jnp.asarray([[0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0]], bool)
  out = jax.jit(reward_fn)(jnp.zeros(()), tokens, jnp.zeros_like(tokens), valid, jnp.asarray([P + 1, P + 2]),
                           jnp.full((2,), P - 1))
  assert seen["P"] == P and out.shape == (2,)
  np.testing.assert_allclose(np.asarray(out), [22.0, 33.0])
  assert N == tokens.shape[1] - P


def _tiny(workdir_name, tmp_path, **overrides):
  config = sales_config.get_config("tiny")
  config.qfit.view = "dialogue_state"
  config.qfit.method = "td"
  config.loop.rank_states = 2
  config.loop.rank_rollouts = 2
  config.loop.tensorboard = False
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config, str(tmp_path / workdir_name)


def test_loop_with_the_dialogue_state_q_ranks_and_resumes(tmp_path, monkeypatch):
  config, workdir = _tiny("run", tmp_path)
  summary = loop.run(config, workdir)
  for k in range(config.loop.iterations):
    assert os.path.exists(os.path.join(workdir, "checkpoints", "qtable", f"{k}.json"))
  metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  cells = [m["qfit/table_cells"] for m in metrics if "qfit/table_cells" in m]
  assert len(cells) == config.loop.iterations and min(cells) > 1
  assert any("qfit/rank_top1" in m for m in metrics)
  # the reference of pi_k's mode: the same candidates ranked by how often D_k logged their cell, recomputed
  mode = {m["iteration"]: m["qfit/rank_mode_top1"] for m in metrics if "qfit/rank_mode_top1" in m}
  assert sorted(mode) == list(range(config.loop.iterations))
  last = config.loop.iterations - 1
  action_set = q_ranking.ActionSet.load(os.path.join(workdir, "data", f"ranking_{last}.json"))
  table = q_table.TableQ.load(os.path.join(workdir, "checkpoints", "qtable", f"{last}.json"), sales.dialogue_state,
                              sales.act_key)
  evals = {r.id: r for r in conv_lib.read_jsonl(os.path.join(workdir, "data", f"eval_{last}.jsonl"))}
  counts = np.zeros_like(action_set.true_q)
  for i, ((cid, t), candidates) in enumerate(zip(action_set.where, action_set.candidates)):
    turns = evals[cid].turns[:t]
    for j, c in enumerate(candidates):
      counts[i, j] = table.cells.get((sales.dialogue_state(turns), sales.act_key(turns, c)), (0, 0))[1]
  expected = q_ranking.ranking_metrics(counts, action_set.true_q, action_set.mask, action_set.own)["top1"]
  assert mode[last] == pytest.approx(expected)
  # how far the step can climb Q_k, on pi_k's own suggestions of D_k (randomised turns left out), recomputed
  names = ("q_sd_in_state", "q_sd_of_state_value", "step_raise")
  reach = {m["iteration"]: {n: m[f"qfit/{n}"] for n in names} for m in metrics if "qfit/step_raise" in m}
  own = [k for k in range(config.loop.iterations) if k or config.loop.first_data == "policy"]
  assert sorted(reach) == own and own  # not on the staff's logs (the tiny config's D_0)
  for k, logged in reach.items():
    records = conv_lib.read_jsonl(os.path.join(workdir, "data", f"iter_{k}.jsonl"))
    table = q_table.TableQ.load(os.path.join(workdir, "checkpoints", "qtable", f"{k}.json"), sales.dialogue_state,
                                sales.act_key)
    by_id, by_state = {r.id: r for r in records}, {}
    for e in data_lib.examples_from_conversations(records, config.gamma):
      if not e.explored:
        turns = data_lib.turns_before(by_id[e.conversation_id], e)
        by_state.setdefault(repr(sales.dialogue_state(turns)), []).append(table.score(turns, e.suggestion))
    assert logged == pytest.approx(q_ranking.step_reach(list(by_state.values()), config.ppo.kl_coef))
    assert min(logged.values()) > 0
  # The logs-only measures on every randomised turn of D_k (qfit.cross_fit folds): the loop scored all of them,
  # more than the held-out tenth; each fold is scored by a table that never saw its conversations, and the older
  # logs are in every fold's table.
  k = own[-1]
  records = conv_lib.read_jsonl(os.path.join(workdir, "data", f"iter_{k}.jsonl"))
  examples = data_lib.examples_from_conversations(records, config.gamma)
  explored_ids = {e.conversation_id for e in examples if e.explored}
  cv = next(m for m in metrics if "qfit/logged_cv_turns" in m and m["iteration"] == k)
  assert cv["qfit/logged_cv_turns"] == sum(e.explored for e in examples) > cv.get("qfit/logged_turns", 0)
  assert "qfit/logged_cv_adv_corr" in cv and "qfit/logged_cv_ips_pick_gain" in cv
  ds = q_table.decisions(records, examples, sales.dialogue_state, sales.act_key)
  older_records = conv_lib.read_jsonl(os.path.join(workdir, "data", "behavior.jsonl"))[:20]
  older = [dataclasses.replace(d, conversation_id="older/" + d.conversation_id, target_valid=False)
           for d in q_table.decisions(older_records, data_lib.examples_from_conversations(older_records, config.gamma),
                                      sales.dialogue_state, sales.act_key)]
  fitted, scored = [], []

  def fit(train):
    assert all(d.next_index < 0 or train[d.next_index].conversation_id == d.conversation_id for d in train)
    fitted.append({d.conversation_id for d in train})
    return q_table.fit_sarsa(train, config.gamma, sales.dialogue_state, sales.act_key)

  candidate_scores = loop._candidate_scores
  monkeypatch.setattr(loop, "_candidate_scores", lambda score, recs, ex: (
      scored.append({e.conversation_id for e in ex}), candidate_scores(score, recs, ex))[1])
  out = loop._cross_fitted_ranking(types.SimpleNamespace(config=config), records, examples, ds, older, fit)
  assert out["logged_cv_turns"] == cv["qfit/logged_cv_turns"] and len(fitted) == len(scored) >= 2
  for train_ids, scored_ids in zip(fitted, scored):
    assert scored_ids and not train_ids & scored_ids
    assert {d.conversation_id for d in older} <= train_ids
  assert set().union(*scored) == explored_ids
  config.qfit.cross_fit = 1
  assert loop._cross_fitted_ranking(types.SimpleNamespace(config=config), records, examples, ds, older, fit) == {}
  config.qfit.cross_fit = 10
  # PPO moved the policy with the table's reward
  assert summary["iterations"][1]["kl_to_pi0"] > 0
  # stopped after the Q-fit of iteration 1, then resumed: the same policy as the uninterrupted run
  config2, workdir2 = _tiny("resumed", tmp_path)
  config2.loop.stop_after_phase = "qfit/1"
  with pytest.raises(loop.Interrupted):
    loop.run(config2, workdir2)
  config2.loop.stop_after_phase = ""
  resumed = loop.run(config2, workdir2)
  assert [h["conversion"] for h in resumed["iterations"]] == [h["conversion"] for h in summary["iterations"]]
  assert resumed["iterations"][-1]["kl_to_pi0"] == pytest.approx(summary["iterations"][-1]["kl_to_pi0"])


def test_setup_refuses_a_bad_view_before_any_work(tmp_path, monkeypatch):
  config, workdir = _tiny("bad", tmp_path)
  config.qfit.view = "pixels"
  with pytest.raises(ValueError, match="qfit.view must be one of"):
    loop.setup(config, workdir)
  assert not os.path.exists(workdir)
  # a domain whose module defines no dialogue_state / act_key
  plain = types.ModuleType("plain")
  for name in registry.REQUIRED:  # the booking domain without its tracker
    setattr(plain, name, getattr(booking, name))
  monkeypatch.setitem(sys.modules, "my_pkg.plain", plain)
  config, workdir = _tiny("plain", tmp_path)
  config.env.domain = "my_pkg.plain"
  with pytest.raises(ValueError, match="no dialogue-state tracker"):
    loop.setup(config, workdir)
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("domain", sorted(registry.DOMAINS))
def test_every_domain_has_a_tracker_that_separates_the_oracles_act(domain):
  """On behaviour conversations: keys are JSON-safe tuples, the state key moves along a conversation, and at
  every state the oracle's act and small talk get different act keys (else no table could rank them)."""
  import importlib
  config = importlib.import_module(f"configs.{domain}").get_config("tiny")
  env = registry.make_env(config.env)
  records = env.play(registry.make_policy(domain, "behavior", config.env), 12, seed=3, batch_size=12)
  state_fn, act_fn = registry.tracker(domain)
  script = registry.script(domain)
  states = set()
  for record in records:
    for i in record.agent_steps():
      turns = record.turns[:i]
      state = state_fn(turns)
      states.add(state)
      oracle = script.business_text(script.oracle_act(script.visible_facts(turns)), np.random.default_rng(0))
      assert act_fn(turns, oracle) != act_fn(turns, "Lovely weather today, isn't it?"), (domain, turns)
      assert q_table._tuple(json.loads(json.dumps(list(state)))) == state
  assert len(states) > 3


def test_q0_on_the_staffs_logs_can_bootstrap_from_pi0s_samples(tmp_path):
  """qfit.next_act=pi_k: D_0 is the staff's logs, which pi_0 did not make, so Q_0 bootstraps from pi_0's samples
  (fitted Q evaluation); D_1 is pi_1's own deployment and bootstraps from its logged acts."""
  config, workdir = _tiny("fqe0", tmp_path, **{"qfit.next_act": "pi_k", "loop.iterations": 2,
                                               "loop.stop_after_phase": "qfit/1"})
  with pytest.raises(loop.Interrupted):
    loop.run(config, workdir)
  metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {m["iteration"]: m["qfit/off_policy"] for m in metrics if "qfit/off_policy" in m} == {0: 1.0, 1: 0.0}
  logged, workdir2 = _tiny("logged0", tmp_path, **{"loop.iterations": 1, "loop.stop_after_phase": "qfit/0"})
  with pytest.raises(loop.Interrupted):
    loop.run(logged, workdir2)
  q = [json.load(open(os.path.join(w, "checkpoints", "qtable", "0.json"))) for w in (workdir, workdir2)]
  assert q[0]["cells"] != q[1]["cells"]  # the same logs, another policy's continuation


def test_pooling_earlier_logs_bootstraps_from_pi_ks_samples(tmp_path):
  """qfit.pool=-1: Q_1 is also fitted on D_0 (here the behaviour logs), every one of its decisions, with pi_1's
  own samples as the next actions; a mistyped pool is refused up front."""
  config, workdir = _tiny("pooled", tmp_path, **{"qfit.pool": -1, "loop.iterations": 2})
  loop.run(config, workdir)
  metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  pooled = {m["iteration"]: m["qfit/pooled_examples"] for m in metrics if "qfit/pooled_examples" in m}
  behaviour = conv_lib.read_jsonl(os.path.join(workdir, "data", "behavior.jsonl"))
  assert pooled == {1: sum(len(r.agent_steps()) for r in behaviour)}
  # by default Q_0 bootstraps from the staff's logged next acts
  assert {m["iteration"]: m["qfit/off_policy"] for m in metrics if "qfit/off_policy" in m} == {0: 0.0, 1: 0.0}
  records = behaviour[:3]
  examples = data_lib.examples_from_conversations(records, gamma=0.9)
  n = sum(len(r.agent_steps()) for r in records)
  own = q_table.decisions(records, examples, sales.dialogue_state, sales.act_key, own_texts=["Which budget?"] * n)
  assert {d.own_act for d in own} == {("ask_budget",)}
  with pytest.raises(ValueError, match="own suggestions"):
    q_table.decisions(records, examples, sales.dialogue_state, sales.act_key, own_texts=["x"])
  several = q_table.decisions(records, examples, sales.dialogue_state, sales.act_key,
                              own_texts=[["Which budget?", "Hello there!"]] * n)
  assert {d.successors() for d in several} == {(("ask_budget",), sales.act_key([], "Hello there!"))}
  bad, workdir = _tiny("bad_pool", tmp_path, **{"qfit.pool": -2})
  with pytest.raises(ValueError, match="qfit.pool must be an integer >= -1"):
    loop.setup(bad, workdir)


def test_shrinkage_pulls_rare_cells_to_their_prior():
  """Monte Carlo cells (s0, a): targets 1, 1; (s1, a): 0; (s1, b): 1. With m = 1 toward the act's pooled mean
  (a: 2/3, b: 1): (2 + 2/3) / 3, (0 + 2/3) / 2, (1 + 1) / 2; toward state mean + act offset (overall 3/4, s0: 1,
  s1: 1/2) the priors are 2/3 + 1 - 3/4, 2/3 + 1/2 - 3/4 and 1 + 1/2 - 3/4. m = 0 keeps the plain means, and SARSA
  on one-step conversations is the same table."""
  D = q_table.Decision
  ds = [D(("s0",), ("a",), ("a",), 1.0, -1, 1.0, True, "A"), D(("s0",), ("a",), ("a",), 1.0, -1, 1.0, True, "B"),
        D(("s1",), ("a",), ("a",), 0.0, -1, 0.0, True, "C"), D(("s1",), ("b",), ("b",), 1.0, -1, 1.0, True, "D")]
  values = lambda t: {key: v for key, (v, _) in t.cells.items()}  # noqa: E731
  s0a, s1a, s1b = (("s0",), ("a",)), (("s1",), ("a",)), (("s1",), ("b",))
  assert values(q_table.fit_mc(ds)) == pytest.approx({s0a: 1.0, s1a: 0.0, s1b: 1.0})
  act = values(q_table.fit_mc(ds, shrink=1.0))
  assert act == pytest.approx({s0a: 8 / 9, s1a: 1 / 3, s1b: 1.0})
  assert values(q_table.fit_sarsa(ds, GAMMA, shrink=1.0)) == pytest.approx(act)
  add = values(q_table.fit_mc(ds, shrink=1.0, shrink_to="additive"))
  assert add == pytest.approx({s0a: (2 + 2 / 3 + 1 / 4) / 3, s1a: (2 / 3 - 1 / 4) / 2, s1b: (1 + 3 / 4) / 2})
  with pytest.raises(ValueError, match="shrink"):
    q_table.fit_mc(ds, shrink=-1.0)


def test_twoway_prior_measures_an_act_within_its_states():
  """'close' is played 20 times where deals are near (0.6, as good as the other act there) and once where an
  objection is open (0.0 there, against 0.2 for answering it). Toward state mean + act offset, close's offset
  carries its states' value and the one-off close cell tops the bad state; toward the two-way fit (the act's
  effect measured within its states: none), the answer keeps the top."""
  D = q_table.Decision
  ds = []
  for i in range(20):  # near a deal: close and propose both 0.6 on average
    ds.append(D(("near",), ("close",), ("close",), float(i % 5 < 3), -1, float(i % 5 < 3), True, f"c{i}"))
    ds.append(D(("near",), ("propose",), ("propose",), float(i % 5 < 3), -1, float(i % 5 < 3), True, f"p{i}"))
  for i in range(20):  # an objection open: answering it converts 0.2, proposing 0.1
    ds.append(D(("open",), ("answer",), ("answer",), float(i % 5 == 0), -1, float(i % 5 == 0), True, f"a{i}"))
    ds.append(D(("open",), ("propose",), ("propose",), float(i % 10 == 0), -1, float(i % 10 == 0), True, f"q{i}"))
  ds.append(D(("open",), ("close",), ("close",), 0.0, -1, 0.0, True, "x"))
  top = lambda t: max((a for s, a in t.cells if s == ("open",)), key=lambda a: t.cells[(("open",), a)][0])  # noqa: E731
  assert top(q_table.fit_mc(ds, shrink=5.0, shrink_to="additive")) == ("close",)
  twoway = q_table.fit_sarsa(ds, GAMMA, shrink=5.0, shrink_to="twoway")
  assert top(twoway) == ("answer",)
  assert twoway.cells[(("open",), ("close",))][0] < twoway.cells[(("open",), ("answer",))][0]


def test_centred_reward_subtracts_pi_ks_state_value(tmp_path):
  """ppo.center_reward=state: PPO's reward is Q_k(s, a) - V_k(s), V_k the mean of Q_k over pi_k's suggestions of D_k
  at the tracker state (a shift per state: the step's exact solution is unchanged); the token Q-model has no
  tracker state, so the setting is refused with it."""
  config, workdir = _tiny("centred", tmp_path, **{"ppo.center_reward": "state", "loop.iterations": 1,
                                                  "loop.first_data": "policy", "loop.rank_states": 0})
  loop.run(config, workdir)
  records = conv_lib.read_jsonl(os.path.join(workdir, "data", "iter_0.jsonl"))
  table = q_table.TableQ.load(os.path.join(workdir, "checkpoints", "qtable", "0.json"), sales.dialogue_state,
                              sales.act_key)
  examples = data_lib.examples_from_conversations(records, config.gamma)
  values = loop.state_values(table, records, examples)
  by_id, own, explored = {r.id: r for r in records}, {}, {}
  for e in examples:
    turns = data_lib.turns_before(by_id[e.conversation_id], e)
    (explored if e.explored else own).setdefault(sales.dialogue_state(turns), []).append(
        table.score(turns, e.suggestion))
  assert any(explored) and set(values) == set(own) | set(explored)
  for state, v in values.items():
    assert v == pytest.approx(np.mean(own.get(state) or explored[state]))
  # the rewards PPO saw are centred: their mean over the batches is near 0, where Q_0's level is not
  scores = [m["ppo/score"] for m in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
            if "ppo/score" in m]
  level = np.mean([q for qs in own.values() for q in qs])
  assert scores and abs(np.mean(scores)) < 0.25 * level
  bad, workdir = _tiny("centred_tokens", tmp_path, **{"ppo.center_reward": "state", "qfit.view": "tokens"})
  with pytest.raises(ValueError, match="center_reward='state' subtracts the dialogue-state table's state value"):
    loop.setup(bad, workdir)
  assert not os.path.exists(workdir)


def test_pessimism_reads_a_lower_bound_that_rare_cells_pay_most(tmp_path):
  """Monte Carlo cells (s0, a): 1, 0, 1, 0; (s0, b): 1; (s1, a): 1, 1; (s1, b): 0, 0; (s2, a): 1. The targets'
  spread around their cell means is sigma = sqrt(1 / (10 - 5)); read with z, a cell is its mean less
  z sigma / sqrt(n + m), so at s0 the lucky one-off b tops a (4 targets) while z < 1 / sigma = 2.24, not at 3; the
  pair (s2, b), never logged, is its additive prior mean + effect(s2) + effect(b) = 0.6 + 0.4 - 0.6 + 1/3 less
  z sigma. z = 0 is the plain table, and SARSA on one-step conversations gives the same bound."""
  D = q_table.Decision
  logged = [("s0", "a", 1), ("s0", "a", 0), ("s0", "a", 1), ("s0", "a", 0), ("s0", "b", 1), ("s1", "a", 1),
            ("s1", "a", 1), ("s1", "b", 0), ("s1", "b", 0), ("s2", "a", 1)]
  ds = [D((x,), (a,), (a,), float(g), -1, float(g), True, f"c{i}") for i, (x, a, g) in enumerate(logged)]
  sigma = np.sqrt(1 / 5)
  plain = q_table.fit_mc(ds, shrink_to="additive")
  assert plain.value(("s0",), ("b",)) > plain.value(("s0",), ("a",))
  assert "pessimism" not in plain.to_json() and plain.value(("s2",), ("b",)) == pytest.approx(1 / 3 - 1e-3)
  for z in (1.0, 3.0):
    lcb = q_table.fit_mc(ds, shrink_to="additive", pessimism=z)
    assert lcb.noise == pytest.approx(sigma)
    expected = {("s0", "a"): 0.5 - z * sigma / 2, ("s0", "b"): 1 - z * sigma, ("s1", "a"): 1 - z * sigma / np.sqrt(2),
                ("s1", "b"): -z * sigma / np.sqrt(2), ("s2", "a"): 1 - z * sigma,
                ("s2", "b"): 0.6 + 0.4 + (1 / 3 - 0.6) - z * sigma}
    got = {(x, a): lcb.value((x,), (a,)) for x, a in expected}
    assert got == pytest.approx(expected)
    assert (got[("s0", "b")] > got[("s0", "a")]) == (z == 1.0)
    sarsa = q_table.fit_sarsa(ds, GAMMA, shrink_to="additive", pessimism=z)
    assert {key: sarsa.value((key[0],), (key[1],)) for key in expected} == pytest.approx(expected)
    path = str(tmp_path / f"lcb_{z}.json")
    lcb.save(path)
    back = q_table.TableQ.load(path, None, None)
    assert {key: back.value((key[0],), (key[1],)) for key in expected} == pytest.approx(expected)
  # with m = 1 toward the act's mean, the prior counts as one more target: sqrt(n + 1)
  shrunk = q_table.fit_mc(ds, shrink=1.0, pessimism=1.0)
  q, n = shrunk.cells[(("s0",), ("b",))]
  assert n == 1 and shrunk.value(("s0",), ("b",)) == pytest.approx(q - sigma / np.sqrt(2))
  with pytest.raises(ValueError, match="pessimism must be >= 0"):
    q_table.fit_mc(ds, pessimism=-1.0)
  # SARSA's prior for a pair never logged is pooled from its fixed point, not from the returns: in chain() every s0
  # cell is gamma there (returns: gamma, 0, 0), b's is 1, the mean of all (3 gamma + 1) / 6; one decision a cell
  # leaves no spread (sigma 0)
  chained = q_table.fit_sarsa(chain(), GAMMA, shrink_to="additive", pessimism=1.0)
  assert chained.noise == 0.0
  assert chained.value(("s0",), ("b",)) == pytest.approx(GAMMA + 1 - (3 * GAMMA + 1) / 6)


def test_loop_reads_q_k_as_a_lower_bound_with_qfit_pessimism(tmp_path):
  """qfit.pessimism=z reaches the loop's table (kept in its JSON, so a resumed run reads the same bound), and a
  negative z is refused before anything is written."""
  config, workdir = _tiny("lcb", tmp_path, **{"qfit.pessimism": 1.0, "loop.iterations": 1,
                                              "loop.stop_after_phase": "qfit/0"})
  with pytest.raises(loop.Interrupted):
    loop.run(config, workdir)
  saved = json.load(open(os.path.join(workdir, "checkpoints", "qtable", "0.json")))
  assert saved["pessimism"]["z"] == 1.0 and saved["pessimism"]["noise"] > 0
  table = q_table.TableQ.load(os.path.join(workdir, "checkpoints", "qtable", "0.json"), sales.dialogue_state,
                              sales.act_key)
  (state, act), (q, n) = next(iter(table.cells.items()))
  assert table.value(state, act) == pytest.approx(q - table.noise / np.sqrt(n + config.qfit.shrink))
  bad, workdir = _tiny("lcb_bad", tmp_path, **{"qfit.pessimism": -1.0})
  with pytest.raises(ValueError, match=r"config\.qfit\.pessimism"):
    loop.setup(bad, workdir)
  assert not os.path.exists(workdir)
