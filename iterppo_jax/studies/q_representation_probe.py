r"""Is it the estimator or the view of the state? A Q head on frozen features, against the true Q (sales).
(Command line: experiments/q_representation_probe.py.)

A Q-model must (a) see in its input what decides the right act at a state and (b) be fitted by an estimator
whose targets hold the ranking. This probe separates the two. It fits a small MLP head Q(x) = sigmoid(f(x)) on
fixed features x of each logged (state, suggestion) of D_k (data/iter_<k>.jsonl, or --logs), with two
estimators, and scores it on the run's ranking set (data/ranking_<k>.json, or --truth) like a Q-model
(q_ranking.ranking_metrics):

* features: 'trunk', the frozen hidden states of pi_k's transformer at the prompt's last token and at the
  action's last token (what the Q-model starts from); 'abstract', one-hot codes of the simulator's abstract
  state and the act's fit to it (experiments.q_lookup_baseline: what the oracle reads, unavailable in
  production); 'abstract + noise', that code padded with irrelevant Gaussian columns to the trunk's width;
  'both'.
* estimators: Monte Carlo (the discounted return of the logs; turns before a randomised turn included, as
  qfit.targets=all) and fitted Q evaluation / SARSA of pi_k (targets r + gamma Q(s', a'_pi), a'_pi pi_k's own
  next action, recomputed every sweep: what qfit.method=td estimates).

It also prints how much of each abstract feature a linear map of the trunk features explains (held-out R^2): a
view that does not carry the act's fit to the state cannot rank acts by it. With --reaction_steps=N the trunk is
first trained N steps on a world-model task from the same logs (the words of the customer's reply to each sent
message, read at the message's last token), which teaches it the act and its fit to the state.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import config_dict

from iterppo_jax import conversation as conv_lib
from iterppo_jax import data as data_lib
from iterppo_jax import errors
from iterppo_jax import loop
from iterppo_jax import q_ranking
from iterppo_jax import settings
from iterppo_jax.envs import sales
from iterppo_jax.studies import q_ranking_ablation as ablation


class Head(nnx.Module):
  """Two hidden GELU layers with dropout, one logit."""

  def __init__(self, features: int, hidden: int, dropout: float, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(features, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 1, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x):
    h = self.drop(jax.nn.gelu(self.l1(x)))
    return self.out(self.drop(jax.nn.gelu(self.l2(h))))[:, 0]


def fit_head(x: np.ndarray, returns: np.ndarray, rewards: np.ndarray, next_x: np.ndarray, live: np.ndarray,
             train: np.ndarray, *, estimator: str, gamma: float, sweeps: int = 20, steps: int = 200,
             batch_size: int = 256, hidden: int = 64, dropout: float = 0.3, learning_rate: float = 1e-3,
             seed: int = 0):
  """Fits Q(x) = sigmoid(head(x)) by BCE; returns a function features -> Q in [0, 1].

  estimator 'mc' regresses on `returns` (sweeps x steps steps in all); 'sarsa' on r + gamma Q(next_x) where `live`
  (the conversation went on), recomputed from the current head before each of `sweeps` sweeps of `steps` steps.
  `next_x[i]` are the features of (s_{i+1}, pi's own action there). Only rows with `train` are fitted.
  """
  if estimator not in ("mc", "sarsa"):
    raise errors.SettingsError(f"estimator must be 'mc' or 'sarsa', got {estimator!r}")
  head = Head(x.shape[1], hidden, dropout, nnx.Rngs(seed))
  opt = nnx.Optimizer(head, optax.adamw(learning_rate, weight_decay=1e-4), wrt=nnx.Param)

  @nnx.jit
  def step(head, opt, xb, yb):
    def loss_fn(head):
      z = head(xb)
      return jnp.mean(jax.nn.softplus(z) - yb * z)
    loss, grads = nnx.value_and_grad(loss_fn)(head)
    opt.update(head, grads)
    return loss

  @nnx.jit
  def logits(head, xb):
    return head(xb)

  def q(features):
    head.eval()
    out = np.asarray(jax.nn.sigmoid(logits(head, jnp.asarray(features, jnp.float32))))
    head.train()
    return out

  rng = np.random.default_rng(seed)
  rows = np.flatnonzero(train)
  for _ in range(sweeps):
    target = returns if estimator == "mc" else rewards + np.where(live, gamma * q(next_x), 0.0)
    for _ in range(steps):
      b = rng.choice(rows, batch_size)
      step(head, opt, jnp.asarray(x[b], jnp.float32), jnp.asarray(target[b], jnp.float32))
  return q


def one_hot(keys: list[tuple], vocab: list | None = None) -> tuple[np.ndarray, list]:
  """[N, V] indicators of (position, value) of each key tuple; a value unseen in `vocab` gets no column."""
  keys = [tuple(str(v) for v in k) for k in keys]
  if vocab is None:
    vocab = sorted({(i, v) for k in keys for i, v in enumerate(k)})
  column = {item: j for j, item in enumerate(vocab)}
  out = np.zeros((len(keys), len(vocab)), np.float32)
  for r, k in enumerate(keys):
    for i, v in enumerate(k):
      if (i, v) in column:
        out[r, column[(i, v)]] = 1.0
  return out, vocab


def linear_r2(x: np.ndarray, y: np.ndarray, train: np.ndarray) -> np.ndarray:
  """Held-out R^2 of least squares y ~ x (with a bias) per column of y; NaN where y barely varies."""
  design = np.concatenate([x, np.ones((len(x), 1), x.dtype)], 1)
  coef, *_ = np.linalg.lstsq(design[train], y[train], rcond=None)
  resid = y[~train] - design[~train] @ coef
  var = y[~train].var(0)
  return np.where(var > 0.01, 1.0 - (resid ** 2).mean(0) / np.maximum(var, 1e-9), np.nan)


def reaction_rows(records, examples) -> tuple[list[str], list[str], list[str]]:
  """(state, sent message, the customer's reply to it) for every decision followed by both."""
  by_id = {r.id: r for r in records}
  prompts, sent, replies = [], [], []
  for e in examples:
    turns = by_id[e.conversation_id].turns
    i = by_id[e.conversation_id].agent_steps()[e.turn] + 2  # suggestion, business message, customer reply
    if e.sent is not None and i < len(turns) and turns[i].role == "customer":
      prompts.append(e.prompt)
      sent.append(e.sent)
      replies.append(turns[i].text)
  return prompts, sent, replies


def train_reaction(model, tokenizer, arrays: dict, replies: list[str], *, steps: int, batch_size: int = 32,
                   learning_rate: float = 1e-3, seed: int = 0):
  """Trains `model.trunk` in place to predict the set of tokens of each reply (multi-label BCE, a linear head on
  the hidden state at the row's last_index): a world-model task that needs the act and its fit to the state."""
  vocab = model.config.vocab_size
  bags = np.zeros((len(replies), vocab), np.float32)
  for n, text in enumerate(replies):
    bags[n, sorted(set(tokenizer.encode(text)))] = 1.0

  class Reaction(nnx.Module):
    def __init__(self, trunk, rngs):
      self.trunk = trunk
      self.head = nnx.Linear(model.config.embed_dim, vocab, rngs=rngs)

    def __call__(self, tokens, positions, valid, last_index):
      hidden, _ = self.trunk(tokens, positions, valid=valid, out_slots=last_index[:, None].astype(jnp.int32))
      return self.head(hidden[:, 0])

  net = Reaction(model.trunk, nnx.Rngs(seed))
  opt = nnx.Optimizer(net, optax.adam(learning_rate), wrt=nnx.Param)

  @nnx.jit
  def step(net, opt, batch):
    def loss_fn(net):
      z = net(batch["tokens"], batch["positions"], batch["valid"], batch["last_index"])
      return jnp.mean(jnp.sum(jax.nn.softplus(z) - batch["bag"] * z, -1))
    loss, grads = nnx.value_and_grad(loss_fn)(net)
    opt.update(net, grads)
    return loss

  rng = np.random.default_rng(seed)
  loss = float("nan")
  for _ in range(steps):
    b = rng.choice(len(replies), batch_size)
    loss = float(step(net, opt, {"tokens": jnp.asarray(arrays["tokens"][b]), "positions": jnp.asarray(arrays["positions"][b]),
                                 "valid": jnp.asarray(arrays["valid"][b]), "last_index": jnp.asarray(arrays["last_index"][b]),
                                 "bag": jnp.asarray(bags[b])}))
  return loss


def _trunk_features(model, arrays: dict, batch_size: int = 256) -> np.ndarray:
  """[N, 2D] hidden states of the policy trunk at each row's state_index and last_index."""

  @jax.jit
  def feats(tokens, positions, valid, state_index, last_index):
    slots = jnp.stack([state_index, last_index], 1).astype(jnp.int32)
    hidden, _ = model.trunk(tokens, positions, valid=valid, out_slots=slots)
    return hidden.reshape(hidden.shape[0], -1)

  n, out = len(arrays["tokens"]), []
  for start in range(0, n, batch_size):
    take = np.minimum(np.arange(start, start + batch_size), n - 1)  # one compiled shape
    out.append(np.asarray(feats(*(jnp.asarray(arrays[k][take]) for k in
                                  ("tokens", "positions", "valid", "state_index", "last_index")))))
  return np.concatenate(out)[:n]


def probe(wd: str, k: int = 0, *, logs: str = "", truth: str = "", seeds: int = 3, reaction_steps: int = 0,
          log=print) -> None:
  """Fits the heads on every view and estimator and prints (through `log`) their ranking and the linear probe's
  R^2 (the module docstring); wd is a sales loop run, k its iteration."""
  config = config_dict.ConfigDict(ablation.read_run_config(wd))
  domain = settings.load(config).env.domain
  if domain != "sales":
    raise errors.SettingsError(f"{wd} is a {domain} run; the abstract features exist for sales only")
  config.loop.tensorboard = False
  # A scratch copy of the run's tokenizer and pi_k (<workdir>/ablate/probe_<k>), so nothing of the run is touched.
  run_, _ = loop.setup(config, ablation.variant_dir(wd, k, "probe"))
  _, params = loop.train_pi0(run_, [])
  if k:
    params = loop.restore_params(run_, "policy", k, params)
  records = conv_lib.read_jsonl(logs or os.path.join(wd, "data", f"iter_{k}.jsonl"))
  action_set = q_ranking.ActionSet.load(truth or os.path.join(wd, "data", f"ranking_{k}.json"))
  evals = {r.id: r for r in conv_lib.read_jsonl(os.path.join(wd, "data", f"eval_{k}.jsonl"))}
  examples = run_.examples(records)
  by_id = {r.id: r for r in records}
  before = lambda e: data_lib.turns_before(by_id[e.conversation_id], e)
  own = [e.own_action if e.own_action is not None else e.suggestion for e in examples]
  nxt = np.asarray([e.next_index for e in examples])
  live = (nxt >= 0) & ~np.asarray([e.done for e in examples])
  succ = np.maximum(nxt, 0)
  # Hold out every tenth conversation for the R^2 probe; the heads see the rest.
  held_ids = set(sorted({e.conversation_id for e in examples})[::10])
  train = np.asarray([e.conversation_id not in held_ids for e in examples])
  pairs = run_.encoding.pairs
  truth_prompts, truth_actions = action_set.pairs()
  where = [(evals[cid].turns[:i], c) for (cid, i), cs in zip(action_set.where, action_set.candidates) for c in cs]
  model = nnx.merge(loop.run_policy_graphdef(run_), params)
  if reaction_steps:
    prompts, sent, replies = reaction_rows(records, examples)
    loss = train_reaction(model, run_.tokenizer, pairs(prompts, sent), replies, steps=reaction_steps)
    log(f"trunk trained {reaction_steps} steps to predict the customer's reply ({len(replies)} rows; "
          f"last loss {loss:.1f})")
  trunk = _trunk_features(model, pairs([e.prompt for e in examples], [e.suggestion for e in examples]))
  trunk_own = _trunk_features(model, pairs([examples[j].prompt for j in succ], [own[j] for j in succ]))
  trunk_truth = _trunk_features(model, pairs(truth_prompts, truth_actions))
  mu, sd = trunk.mean(0), trunk.std(0) + 1e-6
  trunk, trunk_own, trunk_truth = ((a - mu) / sd for a in (trunk, trunk_own, trunk_truth))
  key = lambda turns, text: sales.dialogue_state(turns) + sales.act_key(turns, text)
  abstract, vocab = one_hot([key(before(e), e.suggestion) for e in examples])
  abstract_own = one_hot([key(before(examples[j]), own[j]) for j in succ], vocab)[0]
  abstract_truth = one_hot([key(turns, c) for turns, c in where], vocab)[0]
  # The abstract code padded with irrelevant Gaussian columns to the trunk's width: what extra dimensions alone cost
  # a head fitted on this many noisy returns.
  pad = np.random.default_rng(0)
  noisy = lambda a: np.concatenate([3.0 * a, pad.normal(size=(len(a), trunk.shape[1] - a.shape[1]))], 1)
  views = {"trunk": (trunk, trunk_own, trunk_truth),
           "abstract": (abstract, abstract_own, abstract_truth),
           "abstract + noise": (noisy(abstract), noisy(abstract_own), noisy(abstract_truth)),
           "both": tuple(np.concatenate([a, 3.0 * b], 1) for a, b in
                         ((trunk, abstract), (trunk_own, abstract_own), (trunk_truth, abstract_truth)))}
  returns = np.asarray([e.target for e in examples], np.float32)
  rewards = np.asarray([e.reward for e in examples], np.float32)
  log(f"D_{k}: {len(records)} conversations, {len(examples)} decisions; truth: {len(action_set.prompts)} states, "
        f"{action_set.rollouts} rollouts, reliability {action_set.reliability():.2f}; mean of {seeds} heads")
  log("| features | estimator | top-1 (chance) | Spearman | pairwise | gain of pick (best) |\n|---|---|---|---|---|---|")
  for view, (x, x_own, x_truth) in views.items():
    for estimator in ("mc", "sarsa"):
      ms = []
      for seed in range(seeds):
        q = fit_head(x, returns, rewards, x_own, live, train, estimator=estimator, gamma=run_.config.gamma, seed=seed)
        ms.append(q_ranking.ranking_metrics(action_set.unflatten(q(x_truth)), action_set.true_q, action_set.mask))
      m = {n: float(np.mean([r[n] for r in ms])) for n in ms[0]}
      log(f"| {view} | {estimator} | {m['top1']:.2f} ({m['top1_chance']:.2f}) | {m['spearman']:+.2f} | "
            f"{m['pairwise']:.2f} | {m['pick_gain']:+.3f} ({m['best_gain']:.3f}) |", flush=True)
  dim = trunk.shape[1] // 2
  log("\nheld-out R^2 of each abstract feature from the trunk's hidden state (linear):")
  log("| abstract feature | at the prompt's end | at the action's end |\n|---|---|---|")
  r2_state, r2_action = linear_r2(trunk[:, :dim], abstract, train), linear_r2(trunk[:, dim:], abstract, train)
  names = ["need known", "budget known", "objection", "liked", "product shown", "act", "act's fit"]
  for j, (i, v) in enumerate(vocab):
    if np.isfinite(r2_state[j]):
      log(f"| {names[i] if i < len(names) else i} = {v} | {r2_state[j]:.2f} | {r2_action[j]:.2f} |")
