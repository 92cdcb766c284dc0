"""Plays N simulated conversations with a shipped policy and writes the logs and a summary.

  python -m experiments.simulate --config=configs/sales.py --workdir=/tmp/sim --config.policy=oracle
"""

import json
import os
import time

from absl import flags

from experiments import cli
from iterppo_jax import conversation as conv_lib
from iterppo_jax import io_utils
from iterppo_jax import metrics
from iterppo_jax import settings
from iterppo_jax.envs import base
from iterppo_jax.envs import registry

_CONFIG = cli.define_config()
_WORKDIR = cli.define(flags.DEFINE_string, "workdir", None, "Where the logs and the summary go.", required=True)


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  # The world alone, checked and typed (the loop's settings and their rules do not matter here); the policy, the
  # number of conversations, the seed and the batch size are this entry point's own keys.
  env_settings = settings.load_env(config.env)
  os.makedirs(workdir, exist_ok=True)
  domain = registry.domain(env_settings)
  env = domain.make_env()
  policy = domain.policy(config.policy)
  n = config.num_conversations
  start = time.perf_counter()
  bar = lambda starts: metrics.progress(starts, total=len(starts), desc=f"simulate {policy.name}")
  records = env.play(policy, n, seed=config.seed, batch_size=config.batch_size, progress=bar)
  seconds = time.perf_counter() - start
  path = os.path.join(workdir, "conversations.jsonl")
  conv_lib.write_jsonl(path, records)
  summary = base.summarize(records)
  summary.update(policy=policy.name, business_user=env_settings.business_user, seed=config.seed,
                 seconds=seconds, conversations_per_second=n / seconds)
  io_utils.atomic_write_text(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
  print(format_summary(summary))
  print(f"wrote {path} and {os.path.join(workdir, 'summary.json')}")


def format_summary(s):
  return "\n".join([
      f"policy={s['policy']} business_user={s['business_user']} conversations={s['conversations']}",
      f"conversion {s['conversion']:.3f} (95% CI {s['conversion_lo']:.3f}-{s['conversion_hi']:.3f})"
      f"  mean turns {s['mean_turns']:.2f}  abstain {s['abstain_rate']:.3f}",
      f"business user: accept {s['accept_rate']:.3f}  edit {s['edit_rate']:.3f}"
      f"  influenced {s['influenced_rate']:.3f}  reject {s['reject_rate']:.3f}",
      f"simulated {s['conversations']} conversations in {s['seconds']:.1f} s"
      f" ({s['conversations_per_second']:.0f}/s on one core)"])


if __name__ == "__main__":
  cli.run(main)
