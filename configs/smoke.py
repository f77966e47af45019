# smoke test: the whole loop in well under a minute on a 2-core CPU, with the built-in default model (or --model=...):
#   python train.py configs/smoke.py
# Expected: 2 steps with a log line each, a held-out eval at the end, a checkpoint in out/smoke/ckpt.pt.
num_steps = 2
prompts_per_step = 4
prompts_per_update = 2
max_new_tokens = 16
eval_every = 0
eval_n = 8
sample_every = 1
out_dir = "out/smoke"
