"""Each setting's path from configs/ to the code that uses it (issue #17): the source audit, and the reads it
found shared and that were made single."""

import os

import pytest

from configs import sales as sales_config
from iterppo_jax import settings
from iterppo_jax import solvers
from iterppo_jax.studies import baselines
from iterppo_jax.studies import config_readers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Leaf keys the library (studies/ aside) reads in more than one module, and why that stays.
SHARED = {
    # The loop sizes every array and prompt to it; the solver samples that many tokens per response. One number
    # with two uses; the solvers read it with the rest of their settings (solvers.SOLVERS[...].config).
    "data.max_action_len": {"iterppo_jax/loop.py", "iterppo_jax/solvers.py"},
}


@pytest.fixture(scope="module")
def found():
  return config_readers.readers(ROOT)


def test_every_setting_is_read(found):
  """A key of settings.Settings that no code reads (by name, or with its section passed on whole) is a setting
  that does nothing: an override of it would be accepted and ignored."""
  assert config_readers.unread(found) == []


def test_library_reads_each_setting_in_one_module(found):
  leaves, _ = config_readers.settings_keys()
  shared = {k: set(config_readers.modules(found.get(k, set()), library_only=True)) for k in sorted(leaves)}
  shared = {k: v for k, v in shared.items() if len(v) > 1}
  assert shared == SHARED


# Keys whose whole path is one function in the whole code base (library, studies and entry points): the run's
# encoding (loop.make_encoding -> data.Encoding, carried by Run and passed to every phase, study and script that
# encodes, renders or samples), the deployment temperature (an LMPolicy, or pi_k's samples for FQE / SARSA), the
# policy's shape (loop.model_config, also for a pretrained model_dir: Run.model_cfg), what the Q-fit sees of D_k
# (loop._qfit_records, for both Q-model views) and the solver's step count.
STRAIGHT = {
    "data.max_prompt_len": {"iterppo_jax/loop.py:make_encoding"},
    "data.prompt_bucket": {"iterppo_jax/loop.py:make_encoding"},
    "env.max_render_turns": {"iterppo_jax/loop.py:make_encoding"},
    "loop.deploy_temperature": {"iterppo_jax/loop.py:make_lm_policy", "iterppo_jax/loop.py:sample_deployed"},
    "model.dtype": {"iterppo_jax/loop.py:model_config"},
    "model.param_dtype": {"iterppo_jax/loop.py:model_config"},
    "model.remat": {"iterppo_jax/loop.py:model_config"},
    "qfit.label_flip": {"iterppo_jax/loop.py:_qfit_records"},
    "qfit.data_fraction": {"iterppo_jax/loop.py:_qfit_records"},
    "ppo.steps": {"iterppo_jax/loop.py:improve_policy"},
}


def test_straight_keys_have_one_reader(found):
  assert {k: found.get(k, set()) for k in STRAIGHT} == STRAIGHT


# Leaf keys that more than one function of the library (studies/ aside) reads, and why. Every other key has one
# reader function there, which hands its value on (an Encoding, Run.model_cfg, Run.gamma, Run.log_name, ...).
SEVERAL_READERS = {
    # SHARED above: the loop's budget (make_encoding) and the solvers' sampling length.
    "data.max_action_len": {"iterppo_jax/loop.py:make_encoding", "iterppo_jax/solvers.py:_group_config",
                            "iterppo_jax/solvers.py:_ppo_config"},
    # pi_k deployed in two forms: an LMPolicy in the simulator, and a batch sampler at logged states (FQE, SARSA).
    "loop.deploy_temperature": {"iterppo_jax/loop.py:make_lm_policy", "iterppo_jax/loop.py:sample_deployed"},
    "loop.play_batch": {"iterppo_jax/loop.py:Run.play", "iterppo_jax/loop.py:sample_deployed",
                        "iterppo_jax/loop.py:setup"},  # setup plays the behaviour logs before a Run exists
    # setup reads the user's logs; the offline iteration's summary names the files they came from.
    "loop.logs": {"iterppo_jax/loop.py:setup", "iterppo_jax/loop.py:offline_iteration"},
    # one pretrained model, three loaders of their own part of it (tokenizer in setup, shape, weights) and the
    # SFT phase that starts from it
    "model_dir": {"iterppo_jax/loop.py:setup", "iterppo_jax/loop.py:model_config",
                  "iterppo_jax/loop.py:load_pretrained", "iterppo_jax/loop.py:train_pi0"},
    # the two Q-model views (qfit.view), each fitting the targets these keys choose
    "qfit.lam": {"iterppo_jax/loop.py:fit_q", "iterppo_jax/loop.py:fit_q_table"},
    "qfit.method": {"iterppo_jax/loop.py:fit_q", "iterppo_jax/loop.py:fit_q_table"},
    "qfit.targets": {"iterppo_jax/loop.py:fit_q", "iterppo_jax/loop.py:fit_q_table"},
    # the inner solver: run in improve_policy; its beta also sizes the Q-fit's measure of how far that step can
    # climb Q_k (_step_reach, finding 29)
    "inner": {"iterppo_jax/loop.py:improve_policy", "iterppo_jax/loop.py:_step_reach"},
    # the token Q-model's output (a logit or a value): fitted in fit_q, turned into PPO's reward in improve_policy
    "qfit.kind": {"iterppo_jax/loop.py:fit_q", "iterppo_jax/loop.py:improve_policy"},
}


def test_library_reads_each_setting_in_one_function(found):
  leaves, _ = config_readers.settings_keys()
  library = {k: {w for w in found.get(k, set()) if w.startswith("iterppo_jax/")
                 and not w.startswith("iterppo_jax/studies/")} for k in sorted(leaves)}
  assert {k: v for k, v in library.items() if len(v) > 1} == SEVERAL_READERS


def test_library_looks_the_domain_up_once(found):
  """The library builds one registry.Domain from the env section (loop.setup, the scaling study) and calls it;
  no phase reads env.domain to look the domain up again."""
  assert not [w for w in found.get("env.domain", set()) if w.startswith("iterppo_jax/")]


def test_audit_follows_aliases_and_skips_writes(tmp_path):
  src = tmp_path / "pkg" / "mod.py"
  src.parent.mkdir()
  src.write_text(
      "def a(config):\n"
      "  p = config.ppo\n"
      "  return p.clip_eps, config.get('resume', True)\n"
      "def b(run):\n"
      "  run.config.loop.iterations = 3\n"          # a write: not a read
      "  return run.config.data.max_prompt_len\n"
      "class R:\n"
      "  def c(self):\n"
      "    return make(self.config.env), other.clip_eps\n")  # a section passed whole; a chain of no settings
  leaves, sections = config_readers.settings_keys()
  got = config_readers.file_readers(str(src), "pkg/mod.py", leaves, sections)
  assert got == {"ppo": {"pkg/mod.py:a"}, "ppo.clip_eps": {"pkg/mod.py:a"}, "resume": {"pkg/mod.py:a"},
                 "data.max_prompt_len": {"pkg/mod.py:b"}, "env": {"pkg/mod.py:R.c"}}


def test_online_ppo_takes_the_ppo_solvers_settings():
  c = sales_config.get_config("tiny")
  c.ppo.kl_coef, c.ppo.clip_eps, c.ppo.epochs, c.ppo.whiten_advantages = 0.07, 0.3, 3, False
  typed = settings.load(c)
  online, token = baselines.online_config(typed), solvers.SOLVERS["ppo"].config(typed)
  for name in ("kl_coef", "clip_eps", "value_clip_eps", "entropy_coef", "epochs", "minibatch_size",
               "whiten_advantages"):
    assert getattr(online, name) == getattr(token, name), name
  assert (online.kl_coef, online.clip_eps, online.epochs, online.whiten_advantages) == (0.07, 0.3, 3, False)
  assert online.gamma == typed.gamma and online.lam == typed.baselines.online_lam


def test_group_rows_name_their_algorithm():
  typed = settings.load(sales_config.get_config("tiny"))  # inner = ppo: the row, not config.inner, decides
  assert solvers.SOLVERS["grpo"].config(typed).algorithm == "grpo"
  assert solvers.SOLVERS["rloo"].config(typed).algorithm == "rloo"
