"""Domains by name or by import path: `env.domain` is a built-in name ("sales") or a module path
("my_pkg.my_domain"), and this module is the one place that turns it into the domain's pieces.

A domain is one Python module that defines (docs/domains.md has the whole protocol, with a worked example):

  make_env(env_config) -> base.TextEnv     the simulator, from the `env` section (settings.Env: the common keys,
                                           and a domain's own in its extras, read as attributes)
  make_policy(name, env_config) -> Policy  its shipped scripted policies by name: at least 'behavior' (the
                                           historical staff: D_0 and pi_0's SFT), 'oracle' and 'random' (the
                                           report's simulator table); 'explore' for loop.first_data=explore
  SCRIPT: policies.Script                  the staff's five functions; its candidate acts are what the ranking
                                           diagnostic scores and what a randomised turn draws from
  dialogue_state(turns), act_key(turns, text)
                                           optional: the dialogue-state tracker that qfit.view=dialogue_state
                                           (q_table.py) reads

A module from outside the package needs no edit here: `--config.env.domain=my_pkg.my_domain` imports it.
"""

import dataclasses
import importlib
import types
from typing import Any

from iterppo_jax import errors
from iterppo_jax.envs import base
from iterppo_jax.envs import policies

# built-in name -> module
DOMAINS = {
    "sales": "iterppo_jax.envs.sales",
    "support": "iterppo_jax.envs.support",
    "booking": "iterppo_jax.envs.booking",
    "negotiation": "iterppo_jax.envs.negotiation",
}
REQUIRED = ("make_env", "make_policy", "SCRIPT")  # what every domain module defines
TRACKER = ("dialogue_state", "act_key")  # what a domain with a dialogue-state tracker adds


def module(domain: str) -> types.ModuleType:
  """The domain's module: a built-in name or an import path, checked to define the protocol's attributes."""
  if domain in DOMAINS:
    path = DOMAINS[domain]
  elif "." in domain:
    path = domain
  else:
    raise errors.SettingsError(f"env.domain: unknown domain {domain!r}; expected one of {', '.join(DOMAINS)}, or the "
                               "import path of a domain module (my_pkg.my_domain; docs/domains.md)")
  try:
    mod = importlib.import_module(path)
  except ImportError as e:
    raise errors.SettingsError(f"env.domain {domain!r}: cannot import module {path!r} ({e}); is its package on "
                               "PYTHONPATH?") from e
  missing = [name for name in REQUIRED if not hasattr(mod, name)]
  if missing:
    raise errors.SettingsError(f"env.domain {domain!r}: module {path} lacks {', '.join(missing)}; a domain module "
                               f"defines {', '.join(REQUIRED)} (docs/domains.md)")
  return mod


def make_env(env_config) -> base.TextEnv:
  return module(env_config.domain).make_env(env_config)


def make_policy(domain: str, name: str, env_config):
  """A shipped scripted policy of `domain`: behavior | oracle | random (and any the domain adds)."""
  return module(domain).make_policy(name, env_config)


def script(domain: str):
  """The domain's policies.Script: visible facts, oracle and staff acts, templates and candidate acts."""
  return module(domain).SCRIPT


def candidate_fn(domain: str):
  """(transcript, rng) -> the domain's scripted candidate suggestions at that state (one per act kind)."""
  s = script(domain)
  return lambda turns, rng: policies.candidate_texts(s, turns, rng)


def oracle_fn(domain: str):
  """(transcript, rng) -> the domain's oracle suggestion at that state (its script's best act, worded). A
  simulator-side reference for diagnostics (how often a policy's act is the oracle's), never a training signal."""
  s = script(domain)
  return lambda turns, rng: s.message(s.oracle_act(s.visible_facts(turns)), turns, rng)


def _has_tracker(mod: types.ModuleType) -> bool:
  return all(hasattr(mod, name) for name in TRACKER)


def tracker(domain: str):
  """(dialogue_state(turns) -> key, act_key(turns, text) -> key): the domain's dialogue-state tracker, which a
  dialogue-state Q-model reads (qfit.view=dialogue_state, q_table.py). A domain module that defines both
  functions has one."""
  mod = module(domain)
  if not _has_tracker(mod):
    have = [d for d in DOMAINS if _has_tracker(module(d))]
    raise errors.SettingsError(f"qfit.view='dialogue_state': env.domain {domain!r} has no dialogue-state tracker "
                               f"(dialogue_state and act_key in {mod.__name__}); domains with one: {', '.join(have)}; "
                               "or use qfit.view=tokens")
  return mod.dialogue_state, mod.act_key


def off_topic_share(domain: str, records) -> float:
  """Share of the non-abstaining suggestions in `records` that the domain's parser reads as no dialogue act
  ('off_topic': the simulated business user and customer react to them as small talk). NaN for a domain without
  a dialogue-state tracker, or with no suggestion. How a free-text LLM policy is read (issue #18)."""
  mod = module(domain)
  if not _has_tracker(mod):
    return float("nan")
  kinds = [mod.act_key(r.turns[:i], r.turns[i].text)[0] for r in records for i in r.agent_steps()
           if not r.turns[i].abstain]
  return sum(k == "off_topic" for k in kinds) / len(kinds) if kinds else float("nan")


@dataclasses.dataclass(frozen=True)
class Domain:
  """One domain with the run's `env` settings: the pieces of its module the loop calls, behind one handle that
  the run builds once (`domain(config.env)`), so no phase looks the domain up by name again."""
  env_config: Any  # settings.Env (or the ConfigDict's env section)

  @property
  def name(self) -> str:
    return self.env_config.domain

  def make_env(self) -> base.TextEnv:
    return module(self.name).make_env(self.env_config)

  def policy(self, name: str):
    """A shipped scripted policy: behavior | oracle | random | explore (and any the domain adds)."""
    return module(self.name).make_policy(name, self.env_config)

  def candidates(self):
    """(transcript, rng) -> the scripted candidate suggestions at that state (candidate_fn)."""
    return candidate_fn(self.name)

  def tracker(self):
    """(dialogue_state, act_key): the dialogue-state tracker (tracker)."""
    return tracker(self.name)

  def off_topic_share(self, records) -> float:
    return off_topic_share(self.name, records)


def domain(env_config) -> Domain:
  """The domain `env_config.domain` names, its module imported and checked now (a bad name fails here)."""
  module(env_config.domain)
  return Domain(env_config)
