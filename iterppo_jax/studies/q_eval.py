r"""Q from exploratory logs: on-policy Monte Carlo vs Monte Carlo and FQE on an exploratory policy's logs.

For a policy pi, Q^pi is estimated three ways (PAPER.md step 2: "if the logs come from an exploratory behaviour
policy, an off-policy evaluation is needed"):
  mc_on_policy  Monte Carlo regression on pi's own logs (what the loop does for k >= 1);
  mc_explore    Monte Carlo regression on the exploratory policy's logs: it estimates the explorer's Q, not pi's;
  fqe_explore   fitted Q evaluation (qfit method 'fqe') on the same exploratory logs, with next actions sampled
                from pi at every logged next state.
Each is compared with the simulator's true Q^pi (SalesEnv.restore + estimate_q: send the logged action, then
follow pi) on the same held-out (state, action) pairs, one random decision per conversation, taken from fresh
exploratory logs ('explore' pairs) and from fresh logs of pi ('policy' pairs): MAE, Pearson correlation, the
mean bias, and AUC (how well Q ranks the pairs whose true Q is above its median over the others). The command
line (experiments/q_eval.py) prints a table and writes one JSON line per (method, pairs) to --out.

The Q-model is either a bag-of-tokens model (`BagOfTokensQ`, --q_model=bag: seconds on a CPU, so many FQE
iterations fit) or the config's transformer (--q_model=transformer; warm-started from pi_0's trunk for a
checkpoint policy, as the loop does).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iterppo_jax import checkpoint as ckpt_lib
from iterppo_jax import conversation as conv_lib
from iterppo_jax import data as data_lib
from iterppo_jax import errors
from iterppo_jax import loop
from iterppo_jax import qfit
from iterppo_jax import sharding
from iterppo_jax import stats
from iterppo_jax import tokenizer as tok_lib
from iterppo_jax import train_state as ts
from iterppo_jax.envs import registry
from iterppo_jax.envs import sales
from iterppo_jax.models import heads
from iterppo_jax.models import transformer as tf
from iterppo_jax.models.transformer import logical_param, take_slots

METHODS = ("mc_on_policy", "mc_explore", "fqe_explore")


# ---- a tabular-like Q-model ----

def _after_last(tokens: jax.Array, valid: jax.Array, mark_id: int) -> jax.Array:
  """[B, T] True at the valid tokens after the last `mark_id` of each row (False where there is none)."""
  marks = (tokens == mark_id) & valid
  seen = jnp.cumsum(marks, axis=1)
  return (seen == seen[:, -1:]) & (seen > 0) & ~marks & valid


class BagOfTokensQ(nnx.Module):
  """Q(s, a) from mean token embeddings: the whole state, its last customer turn, and the action.

  The action is what follows the last `<suggestion>` tag (data.encode_pairs' layout), the last customer turn
  what follows the last `<customer>` tag before it. A ReLU layer reads [state, last turn, action,
  (state + last turn) * action], so state-action interactions are easy. Word order is lost, which the templated
  simulator language mostly does not need, and a step costs about as much as an embedding lookup. Same call
  signature as heads.ScalarModel (one scalar per token, or per slot of ``out_slots``; here the same at every
  token).
  """

  def __init__(self, vocab_size: int, suggestion_id: int, customer_id: int, *, dim: int = 32, hidden: int = 64,
               rngs: nnx.Rngs):
    self.suggestion_id, self.customer_id = suggestion_id, customer_id
    f32 = jnp.float32
    # One table per part: state, last customer turn, action.
    self.embed = logical_param(rngs, nnx.initializers.normal(0.1), (3, vocab_size, dim), (None, "vocab", "embed"),
                               f32)
    self.hidden_kernel = logical_param(rngs, nnx.initializers.lecun_normal(), (4 * dim, hidden), ("embed", "mlp"),
                                       f32)
    self.hidden_bias = logical_param(rngs, nnx.initializers.zeros, (hidden,), ("mlp",), f32)
    # Small init: Q starts near sigmoid(0) = 0.5 whatever the features say.
    self.head_kernel = logical_param(rngs, nnx.initializers.normal(0.01), (hidden, 1), ("mlp", None), f32)
    self.head_bias = logical_param(rngs, nnx.initializers.zeros, (1,), (None,), f32)

  def __call__(self, tokens: jax.Array, positions: jax.Array, attn_mask=None, *,
               valid: jax.Array | None = None, out_slots=None) -> jax.Array:
    del positions, attn_mask  # a bag of tokens has no order
    valid = jnp.ones(tokens.shape, bool) if valid is None else valid.astype(bool)
    action = _after_last(tokens, valid, self.suggestion_id)
    state = valid & ~action
    last_turn = _after_last(tokens, state, self.customer_id)

    def pool(table: int, mask):  # [B, D] mean embedding over the masked tokens
      embedded = self.embed[...][table][tokens]
      return jnp.sum(embedded * mask[..., None], 1) / jnp.maximum(jnp.sum(mask, 1, keepdims=True), 1)

    s, c, a = pool(0, state), pool(1, last_turn), pool(2, action)
    h = jax.nn.relu(jnp.concatenate([s, c, a, (s + c) * a], -1) @ self.hidden_kernel[...] + self.hidden_bias[...])
    value = (h @ self.head_kernel[...])[:, 0] + self.head_bias[...][0]
    per_token = jnp.broadcast_to(value[:, None], tokens.shape)
    return per_token if out_slots is None else take_slots(per_token, out_slots)


# ---- data pieces ----

def successor_prompts(examples, next_index: np.ndarray) -> list[str]:
  """The rendered next state s_{i+1} of every example with one, in qfit.fqe_bootstrap_targets' order."""
  return [examples[j].prompt for j in next_index if j >= 0]


def scripted_next_actions(env, records, examples, policy, samples: int, seed: int) -> list[str]:
  """a'_m ~ pi(. | s_{i+1}) for a scripted policy: M suggestions at the restored next state of every example.

  Each sample gets its own random stream (seed, example, m); the policy sees the restored conversation as it
  would when playing (SalesEnv.restore). Rows follow qfit.fqe_bootstrap_targets' layout.
  """
  by_id = {r.id: r for r in records}
  texts = []
  for i, e in enumerate(examples):
    if e.next_index < 0:
      continue
    nxt = examples[e.next_index]
    record = by_id[nxt.conversation_id]
    observation = env.restore(record, record.agent_steps()[nxt.turn]).observation(env.max_render_turns)
    for m in range(samples):
      texts.extend(policy([dataclasses.replace(observation, rng=np.random.default_rng((seed, i, m)))]))
  return texts


def sample_pairs(env, records, gamma: float, max_render_turns, seed: int):
  """One random decision per conversation: (its Example, the live episode just before it)."""
  examples = data_lib.examples_from_conversations(records, gamma, max_render_turns)
  by_conversation = {}
  for e in examples:
    by_conversation.setdefault(e.conversation_id, []).append(e)
  rng = np.random.default_rng(seed)
  chosen, episodes = [], []
  for record in records:
    steps = record.agent_steps()
    k = int(rng.integers(len(steps)))
    chosen.append(by_conversation[record.id][k])
    episodes.append(env.restore(record, steps[k]))
  return chosen, episodes


def true_q(env, chosen, episodes, policy, gamma: float, rollouts: int, seed: int) -> np.ndarray:
  """The simulator's Monte Carlo Q^pi of each chosen (state, logged suggestion)."""
  suggestions = ["" if e.suggestion == conv_lib.ABSTAIN_TEXT else e.suggestion for e in chosen]
  values, _ = env.estimate_q(episodes, suggestions, policy, gamma, n_rollouts=rollouts, seed=seed)
  return values


def q_metrics(q: np.ndarray, truth: np.ndarray) -> dict:
  """MAE, Pearson, mean bias, and AUC of q at telling pairs with true Q above its median from the rest."""
  above = truth > np.median(truth)
  return {"mae": float(np.mean(np.abs(q - truth))), "pearson": stats.pearson(q, truth),
          "bias": float(np.mean(q - truth)), "auc": stats.auc(q, above), "q_mean": float(np.mean(q)),
          "true_q_mean": float(np.mean(truth))}


# ---- the comparison ----

def _policy_and_tokenizer(config, policy_name: str, workdir: str, records_for_bpe, out_dir: str):
  """(pi, tokenizer, pi's (graphdef, params) or None) for a scripted policy or pi_0 of a loop workdir."""
  if policy_name != "checkpoint":
    policy = registry.domain(config.env).policy(policy_name)
    tokenizer = tok_lib.train_bpe(tok_lib.corpus_from_conversations(records_for_bpe), config.tokenizer.vocab_size,
                                  os.path.join(out_dir, "tokenizer"))
    return policy, tokenizer, None
  if not workdir:
    raise errors.SettingsError("--policy=checkpoint needs --workdir: a loop run with tokenizer/ and checkpoints/policy/0")
  encoding = loop.make_encoding(config, tok_lib.load_tokenizer(os.path.join(workdir, "tokenizer")))
  model_cfg = loop.model_config(config, encoding)
  mesh = sharding.make_mesh([tuple(a) for a in config.mesh])
  trainable, state = ts.init_trainable(lambda: tf.Transformer(model_cfg, rngs=nnx.Rngs(0)),
                                       loop.optimizer(config.sft), mesh)
  with ckpt_lib.Checkpointer(workdir, "policy") as ckpt:
    params, _ = ckpt.restore(0, ckpt_lib.abstract_like(state.params))
  policy = loop.make_lm_policy(config, "pi_0", trainable.graphdef, params, encoding, config.seed)
  return policy, encoding.tokenizer, (trainable.graphdef, params)


def _q_trainable(config, q_model: str, tokenizer, lm, learning_rate: float, with_target: bool, seed: int):
  mesh = sharding.make_mesh([tuple(a) for a in config.mesh])
  tx = loop.optimizer(config.qfit, learning_rate)
  if q_model == "bag":
    tags = conv_lib.ROLE_TAGS
    make = lambda: BagOfTokensQ(tokenizer.vocab_size, tokenizer.token_id(tags["suggestion"]),
                                tokenizer.token_id(tags["customer"]), rngs=nnx.Rngs(seed))
  elif q_model == "transformer" and lm is not None:
    make = lambda: heads.scalar_model_from_policy(nnx.merge(*lm), rngs=nnx.Rngs(seed))
  elif q_model == "transformer":
    model_cfg = loop.model_config(config, loop.make_encoding(config, tokenizer))
    make = lambda: heads.ScalarModel(model_cfg, rngs=nnx.Rngs(seed))
  else:
    raise errors.SettingsError(f"unknown q_model {q_model!r}; expected 'bag' or 'transformer'")
  return ts.init_trainable(make, tx, mesh, with_target=with_target)


def compare(config, *, policy_name: str = "noisy_oracle", workdir: str = "", conversations: int = 1000,
            pairs: int = 100, rollouts: int = 32, q_model: str = "bag", steps: int = 1000, batch_size: int = 64,
            learning_rate: float | None = None, explore_eps: float = 0.3, explore_skill: float = 0.6,
            out_dir: str | None = None) -> list[dict]:
  """Fits the three Q estimates of pi and scores them against the true Q^pi; returns one row per (method, pairs).

  config: the settings (settings.Settings; a ConfigDict of the same keys reads the same).

  learning_rate: default 1e-2 for the bag of tokens (an embedding model trained from scratch), the config's
  qfit.learning_rate for the transformer.
  Logs: `conversations` of pi and of the exploratory policy (ExploratoryPolicy(explore_eps, explore_skill)) to
  fit on, and `pairs` fresh conversations of each for the evaluation pairs. Every fit runs `steps` steps of
  `batch_size`; FQE refreshes its targets every config.qfit.refresh_every steps from a target network copied at
  the same period (each refresh a full fitted-Q iteration; Polyak averaging propagates values back more slowly),
  averaging config.qfit.fqe_samples sampled next actions.
  """
  env = registry.make_env(config.env)
  explore = sales.ExploratoryPolicy(eps=explore_eps, skill_mean=explore_skill)
  gamma, seed = config.gamma, config.seed
  out_dir = out_dir or tempfile.mkdtemp(prefix="q_eval_")
  explore_logs = env.play(explore, conversations, seed=seed * 10 + 1)
  policy, tokenizer, lm = _policy_and_tokenizer(config, policy_name, workdir, explore_logs, out_dir)
  enc = loop.make_encoding(config, tokenizer)  # the budgets and rendering window of the settings
  policy_logs = env.play(policy, conversations, seed=seed * 10 + 2)

  # Evaluation pairs and their true Q^pi.
  evaluation = {}
  for name, behaviour, stream in (("explore", explore, 3), ("policy", policy, 4)):
    chosen, episodes = sample_pairs(env, env.play(behaviour, pairs, seed=seed * 10 + stream), gamma,
                                    enc.max_render_turns, seed)
    evaluation[name] = (enc.arrays(chosen),
                        true_q(env, chosen, episodes, policy, gamma, rollouts, seed))

  # FQE's next actions: pi's responses at every logged next state of the exploratory logs.
  examples = enc.examples(explore_logs, gamma)
  samples = config.qfit.fqe_samples
  if lm is None:
    prompts = [p for p in successor_prompts(examples, [e.next_index for e in examples]) for _ in range(samples)]
    next_actions = enc.pairs(prompts, scripted_next_actions(env, explore_logs, examples, policy, samples, seed))
  else:
    successors = successor_prompts(examples, [e.next_index for e in examples])
    next_actions, _ = loop.sample_deployed(config, *lm, enc, successors, samples, jax.random.key(seed))
  data = {"mc_on_policy": enc.arrays(enc.examples(policy_logs, gamma)), "mc_explore": enc.arrays(examples)}
  data["fqe_explore"] = data["mc_explore"]

  if learning_rate is None:
    learning_rate = 1e-2 if q_model == "bag" else config.qfit.learning_rate
  rows = []
  for method in METHODS:
    fqe = method.startswith("fqe")
    trainable, state = _q_trainable(config, q_model, tokenizer, lm, learning_rate, fqe, seed)
    q = config.qfit
    state, _ = qfit.fit_q(trainable, state, data[method], method="fqe" if fqe else "mc", kind=q.kind, steps=steps,
                          batch_size=batch_size, seed=seed, gamma=gamma, refresh_every=q.refresh_every,
                          target_update="periodic", period=q.refresh_every, log_every=10**9,
                          desc=method, next_actions=next_actions if fqe else None)
    predict_fn = qfit.make_predict_fn(trainable, q.kind)
    for pairs_name, (arrays, truth) in evaluation.items():
      predicted = qfit.predict(predict_fn, state.params, arrays, batch_size, trainable.mesh)
      rows.append({"method": method, "pairs": pairs_name, "policy": policy.name, "q_model": q_model,
                   "conversations": conversations, "n_pairs": len(truth), **q_metrics(predicted, truth)})
  return rows


def format_table(rows: list[dict]) -> str:
  header = ("method", "pairs", "MAE", "Pearson", "AUC", "bias", "Q mean", "true Q")
  lines = ["{:<14} {:<8} {:>6} {:>8} {:>6} {:>7} {:>7} {:>7}".format(*header)]
  for r in rows:
    lines.append(f"{r['method']:<14} {r['pairs']:<8} {r['mae']:6.3f} {r['pearson']:8.3f} {r['auc']:6.3f} "
                 f"{r['bias']:7.3f} {r['q_mean']:7.3f} {r['true_q_mean']:7.3f}")
  return "\n".join(lines)
