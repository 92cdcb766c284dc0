"""Fully online multi-turn PPO: the baseline that learns from its own conversations as they happen, no Q-model.

Iterative PPO (PAPER.md, Algorithm 1) turns the multi-turn problem into single-turn ones by fitting Q^{pi_k} on a
whole batch of logged conversations. The classic alternative is to update the policy after every small batch
of conversations, crediting the sparse conversation outcome through the turns with a learned turn-level critic
V(s_i) (the setting of multi-turn RL for LLM agents, e.g. ArCHer's lower level, Zhou et al. 2024). One decision
i of a conversation is (state s_i, suggestion a_i); the rollout gives

  r_i     = o_{i+1} - beta * sum_t k1_t(a_i),   k1_t = log pi(a_t | s_i, a_<t) - log pi_ref(a_t | s_i, a_<t)
  G_i     = r_i + gamma * G_{i+1}                                   (return-to-go; G after the last decision = 0)
  delta_i = r_i + gamma * V(s_{i+1}) - V(s_i)                       (V after the last decision = 0: it ended)
  A_i     = delta_i + gamma * lam * A_{i+1}                         (GAE over decisions, Schulman et al. 2016)

o_{i+1} is the outcome flag of the customer's reply to a_i, so sum_i gamma^i r_i is the discounted outcome minus
beta times the KL(pi || pi_ref) of every suggestion made: the multi-turn form of the objective Iterative PPO's
inner step has per state. The KL sits in the reward with the k1 estimator, as group_pg.py's 'reward' placement
(its sum over a response is log pi(a) / pi_ref(a) exactly). V(s_i) is a ScalarModel read at the last prompt token
and regressed on G_i; the token-level clipped PPO loss gives every token of a_i the turn advantage A_i.

Conversations end for real (a purchase, the customer leaving, the business silent, or env.max_turns rounds,
after which the simulated customer is gone), so nothing is bootstrapped past a conversation's last decision.
The update learns on the very tokens pi sampled (RecordingPolicy keeps them next to the text log), and the old
log-probabilities are recomputed on them with the parameters that played them, so the ratio starts at 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from iterppo_jax import data as data_lib
from iterppo_jax import group_pg
from iterppo_jax import metrics as metrics_lib
from iterppo_jax import ppo
from iterppo_jax import qfit
from iterppo_jax import sharding
from iterppo_jax import solvers
from iterppo_jax import train_state as ts

# ---- turn-level maths ----


def decision_grid(conversation_ids: Sequence[str], turns: Sequence[int]) -> tuple[np.ndarray, np.ndarray,
                                                                                   np.ndarray]:
  """Where each of D decisions sits on a [conversations C, turns T] grid (host side).

  Args:
    conversation_ids: [D] conversation of each decision.
    turns: [D] index of each decision within its conversation (0, 1, ...; each conversation's turns unique).

  Returns:
    (row [D] int, col [D] int, mask [C, T] bool): decision d is cell (row[d], col[d]); conversations are
    numbered in order of first appearance and T is the longest conversation's number of decisions.
  """
  if len(conversation_ids) != len(turns):
    raise ValueError(f"{len(conversation_ids)} conversation ids but {len(turns)} turns")
  order = {c: i for i, c in enumerate(dict.fromkeys(conversation_ids))}
  row = np.asarray([order[c] for c in conversation_ids], dtype=np.int64)
  col = np.asarray(turns, dtype=np.int64)
  if col.size and col.min() < 0:
    raise ValueError(f"turn indices must be >= 0, got {col.min()}")
  counts = np.zeros((len(order), int(col.max()) + 1 if col.size else 0), dtype=np.int64)
  np.add.at(counts, (row, col), 1)
  if np.any(counts > 1):
    raise ValueError("a (conversation, turn) pair appears twice")
  return row, col, counts > 0


def to_grid(values: np.ndarray, row: np.ndarray, col: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Scatters [D] per-decision values onto the [C, T] grid of ``decision_grid`` (0 at empty cells)."""
  grid = np.zeros(mask.shape, dtype=np.float32)
  grid[row, col] = values
  return grid


@jax.jit
def turn_advantages(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float | jax.Array,
                    lam: float | jax.Array) -> tuple[jax.Array, jax.Array]:
  """Turn-level GAE and return-to-go over the decisions of each conversation.

    G_i     = r_i + gamma * G_{n(i)}                     (0 after the last decision)
    delta_i = r_i + gamma * V_{n(i)} - V_i               (V = 0 after the last decision: the conversation ended)
    A_i     = delta_i + gamma * lam * A_{n(i)}

  where n(i) is the next decision of the same conversation (the next valid cell of the row). This is ppo.gae and
  qfit.discounted_returns with decisions in place of tokens: lam = 1 gives A_i = G_i - V_i.

  Args:
    rewards: [C, T] per-decision rewards r_i.
    values: [C, T] critic values V(s_i) at rollout time.
    mask: [C, T] real decisions.
    gamma: discount between decisions.
    lam: GAE lambda.

  Returns:
    (advantages [C, T], returns [C, T]): A_i and the critic's regression target G_i; 0 at masked cells.
  """
  advantages, _ = ppo.gae(rewards, values, mask, gamma, lam)
  returns = qfit.discounted_returns(rewards, mask, gamma)
  return advantages, jax.lax.stop_gradient(returns)


def token_advantages(advantages: jax.Array, mask: jax.Array) -> jax.Array:
  """A_i broadcast to every token of suggestion i: [D] -> [D, N], 0 at masked tokens."""
  return jnp.where(jnp.asarray(mask).astype(bool), advantages[:, None], 0.0)


def whiten_decisions(advantages: np.ndarray) -> np.ndarray:
  """(A - mean(A)) / sqrt(var(A) + 1e-8) over a batch's decisions (ppo.whiten on [D])."""
  a = jnp.asarray(advantages, jnp.float32)
  return np.asarray(ppo.whiten(a, jnp.ones_like(a, dtype=bool)))


# ---- the jitted scoring pass and update step ----


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
  gamma: float = 0.95  # discount between decisions (the conversation-level gamma)
  lam: float = 0.95  # GAE lambda over decisions
  kl_coef: float = 0.05  # beta of the k1 KL to the reference in the turn reward
  clip_eps: float = 0.2
  value_clip_eps: float = 0.2  # in return units, around the rollout-time V(s_i)
  entropy_coef: float = 0.0
  epochs: int = 2  # passes over each batch of decisions
  minibatch_size: int = 32  # decisions per update (the scoring pass uses the same static size)
  whiten_advantages: bool = True

  def __post_init__(self):
    if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
      raise ValueError(f"OnlineConfig needs gamma, lam in [0, 1], got gamma={self.gamma}, lam={self.lam}")
    if self.minibatch_size < 1 or self.epochs < 1:
      raise ValueError(f"OnlineConfig needs minibatch_size, epochs >= 1, got {self.minibatch_size}, {self.epochs}")


@dataclasses.dataclass(frozen=True)
class OnlineSteps:
  """The two compiled functions of online PPO, built once per (policy, critic, config, prompt length)."""
  experience: Callable  # make_experience_fn
  update: Callable  # make_update_step


def make_experience_fn(policy: ts.Trainable, critic: ts.Trainable, prompt_len: int):
  """Jitted scoring of played decisions: log pi and log pi_ref of the suggestion tokens, and V(s_i).

  Returns fn(policy_params, ref_params, critic_params, batch) -> {'old_logprobs' [B, N], 'ref_logprobs' [B, N],
  'values' [B]}, batch with 'tokens', 'valid', 'positions' [B, P + N] (ppo.sequence_layout).
  """
  P = prompt_len

  def experience(policy_params, ref_params, critic_params, batch):
    tokens, valid, positions = batch["tokens"], batch["valid"], batch["positions"]
    old_logprobs, _ = ppo.policy_response_logprobs(policy.merge(policy_params), tokens, positions, valid, P)
    ref_logprobs, _ = ppo.policy_response_logprobs(policy.merge(ref_params), tokens, positions, valid, P)
    # Causal attention: the critic's output at the last prompt column has seen the state s_i and nothing else.
    values = critic.merge(critic_params)(tokens, positions, valid=valid, out_slots=(P - 1, 1))[:, 0]
    return {"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "values": values}

  return jax.jit(experience)


def make_update_step(policy: ts.Trainable, critic: ts.Trainable, cfg: OnlineConfig, prompt_len: int):
  """`step(PPOState, minibatch) -> (PPOState, metrics)`: clipped token loss with turn advantages, turn critic.

  The policy loss is ppo.policy_loss with A_i on every token of suggestion i; the critic loss is ppo.value_loss
  on V(s_i) (one value per decision, at the last prompt column) against G_i. Padding rows have no valid token
  and row_valid = 0, so they change nothing.
  """
  P = prompt_len

  def step(state: ppo.PPOState, batch):
    mask = batch["mask"]
    tokens, valid, positions = batch["tokens"], batch["valid"], batch["positions"]

    def policy_objective(params):
      logp, step_logits = ppo.policy_response_logprobs(policy.merge(params), tokens, positions, valid, P)
      loss, aux = ppo.policy_loss(logp, batch["old_logprobs"], token_advantages(batch["advantages"], mask), mask,
                                  cfg.clip_eps)
      entropy = ppo.entropy_from_logits(step_logits, mask)
      return loss - cfg.entropy_coef * entropy, {**aux, "entropy": entropy, "policy_loss": loss}

    def value_objective(params):
      values = critic.merge(params)(tokens, positions, valid=valid, out_slots=(P - 1, 1))[:, 0]
      return ppo.value_loss(values[:, None], batch["old_values"][:, None], batch["returns"][:, None],
                            batch["row_valid"][:, None], cfg.value_clip_eps)

    (_, p_aux), p_grads = jax.value_and_grad(policy_objective, has_aux=True)(state.policy.params)
    (v_loss, v_aux), v_grads = jax.value_and_grad(value_objective, has_aux=True)(state.critic.params)
    return ppo.apply_gradients(state, policy, critic, p_grads, v_grads, {**p_aux, **v_aux, "value_loss": v_loss})

  shardings = ppo.PPOState(policy=policy.state_shardings, critic=critic.state_shardings)
  replicated = NamedSharding(policy.mesh, PartitionSpec())
  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(policy.mesh)),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))


def make_steps(policy: ts.Trainable, critic: ts.Trainable, cfg: OnlineConfig, prompt_len: int) -> OnlineSteps:
  return OnlineSteps(experience=make_experience_fn(policy, critic, prompt_len),
                     update=make_update_step(policy, critic, cfg, prompt_len))


# ---- one online update from a batch of played conversations ----


class RecordingPolicy:
  """An lm_policy.LMPolicy that keeps the token ids it sampled at each decision, keyed '<conversation id>/<turn>'.

  PPO's ratio and the k1 KL are about the tokens pi actually sampled; decoding them to text and encoding the text
  again can give other tokens (a non-canonical BPE split, a response cut at max_new_tokens without its end token).
  """

  def __init__(self, policy):
    self.policy, self.name = policy, policy.name
    self.sampled: dict[str, list[int]] = {}

  def __call__(self, observations) -> list[str]:
    texts = self.policy(observations)
    for o, ids in zip(observations, self.policy.last_ids, strict=True):
      self.sampled[f"{o.uid}/{o.turn}"] = ids
    return texts


def decision_arrays(tokenizer, examples: Sequence[data_lib.Example], max_prompt_len: int, max_action_len: int,
                    sampled: dict[str, list[int]] | None = None, renderer=None) -> dict[str, np.ndarray]:
  """The played decisions as PPO sequences [left-padded prompt P | suggestion N, right-padded] plus their grid.

  Args:
    tokenizer, examples: the decisions of a batch of conversations (data.examples_from_conversations).
    max_prompt_len, max_action_len: P and N.
    sampled: '<conversation id>/<turn>' -> the token ids pi sampled there (RecordingPolicy.sampled); None
      encodes the logged suggestion text instead (data.encode_actions).
    renderer: how actions are written when they are encoded from text.

  Returns:
    tokens, valid, positions [D, P + N]; response_valid [D, N] bool; reward [D] (o_{i+1}); row, col [D] and
    grid_mask [C, T] from ``decision_grid``.
  """
  if not examples:
    raise ValueError("no decisions to learn from: every conversation needs at least one suggestion")
  prompts = data_lib.encode_prompts(tokenizer, [e.prompt for e in examples], max_prompt_len)
  if sampled is None:
    actions = data_lib.encode_actions(tokenizer, [e.suggestion for e in examples], max_action_len, renderer)
  else:
    missing = [f"{e.conversation_id}/{e.turn}" for e in examples if f"{e.conversation_id}/{e.turn}" not in sampled]
    if missing:
      raise ValueError(f"no sampled tokens for {len(missing)} decisions, e.g. {missing[:3]}")
    actions = [sampled[f"{e.conversation_id}/{e.turn}"] for e in examples]
    if any(len(a) > max_action_len for a in actions):
      raise ValueError(f"a sampled response is longer than max_action_len {max_action_len}")
  response = np.full((len(examples), max_action_len), tokenizer.pad_id, dtype=np.int32)
  response_valid = np.zeros((len(examples), max_action_len), dtype=bool)
  for d, ids in enumerate(actions):
    response[d, :len(ids)] = ids
    response_valid[d, :len(ids)] = True
  tokens, valid, positions = (np.asarray(x) for x in ppo.sequence_layout(
      prompts["tokens"], prompts["valid"], response, response_valid))
  row, col, grid_mask = decision_grid([e.conversation_id for e in examples], [e.turn for e in examples])
  return {"tokens": tokens, "valid": valid, "positions": positions, "response_valid": response_valid,
          "reward": np.asarray([e.reward for e in examples], dtype=np.float32), "row": row, "col": col,
          "grid_mask": grid_mask}


def _padded_rows(n: int, multiple: int) -> np.ndarray:
  """Row indices 0..n-1, then repeats of row 0 up to a multiple (static shapes; the repeats are masked)."""
  total = -(-n // multiple) * multiple
  return np.concatenate([np.arange(n), np.zeros(total - n, dtype=np.int64)])


_UPDATE_KEYS = ("tokens", "valid", "positions", "mask", "row_valid", "old_logprobs", "old_values", "advantages",
                "returns")


def update(steps: OnlineSteps, state: ppo.PPOState, ref_params: Any, arrays: dict, cfg: OnlineConfig, mesh,
           seed: int) -> tuple[ppo.PPOState, dict[str, float]]:
  """One online PPO update on the decisions of a batch of conversations just played with state.policy.

  Scores every decision (old and reference log-probs, V(s_i)), forms the turn rewards, returns and GAE
  advantages (``turn_advantages``), then runs cfg.epochs shuffled passes of minibatch updates.

  Args:
    steps: from ``make_steps``.
    state: policy and critic (ppo.PPOState); donated.
    ref_params: the KL reference pi_ref (pi_0), a params tree of the policy's graph.
    arrays: ``decision_arrays`` of the batch.
    cfg: the online settings.
    mesh: where batches go.
    seed: the shuffling seed of this update.

  Returns:
    (state, metrics) with names 'online_ppo/...'.
  """
  M = cfg.minibatch_size
  D = len(arrays["reward"])
  rows = _padded_rows(D, M)
  real = np.arange(len(rows)) < D
  seqs = {k: arrays[k][rows] for k in ("tokens", "valid", "positions")}
  mask = arrays["response_valid"][rows] & real[:, None]
  scored = []
  for start in range(0, len(rows), M):
    chunk = ts.device_batch({k: v[start:start + M] for k, v in seqs.items()}, mesh)
    scored.append(jax.device_get(steps.experience(state.policy.params, ref_params, state.critic.params, chunk)))
  exp = {k: np.concatenate([s[k] for s in scored]) for k in scored[0]}
  # The KL-regularised turn reward r_i = o_{i+1} - beta log pi(a_i)/pi_ref(a_i) (group_pg's 'reward' placement).
  rewards, kl_sum = group_pg.sequence_rewards(jnp.asarray(arrays["reward"]), jnp.asarray(exp["old_logprobs"][:D]),
                                              jnp.asarray(exp["ref_logprobs"][:D]), jnp.asarray(mask[:D]),
                                              cfg.kl_coef, "k1")
  row, col, grid_mask = arrays["row"], arrays["col"], arrays["grid_mask"]
  adv_grid, ret_grid = turn_advantages(to_grid(np.asarray(rewards), row, col, grid_mask),
                                       to_grid(exp["values"][:D], row, col, grid_mask), grid_mask,
                                       cfg.gamma, cfg.lam)
  advantages = np.asarray(adv_grid)[row, col]
  returns = np.asarray(ret_grid)[row, col]
  raw_advantages = advantages
  if cfg.whiten_advantages and D > 1:
    advantages = whiten_decisions(advantages)
  pad = lambda x: np.asarray(x, np.float32)[rows] * real  # noqa: E731  (padding rows carry zeros)
  batch = {**seqs, "mask": mask.astype(np.float32), "row_valid": real.astype(np.float32),
           "old_logprobs": exp["old_logprobs"], "old_values": exp["values"], "advantages": pad(advantages),
           "returns": pad(returns)}
  # The single-turn solvers' epoch loop (solvers.run_epochs); minibatches are cut on the host (padded rows).
  state, step_metrics = solvers.run_epochs(
      steps.update, lambda b, idx: ts.device_batch({k: b[k][idx] for k in _UPDATE_KEYS}, mesh), state, batch,
      len(rows), M, cfg.epochs, lambda epoch: np.random.default_rng([seed, epoch]).permutation(len(rows)))
  metrics = solvers.mean_metrics(jax.device_get(step_metrics), "online_ppo")
  metrics.update({
      "online_ppo/decisions": float(D), "online_ppo/conversations": float(grid_mask.shape[0]),
      "online_ppo/outcome_rate": float(np.sum(arrays["reward"]) / max(grid_mask.shape[0], 1)),
      "online_ppo/return": float(np.mean(returns)), "online_ppo/value": float(np.mean(exp["values"][:D])),
      "online_ppo/advantage_abs": float(np.mean(np.abs(raw_advantages))),
      "online_ppo/kl_to_ref": float(np.mean(np.asarray(kl_sum))),
      "online_ppo/response_len": float(np.mean(np.sum(mask[:D], 1)))})
  metrics_lib.check_finite(metrics, 0, ("online_ppo/policy_loss", "online_ppo/value_loss"))
  return state, metrics
