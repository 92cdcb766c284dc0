"""The one place that builds a device Mesh and maps logical axis names to it.

Parameters carry logical axis names where they are created (``models/transformer.py``:
``vocab, embed, heads, kv_heads, kv, mlp, layers, norm``), activations are constrained at block
boundaries with ``act_batch, act_len, act_embed, act_vocab``. This module turns those names into
``NamedSharding``s on a (data, fsdp, tensor) mesh through a short list of rules kept as data, so a
config can override them. On one CPU every axis has size 1 and the same code runs unchanged.

A logical dimension falls back to replicated when its rule is missing, when it names a mesh axis
the mesh lacks, when the dimension size does not divide the mesh-axis size, or when an earlier
dimension of the same array already took that mesh axis.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterator, Optional, Sequence, Tuple, Union

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from iterppo_jax import errors

MeshAxes = Union[None, str, Tuple[str, ...]]
Rules = Sequence[Tuple[str, MeshAxes]]

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical name -> mesh axis (or tuple of axes, or None = replicated). Batch goes over data and
# fsdp (fsdp shards parameters along embed and gathers them per layer); tensor parallelism splits
# heads, mlp and vocab. Per-head dims, layer stacks and norm scales stay replicated.
DEFAULT_RULES: Tuple[Tuple[str, MeshAxes], ...] = (
    ('act_batch', ('data', 'fsdp')),
    ('act_len', None),
    ('act_embed', None),
    ('act_vocab', 'tensor'),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('kv', None),
    ('layers', None),
    ('norm', None),
)


def make_mesh(axes: Sequence[Tuple[str, int]], devices: Optional[Sequence[Any]] = None) -> Mesh:
  """Builds a Mesh from ``(axis_name, size)`` pairs; one size may be -1 (takes the rest).

  Args:
    axes: e.g. ``[('data', -1), ('fsdp', 2), ('tensor', 1)]``.
    devices: defaults to ``jax.devices()``.

  Returns:
    A Mesh with Auto axis types (GSPMD propagation between our explicit constraints).
  """
  devices = list(jax.devices() if devices is None else devices)
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  if len(set(names)) != len(names):
    raise ValueError(f'duplicate mesh axis names in {axes}')
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {axes}')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh axis sizes must be positive or -1, got {axes}')
  known = math.prod(s for s in sizes if s != -1)
  if len(devices) % known:
    raise ValueError(f'mesh {axes} does not divide the {len(devices)} available devices')
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f'mesh {dict(zip(names, sizes))} uses {math.prod(sizes)} devices, but there are '
        f'{len(devices)}; use -1 on one axis to fill the rest')
  axis_types = (jax.sharding.AxisType.Auto,) * len(names)
  return jax.make_mesh(tuple(sizes), tuple(names), axis_types, devices=devices)


def logical_to_spec(mesh: Mesh, rules: Rules, logical_names: Sequence[Optional[str]],
                    shape: Optional[Sequence[int]] = None) -> PartitionSpec:
  """Maps logical names (one per array dimension) to a PartitionSpec on ``mesh``."""
  table = dict(rules)
  used: set = set()
  spec = []
  for i, name in enumerate(logical_names):
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    # Size-1 axes shard nothing; dropping them keeps specs short and comparable.
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or (shape is not None and shape[i] % size):
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def logical_to_sharding(mesh: Mesh, rules: Rules, logical_names: Sequence[Optional[str]],
                        shape: Optional[Sequence[int]] = None) -> NamedSharding:
  """Maps logical names to a NamedSharding; pass ``shape`` to get divisibility fallback."""
  return NamedSharding(mesh, logical_to_spec(mesh, rules, logical_names, shape))


def variable_logical_names(variable: nnx.Variable) -> Optional[Tuple[Optional[str], ...]]:
  """The logical axis names stored on an nnx Variable, or None when it has none.

  The metadata key moved across flax versions (``sharding`` -> ``sharding_names`` ->
  ``out_sharding``); all are read here so no other module needs to know.
  """
  metadata = variable.get_metadata()
  for key in ('out_sharding', 'sharding_names', 'sharding'):
    names = metadata.get(key)
    if names:
      return tuple(names)
  return None


def state_shardings(mesh: Mesh, rules: Rules, abstract_state: Any) -> Any:
  """A tree of NamedShardings matching ``abstract_state`` (for jit in/out_shardings).

  Works for nnx States of Params (concrete or from ``jax.eval_shape``) and for optax states built
  from them: optax maps over the Variables, so moments keep the params' logical names. Leaves with
  no names (step counters, plain arrays) are replicated.

  Args:
    mesh: the device mesh.
    rules: logical->mesh rules, e.g. ``DEFAULT_RULES``.
    abstract_state: a pytree whose leaves are nnx Variables or arrays / ShapeDtypeStructs.

  Returns:
    The same tree with every array replaced by its NamedSharding (Variables keep their type).
  """
  replicated = NamedSharding(mesh, PartitionSpec())

  def leaf_sharding(x):
    if isinstance(x, nnx.Variable):
      value = x.get_value()
      names = variable_logical_names(x)
      if names is None or not hasattr(value, 'shape'):
        return x.replace(replicated)
      return x.replace(logical_to_sharding(mesh, rules, names, value.shape))
    return replicated if hasattr(x, 'shape') else x

  return jax.tree.map(leaf_sharding, abstract_state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Shards the leading (batch) dimension over ('data', 'fsdp'); other dims replicated."""
  axes = tuple(a for a in ('data', 'fsdp') if a in mesh.shape)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def rules_from_config(overrides: Sequence[Tuple[str, MeshAxes]]) -> Tuple[Tuple[str, MeshAxes], ...]:
  """DEFAULT_RULES with the config's `mesh_rules` pairs (logical name, mesh axis | tuple of axes | None)
  replacing their entries, checked: a logical name the models use, mesh axes of MESH_AXES."""
  rules = dict(DEFAULT_RULES)
  for pair in overrides:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
      raise errors.SettingsError(f"config.mesh_rules: expected (logical name, mesh axes) pairs, got {pair!r}")
    name, axes = pair
    if name not in rules:
      raise errors.SettingsError(f"config.mesh_rules: unknown logical name {name!r}; expected one of "
                                 f"{', '.join(rules)}")
    named = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    bad = [a for a in named if a not in MESH_AXES]
    if bad:
      raise errors.SettingsError(f"config.mesh_rules: {name!r} -> {axes!r} names {bad}; mesh axes are "
                                 f"{', '.join(MESH_AXES)}")
    rules[name] = None if axes is None else axes if isinstance(axes, str) else tuple(axes)
  return tuple(rules.items())


def active_rules() -> Rules:
  """The rules of the active `use_mesh` (the run's configured ones), else DEFAULT_RULES."""
  return _ACTIVE.rules if _ACTIVE.mesh is not None else DEFAULT_RULES


# ---- activation constraints -------------------------------------------------------------------
# Model code calls `constrain` at block boundaries. It is a no-op unless `use_mesh` is active, so
# models run with no mesh at all (tests, single-device sampling).

class _ActiveMesh(threading.local):
  mesh: Optional[Mesh] = None
  rules: Rules = ()


_ACTIVE = _ActiveMesh()


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[Mesh]:
  """Activates ``mesh`` and ``rules`` for activation constraints (and as jax's current mesh).

  Enter it around both tracing and running jitted steps. ``jax.set_mesh`` makes the mesh part of
  jit's cache key, so a function traced outside the context is retraced inside it.
  """
  previous = (_ACTIVE.mesh, _ACTIVE.rules)
  _ACTIVE.mesh, _ACTIVE.rules = mesh, tuple(rules)
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _ACTIVE.mesh, _ACTIVE.rules = previous


def constrain(x: jax.Array, logical_names: Sequence[Optional[str]]) -> jax.Array:
  """``with_sharding_constraint`` by logical names; identity when no mesh is active."""
  mesh = _ACTIVE.mesh
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(
      x, logical_to_sharding(mesh, _ACTIVE.rules, logical_names, x.shape))


def describe(shardings: Any) -> dict:
  """Flat ``{path: spec tuple}`` view of a sharding tree, for logs and tests.

  Trailing None entries are dropped, so equal shardings compare equal however they were written.
  """
  def spec_tuple(spec):
    entries = list(spec)
    while entries and entries[-1] is None:
      entries.pop()
    return tuple(entries)

  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  return {jax.tree_util.keystr(path): spec_tuple(s.spec) for path, s in flat
          if isinstance(s, NamedSharding)}
