"""The studies of issue #10 and after, each a library module that the thin mains in experiments/ call.

  baselines           other methods at Iterative PPO's conversation budget (filtered BC, online PPO, ...)
  ablate_q            the Q-quality ablation: degrade Q on purpose, watch Q's error, pi_{k+1} and the bound
  ablate_inner        the inner-solver ablation: ppo, grpo and rloo from the same pi_0 and Q_0
  q_ranking_ablation  Q-model variants refitted on one run's logs, ranked against its true Q (issue #16)
  policy_shift        what each iteration did to the policy, and whether it climbed Q_k (from a run's files)
  q_eval              Q-models fitted several ways on the same logs, scored against the simulator's true Q
  q_representation_probe  what a Q-model's features hold of the dialogue state (linear probes)
  scaling             how fast the simulator plays with growing batches and processes
  benchmark           the jitted pieces timed on random tokens, and their tables (issue #7)
  export_check        Hugging Face exports generated from by transformers and by us (vLLM's side: experiments)
  config_readers      each setting's readers in the source (issue #17)
  report              a run's table and plot, and the whole report (simulator tables, the studies above, the bound)

None of them defines a flag: they take a config (and a workdir), and return rows or write tables and plots. An entry
point imports no other entry point: what two of them share lives here.
"""
