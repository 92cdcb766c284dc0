"""Q-model variants refitted on one run's logs, ranked against that run's true Q^{pi_k} (issue #16's table).

The command line is experiments/q_ranking_ablation.py (--workdir, --iteration, --variants, --truth_states,
--truth_rollouts, --out); experiments/q_representation_probe.py reads a run's config and makes its scratch copy of
the run here too.

Each variant (VARIANTS) refits Q_k on the run's D_k in its own directory under <workdir>/ablate/, starting from the
run's pi_k, and is scored on one true-Q set of pi_k: the run's own data/ranking_<k>.json, or a more precise one
measured once (precise_truth).
"""

import contextlib
import json
import os
import shutil

from ml_collections import config_dict

from iterppo_jax import conversation as conv_lib
from iterppo_jax import errors
from iterppo_jax import io_utils
from iterppo_jax import loop
from iterppo_jax import q_ranking

# name -> (what it changes, config overrides); 'explored_only' keeps only the randomised turns themselves.
VARIANTS = {
    "default": ("the loop's Q-fit (turns from t* on, 200 steps, from pi_k's trunk)", {}),
    "all_targets": ("every turn's return, also before t* (biased)", {"qfit.targets": "all"}),
    "explored_only": ("only the randomised turns t*", {"qfit.targets": "explored"}),
    "steps_800": ("4x the Q-fit steps", {"qfit.steps": 800}),
    "scratch": ("a fresh trunk instead of pi_k's", {"qfit.init": "scratch"}),
    # From pi_k's trunk (what 'previous' does at k = 0): the run's Q_{k-1} has no V head to warm-start from.
    "dueling": ("Q = V(s) + A(s, a), V at the prompt's end", {"qfit.head": "dueling", "qfit.init": "policy"}),
    "dueling_800": ("dueling, 4x the Q-fit steps", {"qfit.head": "dueling", "qfit.init": "policy",
                                                    "qfit.steps": 800}),
    # SARSA: r + gamma Q_bar(s', a'), a' pi_k's own action (the logged one, or pi_k's sample where t* drew
    # another), on every turn; targets refreshed from the target network every `refresh_every` steps.
    "td": ("TD(0)/SARSA on every turn, pi_k's own next action", {"qfit.method": "td"}),
    "td_r20_400": ("TD(0), 400 steps, targets refreshed every 20", {"qfit.method": "td", "qfit.steps": 400,
                                                                    "qfit.refresh_every": 20}),
    "td_lambda_05": ("TD(lambda = 0.5), trace cut at t*", {"qfit.method": "td_lambda", "qfit.lam": 0.5}),
    "td_800": ("TD(0), 800 steps, targets refreshed every 100", {"qfit.method": "td", "qfit.steps": 800,
                                                                 "qfit.refresh_every": 100}),
    # Few free parameters: a table over the domain's dialogue-state keys of the transcript (q_table.py).
    "table_sarsa": ("dialogue-state table, SARSA of pi_k", {"qfit.view": "dialogue_state", "qfit.method": "td"}),
    # On logs pi_k did not make (k = 0, D_0 the staff's): bootstrap from pi_k's samples (fitted Q evaluation).
    "table_fqe": ("dialogue-state table, SARSA of pi_k from pi_k's samples on logs it did not make",
                  {"qfit.view": "dialogue_state", "qfit.method": "td", "qfit.next_act": "pi_k"}),
    "table_sarsa_pool": ("dialogue-state table, SARSA of pi_k on D_0..D_k (FQE on the earlier logs)",
                         {"qfit.view": "dialogue_state", "qfit.method": "td", "qfit.pool": -1}),
    "table_lambda_05": ("dialogue-state table, TD(0.5) of pi_k (trace cut at randomised turns)",
                        {"qfit.view": "dialogue_state", "qfit.method": "td_lambda", "qfit.lam": 0.5}),
    "table_lambda_08": ("dialogue-state table, TD(0.8) of pi_k", {"qfit.view": "dialogue_state",
                                                                 "qfit.method": "td_lambda", "qfit.lam": 0.8}),
    "table_lambda_1": ("dialogue-state table, TD(1) of pi_k (Monte Carlo up to a randomised turn)",
                       {"qfit.view": "dialogue_state", "qfit.method": "td_lambda", "qfit.lam": 1.0}),
    "table_mc": ("dialogue-state table, Monte Carlo (turns from t* on)", {"qfit.view": "dialogue_state",
                                                                          "qfit.method": "mc"}),
}
# The table's cells shrunk toward a prior by a pseudo-count m (q_table.py): m = 2, 5, 10 toward the act's mean,
# m = 5 toward the state's mean plus the act's offset. The other table variants keep the run's own shrinkage
# (qfit.shrink, qfit.shrink_to); 'table_plain' has none.
VARIANTS["table_plain"] = ("dialogue-state table, SARSA, plain cell means (no shrinkage)",
                           {"qfit.view": "dialogue_state", "qfit.method": "td", "qfit.shrink": 0.0})
for _m in (2, 5, 10):
  VARIANTS[f"table_shrink_{_m}"] = (f"dialogue-state table, SARSA, cells shrunk to their act's mean (m = {_m})",
                                    {"qfit.view": "dialogue_state", "qfit.method": "td", "qfit.shrink": float(_m),
                                     "qfit.shrink_to": "act"})
# The same table on a share of D_k's conversations (qfit.data_fraction): how its ranking grows with |D_k|.
for _share in (25, 50):
  VARIANTS[f"table_data_{_share}"] = (f"dialogue-state table, SARSA, on {_share}% of D_k's conversations",
                                      {"qfit.view": "dialogue_state", "qfit.method": "td",
                                       "qfit.data_fraction": _share / 100})
VARIANTS["table_shrink_add_5"] = ("dialogue-state table, SARSA, cells shrunk to state mean + act offset (m = 5)",
                                  {"qfit.view": "dialogue_state", "qfit.method": "td", "qfit.shrink": 5.0,
                                   "qfit.shrink_to": "additive"})
# The two shrinkage priors side by side on D_k alone (no pooled logs, so no pi_k samples to draw): the act's
# offset from all cells ('additive') against its effect within the states it was played in ('twoway').
for _prior in ("additive", "twoway"):
  VARIANTS[f"table_{_prior}_5_dk"] = (f"dialogue-state table, SARSA on D_k alone, cells shrunk to the {_prior} "
                                      "prior (m = 5)", {"qfit.view": "dialogue_state", "qfit.method": "td",
                                                        "qfit.shrink": 5.0, "qfit.shrink_to": _prior,
                                                        "qfit.pool": 0})
# The same two-way table read as a lower confidence bound, Q - z sigma / sqrt(n + m) (q_table.py, finding 41).
VARIANTS["table_twoway_5_lcb1_dk"] = ("dialogue-state table, SARSA on D_k alone, cells shrunk to the twoway prior "
                                      "(m = 5), read as a lower bound (z = 1)",
                                      {"qfit.view": "dialogue_state", "qfit.method": "td", "qfit.shrink": 5.0,
                                       "qfit.shrink_to": "twoway", "qfit.pool": 0, "qfit.pessimism": 1.0})


def read_run_config(wd: str) -> dict:
  """A finished run's config.json, with the keys added since filled in as that run behaved: runs made before
  qfit.view and qfit.pool existed fitted the transformer Q-model on D_k alone, and placed parameters by the
  default rules."""
  with open(os.path.join(wd, "config.json")) as f:
    base = json.load(f)
  base["qfit"].setdefault("view", "tokens")
  base["qfit"].setdefault("pool", 0)
  base["qfit"].setdefault("next_act", "logged")  # SARSA bootstrapped from the logged next act before it existed
  base.setdefault("mesh_rules", [])  # sharding.DEFAULT_RULES, which every run used before the key existed
  return base


def variant_dir(wd: str, k: int, name: str) -> str:
  """A run directory holding the source run's tokenizer, pi_k, D_k and measurements, nothing fitted yet."""
  out = os.path.join(wd, "ablate", f"{name}_{k}")
  if os.path.exists(out):
    shutil.rmtree(out)
  os.makedirs(os.path.join(out, "data"))
  shutil.copytree(os.path.join(wd, "tokenizer"), os.path.join(out, "tokenizer"))
  shutil.copytree(os.path.join(wd, "checkpoints", "policy"), os.path.join(out, "checkpoints", "policy"))
  if k and os.path.isdir(os.path.join(wd, "checkpoints", "qmodel")):  # Q_{k-1}, for qfit.init='previous'
    shutil.copytree(os.path.join(wd, "checkpoints", "qmodel"), os.path.join(out, "checkpoints", "qmodel"))
  # D_0..D_k: the Q-fit of D_k, and the earlier logs qfit.pool adds
  for name_ in ("behavior.jsonl", "explore.jsonl", f"eval_{k}.jsonl", f"ranking_{k}.json",
                *(f"iter_{j}.jsonl" for j in range(k + 1))):
    src = os.path.join(wd, "data", name_)
    if os.path.exists(src):
      shutil.copy(src, os.path.join(out, "data", name_))
  io_utils.atomic_write_json(os.path.join(out, "progress.json"), {"sft": True})
  return out


def precise_truth(wd: str, k: int, base: dict, states: int, rollouts: int, draw: int = 0) -> str:
  """A true-Q set of pi_k with `states` x `rollouts`, measured once into <workdir>/ablate/; `draw` > 0 is
  another, independent set of states (loop.measure_action_set)."""
  if draw < 0:
    raise errors.SettingsError(f"--truth_draw: expected an integer >= 0 (0 the first draw), got {draw}")
  suffix = f"_d{draw}" if draw else ""
  path = os.path.join(wd, "ablate", f"truth_{k}_{states}x{rollouts}{suffix}.json")
  if os.path.exists(path):
    return path
  config = config_dict.ConfigDict(base)
  config.loop.tensorboard = False
  config.loop.rank_states, config.loop.rank_rollouts = states, rollouts
  out = variant_dir(wd, k, "truth")
  with contextlib.suppress(FileNotFoundError):  # the run's own in-loop set (none with loop.rank_states=0)
    os.remove(os.path.join(out, "data", f"ranking_{k}.json"))
  run_, _ = loop.setup(config, out)
  _, policy = loop.train_pi0(run_, [])
  if k:
    policy = loop.restore_params(run_, "policy", k, policy)
  loop.measure_action_set(run_, k, policy, draw=draw)
  run_.writer.close()
  shutil.copy(os.path.join(out, "data", f"ranking_{k}.json"), path)
  return path


def refit(base: dict, wd: str, k: int, name: str, truth: str | None, data_path: str) -> dict:
  """Refits Q_k of variant `name` on the logs at `data_path` in <workdir>/ablate/<name>_<k>/, from the run's pi_k,
  scores it on the true-Q set `truth` (None: none), and returns its row: the ranking and logs-only measures."""
  if name not in VARIANTS:
    raise errors.SettingsError(f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)}")
  what, overrides = VARIANTS[name]
  config = config_dict.ConfigDict(base)
  config.loop.tensorboard = False
  config.loop.true_q_states = 0
  # Q_k is scored on `truth` (copied into the variant's data/ below), also when the run measured no ranking;
  # truth None: the logs-only measures alone
  config.loop.rank_states = len(q_ranking.ActionSet.load(truth).where) if truth else 0
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  out = variant_dir(wd, k, name)
  if truth:
    shutil.copy(truth, os.path.join(out, "data", f"ranking_{k}.json"))
  run_, _ = loop.setup(config, out)
  _, policy = loop.train_pi0(run_, [])
  if k:
    policy = loop.restore_params(run_, "policy", k, policy)
  records = conv_lib.read_jsonl(data_path)
  _, _, m = loop.fit_q(run_, k, records, policy)
  run_.writer.close()
  return {"variant": name, "what": what, **{n: m.get(n) for n in (
      "rank_top1", "rank_top1_chance", "rank_spearman", "rank_pairwise", "rank_pick_gain", "rank_best_gain",
      "rank_pick_gain_own", "rank_best_gain_own", "rank_truth_reliability", "rank_truth_reliability_unpaired",
      "rank_truth_top1_ceiling",
      "rank_truth_spearman_ceiling", "rank_clear_miss", "rank_clear_best", "rank_states", "rank_mode_top1",
      "rank_mode_spearman", "rank_mode_pairwise", "rank_mode_pick_gain", "rank_mode_pick_gain_own",
      "logged_adv_corr", "logged_ips_pick_gain", "logged_ips_pick_gain_se", "logged_turns", "logged_cv_adv_corr",
      "logged_cv_ips_pick_gain", "logged_cv_ips_pick_gain_se", "logged_cv_turns", "auc", "train_examples")}}
