"""Train state, optimizers and the one way every step is built: `step(state, batch) -> (state, metrics)`.

Shapes before arrays (STYLE.md section 3): the model is built abstractly with `nnx.eval_shape`, its
logical axis names give the shardings (sharding.py), and only then is the state materialised by a jitted
init with those out_shardings, so nothing is ever built unsharded. Steps are jitted once with explicit
in/out shardings and the state donated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from iterppo_jax import distributed
from iterppo_jax import sharding
from iterppo_jax.models import lora as lora_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32, optimizer steps taken
  params: Any  # nnx.State of the model's Params
  opt_state: Any  # optax state over `params`
  target_params: Any = None  # TD target network for Q-fit; None elsewhere


@flax.struct.dataclass
class LoraParams:
  """The params of a model trained with LoRA (models/lora.py): a frozen base and the adapters that train.

  Both are pytree children, so the base is an argument of every jitted step (never a constant baked into the
  program). `Trainable.merge` forms the adapted model with the base behind `stop_gradient`, so no gradient is
  computed for it, and `adapters_only` keeps the optimizer's moments off it. Checkpoints hold
  `trainable_part(...)`, the adapters alone; `attach_frozen` puts the base back on restore.
  """
  frozen: Any  # nnx.State of the base's Params
  adapters: Any  # nnx.State from lora.init_adapters


def _is_lora(x) -> bool:
  return isinstance(x, LoraParams)


def trainable_part(tree):
  """`tree` with every LoraParams replaced by its adapters: what a checkpoint of it needs."""
  return jax.tree.map(lambda x: x.adapters if _is_lora(x) else x, tree, is_leaf=_is_lora)


def attach_frozen(part, like):
  """Inverse of `trainable_part`: the frozen bases of `like` put back next to the adapters in `part`."""
  return jax.tree.map(lambda l, p: LoraParams(frozen=l.frozen, adapters=p) if _is_lora(l) else p, like, part,
                      is_leaf=_is_lora)


def adapters_only(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` on the adapters of LoraParams; the frozen base gets zero updates and no optimizer state."""

  def init(params):
    return tx.init(params.adapters)

  def update(grads, state, params=None):
    updates, state = tx.update(grads.adapters, state, None if params is None else params.adapters)
    return LoraParams(frozen=jax.tree.map(jnp.zeros_like, grads.frozen), adapters=updates), state

  return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 3e-4
  warmup_steps: int = 10
  weight_decay: float = 0.0
  clip_norm: float = 1.0  # global-norm gradient clipping
  grad_accum: int = 1  # optimizer update every `grad_accum` micro-batches (optax.MultiSteps)
  b2: float = 0.95


def make_optimizer(c: OptimizerConfig) -> optax.GradientTransformation:
  warmup = max(c.warmup_steps, 1)
  # Linear warmup that starts at lr / warmup, not at 0: a first update with learning rate 0 is a wasted step.
  schedule = lambda count: c.learning_rate * jnp.minimum(1.0, (count + 1) / warmup)  # noqa: E731
  tx = optax.chain(optax.clip_by_global_norm(c.clip_norm),
                   optax.adamw(schedule, b2=c.b2, weight_decay=c.weight_decay))
  if c.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=c.grad_accum)
  return tx


@dataclasses.dataclass
class Trainable:
  """What is static about a trained model: its graph, optimizer and shardings (not a pytree)."""
  graphdef: Any
  tx: optax.GradientTransformation
  state_shardings: Any  # TrainState of NamedShardings
  mesh: Any
  lora: lora_lib.LoraConfig | None = None  # set: TrainState.params are LoraParams

  def merge(self, params):
    """The model of `params`: plain params, or LoraParams (the adapted model; no gradient reaches the base)."""
    if _is_lora(params):
      # Formed in float32 so that small adapter updates are not rounded away on a bfloat16 base.
      params = lora_lib.merge(jax.lax.stop_gradient(params.frozen), params.adapters, self.lora, dtype=jnp.float32)
    return nnx.merge(self.graphdef, params)

  def merged_params(self, params):
    """Plain params of the adapted model (for sampling, export, pi_k); plain params pass through."""
    return merged(params, self.lora)


@functools.partial(jax.jit, static_argnums=(1,))
def _merge_lora(params: LoraParams, lora: lora_lib.LoraConfig):
  return lora_lib.merge(params.frozen, params.adapters, lora)


def merged(params, lora: lora_lib.LoraConfig | None):
  """W + (alpha / r) A B at every adapted weight, in the base's dtypes, when `params` are LoraParams; else
  `params`. One jitted program per LoRA config (placed like the base by sharding propagation)."""
  return _merge_lora(params, lora) if _is_lora(params) else params


def _split(model):
  graphdef, params = nnx.split(model)
  return graphdef, params


def init_trainable(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh,
                   rules=None, *, with_target: bool = False, params: Any = None,
                   lora: lora_lib.LoraConfig | None = None, lora_seed: int = 0,
                   adapters: Any = None) -> tuple[Trainable, TrainState]:
  """Builds a sharded TrainState without ever materialising the model unsharded.

  Args:
    make_model: () -> a fresh nnx.Module (seeded inside).
    tx: the optimizer.
    mesh, rules: where parameters live (sharding.make_mesh; rules default to the active use_mesh's, which
      loop.run takes from the config, else sharding.DEFAULT_RULES).
    with_target: also keep a target copy of the params (TD Q-fit).
    params: start from these parameters (e.g. pi_k) instead of a fresh init.
    lora: train LoRA adapters (seeded by `lora_seed`, B = 0: the model starts as its base) on the frozen
      `params` (or fresh init); the state's params are then LoraParams and the optimizer sees the adapters only.
    adapters: with `lora` and `params`, start from these adapters (a warm start) instead of fresh ones.
  """
  # jax.eval_shape rather than nnx.eval_shape: under an active mesh (sharding.use_mesh) the latter reads the
  # params' *logical* names as mesh axes and fails ("Resource axis: embed ... not found in mesh").
  graphdef = jax.eval_shape(lambda: _split(make_model()))[0]

  if lora is not None:
    tx = adapters_only(tx)

  def init(p, a=None):
    if p is None:
      p = _split(make_model())[1]
    if lora is not None:
      p = LoraParams(frozen=p, adapters=lora_lib.init_adapters(p, lora, jax.random.key(lora_seed)) if a is None else a)
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                      target_params=jax.tree.map(jnp.copy, p) if with_target else None)

  abstract = jax.eval_shape(lambda: init(None))
  shardings = sharding.state_shardings(mesh, sharding.active_rules() if rules is None else rules, abstract)
  if adapters is not None and (lora is None or params is None):
    raise ValueError("init_trainable: adapters (a LoRA warm start) need lora and the frozen base's params")
  if params is None:
    state = jax.jit(lambda: init(None), out_shardings=shardings)()
  else:
    base_shardings = shardings.params.frozen if lora is not None else shardings.params
    params = jax.device_put(params, base_shardings)
    if adapters is None:
      state = jax.jit(init, in_shardings=(base_shardings,), out_shardings=shardings)(params)
    else:
      adapters = jax.device_put(adapters, shardings.params.adapters)
      state = jax.jit(init, in_shardings=(base_shardings, shardings.params.adapters),
                      out_shardings=shardings)(params, adapters)
  return Trainable(graphdef=graphdef, tx=tx, state_shardings=shardings, mesh=mesh, lora=lora), state


def make_train_step(trainable: Trainable, loss_fn: Callable, *, donate: bool = True,
                    post_update: Callable | None = None):
  """Jits `step(state, batch) -> (state, metrics)` for `loss_fn(model, batch) -> (loss, aux)`.

  `post_update(state) -> state` runs inside the step (e.g. the Polyak update of a target network).
  """
  tx = trainable.tx

  def step(state: TrainState, batch):
    def objective(params):
      return loss_fn(trainable.merge(params), batch)

    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if post_update is not None:
      state = post_update(state)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}
    return state, metrics

  replicated = NamedSharding(trainable.mesh, PartitionSpec())
  return jax.jit(step, in_shardings=(trainable.state_shardings, sharding.batch_sharding(trainable.mesh)),
                 out_shardings=(trainable.state_shardings, replicated),
                 donate_argnums=(0,) if donate else ())


def device_batch(batch: dict, mesh) -> dict:
  """Puts a host batch (dict of numpy arrays) on the mesh, leading dimension over (data, fsdp); in a
  multi-process run each process supplies its own devices' rows (distributed.device_batch)."""
  return distributed.device_batch(batch, sharding.batch_sharding(mesh))


def copy_params(params):
  """A fresh copy (so a donated step cannot delete the arrays another model shares)."""
  return jax.tree.map(jnp.copy, params)
