# 16-GRPO, the paper's baseline, scaled down to the embedded default (SmolLM2-135M-Instruct, synthetic:1).
# Same prompts per step as grpo2.py (32) but 16 rollouts each, split into 8 mini-batches of 4 prompts x 16 = 64
# rollouts (equal rollouts per mini-batch), lr / 8 (linear lr-batch scaling in prompts, paper section 3.2). The policy
# moves between the 8 updates of a step, so the old/new ratio and clip-higher act as in verl.
# Expected on a 2-core CPU: ~8x the rollouts of grpo2.py; roughly 1-2 min a step, ~30-40 min for 20 steps.
algo = "grpo"
k = 16
prompts_per_step = 32
prompts_per_update = 4
lr = 1.25e-6
num_steps = 20
out_dir = "out/grpo16"
