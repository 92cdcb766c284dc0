"""Label flips and the classifier's error rate (label_noise.py): consistent flags, truth kept, deterministic."""

import pytest

from configs import sales as sales_config
from iterppo_jax import conversation as conv_lib
from iterppo_jax import label_noise
from iterppo_jax.envs import base as env_base
from iterppo_jax.envs import registry


@pytest.fixture(scope="module")
def sim_records():
  c = sales_config.get_config()
  env = registry.make_env(c.env)
  return env.play(registry.make_policy("sales", "behavior", c.env), 400, seed=3)


def conv(cid, flags, outcome=None, truth=None, end="customer_left"):
  turns = [conv_lib.Turn("customer", "hi", flag=0)]
  for f in flags:
    turns += [conv_lib.Turn("suggestion", "s"), conv_lib.Turn("business", "m", feedback="accept"),
              conv_lib.Turn("customer", "c", flag=f)]
  outcome = float(any(flags)) if outcome is None else outcome
  meta = {} if truth is None else {"true_outcome": truth}
  return conv_lib.Conversation(cid, "sales", "p", turns, outcome=outcome, end_reason=end, metadata=meta)


def test_flip_one_changes_flags_consistently():
  win = conv("w", [0, 1], truth=1, end="outcome")
  flipped = label_noise.flip_one(win)
  assert flipped.outcome == 0.0 and label_noise.logged_label(flipped) == 0
  assert flipped.end_reason == "customer_left"
  assert flipped.metadata == {"true_outcome": 1, "label_flipped": True, "unflipped_end_reason": "outcome"}
  assert [t.text for t in flipped.turns] == [t.text for t in win.turns]  # labels only, never text
  assert win.outcome == 1.0 and win.turns[-1].flag == 1 and "label_flipped" not in win.metadata  # input kept
  assert env_base.discounted_targets(flipped, 0.9) == [0.0, 0.0]
  loss = conv("l", [0, 0], truth=0)
  gained = label_noise.flip_one(loss)
  assert gained.outcome == 1.0 and gained.end_reason == "outcome"
  assert [t.flag for t in gained.turns if t.role == "customer"] == [0, 0, 1]  # the last customer message
  assert env_base.discounted_targets(gained, 0.9) == pytest.approx([0.9, 1.0])
  # Flipping twice gives the labels back.
  again = label_noise.flip_one(gained)
  assert [t.flag for t in again.turns] == [t.flag for t in loss.turns] and again.outcome == 0.0


def test_flip_rate_determinism_and_truth(sim_records):
  flipped = label_noise.flip_labels(sim_records, 0.3, seed=7)
  marked = [r.metadata.get("label_flipped", False) for r in flipped]
  rate = sum(marked) / len(marked)
  assert 0.23 < rate < 0.37  # 400 draws at 0.3: sd 0.023
  for old, new, m in zip(sim_records, flipped, marked):
    assert new.metadata["true_outcome"] == old.metadata["true_outcome"]
    assert (label_noise.logged_label(new) != label_noise.logged_label(old)) == m
    assert new.outcome == label_noise.logged_label(new)
  # The draw is per conversation id: another order, or a subset, flips the same conversations.
  again = label_noise.flip_labels(list(reversed(sim_records[:100])), 0.3, seed=7)
  assert {r.id for r in again if r.metadata.get("label_flipped")} == {
      r.id for r in flipped[:100] if r.metadata.get("label_flipped")}
  other_seed = label_noise.flip_labels(sim_records, 0.3, seed=8)
  assert [r.metadata.get("label_flipped", False) for r in other_seed] != marked
  assert not any(r.metadata.get("label_flipped") for r in label_noise.flip_labels(sim_records, 0.0, seed=7))
  assert all(r.metadata.get("label_flipped") for r in label_noise.flip_labels(sim_records, 1.0, seed=7))


def test_classifier_error_counts_false_positives_and_negatives(sim_records):
  # The sales simulator's classifier reads templated purchase phrases: no error on clean logs.
  clean = label_noise.classifier_error(sim_records)
  assert clean["labelled"] == 400 and clean["error_rate"] == 0.0
  assert clean["true_positives_n"] > 20  # the behaviour staff convert ~25%, so both rates are defined
  flipped = label_noise.flip_labels(sim_records, 0.3, seed=7)
  err = label_noise.classifier_error(flipped)
  by_truth = {0: [], 1: []}
  for r in flipped:
    by_truth[r.metadata["true_outcome"]].append(bool(r.metadata.get("label_flipped")))
  assert err["false_positive_rate"] == pytest.approx(sum(by_truth[0]) / len(by_truth[0]))
  assert err["false_negative_rate"] == pytest.approx(sum(by_truth[1]) / len(by_truth[1]))
  assert err["error_rate"] == pytest.approx(err["flipped"] / 400)
  # By hand: truth (1, 0, 0, 1) vs logged (1, 1, 0, 0) -> FP 1/2, FN 1/2, error 1/2; one record without truth.
  hand = [conv("a", [1], truth=1), conv("b", [1], truth=0), conv("c", [0], truth=0), conv("d", [0], truth=1),
          conv("e", [1])]
  e = label_noise.classifier_error(hand)
  assert (e["labelled"], e["false_positive_rate"], e["false_negative_rate"], e["error_rate"]) == (4, 0.5, 0.5, 0.5)


def test_qfit_records_subsample_then_flip(sim_records):
  kept = label_noise.qfit_records(sim_records, data_fraction=0.25, seed=1)
  assert 70 < len(kept) < 130
  by_id = {r.id: r for r in sim_records}
  assert all(by_id[r.id] is r for r in kept)  # no flips: the very same records
  positions = [list(by_id).index(r.id) for r in kept]
  assert positions == sorted(positions)  # in D_k's order
  assert {r.id for r in kept} == {r.id for r in label_noise.subsample(list(reversed(sim_records)), 0.25, 1)}
  both = label_noise.qfit_records(sim_records, label_flip=0.1, data_fraction=0.25, seed=1)
  assert [r.id for r in both] == [r.id for r in kept]
  assert any(r.metadata.get("label_flipped") for r in both)
  assert label_noise.qfit_records(sim_records, seed=1) == list(sim_records)
  assert len(label_noise.subsample(sim_records[:3], 0.0001, seed=1)) == 1  # never empty


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="label flip rate"):
    label_noise.flip_labels([conv("a", [1])], 1.5, seed=0)
  with pytest.raises(ValueError, match="binary outcome"):
    label_noise.flip_labels([conv("a", [0], outcome=0.7)], 1.0, seed=0)
  with pytest.raises(ValueError, match="binary outcome"):
    label_noise.flip_one(conv("a", [0], outcome=1.0))  # outcome 1 but no flag: labels disagree
  with pytest.raises(ValueError, match="true_outcome"):
    label_noise.classifier_error([conv("a", [1])])
  with pytest.raises(ValueError, match="data fraction"):
    label_noise.subsample([conv("a", [1])], -0.1, seed=0)
