"""Builds an environment and its shipped policies from the `env` config section, by domain name.

A plain lookup table (STYLE.md: select components by name with a dict), so a new domain adds one entry.
"""

from iterppo_jax.envs import base
from iterppo_jax.envs import policies
from iterppo_jax.envs import sales


def make_env(env_config) -> base.TextEnv:
  bu = base.BusinessUserConfig(mode=env_config.business_user)
  if env_config.domain == "sales":
    return sales.SalesEnv(business_user=bu, max_turns=env_config.max_turns,
                          max_render_turns=env_config.max_render_turns, skill_mean=env_config.skill_mean)
  raise ValueError(f"unknown env.domain {env_config.domain!r}; expected one of: sales")


def make_policy(domain: str, name: str, env_config):
  if domain == "sales":
    return policies.make_sales_policy(name, skill_mean=env_config.skill_mean)
  raise ValueError(f"unknown env.domain {domain!r}; expected one of: sales")
