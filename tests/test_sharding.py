"""Tests for sharding.py on 8 forced host CPU devices.

XLA_FLAGS must be set before jax is imported, and pytest may already have imported jax with one
device, so the checks run in a subprocess (this file run as a script) that reports JSON; the test
functions below assert on that report.
"""

import json
import os
import subprocess
import sys

import pytest

MESHES = {'8x1x1': (8, 1, 1), '2x4x1': (2, 4, 1), '2x2x2': (2, 2, 2)}


def _worker() -> dict:
  """Runs every multi-device check; returns a JSON-able report."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from iterppo_jax import sharding
  from iterppo_jax.models import transformer as tr

  report = {'num_devices': jax.device_count()}
  rules = sharding.DEFAULT_RULES
  # vocab 129 is odd: on tensor=2 the vocab dim must fall back to replicated.
  config = tr.TransformerConfig.tiny(129, num_layers=2, embed_dim=64, mlp_dim=128, num_heads=4,
                                     num_kv_heads=2, head_dim=16, max_len=32,
                                     tie_embeddings=False)

  def init_state():
    return nnx.split(tr.Transformer(config, rngs=nnx.Rngs(0)))[1]

  graphdef = nnx.split(nnx.eval_shape(lambda: tr.Transformer(config, rngs=nnx.Rngs(0))))[0]
  abstract = jax.eval_shape(init_state)

  @jax.jit
  def forward(state, tokens, valid):
    model = nnx.merge(graphdef, state)
    return model(tokens, tr.positions_from_valid(valid), valid=valid)[0]

  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 129, size=(8, 12)), jnp.int32)
  valid = jnp.arange(12)[None] >= jnp.arange(8)[:, None]  # left padding of 0..7 tokens
  reference = np.asarray(forward(jax.jit(init_state)(), tokens, valid))

  report['meshes'] = {}
  for name, (data, fsdp, tensor) in MESHES.items():
    mesh = sharding.make_mesh([('data', data), ('fsdp', fsdp), ('tensor', tensor)])
    shardings = sharding.state_shardings(mesh, rules, abstract)
    # Shapes before arrays: the params are created already sharded.
    state = jax.jit(init_state, out_shardings=shardings)()
    actual = sharding.describe(jax.tree.map(lambda x: x.sharding, state))
    batch = sharding.batch_sharding(mesh)
    with sharding.use_mesh(mesh, rules):
      logits = forward(state, jax.device_put(tokens, batch), jax.device_put(valid, batch))
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, abstract)
    opt_shardings = sharding.describe(sharding.state_shardings(mesh, rules, opt_state))
    report['meshes'][name] = {
        'shape': dict(mesh.shape),
        'expected': sharding.describe(shardings),
        'actual': actual,
        'opt': {k: v for k, v in opt_shardings.items() if 'mlp' in k and 'up' in k},
        'max_abs_diff': float(np.max(np.abs(np.asarray(logits) - reference))),
    }

  report['fill'] = dict(sharding.make_mesh([('data', -1), ('fsdp', 2), ('tensor', 1)]).shape)
  errors = []
  for bad in ([('data', 3), ('fsdp', 1), ('tensor', 1)], [('data', -1), ('fsdp', -1)],
              [('data', 3), ('fsdp', -1)]):
    try:
      sharding.make_mesh(bad)
    except ValueError as e:
      errors.append(str(e))
  report['errors'] = errors
  mesh = sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])
  report['batch_spec'] = list(sharding.batch_sharding(mesh).spec)
  report['logical'] = {
      'embed_mlp': list(sharding.logical_to_sharding(mesh, rules, ('embed', 'mlp')).spec),
      'indivisible': list(sharding.logical_to_sharding(mesh, rules, ('vocab', 'embed'),
                                                       (129, 64)).spec),
      'unknown': list(sharding.logical_to_sharding(mesh, rules, ('nope', None)).spec),
  }
  x = jnp.ones((8, 4, 64))
  report['constrain_noop'] = sharding.constrain(x, tr.ACT_BTD) is x
  with sharding.use_mesh(mesh, rules):
    y = jax.jit(lambda x: sharding.constrain(x * 2, tr.ACT_BTD))(x)
  report['constrained'] = sharding.describe({'y': y.sharding})["['y']"]
  return report


@pytest.fixture(scope='module')
def report():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = os.pathsep.join([root, env.get('PYTHONPATH', '')])
  result = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-5000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_meshes_build(report):
  assert report['num_devices'] == 8
  for name, (data, fsdp, tensor) in MESHES.items():
    assert report['meshes'][name]['shape'] == {'data': data, 'fsdp': fsdp, 'tensor': tensor}
  assert report['fill'] == {'data': 4, 'fsdp': 2, 'tensor': 1}


def test_bad_meshes_raise(report):
  assert len(report['errors']) == 3
  assert 'does not divide' in report['errors'][0]


def spec_of(report, mesh_name, path_part):
  [value] = [v for k, v in report['meshes'][mesh_name]['actual'].items() if path_part in k]
  return value


def test_params_get_expected_shardings(report):
  mesh = report['meshes']['2x2x2']
  assert mesh['actual'] == mesh['expected']
  spec = lambda path_part: spec_of(report, '2x2x2', path_part)  # noqa: E731

  # Specs as lists with trailing Nones dropped (sharding.describe).
  assert spec("[0]['mlp']['up']") == ['fsdp', 'tensor']
  assert spec("[0]['mlp']['down']") == ['tensor', 'fsdp']
  assert spec("[0]['attn']['q_proj']") == ['fsdp', 'tensor']
  assert spec("[0]['attn']['k_proj']") == ['fsdp', 'tensor']
  assert spec("[0]['attn_norm']['scale']") == []
  assert spec("['embedding']") == [None, 'fsdp']  # vocab 129 % 2 != 0: replicated
  assert spec("['lm_head']") == ['fsdp']
  # 8x1x1: size-1 axes shard nothing, params are replicated.
  assert all(v == [] for v in report['meshes']['8x1x1']['actual'].values())
  # 2x4x1: 'embed' (64) splits over fsdp=4, nothing over tensor=1.
  assert spec_of(report, '2x4x1', "[0]['mlp']['up']") == ['fsdp']


def test_optimizer_state_follows_params(report):
  opt = report['meshes']['2x2x2']['opt']
  assert len(opt) == 4  # mu and nu of two blocks' mlp.up
  assert all(v == ['fsdp', 'tensor'] for v in opt.values())


def test_forward_matches_single_device(report):
  for name, mesh in report['meshes'].items():
    assert mesh['max_abs_diff'] < 1e-5, (name, mesh['max_abs_diff'])


def test_logical_helpers(report):
  assert report['batch_spec'] == [['data', 'fsdp']]
  assert report['logical']['embed_mlp'] == ['fsdp', 'tensor']
  assert report['logical']['indivisible'] == [None, 'fsdp']
  assert report['logical']['unknown'] == [None, None]
  assert report['constrain_noop']
  assert report['constrained'] == [['data', 'fsdp']]


if __name__ == '__main__':
  print(json.dumps(_worker()))


def test_config_rules_replace_the_defaults_and_bad_ones_name_the_key():
  from iterppo_jax import sharding  # here, not at the top: run as a script, this file sets XLA_FLAGS first
  rules = dict(sharding.rules_from_config((("embed", None), ("mlp", ("fsdp", "tensor")))))
  assert rules["embed"] is None and rules["mlp"] == ("fsdp", "tensor")
  assert rules["heads"] == dict(sharding.DEFAULT_RULES)["heads"]  # the rest stay
  from iterppo_jax import errors  # a bad rule is a setting: exit status 2, one line (cli.guard)
  with pytest.raises(errors.SettingsError, match="config.mesh_rules: unknown logical name 'embedding'"):
    sharding.rules_from_config((("embedding", None),))
  with pytest.raises(errors.SettingsError, match=r"config.mesh_rules: 'mlp' -> 'model' names \['model'\]"):
    sharding.rules_from_config((("mlp", "model"),))


def test_the_loop_runs_every_phase_under_the_configured_mesh_and_rules(tmp_path, monkeypatch):
  """loop.run enters sharding.use_mesh with config.mesh and config.mesh_rules, so activation constraints and
  parameter placement inside the phases follow the config (seen from inside the first phase)."""
  from configs import sales as sales_config
  from iterppo_jax import loop
  from iterppo_jax import sharding

  seen = {}

  class Stop(Exception):
    pass

  def first_phase(run_, logs):
    seen["mesh"], seen["rules"] = sharding._ACTIVE.mesh, dict(sharding.active_rules())
    raise Stop

  monkeypatch.setattr(loop, "train_pi0", first_phase)
  c = sales_config.get_config("tiny")
  c.sft.behavior_conversations = 8
  c.mesh_rules = (("embed", None),)
  with pytest.raises(Stop):
    loop.run(c, str(tmp_path / "run"))
  assert seen["mesh"] is not None and seen["mesh"].axis_names == ("data", "fsdp", "tensor")
  assert seen["rules"]["embed"] is None and seen["rules"]["mlp"] == "tensor"
  assert sharding._ACTIVE.mesh is None  # left on exit
