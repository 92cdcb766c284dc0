"""Baselines at the same number of simulated conversations (issue #10): what does iterating buy?

Every method starts from the same pi_0 (SFT on the same behaviour logs, per seed), may learn from at most
`baselines.budget` conversations it plays in the simulator, and is evaluated on the same held-out conversations
as Iterative PPO's pi_k (loop.evaluate_policy; the evaluation set differs between seeds, not between methods):

  behavior, oracle  the scripted staff who wrote the behaviour logs, and the scripted oracle (reference lines)
  pi0               the SFT behaviour-cloned policy itself
  offline           all of the budget collected once with pi_0, one Q fit, one PPO update (Iterative PPO, K = 1)
  filtered_bc       K_b times: play budget/K_b conversations with pi_k, then SFT pi_k on what the business sent
                    in the successful ones (behaviour cloning filtered by outcome), continuing from pi_k
  filtered_bc_own   the same on pi_k's own suggestions in the successful ones: outcome filtering without
                    copying the business user's rewrites (under env.business_user=direct the two coincide)
  filtered_bc_pooled  filtered_bc on the successes of the logs Q_k pools as well (qfit.pool: the pool latest
                    iterations before k, the staff's behaviour logs counting as D_{-1}): the same data as
                    Iterative PPO's pooled Q-fit, so the two differ in how they learn, not in what from
  myopic            Iterative PPO with gamma = 0, K_b iterations: Q_k regresses the next customer flag only
  online_ppo        online multi-turn PPO with a turn-level critic and no Q-model (online_ppo.py)
  iterative_ppo_kK  Iterative PPO, K iterations of budget/K conversations each (K in baselines.ks)

Each method is a function (config, workdir, seed) -> row. The phases every method shares (behaviour logs,
tokenizer, SFT pi_0, pi_0's evaluation, the reference lines) run once per seed into workdir/seed_<s>/_shared,
which is copied to workdir/seed_<s>/<method>/ and resumed there with a modified copy of the config; loop.py's
resume is exact, so every method of a seed starts from the very same pi_0. Iterative PPO here deploys pi_0 for
D_0 (loop.first_data = 'policy'); with qfit.pool != 0 (sales' default) its Q_0 also evaluates the behaviour logs
off-policy, which filtered_bc_pooled matches; the other methods learn from them only through pi_0's SFT.

Conversations used counts every simulated conversation that fed learning, read back from the method's logs
(data/iter_*.jsonl, data/online_*.jsonl); the behaviour logs that trained pi_0 are shared by all methods and
reported separately (behavior_logs). Evaluation conversations are not learning data, and loop's true-Q
diagnostic (extra simulator rollouts) is switched off. `seconds` is the wall time of the method beyond the shared
phases, evaluations included; pi0's is the shared phases' own.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
import time
from typing import Any, Callable

import numpy as np
from flax import nnx

from iterppo_jax import checkpoint as ckpt_lib
from iterppo_jax import conversation as conv_lib
from iterppo_jax import errors
from iterppo_jax import io_utils
from iterppo_jax import loop
from iterppo_jax import online_ppo as online_lib
from iterppo_jax import ppo as ppo_lib
from iterppo_jax import settings
from iterppo_jax import stats
from iterppo_jax import sft as sft_lib
from iterppo_jax import solvers
from iterppo_jax import train_state as ts
from iterppo_jax.models import heads
from iterppo_jax.models import transformer as tf

METHODS = ("behavior", "oracle", "pi0", "offline", "filtered_bc", "filtered_bc_own", "filtered_bc_pooled", "myopic",
           "online_ppo", "iterative_ppo")
ROWS_FILE = "baselines.jsonl"

# ---- configs and directories ----


def method_config(config, seed: int):
  """A copy of the config for one method and seed: D_0 from pi_0, no true-Q rollouts, no test interruptions."""
  c = copy.deepcopy(config)
  c.seed = int(seed)
  c.loop.first_data = "policy"  # every method learns only from conversations it plays itself
  c.loop.true_q_states = 0  # a diagnostic that plays extra conversations; not part of any method
  c.loop.stop_after_phase = ""
  c.loop.stop_after_ppo_step = 0
  return c


def per_iteration(budget: int, iterations: int, what: str) -> int:
  """budget / iterations, refusing a split that would not use exactly the budget."""
  if iterations < 1 or budget % iterations:
    raise errors.SettingsError(f"{what}: baselines.budget {budget} must split into {iterations} equal iterations "
                               f"(a positive divisor of the budget)")
  return budget // iterations


def check_config(config) -> settings.Settings:
  """Fails before any work on settings no method could honour; returns the typed settings of `config`."""
  typed = settings.load(config)  # the loop's settings, which every method runs with
  b = typed.baselines
  if typed.loop.logs:
    raise errors.SettingsError("baselines play the simulator; loop.logs (one offline iteration on user logs) is "
                               "not supported")
  unknown = sorted(set(b.methods) - set(METHODS))
  if unknown or not b.methods:
    raise errors.SettingsError(f"baselines.methods must be a non-empty subset of {METHODS}, got {list(b.methods)}")
  if not b.seeds or len(set(b.seeds)) != len(b.seeds):
    raise errors.SettingsError(f"baselines.seeds must be distinct and non-empty, got {list(b.seeds)}")
  if b.budget < 1 or b.online_batch < 1 or b.bc_steps < 1 or b.online_eval_every < 0:
    raise errors.SettingsError(f"baselines.budget, online_batch, bc_steps must be >= 1 and online_eval_every >= 0, got "
                               f"{b.budget}, {b.online_batch}, {b.bc_steps}, {b.online_eval_every}")
  if "iterative_ppo" in b.methods:
    for k in b.ks:
      per_iteration(b.budget, k, f"iterative_ppo K={k}")
  if {"filtered_bc", "filtered_bc_own", "filtered_bc_pooled", "myopic"} & set(b.methods):
    per_iteration(b.budget, b.iterations, "baselines.iterations")
  if "filtered_bc_pooled" in b.methods and typed.qfit.pool == 0:
    raise errors.SettingsError("baselines.methods: filtered_bc_pooled pools the logs qfit.pool names, and qfit.pool "
                               "is 0 (it would be filtered_bc); set qfit.pool to n >= 1 or -1")
  return typed


def seed_dir(workdir: str, seed: int) -> str:
  return os.path.join(workdir, f"seed_{seed}")


def shared_prefix(config, workdir: str, seed: int) -> dict:
  """Behaviour logs, tokenizer, SFT pi_0, its evaluation and the reference lines of a seed (run once, cached)."""
  shared = os.path.join(seed_dir(workdir, seed), "_shared")
  path = os.path.join(shared, "prefix.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  start = time.perf_counter()
  run_, logs = loop.setup(method_config(config, seed), shared)
  _, pi0 = loop.train_pi0(run_, logs)
  out = {"reference": loop.reference_lines(run_), "pi0": loop.evaluate_policy(run_, 0, pi0, pi0, "pi_0"),
         "behavior_logs": len(logs), "seconds": time.perf_counter() - start}
  run_.writer.close()
  io_utils.atomic_write_json(path, out)
  return out


def method_dir(workdir: str, seed: int, name: str) -> tuple[str, bool]:
  """workdir/seed_<s>/<name>, a copy of the seed's shared prefix; returns (path, whether it already existed)."""
  run_dir = os.path.join(seed_dir(workdir, seed), name)
  if os.path.exists(run_dir):
    return run_dir, True
  shutil.rmtree(run_dir + ".tmp", ignore_errors=True)  # left by a copy that was killed
  shutil.copytree(os.path.join(seed_dir(workdir, seed), "_shared"), run_dir + ".tmp")
  os.replace(run_dir + ".tmp", run_dir)  # a half-copied prefix is never mistaken for a method's run
  return run_dir, False


def count_conversations(run_dir: str, name: str) -> int:
  """How many conversations the log workdir/data/<name>.jsonl holds (0 if it does not exist)."""
  path = os.path.join(run_dir, "data", f"{name}.jsonl")
  return len(conv_lib.read_jsonl(path)) if os.path.exists(path) else 0


def _finished(run_dir: str) -> dict | None:
  path = os.path.join(run_dir, "row.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _finish(run_dir: str, row: dict) -> dict:
  io_utils.atomic_write_json(os.path.join(run_dir, "row.json"), row)
  return row


def _point(conversations: int, summary: dict) -> dict:
  return {"conversations_used": conversations, "conversion": summary["conversion"],
          "conversion_lo": summary["conversion_lo"], "conversion_hi": summary["conversion_hi"]}


def _row(method: str, seed: int, summary: dict, conversations: int, seconds: float | None, prefix: dict,
         **extra) -> dict:
  """One result: the final evaluation of a method for a seed, with what it cost."""
  return {"method": method, "seed": int(seed), "conversion": summary["conversion"],
          "conversion_lo": summary["conversion_lo"], "conversion_hi": summary["conversion_hi"],
          "conversations_used": int(conversations), "seconds": seconds, "behavior_logs": prefix["behavior_logs"],
          "eval_conversations": summary["conversations"], "accept_rate": summary.get("accept_rate"),
          "mean_turns": summary.get("mean_turns"), "kl_to_pi0": summary.get("kl_to_pi0"), **extra}


# ---- the methods: (config, workdir, seed) -> row ----


def behavior(config, workdir: str, seed: int) -> dict:
  """The scripted staff who wrote the behaviour logs, on the evaluation conversations (learns nothing)."""
  prefix = shared_prefix(config, workdir, seed)
  return _row("behavior", seed, prefix["reference"]["behavior"], 0, None, prefix)


def oracle(config, workdir: str, seed: int) -> dict:
  """The scripted oracle: what the simulator allows."""
  prefix = shared_prefix(config, workdir, seed)
  return _row("oracle", seed, prefix["reference"]["oracle"], 0, None, prefix)


def pi0(config, workdir: str, seed: int) -> dict:
  """The SFT behaviour-cloned pi_0 every method starts from (0 conversations of its own)."""
  prefix = shared_prefix(config, workdir, seed)
  return _row("pi0", seed, prefix["pi0"], 0, prefix["seconds"], prefix, curve=[_point(0, prefix["pi0"])])


def _loop_method(config, workdir: str, seed: int, *, method: str, name: str, iterations: int,
                 gamma: float | None = None) -> dict:
  """loop.run with K = iterations and budget / K conversations per iteration (D_0 played by pi_0)."""
  budget = settings.load(config).baselines.budget
  conversations = per_iteration(budget, iterations, method)
  prefix = shared_prefix(config, workdir, seed)
  start = time.perf_counter()
  run_dir, existed = method_dir(workdir, seed, name)
  done = _finished(run_dir)
  if done:  # offline and iterative_ppo_k1 are the same run
    return {**done, "method": method}
  c = method_config(config, seed)
  c.loop.iterations = iterations
  c.loop.conversations = conversations
  if gamma is not None:
    c.gamma = gamma
  summary = loop.run(c, run_dir)
  used = [count_conversations(run_dir, f"iter_{k}") for k in range(iterations)]
  gamma = settings.load(c).gamma
  curve = [_point(sum(used[:k]), s) for k, s in enumerate(summary["iterations"])]
  row = _row(method, seed, summary["iterations"][-1], sum(used), time.perf_counter() - start, prefix,
             iterations=iterations, gamma=gamma, curve=curve, run_dir=os.path.relpath(run_dir, workdir),
             resumed=existed)
  return _finish(run_dir, row)


def offline(config, workdir: str, seed: int) -> dict:
  """All of the budget collected once from pi_0, one Q fit and one PPO update (Iterative PPO with K = 1)."""
  return _loop_method(config, workdir, seed, method="offline", name="iterative_ppo_k1", iterations=1)


def iterative_ppo(config, workdir: str, seed: int, k: int) -> dict:
  """Iterative PPO with K = k iterations of budget / k conversations each."""
  return _loop_method(config, workdir, seed, method=f"iterative_ppo_k{k}", name=f"iterative_ppo_k{k}",
                      iterations=k)


def myopic(config, workdir: str, seed: int) -> dict:
  """Iterative PPO with gamma = 0: each Q_k is a one-step reward model of the next customer flag."""
  k = settings.load(config).baselines.iterations
  return _loop_method(config, workdir, seed, method="myopic", name=f"myopic_k{k}", iterations=k, gamma=0.0)


def _fill_rows(arrays: dict, batch_size: int) -> dict:
  """Repeats the rows of a small dataset up to one batch (SFT batches drop a remainder: an empty epoch)."""
  n = len(next(iter(arrays.values())))
  if n >= batch_size:
    return arrays
  rows = np.resize(np.arange(n), batch_size)
  return {k: v[rows] for k, v in arrays.items()}


def filtered_bc(config, workdir: str, seed: int, own: bool = False, pooled: bool = False) -> dict:
  """K_b iterations of: play budget / K_b conversations with pi_k; SFT pi_k on the successful ones -> pi_{k+1}.

  The SFT target is what the business sent (as pi_0's), or with `own` pi_k's own suggestion (filtered_bc_own),
  only in conversations that ended in the outcome, and it continues from pi_k's weights with a fresh optimizer
  for baselines.bc_steps steps. With `pooled` (filtered_bc_pooled) the successes of the logs Q_k would pool
  (loop.older_logs: qfit.pool's earlier iterations, the behaviour logs as D_{-1}) join each iteration's. An
  iteration without a success keeps pi_k.
  """
  assert not (own and pooled), "filtered_bc_pooled trains on what was sent"
  method = "filtered_bc_own" if own else "filtered_bc_pooled" if pooled else "filtered_bc"
  b = settings.load(config).baselines
  iterations = b.iterations
  conversations = per_iteration(b.budget, iterations, method)
  prefix = shared_prefix(config, workdir, seed)
  start = time.perf_counter()
  run_dir, existed = method_dir(workdir, seed, f"{method}_k{iterations}")
  done = _finished(run_dir)
  if done:
    return done
  run_, logs = loop.setup(method_config(config, seed), run_dir)
  c = run_.config  # the typed settings the run was made with
  _, pi0_params = loop.train_pi0(run_, logs)  # restored from the shared SFT checkpoint
  graphdef = loop.run_policy_graphdef(run_)
  params, used, curve, filtered = pi0_params, [], [_point(0, prefix["pi0"])], []
  for k in range(iterations):
    key = f"policy/{k + 1}"
    if not run_.progress.get(key):
      policy = run_.lm_policy(f"pi_{k}", graphdef, params, loop.seed_for(c, k, loop.PHASE_IDS["collect"]))
      records = run_.play(policy, conversations, loop.seed_for(c, k, loop.PHASE_IDS["collect"], 1), f"iter_{k}")
      wins = [r for r in records if r.outcome >= 1]
      if pooled:
        wins = wins + [r for r in loop.older_logs(run_, k) if r.outcome >= 1]
      examples = [e for e in run_.examples(wins) if own or e.sent is not None]
      if examples:
        trainable, state = run_.policy_trainable(params=ts.copy_params(params))
        arrays = run_.arrays(examples, action="suggestion" if own else "sent")
        state, _ = sft_lib.train_sft(trainable, state, _fill_rows(arrays, c.sft.batch_size),
                                     steps=b.bc_steps, batch_size=c.sft.batch_size,
                                     seed=loop.seed_for(c, k, loop.PHASE_IDS["sft"], 1), writer=run_.writer,
                                     desc=f"{method}/{k}")
        params = state.params
      loop.save_params(run_, "policy", k + 1, params, {"phase": method, "iteration": k + 1})
      run_.log(k, {f"{method}/successes": len(wins), f"{method}/examples": len(examples)},
               phase=method, iteration=k)
      run_.progress.mark(key, {"successes": len(wins), "examples": len(examples)})
    else:
      params = loop.restore_params(run_, "policy", k + 1, params)
    filtered.append(run_.progress.get(key))
    used.append(count_conversations(run_dir, f"iter_{k}"))
    curve.append(_point(sum(used), loop.evaluate_policy(run_, k + 1, params, pi0_params, f"pi_{k + 1}")))
  final = run_.progress.get(f"eval/{iterations}")
  run_.writer.close()
  row = _row(method, seed, final, sum(used), time.perf_counter() - start, prefix, iterations=iterations,
             successes=[f["successes"] for f in filtered], bc_examples=[f["examples"] for f in filtered],
             curve=curve, run_dir=os.path.relpath(run_dir, workdir), resumed=existed)
  return _finish(run_dir, row)


def online_config(config) -> online_lib.OnlineConfig:
  """Online PPO's settings (settings.Settings): the clipped-update settings of the token-level PPO solver (read
  from config.ppo by its row of solvers.SOLVERS, the one reader of that section), the conversation's gamma, and
  the turn-level lambda."""
  p = solvers.SOLVERS["ppo"].config(config)
  return online_lib.OnlineConfig(gamma=config.gamma, lam=config.baselines.online_lam, kl_coef=p.kl_coef,
                                 clip_eps=p.clip_eps, value_clip_eps=p.value_clip_eps,
                                 entropy_coef=p.entropy_coef, epochs=p.epochs, minibatch_size=p.minibatch_size,
                                 whiten_advantages=p.whiten_advantages)


def online_batches(budget: int, batch: int) -> list[int]:
  """Conversations played before each online update: whole batches, then the remainder (exactly the budget)."""
  return [batch] * (budget // batch) + ([budget % batch] if budget % batch else [])


def online_eval_points(sizes: list[int], every: int) -> list[int]:
  """Updates (1-based) after which online PPO is evaluated: each time the conversations played cross a multiple
  of `every` (0: never), and always after the last one."""
  played = np.cumsum(sizes)
  points = {len(sizes)}
  if every:
    points |= {u + 1 for u in range(len(sizes)) if played[u] // every > (played[u] - sizes[u]) // every}
  return sorted(points)


def _play_recorded(run_: loop.Run, policy, n: int, seed: int, name: str):
  """Plays n conversations keeping the sampled tokens: data/<name>.jsonl and data/<name>.tokens.json.

  The tokens are written first, so a log that exists always has its tokens; a rerun reads both back.
  """
  path = os.path.join(run_.workdir, "data", f"{name}.jsonl")
  tokens_path = os.path.join(run_.workdir, "data", f"{name}.tokens.json")
  if os.path.exists(path):
    with open(tokens_path) as f:
      return conv_lib.read_jsonl(path), json.load(f)
  recorder = online_lib.RecordingPolicy(policy)
  records = run_.env.play(recorder, n, seed=seed, batch_size=run_.config.loop.play_batch)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  io_utils.atomic_write_json(tokens_path, recorder.sampled, indent=None)
  conv_lib.write_jsonl(path, records)
  return records, recorder.sampled


def online_ppo(config, workdir: str, seed: int) -> dict:
  """Online multi-turn PPO: play baselines.online_batch conversations with pi, update, repeat to the budget.

  Policy and critic start from pi_0 (the critic's trunk a copy of pi_0's), the KL reference is pi_0, and the
  state is checkpointed every ppo.checkpoint_every updates, so a rerun continues exactly where it stopped.
  pi is evaluated every baselines.online_eval_every conversations (0: only at the end).
  """
  b = settings.load(config).baselines
  prefix = shared_prefix(config, workdir, seed)
  start = time.perf_counter()
  run_dir, existed = method_dir(workdir, seed, "online_ppo")
  done = _finished(run_dir)
  if done:
    return done
  c = method_config(config, seed)
  c.loop.deploy_temperature = 1.0  # the importance ratio and the KL assume the suggestions were sampled from pi
  run_, logs = loop.setup(c, run_dir)
  c = run_.config  # the typed settings the run was made with
  _, pi0_params = loop.train_pi0(run_, logs)
  sizes = online_batches(b.budget, b.online_batch)
  evals = online_eval_points(sizes, b.online_eval_every)
  policy_tr, policy_state = ts.init_trainable(lambda: tf.Transformer(run_.model_cfg, rngs=nnx.Rngs(0)),
                                              loop.optimizer(c.ppo), run_.mesh,
                                              params=ts.copy_params(pi0_params))
  critic_tr, critic_state = ts.init_trainable(
      lambda: heads.scalar_model_from_policy(nnx.merge(policy_tr.graphdef, pi0_params),
                                             rngs=nnx.Rngs(loop.seed_for(c, 0, loop.PHASE_IDS["ppo"]))),
      loop.optimizer(c.ppo.critic), run_.mesh)
  state = ppo_lib.PPOState(policy=policy_state, critic=critic_state)
  ckpt = run_.checkpointer("online_ppo", max_to_keep=2)
  first = 0
  if ckpt.latest_step() is not None:
    restored, meta = ckpt.restore(None, ckpt_lib.abstract_like({"state": state}))
    state, first = restored["state"], int(meta["update"])
  cfg = online_config(c)
  e = run_.encoding
  steps = online_lib.make_steps(policy_tr, critic_tr, cfg, e.max_prompt_len)
  graphdef = loop.run_policy_graphdef(run_)
  for u in range(first, len(sizes)):
    policy = run_.lm_policy(f"online_{u}", graphdef, state.policy.params,
                            loop.seed_for(c, u, loop.PHASE_IDS["collect"]))
    records, sampled = _play_recorded(run_, policy, sizes[u], loop.seed_for(c, u, loop.PHASE_IDS["collect"], 1),
                                      f"online_{u}")
    arrays = online_lib.decision_arrays(e.tokenizer, run_.examples(records), e.max_prompt_len, e.max_action_len,
                                        sampled)
    state, metrics = online_lib.update(steps, state, pi0_params, arrays, cfg, run_.mesh,
                                       loop.seed_for(c, u, loop.PHASE_IDS["ppo"]))
    run_.log(u + 1, metrics, phase="online_ppo", iteration=u)
    # Evaluate before checkpointing: a run stopped in between replays the update and finds the evaluation done.
    if u + 1 in evals:
      loop.evaluate_policy(run_, u + 1, state.policy.params, pi0_params, f"online_{u + 1}")
    if (u + 1) % c.ppo.checkpoint_every == 0 or u + 1 == len(sizes):
      ckpt.save(u + 1, {"state": state}, {"update": u + 1}, overwrite=True)
  ckpt.close()
  run_.writer.close()
  used = [count_conversations(run_dir, f"online_{u}") for u in range(len(sizes))]
  curve = [_point(0, prefix["pi0"])] + [_point(sum(used[:u]), run_.progress.get(f"eval/{u}")) for u in evals]
  row = _row("online_ppo", seed, run_.progress.get(f"eval/{len(sizes)}"), sum(used), time.perf_counter() - start,
             prefix, updates=len(sizes), online_batch=b.online_batch, curve=curve,
             run_dir=os.path.relpath(run_dir, workdir), resumed=existed)
  return _finish(run_dir, row)


_METHOD_FNS: dict[str, Callable] = {"behavior": behavior, "oracle": oracle, "pi0": pi0, "offline": offline,
                                    "filtered_bc": filtered_bc,
                                    "filtered_bc_own": functools.partial(filtered_bc, own=True),
                                    "filtered_bc_pooled": functools.partial(filtered_bc, pooled=True), "myopic": myopic,
                                    "online_ppo": online_ppo}


def method_fns(config) -> dict[str, Callable]:
  """Row name -> (config, workdir, seed) -> row, in the configured order; iterative_ppo expands over ks."""
  b = check_config(config).baselines
  out = {}
  for name in b.methods:
    if name == "iterative_ppo":
      out.update({f"iterative_ppo_k{k}": functools.partial(iterative_ppo, k=k) for k in b.ks})
    else:
      out[name] = _METHOD_FNS[name]
  return out


# ---- all methods x seeds, resumable ----


def read_rows(path: str) -> list[dict]:
  """The rows run_all wrote to `path` so far ([] before the first)."""
  return io_utils.read_rows(path) if os.path.exists(path) else []


def run_all(config, workdir: str, log: Callable[[str], Any] = print) -> list[dict]:
  """Runs every configured method for every seed (seeds outermost) and writes workdir/baselines.jsonl.

  Rows already in the file are reused, and a method stopped midway resumes in its own directory, so rerunning
  with the same workdir continues. A file from another budget is refused rather than mixed in.
  """
  fns = method_fns(config)
  path = os.path.join(workdir, ROWS_FILE)
  rows = read_rows(path)
  b = settings.load(config).baselines
  budget = b.budget
  stale = [r for r in rows if r.get("budget") != budget]
  if stale:
    raise ValueError(f"{path} holds rows for budget {stale[0].get('budget')}, not {budget}; use another workdir")
  done = {(r["method"], r["seed"]) for r in rows}
  for seed in b.seeds:
    for name, fn in fns.items():
      if (name, seed) in done:
        continue
      log(f"baselines: {name} seed {seed}")
      rows.append({**fn(config, workdir, seed), "budget": budget})
      io_utils.atomic_write_rows(path, rows)
  return rows


# ---- the table and the plot ----


def aggregate(rows: list[dict]) -> list[dict]:
  """Per method (in first-seen order): mean conversion over seeds with a 95% interval, mean cost.

  With n >= 2 seeds the interval is mean +- t_{0.975, n-1} sd / sqrt(n) (seed-to-seed variation: logs, pi_0,
  evaluation set), clipped to [0, 1]; with one seed it is that seed's Wilson interval over its evaluation.
  """
  out = []
  for method in dict.fromkeys(r["method"] for r in rows):
    mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])
    conv = np.asarray([r["conversion"] for r in mine], dtype=np.float64)
    if len(mine) == 1:
      lo, hi = mine[0]["conversion_lo"], mine[0]["conversion_hi"]
    else:
      half = stats.t975(len(mine) - 1) * conv.std(ddof=1) / math.sqrt(len(mine))
      lo, hi = max(conv.mean() - half, 0.0), min(conv.mean() + half, 1.0)
    seconds = [r["seconds"] for r in mine if r.get("seconds") is not None]
    out.append({"method": method, "seeds": [r["seed"] for r in mine], "conversion": float(conv.mean()),
                "conversion_lo": float(lo), "conversion_hi": float(hi), "per_seed": conv.tolist(),
                "conversations_used": float(np.mean([r["conversations_used"] for r in mine])),
                "seconds": float(np.mean(seconds)) if seconds else None})
  return out


def table(rows: list[dict]) -> str:
  """Markdown table: mean conversion (95% interval over seeds), per-seed values, conversations used, wall time."""
  out = ["| method | seeds | conversion (95% CI) | per seed | conversations used | wall time s |",
         "|---|---|---|---|---|---|"]
  for a in aggregate(rows):
    seconds = "-" if a["seconds"] is None else f"{a['seconds']:.0f}"
    out.append(f"| {a['method']} | {len(a['seeds'])} | {a['conversion']:.3f} ({a['conversion_lo']:.3f}-"
               f"{a['conversion_hi']:.3f}) | {' '.join(f'{v:.3f}' for v in a['per_seed'])} | "
               f"{a['conversations_used']:.0f} | {seconds} |")
  return "\n".join(out)


def merge_rows(sources: list[tuple[str, list[dict]]]) -> list[dict]:
  """The rows of several baselines.jsonl files (name, rows) as one list: one budget, each (method, seed) once."""
  out, seen = [], {}
  for name, rows in sources:
    for r in rows:
      key = (r["method"], r["seed"])
      if key in seen:
        raise errors.DataError(f"{name}: {r['method']} seed {r['seed']} is also in {seen[key]}; keep one of them")
      if out and r.get("budget") != out[0].get("budget"):
        raise errors.DataError(f"{name}: {r['method']} seed {r['seed']} has budget {r.get('budget')}, the rows "
                               f"before it {out[0].get('budget')}: compare one budget")
      seen[key] = name
      out.append(r)
  return out


def paired(rows: list[dict], a: str, b: str) -> dict | None:
  """Method a minus method b, paired by seed (the same pi_0, behaviour logs and held-out customers): the seeds
  both ran, the per-seed differences, and their mean with a 95% t-interval (NaN bounds with one seed); None when
  they share no seed."""
  conv = {(r["method"], r["seed"]): r["conversion"] for r in rows}
  seeds = sorted(s for m, s in conv if m == a and (b, s) in conv)
  if not seeds:
    return None
  diffs = [conv[(a, s)] - conv[(b, s)] for s in seeds]
  return {"a": a, "b": b, "seeds": seeds, "per_seed": diffs, "mean": stats.mean_interval(diffs)}


def paired_table(rows: list[dict], against: str) -> str:
  """Markdown: `against` minus every other method it shares seeds with, paired by seed."""
  out = [f"| {against} minus | seeds | per seed | mean (95% t-interval over seeds) |", "|---|---|---|---|"]
  for method in dict.fromkeys(r["method"] for r in rows):
    p = paired(rows, against, method) if method != against else None
    if p is None:
      continue
    m, lo, hi = p["mean"]
    interval = f"{m:+.3f} ({lo:+.3f} to {hi:+.3f})" if len(p["seeds"]) > 1 else f"{m:+.3f} (one seed)"
    out.append(f"| {method} | {len(p['seeds'])} | {' '.join(f'{d:+.3f}' for d in p['per_seed'])} | {interval} |")
  return "\n".join(out)


def plot(rows: list[dict], path: str) -> str:
  """Conversion against conversations used: each method's final point (95% interval over seeds) and, where it
  was evaluated along the way, its mean curve; the behaviour staff and the oracle as horizontal lines."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(9, 4.5))
  references = {"behavior": ("tab:gray", "--"), "oracle": ("tab:green", ":")}
  colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
  aggregated = aggregate(rows)
  # Most methods end at the same budget: set their final points side by side rather than on top of each other.
  learners = [a["method"] for a in aggregated if a["method"] not in references]
  width = 0.012 * max([a["conversations_used"] for a in aggregated] + [1])
  dodge = {m: width * (j - (len(learners) - 1) / 2) for j, m in enumerate(learners)}
  for a in aggregated:
    if a["method"] in references:
      color, style = references[a["method"]]
      ax.axhline(a["conversion"], color=color, linestyle=style, label=f"{a['method']} (scripted)")
      continue
    color = next(colors)
    curves = [r["curve"] for r in rows if r["method"] == a["method"] and len(r.get("curve") or ()) > 1]
    if curves and all(len(cv) == len(curves[0]) for cv in curves):
      xs = np.mean([[p["conversations_used"] for p in cv] for cv in curves], axis=0)
      ys = np.mean([[p["conversion"] for p in cv] for cv in curves], axis=0)
      ax.plot(xs, ys, color=color, alpha=0.5, linewidth=1, marker=".")
    y = a["conversion"]
    ax.errorbar([a["conversations_used"] + dodge[a["method"]]], [y],
                yerr=[[y - a["conversion_lo"]], [a["conversion_hi"] - y]], color=color, marker="o", capsize=4,
                label=f"{a['method']} (n={len(a['seeds'])})")
  ax.set_xlabel("simulated conversations used for learning (beyond the shared behaviour logs)")
  ax.set_ylabel("conversion (95% interval over seeds)")
  ax.set_ylim(0, 1)
  ax.set_title("Baselines at the same conversation budget")
  ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
  fig.tight_layout()
  return io_utils.save_figure(fig, path)
