"""LoRA adapters for the transformer's projections (Hu et al. 2021, "LoRA", eq. 3).

A target projection W (a ``q_proj``/``k_proj``/``v_proj``/``o_proj`` of ``Attention`` or a
``gate``/``up``/``down`` of ``MLP`` in ``models/transformer.py``) is replaced by

    W' = W + (alpha / r) A B,   A [in, r] ~ N(0, 1/in),   B [r, out] = 0,

so the forward pass computes x W + (alpha / r) x A B (the paper's W x + (alpha / r) B A x in our
row-vector convention), and with B = 0 the adapted model is the base model exactly. Only A and B
(and, optionally, a few parameters named in ``LoraConfig.train_full``, e.g. a critic's head) are
trained; W stays frozen.

Design: a functional merge, not ``nnx.LoRA``. Our projections are plain ``nnx.Param`` arrays with
multi-axis layouts (q_proj [D,N,H], o_proj [N,H,D]) read by ``transformer.dense`` einsums, not
``nnx.Linear`` submodules; ``nnx.LoRA`` / ``nnx.LoRALinear`` wrap a 2-D ``x @ kernel`` module, so using
them would mean rewriting Attention and MLP (and the HF weight table that names their arrays). Instead
``merge(base, adapters, config)`` returns the effective parameters, in the base's layout, dtype and
logical names, and the loss does ``nnx.merge(graphdef, merge(base, adapters, config))``. Then

  * the trainable pytree is the adapters alone: gradients, optimizer moments and checkpoints cover
    only them, and the frozen base is a separate (non-donated) argument of the jitted step;
  * adapters are ``nnx.Param``s carrying logical axis names (A keeps W's input axes, B its output
    axes, the rank axis is replicated), so ``sharding.state_shardings`` places them like the base;
  * export is ``hf.export(config, merge(base, adapters, config), out_dir)``: a plain HF model.

The price: each step materialises W' for every target (one extra copy of the targeted weights and,
in the backward pass, a full-size dW before it is reduced to dA = dW B^T, dB = A^T dW). That is
cheap at our sizes; an unmerged x A B path would need a hook in ``Attention``/``MLP``. When the base
is stored in bfloat16, pass ``dtype='float32'`` to ``merge`` in the loss so that small updates are
not rounded away when W' is formed.

Adapter paths extend the target's path: ``('trunk', 'blocks', i, 'attn', 'q_proj', 'lora_a')`` holds
A [D, r] and ``... 'lora_b'`` holds B [r, N, H]; a ``train_full`` parameter keeps its base path.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from iterppo_jax import sharding

Array = jax.Array

# Projection name -> (its module's attribute name in Block, number of leading input axes).
# o_proj [N,H,D] reads two input axes; every other target one (q/k/v [D,N|K,H], gate/up [D,F],
# down [F,D]).
TARGETS: Dict[str, Tuple[str, int]] = {
    'q_proj': ('attn', 1), 'k_proj': ('attn', 1), 'v_proj': ('attn', 1), 'o_proj': ('attn', 2),
    'gate': ('mlp', 1), 'up': ('mlp', 1), 'down': ('mlp', 1),
}
ALL_TARGETS = tuple(TARGETS)
_A, _B = 'lora_a', 'lora_b'


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which projections get adapters, and their size.

  Attributes:
    rank: r, the inner dimension of A [in, r] and B [r, out].
    alpha: the update is scaled by alpha / r, so changing r does not change the initial step size.
    targets: projection names from ``TARGETS`` (our parameter names, in every block).
    train_full: '/'-joined paths of base parameters trained in full next to the adapters, e.g.
      ``('head_kernel', 'head_bias')`` for a critic / Q-model's scalar head.
  """
  rank: int
  alpha: float
  targets: Tuple[str, ...] = ('q_proj', 'k_proj', 'v_proj', 'o_proj')
  train_full: Tuple[str, ...] = ()

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f'lora.rank must be an integer >= 1, got {self.rank!r}')
    if not self.alpha > 0:
      raise ValueError(f'lora.alpha must be > 0, got {self.alpha!r}')
    if isinstance(self.targets, str):
      raise ValueError(f'lora.targets must be a tuple of names, got the string {self.targets!r}')
    object.__setattr__(self, 'targets', tuple(self.targets))
    object.__setattr__(self, 'train_full', tuple(self.train_full))
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown:
      raise ValueError(f'lora.targets: unknown target(s) {unknown}; expected some of '
                       f'{", ".join(ALL_TARGETS)}')
    if not self.targets and not self.train_full:
      raise ValueError('lora.targets is empty: nothing would be trained')
    if len(set(self.targets)) != len(self.targets):
      raise ValueError(f'lora.targets has duplicates: {self.targets}')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_section(cls, section: Any, train_full: Tuple[str, ...] = ()) -> Optional['LoraConfig']:
    """From a `lora` section (rank, alpha, targets: settings.Lora, or configs/benchmark.py's section); None when
    it is absent or its rank is 0."""
    if not section or not section.rank:
      return None
    return cls(rank=section.rank, alpha=section.alpha, targets=tuple(section.targets), train_full=train_full)


# ---- small pieces --------------------------------------------------------------------------------

def _flat(state: Any) -> Dict[Tuple[Any, ...], nnx.Variable]:
  if isinstance(state, nnx.Module):
    state = nnx.state(state, nnx.Param)
  return dict(nnx.to_flat_state(state))


def _is_target(path: Tuple[Any, ...], targets: Tuple[str, ...]) -> bool:
  """True for ('...', 'blocks', i, 'attn'|'mlp', name) with name a chosen target."""
  return (len(path) >= 3 and path[-1] in targets and path[-2] == TARGETS[path[-1]][0]
          and 'blocks' in path)


def _delta(a: Array, b: Array) -> Array:
  """A [*in, r] times B [r, *out] -> [*in, *out] in float32 (the un-scaled low-rank update)."""
  return jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)


def _adapter_param(init: Any, key: Array, shape: Tuple[int, ...],
                   names: Tuple[Optional[str], ...], dtype: Any) -> nnx.Param:
  """An nnx.Param with logical names, as ``transformer.logical_param`` makes them."""
  init = nnx.with_partitioning(init, names, eager_sharding=False)
  return nnx.Param(init(key, shape, jnp.dtype(dtype)))


# ---- adapters ------------------------------------------------------------------------------------

def init_adapters(base: Any, config: LoraConfig, key: Array, *,
                  param_dtype: Any = 'float32') -> nnx.State:
  """Fresh adapters for every target projection in ``base``: A ~ N(0, 1/fan_in), B = 0.

  Args:
    base: the frozen model's params (an nnx.State of Params, concrete or from ``jax.eval_shape``, or
      the module): a ``Transformer``'s or a ``heads.ScalarModel``'s.
    config: the LoRA config.
    key: PRNG key; each adapter folds in its index.
    param_dtype: dtype of A and B (float32 even for a bf16 base: they are small).

  Returns:
    nnx.State of Params: per target ``(..., name, 'lora_a')`` [*in, r] with the base's input-axis
    names and ``(..., name, 'lora_b')`` [r, *out] with its output-axis names; plus a copy of every
    ``train_full`` parameter at its base path.

  Raises:
    ValueError when a target has no weight in this model (e.g. 'gate' on a gpt2-style MLP), or a
    ``train_full`` path is missing.
  """
  flat = _flat(base)
  by_name = {'/'.join(map(str, p)): p for p in flat}
  present = sorted({p[-1] for p in flat if _is_target(p, ALL_TARGETS)})
  missing = [t for t in config.targets if t not in present]
  if missing:
    raise ValueError(f'lora.targets: {missing} not found in this model (a gpt2-style MLP has no '
                     f"'gate'); its projections are {present}")
  unknown = [n for n in config.train_full if n not in by_name]
  if unknown:
    raise ValueError(f'lora.train_full: {unknown} not parameters of this model; top-level ones are '
                     f'{sorted({p[0] for p in flat})}')
  both = [n for n in config.train_full if _is_target(by_name[n], config.targets)]
  if both:
    raise ValueError(f'lora.train_full: {both} are also adapted (lora.targets); pick one')

  out = []
  targets = [(path, var) for path, var in flat.items() if _is_target(path, config.targets)]
  for index, (path, var) in enumerate(targets):
    shape = tuple(var.get_value().shape)
    names = sharding.variable_logical_names(var) or (None,) * len(shape)
    n_in = TARGETS[path[-1]][1]
    in_axes = tuple(range(n_in))
    a_init = nnx.initializers.variance_scaling(1.0, 'fan_in', 'normal', in_axis=in_axes, out_axis=-1)
    a = _adapter_param(a_init, jax.random.fold_in(key, index), shape[:n_in] + (config.rank,),
                       names[:n_in] + (None,), param_dtype)
    b = _adapter_param(nnx.initializers.zeros, key, (config.rank,) + shape[n_in:],
                       (None,) + names[n_in:], param_dtype)
    out += [(path + (_A,), a), (path + (_B,), b)]
  for name in config.train_full:
    var = flat[by_name[name]]
    out.append((by_name[name], var.replace(jnp.copy(var.get_value()))))
  return nnx.from_flat_state(out)


def merge(base: Any, adapters: Any, config: LoraConfig, *, dtype: Any = None) -> nnx.State:
  """Effective params: W + (alpha / r) A B at each adapted weight, ``train_full`` params replaced.

  Pure and jittable; used inside the loss (gradients flow to the adapters only) and for export.

  Args:
    base: the frozen params (nnx.State of Params, or the module).
    adapters: from ``init_adapters`` (possibly trained).
    config: the LoRA config (its scale alpha / r).
    dtype: dtype of the merged weights; default each base weight's own (what export wants). The
      sum is always formed in float32.

  Returns:
    An nnx.State with the base's structure, layout and logical names:
    ``nnx.merge(graphdef, merge(...))`` is the adapted model.
  """
  flat = _flat(base)
  pairs: Dict[Tuple[Any, ...], Dict[str, Array]] = {}
  replaced: Dict[Tuple[Any, ...], Array] = {}
  for path, var in _flat(adapters).items():
    if path[-1] in (_A, _B):
      pairs.setdefault(path[:-1], {})[path[-1]] = var.get_value()
    else:
      replaced[path] = var.get_value()
  unknown = [p for p in list(pairs) + list(replaced) if p not in flat]
  if unknown:
    raise ValueError(f'adapters name parameters the base lacks: {unknown[:4]}')
  out = []
  for path, var in flat.items():
    w = var.get_value()
    if path in pairs:
      ab = pairs[path]
      new = w.astype(jnp.float32) + config.scale * _delta(ab[_A], ab[_B])
      w = new.astype(dtype or w.dtype)
    elif path in replaced:
      w = replaced[path]
    out.append((path, var.replace(w)))
  return nnx.from_flat_state(out)


def adapted_loss(loss_fn: Any, graphdef: Any, config: LoraConfig, *, dtype: Any = None):
  """Turns ``loss_fn(model, batch) -> (loss, aux)`` into ``objective(adapters, base, batch)``.

  Differentiate w.r.t. argument 0: ``jax.value_and_grad(objective, has_aux=True)(adapters, base,
  batch)`` gives gradients for the adapters only; the base is a frozen input (never donated).
  """
  def objective(adapters, base, batch):
    return loss_fn(nnx.merge(graphdef, merge(base, adapters, config, dtype=dtype)), batch)
  return objective


def num_adapter_params(base: Any, config: LoraConfig) -> int:
  """rank * (in + out) per target weight per layer (``train_full`` params not counted)."""
  total = 0
  for path, var in _flat(base).items():
    if _is_target(path, config.targets):
      shape = var.get_value().shape
      n_in = TARGETS[path[-1]][1]
      total += config.rank * (math.prod(shape[:n_in]) + math.prod(shape[n_in:]))
  return total
