"""Fitting Q^{pi_k}, Iterative PPO (Algorithm 1, step 2): policy evaluation of the deployed policy.

The Q-model scores (state s_i, suggestion a_i) with the discounted return that followed in the logs,
G_i = sum_{j >= i} gamma^{j - i} r_j with r_j = o_j (the outcome flag, PAPER.md "SR MDP"). This file holds:
  * the losses: Monte Carlo regression (BCE on logits, since returns lie in [0, 1]; or MSE), and the lower-variance
    alternatives the note names, TD(0)/SARSA and TD(lambda), whose bootstrap values come from target parameters
    updated by Polyak averaging or periodic copies; and fitted Q evaluation (FQE, expected SARSA over actions
    sampled from the evaluated policy), which estimates Q^pi from logs of another, exploratory policy;
  * evaluate_q, a fitted Q's scores against outcomes (stats.py: Brier, calibration error, AUC, Pearson);
  * the jitted fit step (appended below the maths).

Turn-level arrays are [B, T] with T = turns of a conversation and ``mask[B, T]`` marking real turns.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from iterppo_jax import data as data_lib
from iterppo_jax import distributed
from iterppo_jax import metrics as metrics_lib
from iterppo_jax import sampling
from iterppo_jax import stats
from iterppo_jax import train_state as ts

# ---- Q-fit maths ----


def _as_bool(mask: jax.Array) -> jax.Array:
  return jnp.asarray(mask).astype(bool)


def _masked_reverse_scan(step_fn, init, xs, mask):
  """Runs ``step_fn(carry, x) -> (carry, y)`` backwards over axis 1 of [B, T] inputs, skipping masked turns.

  A masked turn leaves the carry untouched and outputs 0, so the valid turn before it sees the next valid turn
  as its successor.
  """
  def step(carry, inputs):
    x, valid = inputs
    new_carry, y = step_fn(carry, x)
    carry = jax.tree.map(lambda new, old: jnp.where(valid, new, old), new_carry, carry)
    return carry, jnp.where(valid, y, 0.0)

  xs_time_major = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), xs)  # [T, B] so each step handles the batch
  _, ys = jax.lax.scan(step, init, (xs_time_major, mask.T), reverse=True)
  return ys.T


def discounted_returns(rewards: jax.Array, mask: jax.Array, gamma: float | jax.Array) -> jax.Array:
  """Monte Carlo discounted return from every turn: G_t = r_t + gamma * G_{n(t)}, G after the last turn = 0.

  n(t) is the next valid turn (masked turns are skipped and get G = 0).

  Args:
    rewards: [B, T] per-turn rewards (r_t = o_t, received after the suggestion at turn t).
    mask: [B, T] real turns.
    gamma: discount < 1 (sooner outcomes are worth more).

  Returns:
    [B, T] returns, 0 at masked turns.
  """
  mask = _as_bool(mask)
  # At least float32, so integer 0/1 outcome flags work and the scan carry has one float dtype.
  rewards = jnp.where(mask, rewards, 0.0).astype(jnp.promote_types(jnp.result_type(rewards), jnp.float32))

  def step(next_return, reward):
    value = reward + gamma * next_return
    return value, value

  init = jnp.zeros(rewards.shape[0], rewards.dtype)
  return _masked_reverse_scan(step, init, rewards, mask)


def mc_loss(
    predictions: jax.Array,
    targets: jax.Array,
    kind: str = "bce",
    mask: jax.Array | None = None,
) -> jax.Array:
  """Monte Carlo regression loss of the Q-model onto observed (discounted) returns.

    'bce': mean[ softplus(x) - y x ]  = mean[ -y log sigmoid(x) - (1 - y) log(1 - sigmoid(x)) ], x = logits,
           valid for soft targets y in [0, 1] (discounted 0/1 returns); minimised at sigmoid(x) = E[y | s, a].
    'mse': mean[ (x - y)^2 ], x = predicted values.

  Args:
    predictions: [B] logits ('bce') or values ('mse').
    targets: [B] returns.
    kind: 'bce' or 'mse'.
    mask: optional [B] real examples (padding rows of a static-shape batch are excluded).

  Returns:
    Scalar mean loss over valid examples.

  Raises:
    ValueError: for an unknown kind.
  """
  predictions = predictions.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  if kind == "bce":
    # softplus(x) - y x is the numerically stable form of the cross-entropy on logits.
    losses = jax.nn.softplus(predictions) - targets * predictions
  elif kind == "mse":
    losses = jnp.square(predictions - targets)
  else:
    raise ValueError(f"Unknown Monte Carlo loss {kind!r}; expected 'bce' or 'mse'.")
  if mask is None:
    return jnp.mean(losses)
  mask = _as_bool(mask)
  return jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def td_targets(
    rewards: jax.Array,
    next_values: jax.Array,
    dones: jax.Array,
    mask: jax.Array,
    gamma: float | jax.Array,
) -> jax.Array:
  """TD(0) / SARSA targets at turn level: y_t = r_t + gamma * (1 - done_t) * Q_bar(s_{t+1}, a_{t+1}).

  ``next_values[:, t]`` must be the *target-network* value of the next logged (state, suggestion) pair,
  Q_bar(s_{t+1}, a_{t+1}) (SARSA: evaluates the logged policy, no max over responses). At a terminal turn
  (done_t = 1) nothing is bootstrapped; a non-terminal last turn (truncated log) bootstraps from next_values.

  Args:
    rewards: [B, T] per-turn rewards.
    next_values: [B, T] target-network values of the successor pair (any value where done or masked).
    dones: [B, T] 1 where the episode ends after turn t.
    mask: [B, T] real turns.
    gamma: discount.

  Returns:
    [B, T] targets (constants: no gradient), 0 at masked turns.
  """
  mask = _as_bool(mask)
  not_done = 1.0 - jnp.asarray(dones).astype(jnp.float32)
  # where() rather than multiply: a done turn's successor value may be garbage (NaN from padding).
  bootstrap = jnp.where(not_done > 0, gamma * next_values, 0.0)
  targets = jnp.where(mask, rewards + bootstrap, 0.0)
  return jax.lax.stop_gradient(targets)


def td_lambda_targets(
    rewards: jax.Array,
    values_next: jax.Array,
    dones: jax.Array,
    mask: jax.Array,
    gamma: float | jax.Array,
    lam: float | jax.Array,
) -> jax.Array:
  """TD(lambda) returns by a reverse scan over turns.

    G_t = r_t + gamma * (1 - done_t) * ((1 - lam) * V_bar_{t+1} + lam * G_{n(t)})

  ``values_next[:, t]`` = Q_bar(s_{t+1}, a_{t+1}) from the *target* parameters (as in ``td_targets``).
  n(t) is the next valid turn. At the last valid turn of a row there is no G_{n(t)}: if done_t = 1 nothing is
  bootstrapped; otherwise (truncated log) G_{n(t)} is replaced by V_bar_{t+1}, i.e. a plain TD(0) bootstrap.
  lam = 0 gives ``td_targets``; lam = 1 with done at the end gives ``discounted_returns``.

  Args:
    rewards: [B, T] per-turn rewards.
    values_next: [B, T] target-network values of the successor pair.
    dones: [B, T] 1 where the episode ends after turn t.
    mask: [B, T] real turns.
    gamma: discount.
    lam: lambda in [0, 1].

  Returns:
    [B, T] lambda-returns (constants: no gradient), 0 at masked turns.
  """
  mask = _as_bool(mask)
  dtype = jnp.promote_types(jnp.result_type(rewards, values_next), jnp.float32)
  rewards = jnp.where(mask, rewards, 0.0).astype(dtype)
  not_done = jnp.where(mask, 1.0 - dones.astype(dtype), 0.0)
  values_next = jnp.where(not_done > 0, values_next, 0.0).astype(dtype)

  def step(carry, x):
    next_return, has_next = carry
    reward, value_next, live = x
    # No later valid turn in this row: fall back to the one-step bootstrap.
    next_return = jnp.where(has_next, next_return, value_next)
    value = reward + gamma * live * ((1.0 - lam) * value_next + lam * next_return)
    return (value, jnp.ones_like(has_next)), value

  batch = rewards.shape[0]
  init = (jnp.zeros(batch, dtype), jnp.zeros(batch, bool))
  targets = _masked_reverse_scan(step, init, (rewards, values_next, not_done), mask)
  return jax.lax.stop_gradient(targets)


def fqe_targets(
    rewards: jax.Array,
    next_values: jax.Array,
    dones: jax.Array,
    gamma: float | jax.Array,
) -> jax.Array:
  """Fitted Q evaluation (expected SARSA) targets of a target policy pi from logs of another policy.

    y_i = r_i + gamma * (1 - done_i) * (1/M) sum_m Q_bar(s_{i+1}, a'_m),   a'_m ~ pi(. | s_{i+1})

  Unlike SARSA (``td_targets``), the successor action is not the logged one (the behaviour policy's) but M
  samples from pi, so the fixed point is Q^pi whatever policy wrote the logs (as long as they cover the
  (state, action) pairs pi reaches). ``next_values[i, m]`` is the *target-network* value of the m-th sample.

  Args:
    rewards: [B] per-decision rewards r_i (the outcome flag after a_i).
    next_values: [B, M] Q_bar(s_{i+1}, a'_m) (any value, even NaN, where done).
    dones: [B] 1 where nothing is bootstrapped (the episode ended after a_i).
    gamma: discount.

  Returns:
    [B] targets (constants: no gradient).
  """
  dtype = jnp.promote_types(jnp.result_type(rewards, next_values), jnp.float32)
  expected = jnp.mean(next_values.astype(dtype), axis=1)
  # where() rather than multiply: a done row's successor values may be garbage.
  bootstrap = jnp.where(jnp.asarray(dones).astype(bool), 0.0, gamma * expected)
  return jax.lax.stop_gradient(rewards.astype(dtype) + bootstrap)


def polyak_update(target_params: Any, online_params: Any, tau: float | jax.Array) -> Any:
  """Polyak averaging of target parameters: theta_bar <- (1 - tau) * theta_bar + tau * theta.

  Args:
    target_params: pytree of arrays (theta_bar).
    online_params: pytree of the same structure (theta).
    tau: step size in [0, 1]; 1 copies, 0 keeps the target.

  Returns:
    The new target pytree.
  """
  return jax.tree.map(lambda t, o: (1.0 - tau) * t + tau * o, target_params, online_params)


def periodic_copy(target_params: Any, online_params: Any, step: int | jax.Array, period: int) -> Any:
  """Hard target update: theta_bar <- theta when step % period == 0, else unchanged (jittable in ``step``).

  Args:
    target_params: pytree (theta_bar).
    online_params: pytree of the same structure (theta).
    step: current step (after the update that produced ``online_params``).
    period: copy every ``period`` steps (>= 1).

  Returns:
    The new target pytree.
  """
  copy = (step % period) == 0
  return jax.tree.map(lambda t, o: jnp.where(copy, o, t), target_params, online_params)


# ---- the Q-fit step and its driver ----
# Q(s, a) is the Q-model's scalar at the last action token of [state][action] (data.encode_pairs). For 'bce'
# the scalar is a logit and Q = sigmoid(logit); for 'mse' it is Q itself. TD targets are computed on the host
# from the target network's predictions at the next logged (state, suggestion) pair (SARSA: evaluation of
# the logged policy pi_k, never a max over responses, PAPER.md step 2) and refreshed every few steps. FQE
# bootstraps instead from M responses sampled from the policy being evaluated at each logged next state, so the
# logs may come from another (exploratory) policy: PAPER.md step 2, "an off-policy evaluation is needed".

METHODS = ("mc", "td", "td_lambda", "fqe")


def q_scalar(model, batch) -> jax.Array:
  """[B] raw Q-model output at each row's last action token (V + A for a dueling model; batch['state_index'])."""
  if getattr(model, "dueling", False):
    return q_and_v(model, batch)[0]
  # Only the last action token's output is needed: the trunk's last block runs for that slot alone.
  return model(batch["tokens"], batch["positions"], valid=batch["valid"],
               out_slots=batch["last_index"][:, None].astype(jnp.int32))[:, 0]


def q_and_v(model, batch) -> tuple[jax.Array, jax.Array]:
  """([B] raw Q, [B] raw V) of a dueling Q-model (models/heads.py); V is read at batch['state_index']."""
  return model.q_and_v(batch["tokens"], batch["positions"], valid=batch["valid"],
                       state_index=batch["state_index"], last_index=batch["last_index"])


def to_q(raw: jax.Array, kind: str) -> jax.Array:
  return jax.nn.sigmoid(raw) if kind == "bce" else raw


def make_qfit_step(trainable, *, kind: str = "bce", target_update: str = "polyak", tau: float = 0.05,
                   period: int = 50):
  """`step(state, batch) -> (state, metrics)`: regress Q(s, a) on batch['target'].

  batch: tokens/positions/valid [B, L], last_index [B], target [B] (Monte Carlo return or TD target).
  With a target network (state.target_params not None) it is moved after each update by Polyak averaging
  (`tau`) or a periodic copy (`period`).
  """
  def loss_fn(model, batch):
    if getattr(model, "dueling", False):
      # Q = V + A regressed on the return, and V alone too: V(s) learns E[G | s] under the logged actions, so A
      # is left with what the action adds at this state.
      raw, value = q_and_v(model, batch)
      loss = mc_loss(raw, batch["target"], kind) + mc_loss(value, batch["target"], kind)
    else:
      raw = q_scalar(model, batch)
      loss = mc_loss(raw, batch["target"], kind)
    q = to_q(raw, kind)
    return loss, {"q_mean": jnp.mean(q), "target_mean": jnp.mean(batch["target"]),
                  "abs_error": jnp.mean(jnp.abs(q - batch["target"]))}

  def post_update(state):
    if state.target_params is None:
      return state
    lora = isinstance(state.params, ts.LoraParams)  # only the adapters move; the target keeps the frozen base
    online, old = (state.params.adapters, state.target_params.adapters) if lora else (state.params,
                                                                                      state.target_params)
    if target_update == "polyak":
      target = polyak_update(old, online, tau)
    elif target_update == "periodic":
      target = periodic_copy(old, online, state.step, period)
    else:
      raise ValueError(f"unknown target_update {target_update!r}; expected 'polyak' or 'periodic'")
    if lora:
      target = state.target_params.replace(adapters=target)
    return state.replace(target_params=target)

  return ts.make_train_step(trainable, loss_fn, post_update=post_update)


def make_predict_fn(trainable, kind: str = "bce"):
  """Jitted `(params, batch) -> Q [B]` in [0, 1] for 'bce'."""
  def predict(params, batch):
    return to_q(q_scalar(trainable.merge(params), batch), kind)
  return jax.jit(predict)


def predict(predict_fn, params, arrays: dict, batch_size: int, mesh) -> np.ndarray:
  """Q for every row of `arrays` (host numpy [N])."""
  n = len(arrays["tokens"])
  out = []
  arrays = {k: arrays[k] for k in ("tokens", "positions", "valid", "last_index", "state_index") if k in arrays}
  for batch in data_lib.batch_iterator(arrays, batch_size, seed=0, shuffle=False, drop_remainder=False):
    batch.pop("batch_valid")  # filler rows repeat real ones at the end and are cut off below
    out.append(np.asarray(distributed.to_host(predict_fn(params, ts.device_batch(batch, mesh)))))
  return np.concatenate(out)[:n]


def bootstrap_targets(q_next: np.ndarray, rewards: np.ndarray, next_index: np.ndarray, done: np.ndarray,
                      gamma: float, lam: float | None, succ_override: np.ndarray | None = None) -> np.ndarray:
  """TD(0) (lam None) or TD(lambda) targets for logged examples, from target-network Q of each example.

  Examples of one conversation are chained by `next_index` (-1 at the last). Q_bar(s_{i+1}, a_{i+1}) is
  `q_next[next_index[i]]`. The chains are packed into [conversations, turns] arrays for the scans above.

  `succ_override[i]`, where finite, replaces the successor's value by Q_bar(s_{i+1}, a') of another action a' (the
  evaluated policy's own, where the logged a_{i+1} was a randomised exploratory draw: explore.py) and cuts the
  lambda-trace there (the return after s_{i+1} followed the draw, not the policy), as Retrace does with c = 0.
  """
  n = len(rewards)
  next_index = np.asarray(next_index)
  succ_value = np.where(next_index >= 0, q_next[np.maximum(next_index, 0)], 0.0)
  if succ_override is not None:
    cut = np.isfinite(succ_override) & (next_index >= 0)
    succ_value = np.where(cut, succ_override, succ_value)
    next_index = np.where(cut, -1, next_index)  # the chain ends here: a one-step bootstrap from the override
  if lam is None:
    return np.asarray(td_targets(jnp.asarray(rewards[None]), jnp.asarray(succ_value[None]),
                                 jnp.asarray(done[None]), jnp.ones((1, n), bool), gamma))[0]
  heads = sorted(set(range(n)) - set(int(j) for j in next_index if j >= 0))
  chains = []
  for h in heads:
    chain, i = [], h
    while i >= 0:
      chain.append(i)
      i = int(next_index[i])
    chains.append(chain)
  width = max(len(c) for c in chains)
  idx = np.full((len(chains), width), -1)
  for r, c in enumerate(chains):
    idx[r, :len(c)] = c
  mask = idx >= 0
  take = lambda a: np.where(mask, a[np.maximum(idx, 0)], 0)
  packed = np.asarray(td_lambda_targets(jnp.asarray(take(rewards), jnp.float32),
                                        jnp.asarray(take(succ_value), jnp.float32),
                                        jnp.asarray(take(done.astype(np.float32))), jnp.asarray(mask),
                                        gamma, lam))
  out = np.zeros(n, np.float32)
  out[idx[mask]] = packed[mask]
  return out


def fqe_sample_count(next_index: np.ndarray, next_actions: dict) -> int:
  """M, the sampled next actions per logged next state; checks the layout `fqe_bootstrap_targets` reads.

  Raises:
    ValueError: when the rows of `next_actions` are not M per example with a successor (next_index >= 0).
  """
  live = int(np.sum(np.asarray(next_index) >= 0))
  rows = len(next_actions["tokens"])
  if live == 0 or rows == 0 or rows % live:
    raise ValueError(f"next_actions has {rows} rows; expected M >= 1 rows per example with a next state "
                     f"({live} examples have next_index >= 0)")
  return rows // live


def fqe_bootstrap_targets(q_next: np.ndarray, rewards: np.ndarray, next_index: np.ndarray, done: np.ndarray,
                          gamma: float, samples: int) -> np.ndarray:
  """FQE targets (``fqe_targets``) for logged examples from the target network's Q of sampled next actions.

  `q_next` holds Q_bar(s_{i+1}, a'_m) for the examples i with a next state (next_index[i] >= 0), in example
  order, M = `samples` consecutive rows each: row r * M + m is the m-th sample of the r-th such example. An
  example without a next state is not bootstrapped (its conversation ended after it).
  """
  n = len(rewards)
  live = np.flatnonzero(np.asarray(next_index) >= 0)
  if len(q_next) != len(live) * samples:
    raise ValueError(f"{len(q_next)} next-action values; expected {len(live)} next states x {samples} samples")
  next_values = np.zeros((n, samples), np.float32)
  next_values[live] = np.asarray(q_next, np.float32).reshape(len(live), samples)
  no_bootstrap = np.asarray(done, bool) | (np.asarray(next_index) < 0)
  return np.asarray(fqe_targets(jnp.asarray(rewards, jnp.float32), jnp.asarray(next_values),
                                jnp.asarray(no_bootstrap), gamma))


def sample_next_actions(graphdef, params, encoding: data_lib.Encoding, prompts: list[str], samples: int, *,
                        key: jax.Array, batch_size: int, temperature: float = 1.0) -> tuple[dict, list[str]]:
  """Draws a'_m ~ pi(. | s) for FQE: `samples` responses of a language-model policy to each prompt.

  Rows are (prompt, sample) in order, M = `samples` per prompt, cut into fixed batches of `batch_size` rows (the
  last one filled up with repeats), so the sampler compiles once; batch b uses fold_in(key, b). The responses
  are decoded and parsed as the policy's suggestions would be (lm_policy.LMPolicy), then encoded with their
  prompts like logged pairs (data.encode_pairs), so the Q-model scores them exactly as it scores the logs.

  Args:
    graphdef, params: the policy (nnx.split of a models.transformer.Transformer).
    encoding: the tokenizer, renderer and budgets (data.Encoding; prompts keep their last max_prompt_len
      tokens, responses have at most max_action_len).
    prompts: S rendered next states.
    samples: M >= 1.
    key: PRNG key.
    batch_size: rows per sampler call.
    temperature: sampling temperature (1: pi itself).

  Returns:
    (encode_pairs arrays with S * M rows, the S * M suggestion texts; '' = abstain).
  """
  if samples < 1 or batch_size < 1:
    raise ValueError(f"samples and batch_size must be >= 1, got {samples} and {batch_size}")
  tokenizer, renderer = encoding.tokenizer, encoding.renderer
  rows = [p for p in prompts for _ in range(samples)]
  texts: list[str] = []
  if rows:
    encoded = encoding.prompts(prompts)
    tokens, valid = (np.repeat(encoded[name], samples, axis=0) for name in ("tokens", "valid"))
    for b, start in enumerate(range(0, len(rows), batch_size)):
      take = np.minimum(np.arange(start, start + batch_size), len(rows) - 1)  # static shape: repeat the last row
      out = sampling.sample(graphdef, params, tokens[take], valid[take], jax.random.fold_in(key, b),
                            max_new_tokens=encoding.max_action_len, temperature=temperature, eos_id=encoding.end_id,
                            pad_id=tokenizer.pad_id)
      new_tokens, new_valid = distributed.to_host((out.tokens, out.valid))
      for r in range(min(batch_size, len(rows) - start)):
        texts.append(renderer.parse(tokenizer.decode(new_tokens[r][new_valid[r]])))
  return encoding.pairs(rows, texts), texts


def fit_q(trainable, state, arrays: dict, *, method: str = "mc", kind: str = "bce", steps: int,
          batch_size: int, seed: int, gamma: float, lam: float = 0.9, refresh_every: int = 50,
          target_update: str = "polyak", tau: float = 0.05, period: int = 50, writer=None,
          log_every: int = 50, desc: str = "qfit", next_actions: dict | None = None,
          own_next: dict | None = None):
  """Fits the Q-model on logged examples; returns (state, last metrics).

  arrays: data.encode_pairs arrays plus 'target' (Monte Carlo return), 'reward', 'next_index', 'done'.
  method: 'mc' regresses on the Monte Carlo return; 'td' / 'td_lambda' on bootstrapped targets from the
  target network, recomputed every `refresh_every` steps; 'fqe' likewise on expected-SARSA targets over
  `next_actions`: data.encode_pairs arrays of (s_{i+1}, a'_m), a'_m sampled from the policy to evaluate, M rows
  per example with next_index >= 0 in example order (see `fqe_bootstrap_targets`).
  own_next ('td' / 'td_lambda'): where the logged successor action was a randomised draw (explore.py), the
  evaluated policy's own action there: data.encode_pairs arrays of (s_{i+1}, a_own) plus 'row', the example i each
  belongs to. Those examples bootstrap from Q_bar(s_{i+1}, a_own) and cut the lambda-trace (`bootstrap_targets`),
  so every turn's target is one of Q^{pi_k}, not only the turns from the randomised one on.
  """
  if method not in METHODS:
    raise ValueError(f"unknown Q-fit method {method!r}; expected one of {', '.join(METHODS)}")
  if method != "mc" and state.target_params is None:
    raise ValueError(f"method {method!r} needs a target network: init_trainable(..., with_target=True)")
  if method == "fqe":
    if next_actions is None:
      raise ValueError("method 'fqe' needs next_actions: encoded (next state, sampled action) pairs")
    samples = fqe_sample_count(arrays["next_index"], next_actions)
  step_fn = make_qfit_step(trainable, kind=kind, target_update=target_update, tau=tau, period=period)
  predict_fn = make_predict_fn(trainable, kind)
  arrays = dict(arrays)
  last = {}
  it = None
  for i in metrics_lib.progress(range(steps), total=steps, desc=desc):
    if it is None or (method != "mc" and i % refresh_every == 0):
      if method == "fqe":
        q_bar = predict(predict_fn, state.target_params, next_actions, batch_size, trainable.mesh)
        arrays["target"] = fqe_bootstrap_targets(q_bar, arrays["reward"], arrays["next_index"], arrays["done"],
                                                 gamma, samples)
      elif method != "mc":
        q_bar = predict(predict_fn, state.target_params, arrays, batch_size, trainable.mesh)
        override = None
        if own_next is not None and len(own_next["row"]):
          override = np.full(len(q_bar), np.nan, np.float32)
          override[own_next["row"]] = predict(predict_fn, state.target_params, own_next, batch_size,
                                              trainable.mesh)
        arrays["target"] = bootstrap_targets(q_bar, arrays["reward"], arrays["next_index"], arrays["done"],
                                             gamma, lam if method == "td_lambda" else None, override)
      it = data_lib.batch_iterator(arrays, batch_size, seed=seed + i, epochs=1_000_000, shuffle=True)
    state, m = step_fn(state, ts.device_batch(_model_batch(next(it)), trainable.mesh))
    if (i + 1) % log_every == 0 or i + 1 == steps:
      last = {f"qfit/{k}": float(v) for k, v in m.items()}
      if writer is not None:
        writer.write(i + 1, last, phase=desc)
  return state, last


def _model_batch(batch: dict) -> dict:
  keys = ("tokens", "positions", "valid", "last_index", "state_index", "target")
  return {k: batch[k] for k in keys if k in batch}  # state_index: only a dueling Q-model reads it


def evaluate_q(q: np.ndarray, outcomes: np.ndarray, true_q: np.ndarray | None = None) -> dict:
  """Calibration and ranking of predicted Q against outcomes (and against true Q from a simulator)."""
  out = {"brier": stats.brier(q, outcomes), "ece": stats.expected_calibration_error(q, outcomes),
         "auc": stats.auc(q, outcomes), "q_mean": float(np.mean(q)), "outcome_mean": float(np.mean(outcomes))}
  if true_q is not None:
    out["true_q_corr"] = stats.pearson(q, true_q)
    out["true_q_mae"] = float(np.mean(np.abs(q - true_q)))
  return out
