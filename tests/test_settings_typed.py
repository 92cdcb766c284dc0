"""settings.load: every shipped config becomes typed, frozen settings equal to its ConfigDict's values; a key no
section knows is refused by name before any work; the env section keeps a domain's own keys."""

import ast
import dataclasses
import glob
import importlib
import os

import pytest

from configs import sales as sales_config
from iterppo_jax import errors
from iterppo_jax import loop
from iterppo_jax import settings
from iterppo_jax.models import gguf

SPECS = ["sales", "sales:tiny", "support", "support:tiny", "booking", "booking:tiny", "negotiation",
         "negotiation:tiny", "sales_hf", "sales_hf:tiny"]
SMOLLM = ["sales_smollm", "sales_smollm:tiny", "sales_smollm:prompted", "sales_smollm:laptop", "support_smollm",
          "support_smollm:prompted"]


def _config(spec):
  name, _, arg = spec.partition(":")
  return importlib.import_module(f"configs.{name}").get_config(arg or None)


def _flat(node, prefix=""):
  """{dotted key: value} of a ConfigDict or dict, or of settings (dataclasses; Env's extras as keys of env)."""
  if dataclasses.is_dataclass(node):
    items = {f.name: getattr(node, f.name) for f in dataclasses.fields(node) if f.name != "extras"}
    items.update(getattr(node, "extras", ()))
  else:
    items = dict(node.items())
  out = {}
  for key, value in items.items():
    if dataclasses.is_dataclass(value) or hasattr(value, "keys"):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _tuples(value):
  return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _check_equal(config, typed):
  """Every key of the config has its value in the typed settings; the keys it lacks have their defaults."""
  given, loaded = _flat(config), _flat(typed)
  assert set(given) <= set(loaded)
  for key, value in given.items():
    assert loaded[key] == _tuples(value) and type(loaded[key]) is type(_tuples(value)) or (
        isinstance(value, int) and type(loaded[key]) is float and loaded[key] == value), key
  defaults = _flat(settings.Settings())
  for key in set(loaded) - set(given):
    assert loaded[key] == defaults[key], key


@pytest.mark.parametrize("spec", SPECS)
def test_every_shipped_config_loads_with_its_values(spec):
  config = _config(spec)
  typed = settings.load(config)
  assert isinstance(typed, settings.Settings)
  _check_equal(config, typed)


@pytest.mark.parametrize("spec", SMOLLM)
def test_the_smollm2_configs_load_or_say_what_to_install(spec):
  config = _config(spec)
  if gguf.smollm2_path() is None:
    with pytest.raises(errors.SettingsError, match=r"config.model_dir .*not installed"):
      settings.load(config)
  else:
    _check_equal(config, settings.load(config))


def test_the_defaults_are_the_sales_config():
  assert settings.load(sales_config.get_config()) == settings.Settings()


def test_a_config_read_back_from_json_loads_the_same():
  """workdir/config.json holds lists where the config had tuples: the settings are the same."""
  import json
  c = sales_config.get_config("tiny")
  assert settings.load(json.loads(c.to_json_best_effort())) == settings.load(c)


@pytest.mark.parametrize("key, value", [("qfit.methd", "mc"), ("loop.iteration", 3), ("model.qfit", 1),
                                        ("ppo.critic.lr", 1e-3), ("qfit.model.depth", 2), ("seeed", 1),
                                        ("reward", {"scale": 1.0})])
def test_an_unknown_key_anywhere_is_refused_by_name(key, value):
  c = sales_config.get_config("tiny").to_dict()
  *path, leaf = key.split(".")
  node = c
  for part in path:
    node = node[part]
  node[leaf] = value
  with pytest.raises(errors.SettingsError, match=rf"^config\.{key}: unknown key; expected one of "):
    settings.load(c)


def test_an_unknown_key_stops_the_loop_before_any_work(tmp_path):
  c = sales_config.get_config("tiny")
  c.qfit.unlock()
  c.qfit.methd = "mc"
  workdir = tmp_path / "run"
  with pytest.raises(errors.SettingsError, match=r"config\.qfit\.methd: unknown key; expected one of .*method"):
    loop.setup(c, str(workdir))
  assert not workdir.exists()


@pytest.mark.parametrize("key, value, expected", [
    ("loop.tensorboard", "yes", "a bool"), ("tokenizer.path", 3, "a str"), ("qfit.model", 0, "a section"),
    ("lora.targets", "q_proj", "a tuple"), ("model.remat", 1, "a bool"), ("ppo.whiten_advantages", None, "a bool")])
def test_a_value_of_the_wrong_type_is_refused(key, value, expected):
  c = sales_config.get_config("tiny").to_dict()
  section, leaf = key.split(".")
  c[section][leaf] = value
  with pytest.raises(errors.SettingsError, match=rf"config\.{key} must be {expected}, got "):
    settings.load(c)


def test_the_settings_are_frozen():
  typed = settings.load(sales_config.get_config("tiny"))
  with pytest.raises(dataclasses.FrozenInstanceError):
    typed.seed = 1
  with pytest.raises(dataclasses.FrozenInstanceError):
    typed.qfit.method = "mc"
  with pytest.raises(dataclasses.FrozenInstanceError):
    typed.qfit.model.num_layers = 3
  with pytest.raises(dataclasses.FrozenInstanceError):
    typed.env.domain = "support"
  assert isinstance(typed.lora.targets, tuple) and isinstance(typed.mesh[0], tuple)
  hash(typed)  # every value is immutable


def test_the_env_section_keeps_a_domains_own_keys():
  """A domain from outside the package (docs/domains.md) may read keys of its own from config.env."""
  c = sales_config.get_config("tiny")
  c.env.unlock()
  c.env.patience = 3
  c.env.greetings = ["hi", "hello"]
  env = settings.load(c).env
  assert env.patience == 3 and env.greetings == ("hi", "hello") and env.get("patience") == 3
  assert env.get("absent", 7) == 7 and env.get("max_turns") == c.env.max_turns
  assert dataclasses.replace(env, business_user="direct").patience == 3
  with pytest.raises(AttributeError, match="absent"):
    env.absent  # pylint: disable=pointless-statement
  c.env.nested = {"a": 1}
  with pytest.raises(errors.SettingsError, match=r"config\.env\.nested: a domain's own env keys hold plain values"):
    settings.load(c)


def test_load_env_checks_the_section_alone():
  env = settings.load_env(sales_config.get_config().env)
  assert env == settings.Env()
  c = sales_config.get_config()
  c.env.business_user = "auto"
  with pytest.raises(errors.SettingsError, match=r"config\.env\.business_user must be one of sr, direct"):
    settings.load_env(c.env)


def test_a_bad_setting_is_still_named_by_check_first():
  c = sales_config.get_config("tiny").to_dict()
  c["loop"]["first_data"] = "polciy"
  with pytest.raises(errors.SettingsError, match=r"config\.loop\.first_data must be one of behavior, policy, explore"):
    settings.load(c)


def test_parse_types_without_the_checks():
  """settings.parse: the typed tree for a study's own checks, which come before loop.run's (studies/ablate_*.py)."""
  c = sales_config.get_config("tiny")
  c.ppo.batch_size = 6  # minibatch_size 4 does not divide it: load refuses, parse types it
  with pytest.raises(errors.SettingsError, match="must divide ppo.batch_size"):
    settings.load(c)
  assert settings.parse(c).ppo.batch_size == 6
  c.qfit.unlock()
  c.qfit.methd = "mc"
  with pytest.raises(errors.SettingsError, match=r"config\.qfit\.methd: unknown key"):
    settings.parse(c)


def _names_read_outside_settings() -> set[str]:
  """Every attribute name and string constant in the library and the entry points, settings.py left out."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  names = set()
  for path in glob.glob(f"{root}/iterppo_jax/**/*.py", recursive=True) + glob.glob(f"{root}/experiments/*.py"):
    if os.path.basename(path) == "settings.py":
      continue
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute):
        names.add(node.attr)
      elif isinstance(node, ast.Constant) and isinstance(node.value, str):
        names.add(node.value)
  return names


def test_every_key_of_every_shipped_config_has_a_reader():
  """A key that settings accept but no code reads would be a setting that silently does nothing. A reader is an attribute of that name (or the name as a string, for a
  domain's env keys) anywhere in iterppo_jax/ or experiments/ outside settings.py."""
  names = _names_read_outside_settings()
  keys = {key for spec in SPECS for key in _flat(_config(spec))}
  unread = sorted(key for key in keys if key.rsplit(".", 1)[-1] not in names)
  assert not unread, unread
