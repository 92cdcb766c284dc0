"""Metric logging (metrics.py), atomic writes (io_utils.py) and orbax checkpoints (checkpoint.py)."""

import glob
import json
import logging
import math
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from iterppo_jax import checkpoint
from iterppo_jax import io_utils
from iterppo_jax import metrics


# ---- metrics ----


def test_metric_jsonl_round_trip(tmp_path):
  with metrics.MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write(1, {"ppo/clipfrac": jnp.float32(0.25), "ppo/kl": np.float64(0.5), "ppo/n": 3}, phase="ppo",
                 iteration=0)
    writer.write(2, {"qfit/brier": jnp.array([0.125])})
  records = metrics.read_metrics(tmp_path / "metrics.jsonl")
  assert records == [
      {"step": 1, "phase": "ppo", "iteration": 0, "ppo/clipfrac": 0.25, "ppo/kl": 0.5, "ppo/n": 3.0},
      {"step": 2, "qfit/brier": 0.125},
  ]
  assert all(type(v) is float for k, v in records[0].items() if "/" in k)
  assert metrics.read_metrics(tmp_path) == records  # a workdir works too


def test_metric_lines_are_flushed_immediately(tmp_path):
  writer = metrics.MetricWriter(tmp_path, tensorboard=False)
  writer.write(7, {"a/b": 1.0})
  # Read before close: a killed run must keep what it logged.
  assert metrics.read_metrics(tmp_path)[0]["step"] == 7
  writer.close()


def test_read_metrics_dedup_keeps_last(tmp_path):
  with metrics.MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write(1, {"x/y": 1.0}, phase="ppo")
    writer.write(2, {"x/y": 2.0}, phase="ppo")
    writer.write(1, {"x/y": 3.0}, phase="ppo")  # replayed after a resume
  assert [r["x/y"] for r in metrics.read_metrics(tmp_path, dedup=True)] == [3.0, 2.0]


def test_nonfinite_metric_raises_naming_step(tmp_path):
  with metrics.MetricWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(FloatingPointError, match=r"step 42.*ppo/loss"):
      writer.write(42, {"ppo/loss": jnp.nan, "ppo/clipfrac": 0.1})
  assert not (tmp_path / "metrics.jsonl").read_text()  # nothing written for the bad record


def test_nonfinite_families(tmp_path):
  with metrics.MetricWriter(tmp_path, tensorboard=False, fail_on_nonfinite=["ppo/"]) as writer:
    writer.write(1, {"eval/auc": float("nan")})  # outside the checked family: logged
    with pytest.raises(FloatingPointError, match="step 2"):
      writer.write(2, {"ppo/loss": float("inf")})
  assert np.isnan(metrics.read_metrics(tmp_path)[0]["eval/auc"])
  metrics.check_finite({"a": float("nan")}, 0, families=False)
  with pytest.raises(FloatingPointError, match="step 5"):
    metrics.check_finite({"qfit/loss": np.float32(np.inf)}, 5, families=["qfit/loss"])


def test_non_scalar_metric_rejected(tmp_path):
  with metrics.MetricWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(ValueError, match="ppo/values"):
      writer.write(1, {"ppo/values": jnp.ones(3)})


def test_tensorboard_event_file_appears(tmp_path):
  with metrics.MetricWriter(tmp_path, tensorboard=True) as writer:
    writer.write(3, {"ppo/clipfrac": 0.1})
  events = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  assert events and os.path.getsize(events[0]) > 0


def test_an_undefined_statistic_is_kept_in_jsonl_and_left_out_of_tensorboard(tmp_path, caplog):
  """A NaN evaluation statistic (an AUC of one class) is data, not an error: the JSONL keeps it, and TensorBoard
  gets no point, so tensorboardX logs no 'NaN or Inf found' warning a user must learn to ignore."""
  with caplog.at_level(logging.WARNING):
    with metrics.MetricWriter(tmp_path, tensorboard=True, fail_on_nonfinite=("ppo/",)) as writer:
      writer.write(1, {"eval/auc": float("nan"), "eval/conversion": 0.25})
  assert "NaN or Inf" not in caplog.text
  with open(tmp_path / "metrics.jsonl") as f:
    record = json.loads(f.readline())
  assert math.isnan(record["eval/auc"]) and record["eval/conversion"] == 0.25


def test_inactive_writer_writes_nothing(tmp_path):
  with metrics.MetricWriter(tmp_path / "run", active=False) as writer:
    writer.write(1, {"a/b": 1.0})
    with pytest.raises(FloatingPointError):
      writer.write(2, {"a/b": float("nan")})
  assert not (tmp_path / "run").exists()


def test_progress_quiet_without_tty(monkeypatch):
  monkeypatch.setenv("IPPO_NO_PROGRESS", "1")
  items = [1, 2, 3]
  assert metrics.progress(items, total=3, desc="x") is items
  assert list(metrics.progress(iter(items))) == items


# ---- atomic writes ----


def _leftovers(directory):
  return [name for name in os.listdir(directory) if name.endswith(".tmp")]


def test_atomic_write_text_and_bytes(tmp_path):
  path = tmp_path / "sub" / "config.json"
  io_utils.atomic_write_text(path, "first")
  io_utils.atomic_write_text(path, "second")
  assert path.read_text() == "second"
  io_utils.atomic_write_bytes(tmp_path / "blob", b"\x00\x01")
  assert (tmp_path / "blob").read_bytes() == b"\x00\x01"
  io_utils.atomic_write_json(tmp_path / "c.json", {"b": 1, "a": [1, 2]})
  assert json.loads((tmp_path / "c.json").read_text()) == {"a": [1, 2], "b": 1}
  assert not _leftovers(tmp_path) and not _leftovers(tmp_path / "sub")
  assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_atomic_write_failure_keeps_old_file(tmp_path):
  path = tmp_path / "state.txt"
  io_utils.atomic_write_text(path, "old contents")
  with pytest.raises(RuntimeError, match="midway"):
    with io_utils.atomic_open(path, "w") as f:
      f.write("new half")
      raise RuntimeError("writer died midway")
  assert path.read_text() == "old contents"
  assert not _leftovers(tmp_path)
  with pytest.raises(TypeError):
    io_utils.atomic_write_json(path, {"x": object()})  # unserialisable: fails before touching the file
  assert path.read_text() == "old contents"


# ---- checkpoints ----


def _train_state():
  model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  optimizer = optax.adam(1e-3)
  opt_state = optimizer.init(params)
  # One real update so the moments are non-zero and the round trip is meaningful.
  grads = jax.tree.map(jnp.ones_like, params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return {"params": params, "opt_state": opt_state, "step": jnp.int32(1),
          "rng": jax.random.key_data(jax.random.key(3))}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_round_trip(tmp_path):
  state = _train_state()
  metadata = {"phase": "ppo", "iteration": 2, "kl_coef": 0.05, "paths": ["data/iter_2.jsonl"]}
  with checkpoint.Checkpointer(tmp_path, "ppo", max_to_keep=2) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError):
      ckpt.restore()
    ckpt.save(10, state, metadata)
    assert os.path.isdir(tmp_path / "checkpoints" / "ppo" / "10")
    assert ckpt.latest_step() == 10
    abstract = checkpoint.abstract_like(state)
    restored, restored_metadata = ckpt.restore(10, abstract)
  _assert_trees_equal(restored, state)
  assert restored_metadata == metadata
  assert isinstance(restored["params"], nnx.State)
  assert restored["params"]["kernel"][...].sharding == state["params"]["kernel"][...].sharding


def test_checkpoint_resume_latest_max_to_keep_and_eval_shape(tmp_path):
  state = _train_state()
  with checkpoint.Checkpointer(tmp_path, "qfit", max_to_keep=2) as ckpt:
    for step in (1, 2, 3):
      bumped = jax.tree.map(lambda x, s=step: x + s, state)
      ckpt.save(step, bumped, {"step": step})
    with pytest.raises(ValueError, match="step 3 already exists"):
      ckpt.save(3, state, {})
    ckpt.save(3, state, {"step": "again"}, overwrite=True)
  # A fresh Checkpointer (a resumed process) sees what is on disk.
  with checkpoint.Checkpointer(tmp_path, "qfit", max_to_keep=2) as ckpt:
    assert ckpt.all_steps() == [2, 3]
    assert ckpt.latest_step() == 3
    assert ckpt.restore_metadata() == {"step": "again"}
    # Abstract target from shapes only, with an explicit sharding per leaf.
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            jax.eval_shape(_train_state))
    restored, metadata = ckpt.restore(2, abstract)
  _assert_trees_equal(restored, jax.tree.map(lambda x: x + 2, state))
  assert metadata == {"step": 2}
  leaf = jax.tree.leaves(restored)[0]
  assert leaf.sharding == sharding


def test_remove_partial_waits_for_writes_that_land_after_the_first_removal(tmp_path):
  """A failed save's in-flight writes can recreate its staging directory after it was removed (seen on a full
  disk: the removal frees the space they waited for); remove_partial scans again until nothing is left, and
  keeps complete steps."""
  root = tmp_path / "checkpoints"
  done = root / "ppo" / "0" / "1"
  done.mkdir(parents=True)
  (done / "_CHECKPOINT_METADATA").write_text("{}")
  staging = root / "ppo" / "0" / "2.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp"
  staging.mkdir(parents=True)
  late = threading.Timer(0.1, lambda: (staging.mkdir(parents=True, exist_ok=True),
                                       (staging / "manifest.ocdbt").write_text("late")))
  late.start()
  removed = checkpoint.remove_partial(root, settle_s=0.3)
  late.join()
  assert removed == [str(root / "ppo" / "0" / "2.orbax-checkpoint-tmp")]
  assert not (root / "ppo" / "0" / "2.orbax-checkpoint-tmp").exists()
  assert checkpoint.latest_complete(root) == str(done)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs several (host) devices")
def test_checkpoint_restores_into_new_sharding(tmp_path):
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  tree = {"w": jax.device_put(jnp.arange(8.0), replicated)}
  with checkpoint.Checkpointer(tmp_path, "sharded") as ckpt:
    ckpt.save(0, tree)
    restored, metadata = ckpt.restore(0, {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=split)})
  assert metadata == {}
  assert restored["w"].sharding == split
  np.testing.assert_array_equal(restored["w"], np.arange(8.0))
