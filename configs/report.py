r"""The whole report of issue #10 in one command (experiments/report.py), in three sizes.

  python -m experiments.report --config=configs/report.py --workdir=/tmp/report            # small: ~30 min, 2 cores
  python -m experiments.report --config=configs/report.py:full --workdir=/tmp/report_full  # full: ~30 h, 2 cores
  python -m experiments.report --config=configs/report.py:tiny --workdir=/tmp/report_tiny  # minutes, for tests

Each section names the piece it runs, the domains it runs it on (each domain's own configs/<domain>.py, with
`config_arg` as its colon argument) and `overrides`, dotted `key=value` settings of that sub-config, exactly what
`--config.key=value` would set on the piece's own command line (values are Python literals, else strings).

Expected wall time on 2 idle CPU cores, from the pieces' own measurements and estimates:
  small  30 minutes measured on 2026-11-29 (simulator 113 s, baselines 716 s, Q ablation 472 s, inner-solver
         ablation 490 s; docs/results.md, "The report's small preset"): the simulator tables (24 cells of
         5,000 conversations), shared SFT prefixes (~4 min each, three times), the sales baselines at 1,536
         conversations with 1 seed (offline = K=1 ~5 min, K=2 ~8 min), the Q-quality ablation with 2 variants
         of one iteration (~5 min each) and the inner-solver ablation with one iteration of ppo, grpo and rloo (~2.5 min each).
  full   about 30 hours (not run): the baselines' defaults (1,536 conversations, 3 seeds, K = 1, 2, 4, 8, every
         method) take ~6 h per domain for sales (docs/performance.md), support and booking ~1.2x that (longer
         prompts) and negotiation ~1.7x (longer prompts and conversations), ~28 h together; all six Q-ablation
         variants ~6 x 13 min; the inner-solver ablation ~30 min; the simulator tables ~3 min.
  tiny   every piece at configs/<domain>.py:tiny sizes, a few minutes on a loaded 2-core machine.
Use one workdir per preset: a rerun with the same workdir reuses every finished section.
"""

import ml_collections

from configs import common

DOMAINS = ("sales", "support", "booking", "negotiation")  # iterppo_jax/envs/registry.DOMAINS


def _piece(enabled: bool, domains, config_arg: str, overrides) -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.enabled = enabled  # run this section (False: leave it out of the report)
  s.domains = tuple(domains)  # one run per domain, each from configs/<domain>.py, into workdir/<section>/<domain>
  s.config_arg = config_arg  # colon argument of configs/<domain>.py: '' (its default sizes) or 'tiny'
  s.overrides = tuple(overrides)  # 'dotted.key=value' settings of that config, as --config.key=value would set
  return s


def get_config(arg=None):
  args = common.parse_arg(arg, small=False, full=False, tiny=False)
  chosen = [name for name in ("small", "full", "tiny") if args[name]]
  if len(chosen) > 1:
    raise ValueError(f"configs/report.py takes one preset of small, full, tiny; got {chosen}")
  preset = chosen[0] if chosen else "small"
  c = ml_collections.ConfigDict()
  c.preset = preset  # printed in the report; a workdir holds one preset (a rerun with another is refused)

  # ---- simulator tables: behaviour / oracle / random conversion per domain and business user (no learning) ----
  c.simulator = ml_collections.ConfigDict()
  c.simulator.enabled = True  # cheap (~600 conversations/s on a core), so every preset has it
  c.simulator.domains = DOMAINS  # all four: a table row per domain and policy
  c.simulator.policies = ("behavior", "oracle", "random")  # the shipped scripted policies of every domain
  c.simulator.business_users = ("sr", "direct")  # the paper's suggested-response setting and sending verbatim
  c.simulator.conversations = 5000  # per cell: a 95% interval of about +-1.2 points at 25% conversion
  c.simulator.seed = 0  # docs/results.md's simulator tables use seed 0
  c.simulator.batch_size = 1024  # conversations advanced in lock-step (logs do not depend on it)

  # ---- baselines at equal conversation budget (experiments/baselines.py, iterppo_jax/studies/baselines.py) ----
  # Small: the reference lines, pi_0, fully offline (= Iterative PPO K=1) and Iterative PPO K=2, one seed, the
  # default budget (~14 min on 2 cores: the fixed SFT, Q-fit and PPO steps cost more than playing conversations).
  c.baselines = _piece(True, ("sales",), "", (
      "baselines.budget=1536", "baselines.seeds=(0,)", "baselines.ks=(2,)",
      'baselines.methods=("behavior", "oracle", "pi0", "offline", "iterative_ppo")'))

  # ---- Q-quality ablation (experiments/ablate_q.py): degrade Q on purpose ----
  c.ablate_q = _piece(True, ("sales",), "", ("loop.iterations=1",))  # one iteration: Q_0's quality -> pi_1
  c.ablate_q.variants = ("baseline", "flip_10")  # iterppo_jax/studies/ablate_q.VARIANTS: clean labels vs 10% flipped

  # ---- inner-solver ablation (experiments/ablate_inner.py): ppo vs grpo vs rloo from the same pi_0 and Q_0 ----
  # Small: one iteration of each solver from the same pi_0 and Q_0 (~11 min); the full preset runs the default two.
  c.ablate_inner = _piece(True, ("sales",), "", ("loop.iterations=1",))
  c.ablate_inner.inners = ("ppo", "grpo", "rloo")  # iterppo_jax/settings.INNER_SOLVERS

  # ---- the improvement bound (iterppo_jax/bound.py) on the ablation runs above; runs nothing of its own ----
  c.bound = ml_collections.ConfigDict()
  c.bound.enabled = True  # a table from every ablate_q / ablate_inner iteration that logged KL and eps_Q

  if preset == "full":
    c.baselines = _piece(True, DOMAINS, "", ())  # the defaults: 1,536 conversations, 3 seeds, K=1,2,4,8, all
    # the default loop (2 iterations per variant) with the transformer Q-model, which small_q and
    # few_qfit_steps change (iterppo_jax/studies/ablate_q.TOKEN_ONLY)
    c.ablate_q = _piece(True, ("sales",), "", ("qfit.view=tokens", "qfit.method=mc", "qfit.pool=0"))
    c.ablate_q.variants = ("baseline", "fewer_conversations", "flip_10", "flip_30", "small_q", "few_qfit_steps")
    c.ablate_inner = _piece(True, ("sales",), "", ())
    c.ablate_inner.inners = ("ppo", "grpo", "rloo")
  elif preset == "tiny":
    c.simulator.conversations = 60  # the table's shape, not its numbers
    c.simulator.batch_size = 64
    c.baselines = _piece(True, ("sales",), "tiny", (
        "loop.tensorboard=False", "baselines.ks=(1,)",
        'baselines.methods=("behavior", "oracle", "pi0", "iterative_ppo")'))
    c.ablate_q = _piece(True, ("sales",), "tiny", ("loop.tensorboard=False", "loop.iterations=1"))
    c.ablate_q.variants = ("baseline", "flip_30")  # 30%: a label error the tiny run can show
    c.ablate_inner = _piece(True, ("sales",), "tiny", ("loop.tensorboard=False", "loop.iterations=1"))
    c.ablate_inner.inners = ("ppo", "rloo")
  return c
