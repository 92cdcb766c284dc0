"""Builds an environment and its shipped policies from the `env` config section, by domain name.

A plain lookup table (STYLE.md: select components by name with a dict of module paths, imported on use): a new
domain adds a module that defines `make_env(env_config)` and `make_policy(name, env_config)`, and one row here.
"""

import importlib

from iterppo_jax.envs import base

# domain -> (module with make_env, module with make_policy)
DOMAINS = {
    "sales": ("iterppo_jax.envs.sales", "iterppo_jax.envs.policies"),
    "support": ("iterppo_jax.envs.support", "iterppo_jax.envs.support"),
    "booking": ("iterppo_jax.envs.booking", "iterppo_jax.envs.booking"),
    "negotiation": ("iterppo_jax.envs.negotiation", "iterppo_jax.envs.negotiation"),
}


def _module(domain: str, which: int):
  if domain not in DOMAINS:
    raise ValueError(f"unknown env.domain {domain!r}; expected one of: {', '.join(DOMAINS)}")
  return importlib.import_module(DOMAINS[domain][which])


def business_user(env_config) -> base.BusinessUserConfig:
  return base.BusinessUserConfig(mode=env_config.business_user)


def make_env(env_config) -> base.TextEnv:
  return _module(env_config.domain, 0).make_env(env_config)


def make_policy(domain: str, name: str, env_config):
  """A shipped scripted policy of `domain`: behavior | oracle | random (and any the domain adds)."""
  return _module(domain, 1).make_policy(name, env_config)


# domain -> (module, attribute) of its policies.Script (the scripted staff's functions)
SCRIPTS = {
    "sales": ("iterppo_jax.envs.policies", "SALES"),
    "support": ("iterppo_jax.envs.support", "SCRIPT"),
    "booking": ("iterppo_jax.envs.booking", "SCRIPT"),
    "negotiation": ("iterppo_jax.envs.negotiation", "SCRIPT"),
}


def script(domain: str):
  """The domain's policies.Script: visible facts, oracle and staff acts, templates and candidate acts."""
  if domain not in SCRIPTS:
    raise ValueError(f"unknown env.domain {domain!r}; expected one of: {', '.join(SCRIPTS)}")
  module, attribute = SCRIPTS[domain]
  return getattr(importlib.import_module(module), attribute)


def candidate_fn(domain: str):
  """(transcript, rng) -> the domain's scripted candidate suggestions at that state (one per act kind)."""
  from iterppo_jax.envs import policies
  s = script(domain)
  return lambda turns, rng: policies.candidate_texts(s, turns, rng)


def tracker(domain: str):
  """(dialogue_state(turns) -> key, act_key(turns, text) -> key): the domain's dialogue-state tracker, which a
  dialogue-state Q-model reads (qfit.view=dialogue_state, q_table.py). A domain module that defines both
  functions has one."""
  module = _module(domain, 0)
  if not (hasattr(module, "dialogue_state") and hasattr(module, "act_key")):
    have = [d for d in DOMAINS if hasattr(_module(d, 0), "dialogue_state")]
    raise ValueError(f"qfit.view='dialogue_state': env.domain {domain!r} has no dialogue-state tracker "
                     f"(dialogue_state and act_key in {DOMAINS[domain][0]}); domains with one: {', '.join(have)}")
  return module.dialogue_state, module.act_key
