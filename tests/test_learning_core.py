"""The learning core on the sales simulator: SFT warm start (step 1), Q^{pi_k} fitting (step 2), the step contract.

What is checked, and why it could fail:
  * SFT on behaviour logs drives held-out action NLL far below its initial value, and the SFT policy, sampled at
    temperature 1 and playing the simulator through ``lm_policy.LMPolicy``, writes messages the simulator's
    parser reads as on-topic dialogue acts nearly as often as the logged staff messages it imitates (random text
    scores far lower, so the parser rate is a real discriminator).
  * Monte Carlo Q-fit on behaviour logs ranks held-out outcomes (AUC) and correlates with the simulator's *true*
    Q^{pi_k}(s, a): held-out decision points are restored (``SalesEnv.restore``) and ``estimate_q`` rolls the
    behaviour policy (pi_k of these logs) out 32 times from each. The issue asks for 5,000 behaviour
    conversations; the test fits on 1,500 (about 10k decisions) to keep CI time down, while the evaluation
    stays honest: 200 conversations from a different seed stream, never trained on.
  * TD(0) and TD(lambda) run through ``qfit.fit_q`` (on 800 of the conversations): bootstrap targets are
    recomputed several times from a target network that moves, and both reach held-out AUC > 0.6.
  * The step contract (STYLE.md section 3): a step is traced once for two batches of one shape, and the state is
    donated (the old parameter buffers are deleted by the step).

Numbers seen (2-core CPU, run with -s to print them): SFT held-out NLL 7.20 -> 0.44, on-topic rate 0.90 against
the logs' 0.945 (random text 0.006); MC Q-fit AUC 0.72 on all held-out decisions, Pearson 0.68 with the true Q
(turn-index baseline 0.11); TD(0) AUC 0.65, TD(lambda) 0.71. The file takes ~2-4 minutes on two shared cores,
so everything but the step contract is marked slow.
"""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from iterppo_jax import data as data_lib
from iterppo_jax import lm_policy
from iterppo_jax import qfit
from iterppo_jax import sft
from iterppo_jax import sharding
from iterppo_jax import stats
from iterppo_jax import tokenizer as tokenizer_lib
from iterppo_jax import train_state as ts
from iterppo_jax.envs import base
from iterppo_jax.envs import policies
from iterppo_jax.envs import sales
from iterppo_jax.models import heads
from iterppo_jax.models import transformer as tf

GAMMA = 0.95
RENDER_TURNS = 2  # rounds in full (and older customer messages): p95 ~75 tokens with this BPE
PROMPT_LEN, ACTION_LEN = 80, 20
SFT_CONVERSATIONS = 400
Q_CONVERSATIONS = 5000  # as the issue asks; the fit takes a fixed number of steps, so this costs ~20 s of data
TD_CONVERSATIONS = 800
HELD_OUT = 200  # conversations of another seed stream: NLL, AUC and true-Q evaluation
BATCH = 32


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  env = sales.SalesEnv(max_render_turns=RENDER_TURNS)
  behaviour = sales.make_sales_policy("behavior")
  records = env.play(behaviour, Q_CONVERSATIONS, seed=0)
  held_out = env.play(behaviour, HELD_OUT, seed=1)
  tok = tokenizer_lib.train_bpe(tokenizer_lib.corpus_from_conversations(records[:SFT_CONVERSATIONS]), 800,
                                str(tmp_path_factory.mktemp("tokenizer")))
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  config = tf.TransformerConfig.tiny(tok.vocab_size, num_layers=2, embed_dim=64, mlp_dim=128, num_heads=4,
                                     num_kv_heads=4, head_dim=16, max_len=PROMPT_LEN + ACTION_LEN)
  return dict(env=env, behaviour=behaviour, records=records, held_out=held_out, tok=tok, mesh=mesh,
              config=config)


def _sent_arrays(world, records):
  examples = [e for e in data_lib.examples_from_conversations(records, GAMMA, RENDER_TURNS) if e.sent is not None]
  return data_lib.example_arrays(world["tok"], examples, PROMPT_LEN, ACTION_LEN, action="sent")


@pytest.fixture(scope="module")
def sft_run(world):
  """pi_0 by behaviour cloning of the logged staff messages of SFT_CONVERSATIONS conversations."""
  train = _sent_arrays(world, world["records"][:SFT_CONVERSATIONS])
  held = _sent_arrays(world, world["held_out"])
  tx = ts.make_optimizer(ts.OptimizerConfig(learning_rate=5e-3, warmup_steps=20))
  trainable, state = ts.init_trainable(lambda: tf.Transformer(world["config"], rngs=nnx.Rngs(0)), tx,
                                       world["mesh"])
  eval_fn = sft.make_eval_fn(trainable)
  before = sft.evaluate(eval_fn, state.params, held, 64, world["mesh"])
  state, last = sft.train_sft(trainable, state, train, steps=150, batch_size=BATCH, seed=0, log_every=10**9)
  after = sft.evaluate(eval_fn, state.params, held, 64, world["mesh"])
  print(f"SFT held-out action NLL {before['nll']:.3f} -> {after['nll']:.3f} "
        f"(accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}); last train step {last}")
  return dict(trainable=trainable, params=state.params, before=before, after=after)


@pytest.mark.slow
def test_sft_lowers_held_out_action_nll(sft_run):
  before, after = sft_run["before"], sft_run["after"]
  # ~log(vocab) at init; the staff messages are templated, so a fitted model gets far below it.
  assert before["nll"] > 5.0
  assert after["nll"] < 0.25 * before["nll"], (before, after)
  assert after["accuracy"] > 0.6, after


@pytest.mark.slow
def test_sft_policy_writes_on_topic_messages(world, sft_run):
  # The bar: at least 90% of the rate of the logged staff messages the policy imitates (~0.945, not 1: staff
  # sometimes chit-chat off topic), i.e. ~0.85. The SFT policy reaches ~0.90-0.92 over ~420 sampled
  # suggestions (standard error ~0.015), so the bar sits about three standard errors below it. A model that has
  # not learnt the templates, or a broken sampler / prompt layout / decoder, lands far below: random text
  # scores ~0.01.
  env, tok = world["env"], world["tok"]
  policy = lm_policy.LMPolicy("sft", sft_run["trainable"].graphdef, sft_run["params"], tok,
                              max_prompt_len=PROMPT_LEN, max_new_tokens=ACTION_LEN, seed=0, temperature=1.0)
  played = env.play(policy, 64, seed=100, batch_size=64)
  suggestions = [t.text for r in played for t in r.turns if t.role == "suggestion"]
  logged = [t.text for r in world["records"][:SFT_CONVERSATIONS] for t in r.turns if t.role == "business"]
  random_text = [t.text for r in env.play(policies.RandomTextPolicy(), 64, seed=100)
                 for t in r.turns if t.role == "suggestion"]
  rate = lm_policy.recognised_rate(suggestions, sales.parse_business)
  behaviour_rate = lm_policy.recognised_rate(logged, sales.parse_business)
  random_rate = lm_policy.recognised_rate(random_text, sales.parse_business)
  print(f"recognised: SFT policy {rate:.3f} over {len(suggestions)} suggestions, behaviour logs "
        f"{behaviour_rate:.3f}, random text {random_rate:.3f}; SFT conversion {base.summarize(played)['conversion']:.3f}")
  assert len(suggestions) >= 150
  assert behaviour_rate > 0.9
  assert random_rate < 0.5 * behaviour_rate  # the parser is a discriminator, so the bar below means something
  assert rate >= 0.9 * behaviour_rate, (rate, behaviour_rate, suggestions[:10])


# ---- Q-fit ----

@pytest.fixture(scope="module")
def held_out_q(world):
  """One decision point per held-out conversation, its example arrays and its true Q^{pi_k} from the simulator."""
  env, tok = world["env"], world["tok"]
  examples = data_lib.examples_from_conversations(world["held_out"], GAMMA, RENDER_TURNS)
  by_conversation = {}
  for e in examples:
    by_conversation.setdefault(e.conversation_id, []).append(e)
  rng = np.random.default_rng(0)
  episodes, suggestions, chosen = [], [], []
  for record in world["held_out"]:
    steps = record.agent_steps()
    k = int(rng.integers(len(steps)))
    episodes.append(env.restore(record, steps[k]))  # the live state just before suggestion k
    suggestions.append(record.turns[steps[k]].text)
    chosen.append(by_conversation[record.id][k])
  true_q, stderr = env.estimate_q(episodes, suggestions, world["behaviour"], GAMMA, n_rollouts=32)
  return dict(arrays=data_lib.example_arrays(tok, chosen, PROMPT_LEN, ACTION_LEN), chosen=chosen,
              true_q=true_q, stderr=stderr,
              all_arrays=data_lib.example_arrays(tok, examples, PROMPT_LEN, ACTION_LEN))


@pytest.fixture(scope="module")
def q_train(world):
  """Every decision of the Q_CONVERSATIONS behaviour conversations, with Monte Carlo returns and TD links."""
  examples = data_lib.examples_from_conversations(world["records"], GAMMA, RENDER_TURNS)
  return examples, data_lib.example_arrays(world["tok"], examples, PROMPT_LEN, ACTION_LEN)


def _q_trainable(world, sft_run, *, with_target):
  """A Q-model warm-started from pi_0's trunk, as the outer loop builds it."""
  policy = sft_run["trainable"].merge(sft_run["params"])
  tx = ts.make_optimizer(ts.OptimizerConfig(learning_rate=3e-3, warmup_steps=20))
  return ts.init_trainable(lambda: heads.scalar_model_from_policy(policy, rngs=nnx.Rngs(1)), tx, world["mesh"],
                           with_target=with_target)


@pytest.mark.slow
def test_monte_carlo_q_fit_matches_true_q(world, sft_run, held_out_q, q_train):
  examples, train = q_train
  trainable, state = _q_trainable(world, sft_run, with_target=False)
  state, last = qfit.fit_q(trainable, state, train, method="mc", steps=200, batch_size=BATCH, seed=0,
                           gamma=GAMMA, log_every=10**9)
  predict_fn = qfit.make_predict_fn(trainable)
  q = qfit.predict(predict_fn, state.params, held_out_q["arrays"], 64, world["mesh"])
  q_all = qfit.predict(predict_fn, state.params, held_out_q["all_arrays"], 64, world["mesh"])
  true_q = held_out_q["true_q"]
  at_points = qfit.evaluate_q(q, held_out_q["arrays"]["outcome"], true_q)
  everywhere = qfit.evaluate_q(q_all, held_out_q["all_arrays"]["outcome"])

  # Baselines for the correlation floor. A state-blind predictor that knows only the turn index (the mean
  # training return at that turn), and the logged one-sample return G of the same decision.
  turn_mean = {}
  for e in examples:
    turn_mean.setdefault(e.turn, []).append(e.target)
  overall = float(np.mean(train["target"]))
  by_turn = np.array([np.mean(turn_mean.get(e.turn, [overall])) for e in held_out_q["chosen"]])
  turn_corr = stats.pearson(by_turn, true_q)
  sample_corr = stats.pearson(held_out_q["arrays"]["target"], true_q)
  print(f"MC Q-fit on {len(examples)} decisions ({last}):\n  at {len(true_q)} held-out points {at_points}\n"
        f"  all {len(q_all)} held-out decisions {everywhere}\n  true Q spread {true_q.std():.3f}, mean MC stderr "
        f"{held_out_q['stderr'].mean():.3f}; corr(turn-index baseline, true Q) {turn_corr:.3f}, "
        f"corr(logged return G, true Q) {sample_corr:.3f}")

  assert everywhere["auc"] > 0.65, everywhere
  assert at_points["auc"] > 0.6, at_points
  # The true Q's own Monte Carlo noise (stderr ~0.04 against a spread of ~0.25) caps the measurable correlation
  # near 0.99, so it does not excuse a weak fit. The Q-model cannot see the hidden customer profile that the
  # true Q conditions on, so it cannot reach that cap; 0.5 is what reading the transcript must give (we see
  # ~0.65-0.7), and it must beat the state-blind turn-index baseline by a clear margin.
  assert at_points["true_q_corr"] > 0.5, at_points
  assert at_points["true_q_corr"] > turn_corr + 0.1, (at_points["true_q_corr"], turn_corr)
  assert everywhere["ece"] < 0.1, everywhere


@pytest.mark.slow
@pytest.mark.parametrize("method", ["td", "td_lambda"])
def test_td_q_fit_bootstraps_and_ranks(world, sft_run, held_out_q, q_train, method, monkeypatch):
  # The first TD_CONVERSATIONS conversations: a whole-conversation prefix of the example list, so next_index
  # links stay inside it. Smaller than the MC set because every refresh predicts Q_bar on all of it.
  n = sum(len(r.agent_steps()) for r in world["records"][:TD_CONVERSATIONS])
  train = {k: v[:n] for k, v in q_train[1].items()}
  assert np.all(train["next_index"] < n)
  trainable, state = _q_trainable(world, sft_run, with_target=True)
  initial_target = np.asarray(state.target_params["head_kernel"][...]).copy()

  refreshed = []
  original = qfit.bootstrap_targets

  def recording(*args, **kwargs):
    targets = original(*args, **kwargs)
    refreshed.append(np.asarray(targets).copy())
    return targets

  monkeypatch.setattr(qfit, "bootstrap_targets", recording)
  state, last = qfit.fit_q(trainable, state, train, method=method, steps=150, batch_size=BATCH, seed=0,
                           gamma=GAMMA, lam=0.9, refresh_every=50, tau=0.1, log_every=10**9)
  q_all = qfit.predict(qfit.make_predict_fn(trainable), state.params, held_out_q["all_arrays"], 64,
                       world["mesh"])
  metrics = qfit.evaluate_q(q_all, held_out_q["all_arrays"]["outcome"])
  target_kernel = np.asarray(state.target_params["head_kernel"][...])
  online_kernel = np.asarray(state.params["head_kernel"][...])
  changes = [float(np.mean(np.abs(a - b))) for a, b in zip(refreshed, refreshed[1:])]
  print(f"{method}: {len(refreshed)} target refreshes, mean |change| {np.round(changes, 4)}; {last}; held-out {metrics}")

  assert len(refreshed) == 3  # steps 0, 50, 100
  assert all(c > 1e-3 for c in changes), changes  # the targets follow the moving target network
  assert all(np.all(np.isfinite(t)) for t in refreshed)
  assert np.max(np.abs(target_kernel - initial_target)) > 1e-3  # the target network moved...
  assert np.max(np.abs(target_kernel - online_kernel)) > 0  # ...and lags the online one (Polyak, tau < 1)
  assert metrics["auc"] > 0.6, metrics


# ---- the step contract ----

def test_step_traces_once_and_donates_state():
  config = tf.TransformerConfig.tiny(64, num_layers=1, embed_dim=32, mlp_dim=64, num_heads=2, num_kv_heads=2,
                                     head_dim=16, max_len=16)
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  trainable, state = ts.init_trainable(lambda: tf.Transformer(config, rngs=nnx.Rngs(0)), optax.adam(1e-3), mesh)
  traces = []

  def counting_loss(model, batch):
    traces.append(1)  # runs only while tracing
    return sft.sft_loss(model, batch)

  step = ts.make_train_step(trainable, counting_loss)
  rng = np.random.default_rng(0)

  def batch():
    tokens = rng.integers(0, 64, size=(8, 16)).astype(np.int32)
    return ts.device_batch({"tokens": tokens, "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)),
                            "valid": np.ones((8, 16), bool), "loss_mask": np.ones((8, 16), np.float32)}, mesh)

  first, second = batch(), batch()
  old_leaves = jax.tree.leaves(state.params)
  old_opt = jax.tree.leaves(state.opt_state)[-1]
  state, m1 = step(state, first)
  assert all(x.is_deleted() for x in old_leaves)  # params donated to the step
  assert old_opt.is_deleted()  # and the optimizer state
  kept = jax.tree.leaves(state.params)
  state, m2 = step(state, second)
  assert all(x.is_deleted() for x in kept)
  assert len(traces) == 1, len(traces)
  assert int(state.step) == 2
  assert float(m1["loss"]) != float(m2["loss"])  # two different batches really ran
  # The library's own steps: one compiled program each for two same-shape batches.
  sft_step = sft.make_sft_step(trainable)
  state, _ = sft_step(state, batch())
  state, _ = sft_step(state, batch())
  assert sft_step._cache_size() == 1
