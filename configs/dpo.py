# Online DPO (Eq. 9) on the embedded default: 2 rollouts per prompt, (correct, incorrect) pairs, frozen reference =
# the initial policy, summed sequence log-probs. The paper only links GRPO and DPO analytically (Lemma B.1); this is
# the experiment it does not run. Offline DPO: --algo=dpo_offline --data=prefs.jsonl (prompt, chosen, rejected).
# Expected on a 2-core CPU: ~10 min for 20 steps (a reference forward per kept pair on top of 2-GRPO's cost).
algo = "dpo"
k = 2
beta = 0.1
prompts_per_step = 32
prompts_per_update = 32
lr = 1e-5
num_steps = 20
out_dir = "out/dpo"
