r"""What each iteration of a finished run did to the policy, and whether it climbed Q_k (finding 15).

  python -m experiments.policy_shift --workdirs=runs/s0,runs/eb_direct_s0/seed_0/iterative_ppo_k4 [--by_act] [--beta=0.02]

Per run and iteration k: pi_k's conversion, how often its act is the domain oracle's, Q_k's mean over pi_k's and
pi_{k+1}'s evaluation decisions (the first term of the improvement step's objective), the raise of that mean the
step's exact solution would give at beta next to Q_k's spread within a state (finding 29), and pi_k's act shares
(iterppo_jax/studies/policy_shift.py); a first row for the staff's logs the run cloned pi_0 from. --by_act: the
oracle agreement per act the oracle plays (finding 22).
Runs with the dialogue-state Q-model only; nothing is refitted or played.
"""

from absl import flags

from experiments import cli
from iterppo_jax import errors
from iterppo_jax.studies import policy_shift

_WORKDIRS = cli.define(flags.DEFINE_list, "workdirs", None, "Finished loop runs (qfit.view=dialogue_state).")
_BETA = cli.define(flags.DEFINE_float, "beta", None, "The KL weight at which to compute the exact step's raise "
                   "of Q_k (default: each run's ppo.kl_coef).")
_BY_ACT = cli.define(flags.DEFINE_bool, "by_act", False, "Also print, per act the oracle plays, how often the "
                     "staff's logs and each pi_k play it there.")


def main(argv):
  del argv
  if not _WORKDIRS.value:
    cli.fail(errors.EXIT_USAGE, "--workdirs: give one or more finished loop runs")
  if _BETA.value is not None and _BETA.value <= 0:
    cli.fail(errors.EXIT_USAGE, f"--beta={_BETA.value}: expected a KL weight > 0")
  for wd in _WORKDIRS.value:
    print(f"\n{wd}\n")
    rows = policy_shift.shift_rows(wd, beta=_BETA.value)
    print(policy_shift.table(rows))
    if _BY_ACT.value:
      print()
      print(policy_shift.agreement_table(rows))


if __name__ == "__main__":
  cli.run(main)
