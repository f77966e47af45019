# 2-GRPO+RS (paper v3 section 4.3): like grpo2.py, but pairs with equal rewards are replaced by pairs from fresh
# prompts until the mini-batch is full or the step has used 16-GRPO's rollout budget (32 prompts x 16).
# Expected on a 2-core CPU: 2-3x the rollouts of grpo2.py per step early on, fewer as accuracy rises; ~15 min.
algo = "grpo"
k = 2
resample = True
rs_max_k = 16
prompts_per_step = 32
prompts_per_update = 32
lr = 1e-5
num_steps = 20
out_dir = "out/grpo2_rs"
