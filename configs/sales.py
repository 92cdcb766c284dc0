r"""Iterative PPO on the sales suggested-response simulator, and the simulator runs.

  python -m experiments.iterative_ppo                                   # this config, fresh workdir
  python -m experiments.iterative_ppo --workdir=/tmp/ippo --config.loop.iterations=4 --config.ppo.kl_coef=0.02
  python -m experiments.iterative_ppo --config=configs/sales.py:tiny --workdir=/tmp/t   # seconds, for tests
  python -m experiments.simulate --config=configs/sales.py --workdir=/tmp/sim --config.policy=oracle
  python -m experiments.iterative_ppo --config=configs/sales.py:hf --config.model_dir=DIR   # = configs/sales_hf.py

Any key can be overridden with --config.key=value; an unknown key fails before any work starts.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, tiny=False, hf=False)
  if args["hf"]:  # `configs/sales.py:hf`: start from a local Hugging Face checkpoint (--config.model_dir=DIR)
    from configs import sales_hf  # sales_hf builds on this module's config
    return sales_hf.get_config("tiny" if args["tiny"] else None)
  c = ml_collections.ConfigDict()
  c.seed = 0  # every random stream is folded from this and (iteration, phase, step)
  c.gamma = 0.95  # discount of returns and Q targets: a sale sooner is worth more (PAPER.md)
  # A rerun with the same --workdir continues its run from the last completed phase (same settings, except
  # loop.iterations and the others in loop.RESUMABLE_CHANGES); False refuses a workdir that holds a run.
  c.resume = True

  # ---- the world ----
  c.env = ml_collections.ConfigDict()
  c.env.domain = "sales"  # which simulator in iterppo_jax/envs
  c.env.business_user = "sr"  # 'sr': the business user accepts/edits/rejects; 'direct': sent verbatim
  c.env.max_turns = 10  # rounds before the customer is gone anyway
  c.env.skill_mean = 0.35  # mean skill of the historical staff; gives ~15% direct, ~25% SR conversion
  # Rounds of history a model sees in full; older rounds keep the customer's messages only (conversation.py).
  # 3 full rounds: p99 179 BPE tokens, max 202 in 600 behaviour conversations (issue #16).
  c.env.max_render_turns = 3

  # ---- simulate: play conversations with a shipped policy (experiments.simulate) ----
  c.policy = "behavior"  # behavior | oracle | random | explore | noisy_oracle
  c.num_conversations = 5000  # enough for a +-1.3 point 95% interval on conversion
  c.batch_size = 1024  # conversations advanced in lock-step

  # ---- tokens ----
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ""  # a local Hugging Face tokenizer dir; empty: train a BPE on the behaviour logs
  c.tokenizer.vocab_size = 1024  # simulator text is templated: BPE stops near 800 anyway
  c.data = ml_collections.ConfigDict()
  c.data.max_prompt_len = 192  # fits ~99.9% of states (a run warns with counts when prompts are cut)
  c.data.max_action_len = 24  # business messages are ~11 tokens with <eot>
  c.data.prompt_bucket = 0  # deployment: 0 pads prompts to max_prompt_len; N pads a batch to its longest, in N's

  # ---- the model (policy, Q-model and critic share the shape) ----
  c.model = ml_collections.ConfigDict()
  c.model.style = "llama"  # llama (RoPE, RMSNorm, SwiGLU, GQA) | gpt2 (learned positions, LayerNorm, GELU)
  c.model.num_layers = 2  # CPU-sized: the whole demo must finish in 15 minutes on 2 cores
  c.model.embed_dim = 128
  c.model.mlp_dim = 512
  c.model.num_heads = 4
  c.model.num_kv_heads = 4
  c.model.head_dim = 32
  c.model.tie_embeddings = True
  c.model.dtype = "float32"  # compute dtype; bfloat16 on accelerators
  c.model.param_dtype = "float32"
  c.model.remat = False  # recompute activations in the backward pass (memory for compute)

  # ---- LoRA (iterppo_jax/models/lora.py): adapters on a frozen base instead of full fine-tuning ----
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0  # 0: every weight trains; r > 0: the loop's SFT, PPO and Q-fit train rank-r adapters
  c.lora.alpha = 16.0  # the update is (alpha / rank) A B
  c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")  # of q_proj k_proj v_proj o_proj gate up down
  c.lora.models = ("policy", "critic", "qmodel")  # which of the loop's models use it (baselines train in full)

  # ---- SFT: pi_0 clones what the business sent in the behaviour logs ----
  c.sft = _optimizer_section(learning_rate=1e-3, warmup_steps=20)
  c.sft.behavior_conversations = 2000  # historical logs (~14k decisions)
  c.sft.steps = 300  # held-out action NLL ~0.34 nats/token by then (7.0 before)
  c.sft.batch_size = 32
  c.sft.eval_examples = 0  # held-out decisions the NLL is measured on before and after SFT; 0: all (10%)

  # ---- Q-fit: Q_k ~ Q^{pi_k} on D_k ----
  c.qfit = _optimizer_section(learning_rate=3e-4, warmup_steps=10)
  # mc | td | td_lambda | fqe (off-policy: bootstraps from pi_k's sampled responses). With qfit.view=
  # dialogue_state: td (= td_lambda = fqe) is SARSA of pi_k to its fixed point, mc the mean return per cell.
  c.qfit.method = "td"
  c.qfit.kind = "bce"  # bce (binary outcome; Q = sigmoid) | mse (real-valued outcomes)
  c.qfit.init = "previous"  # Q_{k-1} warm start (k >= 1; Q_0 from pi_0's trunk) | 'policy' (pi_k) | 'scratch'

  c.qfit.steps = 200
  c.qfit.batch_size = 32
  c.qfit.lam = 0.9  # TD(lambda)
  c.qfit.refresh_every = 50  # TD targets recomputed from the target network every this many steps
  c.qfit.target_update = "polyak"  # polyak | periodic
  c.qfit.tau = 0.05  # Polyak step of the target network
  # Degrading Q on purpose (experiments/ablate_q.py, issue #10); the defaults change nothing.
  c.qfit.label_flip = 0.0  # flip each D_k conversation's outcome label with this probability before the Q-fit
  c.qfit.data_fraction = 1.0  # share of D_k's conversations the Q-fit sees (PPO still uses all of D_k's states)
  c.qfit.model = ml_collections.ConfigDict()  # a Q-model size of its own; 0 keeps the policy's (non-zero: no
  c.qfit.model.num_layers = 0  # warm start from pi_k's trunk, so qfit.init must be 'scratch' or 'previous')
  c.qfit.model.embed_dim = 0  # = num_heads * head_dim
  c.qfit.model.mlp_dim = 0
  c.qfit.model.num_heads = 0
  c.qfit.model.num_kv_heads = 0  # must divide num_heads
  c.qfit.model.head_dim = 0
  # With randomised turns (loop.explore_turns), a Monte Carlo return before the conversation's randomised turn
  # is not a sample of Q^{pi_k}: 'unbiased' fits the turns from it on; 'all' fits every turn (biased).
  # What Q_k reads: 'dialogue_state', the domain's state tracker's keys of the transcript (q_table.py: a table
  # fitted by SARSA of pi_k with qfit.method td, or Monte Carlo with mc; the steps, head and init keys below are
  # unused); 'tokens', the rendered transcript through a transformer (the paper's LLM Q-model), which fitted on
  # one iteration's logs does not rank actions (docs/results.md, findings 5 and 6).
  c.qfit.view = "dialogue_state"
  # dialogue_state: also fit on the logs of this many earlier iterations (-1: all), bootstrapping from pi_k's
  # own samples at their states (fitted Q evaluation), so the data grow with k. 0: D_k alone. With
  # loop.first_data=policy the behaviour logs count as D_{-1} (pool=1 at k=0 adds them to pi_0's own D_0).
  # 1: Q_0 also learns from the staff's logs (FQE of pi_0 on them), which lifts its ranking of pi_0's acts to the
  # bar at k = 0 in every seed (docs/results.md, finding 24); each later Q_k adds D_{k-1}.
  c.qfit.pool = 1
  # dialogue_state, on logs pi_k did not make (D_0 from the staff or the explore policy): bootstrap from
  # 'logged', the logged next act (SARSA of the policy that made the logs), or 'pi_k', pi_k's qfit.fqe_samples
  # draws at each logged state (fitted Q evaluation of pi_k; ranked worse at k = 0: docs/results.md, finding 8).
  c.qfit.next_act = "logged"
  c.qfit.head = "q"  # q: one scalar at the action's end | dueling: Q = V(s) + A(s, a) (models/heads.py)
  # > 0: fit in chunks of this many steps and keep the Q-model that ranks held-out randomised turns best (the
  # logs-only measure corr(A_k(s, a), G), q_ranking.py); 0 keeps the last step's.
  c.qfit.select_every = 0
  # dialogue_state: the logs-only ranking measures also on every randomised turn of D_k (qfit/logged_cv_*), each
  # fold of conversations scored by a table fitted on the others; ~10x the held-out tenth's turns (about a third
  # of the sampling error) for qfit.cross_fit more table fits. 0 or 1: off.
  c.qfit.cross_fit = 10
  c.qfit.targets = "unbiased"  # | all | explored (the randomised turns alone)
  # dialogue_state: pseudo-count m of the cells' shrinkage toward a prior (q_table.py; 0: plain cell means) made
  # of the act's mean Q ('act'), the state's mean plus the act's offset ('additive') or the two-way fit of state
  # and act effects ('twoway', the act's effect within its states). m = 5 toward 'additive'
  # ranked pi_k's actions better than plain means in 6 of 6 (seed, k) against a precise truth (Spearman +0.01 to
  # +0.10; docs/results.md, finding 14); the other domains keep plain means, as their results were measured.
  c.qfit.shrink = 5.0
  c.qfit.shrink_to = "additive"
  # dialogue_state: z of a lower confidence bound, Q_k read as Q - z sigma / sqrt(n + m) (q_table.py): the acts
  # logged least have the noisiest means, and the step's maximum favours them. 0: the plain table, as sales' and
  # negotiation's bars were measured (finding 41 scores z = 1 against the truth; support and booking set 1,
  # findings 48-49).
  c.qfit.pessimism = 0.0
  c.qfit.fqe_samples = 4  # fqe: responses of pi_k per logged next state averaged in the target (expected SARSA)

  # ---- the inner solver of the single-turn problem ----
  # ppo (critic + GAE) | grpo (group-normalised, no critic) | rloo (leave-one-out, no critic). RLOO at beta 0.03:
  # its baseline is the same state's other samples, where PPO's critic must also learn the states' values; over
  # three seeds x four iterations it gains more than PPO at 0.05 (docs/results.md, findings 34 and 35).
  c.inner = "rloo"

  # ---- PPO on the single-turn problem (also the shared settings of grpo / rloo: steps, batch_size = sampled
  # responses per batch, minibatch_size, epochs, clip_eps, kl_coef, kl_estimator, kl_target, optimizer) ----
  c.ppo = _optimizer_section(learning_rate=3e-4, warmup_steps=2)
  c.ppo.critic = _optimizer_section(learning_rate=2e-4, warmup_steps=2)
  # beta in max E[Q] - beta KL(pi || pi_k): 0.03 with RLOO (finding 35); with PPO 0.05 since Q_k ranks actions
  # (finding 10: four iterations gain +39.6 points over three seeds, against +25.8 at 0.1), 0.1 while Q_k
  # ranked at chance
  c.ppo.kl_coef = 0.03
  c.ppo.kl_estimator = "k1"  # k1 | k2 | k3 per-token estimator in the reward
  c.ppo.kl_target = 0.0  # > 0 turns on the adaptive controller (Ziegler et al.)
  c.ppo.kl_horizon = 10000
  c.ppo.reference = "pi_k"  # pi_k (the paper) | sft (pi_0)
  # 'state': the reward is Q_k(s, a) - V_k(s), V_k the mean of Q_k over pi_k's logged suggestions at the tracker
  # state (dialogue_state view). A shift per state leaves the step's exact solution pi_k exp(Q_k/beta)/Z as it
  # is, and spares the critic the states' values, which where they spread far more than the acts' (negotiation:
  # 0.076 against 0.017) it misses by more than the acts differ (docs/results.md, finding 29).
  c.ppo.center_reward = "none"
  c.ppo.steps = 20  # rollout batches per iteration
  c.ppo.batch_size = 64  # prompts per rollout batch
  c.ppo.minibatch_size = 32
  c.ppo.epochs = 2
  c.ppo.gamma = 1.0  # token-level discount inside a response
  c.ppo.lam = 0.95  # GAE lambda
  c.ppo.clip_eps = 0.2
  c.ppo.value_clip_eps = 0.2
  c.ppo.entropy_coef = 0.0  # 0 keeps the closed-form optimum pi_k exp(Q / beta)
  c.ppo.whiten_advantages = True
  c.ppo.temperature = 1.0  # PPO's importance ratio assumes sampling at temperature 1
  c.ppo.checkpoint_every = 5  # PPO steps between checkpoints (resume inside the phase)

  # ---- GRPO / RLOO (inner = grpo | rloo): G responses per state, the group is the baseline ----
  c.group = ml_collections.ConfigDict()
  c.group.size = 4  # G; ppo.batch_size / G states per batch, so as many sampled responses as PPO
  c.group.kl_in = "reward"  # reward: r = Q - beta KL (fixed point pi_k exp(Q/beta)) | loss: GRPO's in-loss k3
  c.group.std_eps = 1e-6  # GRPO: floor on the group's reward std (a group of equal rewards gets 0 advantage)

  # ---- the outer loop ----
  c.loop = ml_collections.ConfigDict()
  c.loop.iterations = 2  # K: two iterations fit the 15-minute CPU budget
  # D_0: 'behavior' (the logs pi_0 was cloned from) | 'policy' (deploy pi_0) | 'explore' (loop.conversations of
  # the exploratory policy, envs/policies.py; use with qfit.method=fqe, since their Q is not pi_0's).
  # 'policy' is the paper's step 1 at k = 0: Q_0 fitted on pi_0's own deployment (with randomised turns) ranks
  # pi_0's acts better than on the staff's logs (docs/results.md, finding 8: Spearman +0.34 against +0.16).
  c.loop.first_data = "policy"
  c.loop.conversations = 768  # |D_k| logged with pi_k per iteration (k >= 1, or k = 0 with first_data=policy)
  c.loop.eval_conversations = 400  # held-out conversations per evaluation (+-4 points at 95%)
  c.loop.play_batch = 256  # conversations advanced in lock-step when a model plays
  c.loop.deploy_temperature = 1.0  # pi_k is deployed as sampled (its Q is what is fitted)
  # One randomised turn per deployed conversation: uniform over pi_k's sample and the domain's scripted acts
  # (explore.py), so Q_k can learn which action is right at a state, not only which acts pi_k likes.
  c.loop.explore_turns = True
  c.loop.explore_count = 1  # randomised turns per conversation (more: more rare pairs in D_k, a larger cost)
  # Q_k's ranking of actions against the simulator's true Q^{pi_k} (q_ranking.py), every iteration: states of
  # pi_k's evaluation conversations, pi_k's samples + the scripted acts as candidates, Monte Carlo rollouts each.
  # Under the SR business user a suggestion's effect is diluted (bad ones are rewritten), so true Q differs little
  # between candidates: 16 rollouts (s.e. ~0.05) measure it with a reliability of 0.2-0.6 (truth_reliability).
  # 16 states x ~9.5 candidates x 16 rollouts take ~1.5 min of CPU per iteration; docs/results.md used 32.
  c.loop.rank_states = 16
  c.loop.rank_policy_samples = 2
  c.loop.rank_rollouts = 16
  c.loop.true_q_states = 16  # held-out (s, a) pairs whose simulator Q is estimated each iteration
  c.loop.true_q_rollouts = 8  # Monte Carlo rollouts per pair (continuing with pi_k)
  c.loop.tensorboard = True
  # With a pretrained model_dir: first evaluate that model as loaded, before SFT (the paper's prompted pi_0)
  c.loop.eval_pretrained = False
  c.loop.logs = ""  # GLOB of the user's JSONL logs: one offline iteration, no simulator
  c.loop.skip_invalid = False  # with logs: skip (and count) invalid lines instead of failing
  c.loop.stop_after_phase = ""  # testing resume: stop after e.g. 'sft', 'collect/0', 'qfit/0'
  c.loop.stop_after_ppo_step = 0  # testing resume: stop inside PPO after this many steps

  # ---- baselines at the same conversation budget (experiments.baselines; iterppo_jax/studies/baselines.py) ----
  c.baselines = ml_collections.ConfigDict()
  c.baselines.budget = 1536  # conversations each method may play and learn from (beyond the shared behaviour logs)
  c.baselines.seeds = (0, 1, 2)  # replicates (own behaviour logs, pi_0, eval set): a 95% interval needs >= 3
  c.baselines.ks = (1, 2, 4, 8)  # Iterative PPO's K, budget / K conversations per iteration (each divides budget)
  c.baselines.iterations = 4  # K of filtered BC and of the myopic learner (the middle of ks)
  c.baselines.online_batch = 32  # conversations online PPO plays between updates (~220 decisions)
  c.baselines.online_lam = 0.95  # GAE lambda over the decisions of a conversation (online PPO)
  c.baselines.online_eval_every = 384  # conversations between online PPO's evaluations (0: only at the end)
  c.baselines.bc_steps = 50  # filtered BC SFT steps per iteration (~8 epochs of ~30 successful conversations)
  c.baselines.methods = ("behavior", "oracle", "pi0", "offline", "filtered_bc", "filtered_bc_own", "myopic",
                         "online_ppo", "iterative_ppo")  # baselines.METHODS; iterative_ppo runs every K in ks

  # ---- devices ----
  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))  # one -1 takes the remaining devices
  # (logical axis, mesh axes) pairs replacing sharding.DEFAULT_RULES' entries, e.g. (("embed", None),) to keep
  # the embedding dimension replicated; every phase of loop.run runs under these rules.
  c.mesh_rules = ()

  # ---- several processes (hosts) in one run: iterppo_jax/distributed.py, docs/multihost.md ----
  c.distributed = False  # True: join a jax.distributed run (start the same command on every host)
  c.cluster = ml_collections.ConfigDict()  # how a distributed run finds its processes
  c.cluster.coordinator = ""  # host:port of process 0; '': JAX_COORDINATOR_ADDRESS, Cloud TPU or SLURM
  c.cluster.num_processes = 0  # 0: from the cluster's environment (Cloud TPU, SLURM)
  c.cluster.process_id = -1  # this process's rank; -1: from the cluster's environment
  c.cluster.connect_timeout_s = 60.0  # processes other than 0 wait this long for the coordinator's port
  c.cluster.init_timeout_s = 300  # then jax.distributed.initialize waits this long for every process

  if args["tiny"]:
    c.sft.behavior_conversations = 80
    c.sft.steps = 6
    c.sft.batch_size = 8
    c.tokenizer.vocab_size = 400
    c.data.max_prompt_len = 96
    c.data.max_action_len = 16
    c.model.num_layers = 1
    c.model.embed_dim = 32
    c.model.mlp_dim = 64
    c.model.num_heads = 2
    c.model.num_kv_heads = 1
    c.model.head_dim = 16
    # The tests of the transformer Q-model (its fit, checkpoints, resume inside it) run on this preset;
    # tests/test_q_table.py runs the dialogue-state Q-model of the full config.
    c.qfit.view = "tokens"
    c.qfit.pool = 0  # pooling is the dialogue-state table's
    c.loop.first_data = "behavior"  # fewer plays; D_0 = pi_0's deployment is tested in tests/test_loop.py
    c.qfit.method = "mc"
    c.qfit.steps = 4
    c.qfit.batch_size = 8
    # The loop's tests (checkpoints, resume inside the improvement step, sharding) run PPO, the solver with a
    # critic; tests/test_group_pg.py runs the loop with grpo, tests/test_candidates_explore.py negotiation's
    # tiny preset, which keeps rloo.
    c.inner = "ppo"
    c.ppo.kl_coef = 0.05
    c.ppo.steps = 3
    c.ppo.batch_size = 8
    c.ppo.minibatch_size = 4
    c.ppo.checkpoint_every = 1
    c.loop.iterations = 2
    c.loop.conversations = 16
    c.loop.eval_conversations = 16
    c.loop.play_batch = 16
    c.loop.true_q_states = 2
    c.loop.true_q_rollouts = 2
    c.loop.rank_states = 2
    c.loop.rank_policy_samples = 1
    c.loop.rank_rollouts = 2
    c.num_conversations = 200
    c.batch_size = 64
    c.baselines.budget = 16
    c.baselines.seeds = (0,)
    c.baselines.ks = (1, 2)
    c.baselines.iterations = 2
    c.baselines.online_batch = 8
    c.baselines.online_eval_every = 8
    c.baselines.bc_steps = 2
  return c


def _optimizer_section(learning_rate, warmup_steps):
  s = ml_collections.ConfigDict()
  s.learning_rate = learning_rate  # peak AdamW rate after linear warmup
  s.warmup_steps = warmup_steps
  s.weight_decay = 0.0
  s.clip_norm = 1.0  # global gradient-norm clip
  s.grad_accum = 1  # micro-batches per optimizer update
  return s
